"""The SMMUv3 configurations ``iommufd-model matrix --sweep`` runs every scenario under.

Each is a set of ``probe`` options (``PROBE_OPTIONS`` in :mod:`iommufd_arm_smmuv3.driver`):
the substream (PASID) width (IDR1.SSIDSIZE), the CD table layout (2-level or linear,
IDR0.CD2L), range invalidation (IDR3.RIL), hardware dirty state (IDR0.HTTU), stage-2 forced
write-back (IDR3.FWB), the Tegra241 CMDQV extension, the TLB's size, the stall model
(IDR0.STALL_MODEL FORCE, or 0b00 with "dma-can-stall" masters: only stalling masters have IO
page faults in Linux 7.2), E2H (IDR0.HYP on a host running at EL2 with VHE), the translation
stages implemented (IDR0.S1P / S2P) and the translation granules and address sizes
(IDR5.GRAN4K/16K/64K, OAS, VAX). On the model's 4 KiB PAGE_SIZE host, Linux 7.2's io-pgtable-arm
uses the 4 KiB granule whenever IDR5 offers it, and iommufd refuses a domain whose smallest page
exceeds PAGE_SIZE (iopt_table_add_domain: EINVAL), so every set keeps GRAN4K: an SMMU without it
has no domain iommufd can use on such a host (plugins/arm_smmuv3/tests/test_granules.py shows
the driver's 16 / 64 KiB domains below iommufd).
"""

from iommufd_model.api import Feature, OptionSet

#: What an SMMU without one of the stages lacks: ARM_SMMU_FEAT_NESTING needs both, and every
#: vSMMU object hangs off a nest parent.
NO_NESTING = frozenset(
    {
        Feature.NEST_PARENT,
        Feature.NESTED,
        Feature.VIOMMU,
        Feature.VDEVICE,
        Feature.VEVENTQ,
        Feature.VIOMMU_INVALIDATE,
        Feature.HW_QUEUE,
    }
)

OPTION_SETS = (
    OptionSet("ssid8", {"ssid_bits": 8}, doc="IDR1.SSIDSIZE: 8-bit SubstreamIDs"),
    OptionSet("linear-cd", {"cd2l": False}, doc="no IDR0.CD2L: linear CD tables only"),
    OptionSet(
        "no-ril",
        {"range_invalidation": False},
        doc="no IDR3.RIL: TLB invalidation one page at a time",
    ),
    OptionSet("s2fwb", {"s2fwb": True}, doc="IDR3.FWB: stage 2 forces write-back"),
    OptionSet(
        "no-httu-dirty",
        {"hw_dirty": False},
        lacks=frozenset({Feature.DIRTY_TRACKING}),
        doc="IDR0.HTTU without dirty-state update: no dirty tracking",
    ),
    OptionSet(
        "no-cmdqv",
        {"cmdqv": False},
        lacks=frozenset({Feature.HW_QUEUE}),
        doc="no Tegra241 CMDQV: no hardware-accelerated guest command queue",
    ),
    OptionSet("tlb16", {"tlb_capacity": 16}, doc="a 16-entry TLB: eviction under load"),
    OptionSet(
        "stall",
        {"stall_force": True},
        adds=frozenset({Feature.IOPF}),
        doc="IDR0.STALL_MODEL = FORCE: every master stalls, so faults go to IOPF",
    ),
    OptionSet(
        "stall-dma",
        {"stalls": True, "dma_can_stall": True},
        adds=frozenset({Feature.IOPF}),
        doc="IDR0.STALL_MODEL = 0b00 and firmware marks the masters dma-can-stall: they stall "
        "(STE.S1STALLD clear, CD.S / STE.S2S set), so their faults go to IOPF",
    ),
    OptionSet(
        "e2h",
        {"hyp": True},
        doc="IDR0.HYP on a VHE host: E2H, EL2 StreamWorld stage 1 and TLBI_EL2_* commands",
    ),
    OptionSet(
        "gran16k",
        {"granules": (12, 14)},
        doc="IDR5.GRAN4K and GRAN16K: the host's domains stay 4 KiB (io-pgtable-arm prefers "
        "PAGE_SIZE), hw_info's IDR5 offers 16 KiB to a guest's own stage 1",
    ),
    OptionSet(
        "gran64k",
        {"granules": (12, 16)},
        doc="IDR5.GRAN4K and GRAN64K: 4 KiB host domains, 64 KiB offered to guests",
    ),
    OptionSet(
        "va52",
        {"granules": (12, 16), "oas": 52, "vax": True, "host_va_bits": 52},
        doc="IDR5.OAS = 52 bits, VAX, on a 52-bit VA host: the 4 KiB granule caps the host's "
        "domains at 48 bits (arm_lpae_restrict_pgsizes); 52 bits need 64 KiB",
    ),
    OptionSet(
        "s1-only",
        {"s2p": False},
        lacks=NO_NESTING,
        doc="no IDR0.S2P: stage-1 domains only, no nest parent, no vSMMU",
    ),
    OptionSet(
        "s2-only",
        {"s1p": False},
        lacks=NO_NESTING | {Feature.PASID, Feature.DIRTY_TRACKING},
        doc="no IDR0.S1P: every paging domain is stage 2 (no substreams, no dirty tracking, "
        "no nesting)",
    ),
)
