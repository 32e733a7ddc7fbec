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

import inspect
from typing import Any

from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.hw import Smmuv3
from iommufd_model.api import Feature, OptionSet

_PROBE_DEFAULTS = {
    name: p.default for name, p in inspect.signature(Smmuv3.__init__).parameters.items()
}


def httu_lacks(options: dict[str, Any]) -> frozenset[Feature]:
    """DIRTY_TRACKING when the SMMU these probe options build does not say it in IDR0: the
    IDR0.HTTU the hardware model reports (``regs.idr0_httu``) and IDR0.COHACC, read as Linux
    7.2's ``arm_smmu_dbm_capable()`` reads them (``regs.dbm_capable``). Every option set takes
    its dirty tracking from here, so the matrix expects exactly what hw_info and the
    DIRTY_TRACKING allocation say for that SMMU (and names their refusal as the reason)."""

    def opt(name: str) -> Any:
        return options.get(name, _PROBE_DEFAULTS[name])

    httu = R.idr0_httu(access=bool(opt("hw_access_flag")), dirty=bool(opt("hw_dirty")))
    dirty = R.dbm_capable(httu | R.IDR0_COHACC)  # the model's SMMU is always coherent
    return frozenset() if dirty else frozenset({Feature.DIRTY_TRACKING})


def smmu_set(name: str, options: dict[str, Any], **kw: Any) -> OptionSet:
    """An option set whose ``lacks`` also holds what :func:`httu_lacks` derives."""
    lacks = frozenset(kw.pop("lacks", frozenset())) | httu_lacks(options)
    return OptionSet(name, options, lacks=lacks, **kw)


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
    smmu_set("ssid8", {"ssid_bits": 8}, doc="IDR1.SSIDSIZE: 8-bit SubstreamIDs"),
    smmu_set("linear-cd", {"cd2l": False}, doc="no IDR0.CD2L: linear CD tables only"),
    smmu_set(
        "no-ril",
        {"range_invalidation": False},
        doc="no IDR3.RIL: TLB invalidation one page at a time",
    ),
    smmu_set("s2fwb", {"s2fwb": True}, doc="IDR3.FWB: stage 2 forces write-back"),
    smmu_set(
        "no-httu-dirty",
        {"hw_dirty": False},
        doc="IDR0.HTTU = 0b01 (access flag only): no dirty tracking",
    ),
    smmu_set(
        "no-httu",
        {"hw_dirty": False, "hw_access_flag": False},
        doc="IDR0.HTTU = 0b00: no hardware access-flag or dirty-state update, no dirty tracking",
    ),
    smmu_set(
        "no-cmdqv",
        {"cmdqv": False},
        lacks=frozenset({Feature.HW_QUEUE}),
        doc="no Tegra241 CMDQV: no hardware-accelerated guest command queue",
    ),
    smmu_set("tlb16", {"tlb_capacity": 16}, doc="a 16-entry TLB: eviction under load"),
    smmu_set(
        "stall",
        {"stall_force": True},
        adds=frozenset({Feature.IOPF}),
        doc="IDR0.STALL_MODEL = FORCE: every master stalls, so faults go to IOPF",
    ),
    smmu_set(
        "stall-dma",
        {"stalls": True, "dma_can_stall": True},
        adds=frozenset({Feature.IOPF}),
        doc="IDR0.STALL_MODEL = 0b00 and firmware marks the masters dma-can-stall: they stall "
        "(STE.S1STALLD clear, CD.S / STE.S2S set), so their faults go to IOPF",
    ),
    smmu_set(
        "e2h",
        {"hyp": True},
        doc="IDR0.HYP on a VHE host: E2H, EL2 StreamWorld stage 1 and TLBI_EL2_* commands",
    ),
    smmu_set(
        "gran16k",
        {"granules": (12, 14)},
        doc="IDR5.GRAN4K and GRAN16K: the host's domains stay 4 KiB (io-pgtable-arm prefers "
        "PAGE_SIZE), hw_info's IDR5 offers 16 KiB to a guest's own stage 1",
    ),
    smmu_set(
        "gran64k",
        {"granules": (12, 16)},
        doc="IDR5.GRAN4K and GRAN64K: 4 KiB host domains, 64 KiB offered to guests",
    ),
    smmu_set(
        "va52",
        {"granules": (12, 16), "oas": 52, "vax": True, "host_va_bits": 52},
        doc="IDR5.OAS = 52 bits, VAX, on a 52-bit VA host: the 4 KiB granule caps the host's "
        "domains at 48 bits (arm_lpae_restrict_pgsizes); 52 bits need 64 KiB",
    ),
    smmu_set(
        "s1-only",
        {"s2p": False},
        lacks=NO_NESTING,
        doc="no IDR0.S2P: stage-1 domains only, no nest parent, no vSMMU",
    ),
    smmu_set(
        "s2-only",
        {"s1p": False},
        lacks=NO_NESTING | {Feature.PASID, Feature.DIRTY_TRACKING},
        doc="no IDR0.S1P: every paging domain is stage 2 (no substreams, no dirty tracking, "
        "no nesting)",
    ),
)
