"""The SMMUv3 driver's domains: a paging domain of stage 1 (ASID) or 2 (VMID, nest parents)
on the framework's :class:`~iommufd_model.paging.PagingDomain`, with its invalidation array,
and the nested domain a vSMMU builds from a validated vSTE (arm-smmu-v3-iommufd.c).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from iommufd_arm_smmuv3.invs import Invs
from iommufd_arm_smmuv3.pgtable import pgtable_cfg
from iommufd_arm_smmuv3.ste import CFG_ABORT, STE0_V
from iommufd_model import driver as api
from iommufd_model.errors import err
from iommufd_model.hw.bits import get
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.paging import IotlbGather, PagingDomain

if TYPE_CHECKING:
    from iommufd_arm_smmuv3.kernel import SmmuDevice
    from iommufd_arm_smmuv3.viommu import Vsmmu


class SmmuDomain(PagingDomain[RadixPageTable]):
    """A paging domain: stage 1 (ASID) or, for nest parents, stage 2 (VMID).

    ``invs`` is the domain's invalidation array: empty until a master attaches (7.2 flushes
    nothing for a domain nobody uses), the tag flushed when its last master leaves.
    """

    def __init__(
        self,
        smmu: SmmuDevice,
        stage: int,
        *,
        nest_parent: bool,
        pasid: bool,
        dirty_tracking: bool = False,
    ) -> None:
        fwb = nest_parent and smmu.feat_s2fwb  # IO_PGTABLE_QUIRK_ARM_S2FWB
        # arm_smmu_domain_finalise(): stage 1 takes min(52 with VAX else 48, VA_BITS) input
        # bits, stage 2 the OAS; io-pgtable-arm picks the granule and clamps both
        ias = min(52 if smmu.feat_vax else 48, smmu.hw.host_va_bits) if stage == 1 else smmu.oas
        cfg = pgtable_cfg(smmu.pgsize_bitmap, ias, smmu.oas, stage)
        if cfg is None:  # alloc_io_pgtable_ops() fails
            raise err(errno.ENOMEM, "no translation granule in the SMMU's page sizes")
        self.cfg = cfg
        fmt = cfg.format(hd=dirty_tracking, fwb=fwb)
        super().__init__(
            smmu.hw,
            RadixPageTable(smmu.hw.memory, fmt),
            pgsize_bitmap=cfg.pgsize_bitmap,
            aperture_start=0,
            aperture_end=(1 << cfg.ias) - 1,
            nest_parent=nest_parent,
            dirty_tracking=dirty_tracking,
            pasid_compat=pasid,
        )
        self.smmu = smmu
        self.stage = stage
        try:  # ENOSPC when the space is full
            self.asid = smmu.asids.alloc() if stage == 1 else 0
            self.vmid = smmu.vmids.alloc() if stage == 2 else 0
        except OSError:
            self.pt.free()
            raise
        self.invs = Invs()

    def iotlb_sync(self, gather: IotlbGather) -> None:
        """arm_smmu_iotlb_sync() of the unmap's gather, as io-pgtable-arm fills it: each leaf
        joins the gathered range; a leaf of another page size, or after a hole, first flushes
        what was gathered (iommu_iotlb_gather_add_page)."""
        ranges: list[list[int]] = []  # [start, end (exclusive), page size]
        for start, size, pgsize in gather.runs:
            last = ranges[-1] if ranges else None
            if last is not None and last[2] == pgsize and last[1] == start:
                last[1] = start + size
            else:
                ranges.append([start, start + size, pgsize])
        for start, end, pgsize in ranges:
            self.smmu.tlb_inv_range(self, start, end - start, pgsize)

    def free(self) -> None:
        """arm_smmu_domain_free_paging(): only the ASID / VMID goes back; no command (the tag
        was flushed when the last master left the domain's invalidation array)."""
        super().free()
        if self.stage == 1:
            self.smmu.asids.free(self.asid)
        else:
            self.smmu.vmids.free(self.vmid)


class NestedDomain(api.Domain):
    """``struct arm_smmu_nested_domain``: a validated vSTE over the vSMMU's stage 2."""

    def __init__(self, vsmmu: Vsmmu, ste0: int, ste1: int, enable_ats: bool) -> None:
        super().__init__(vsmmu.owner, api.DomainType.NESTED, parent=vsmmu.parent)
        self.vsmmu = vsmmu
        self.ste0 = ste0
        self.ste1 = ste1
        self.enable_ats = enable_ats

    @property
    def cfg(self) -> int:
        return get(self.ste0, 3, 1) if self.ste0 & STE0_V else CFG_ABORT

    @property
    def s2_parent(self) -> SmmuDomain:
        """Whose invalidation array a master attached here joins (to_smmu_domain_devices)."""
        return self.vsmmu.s2_parent
