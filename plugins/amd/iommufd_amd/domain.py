"""The AMD driver's domains: ``struct protection_domain`` of a paging domain (v1 host or
v2 x86-64 tables, on the framework's :class:`~iommufd_model.paging.PagingDomain`) and the
nested domain of a vIOMMU (guest DTE words over its nest parent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommufd_amd.gcr3 import V2PageTable
from iommufd_amd.pgtable_v1 import AMD_IOMMU_PGSIZES, AmdV1PageTable
from iommufd_amd.viommu import AmdViommu, GdomInfo
from iommufd_model.api import Domain, DomainType
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.paging import IotlbGather, PagingDomain
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_amd.hw import AmdIommu
    from iommufd_amd.kernel import AmdKernel

PGSIZES_V2 = (1 << 12) | (1 << 21) | (1 << 30)  # AMD_IOMMU_PGSIZES_V2


class AmdDomain(PagingDomain[RadixPageTable]):
    """``struct protection_domain`` of a paging domain: v1 (host) or v2 (x86-64) tables."""

    def __init__(self, kernel: AmdKernel, flags: int, *, v2: bool) -> None:
        hw = kernel.hw
        self.v2 = v2
        pt: RadixPageTable
        if v2:
            levels = kernel.gpt_levels
            self.mode = 0
            pt = V2PageTable(kernel.mem, levels)
            pgsizes = PGSIZES_V2
            end = (1 << (56 if levels == 5 else 47)) - 1  # no sign extension: lower half
        else:
            self.mode = min(kernel.domain_levels, hw.max_mode)
            pt = AmdV1PageTable(kernel.mem, self.mode)
            pgsizes = AMD_IOMMU_PGSIZES
            end = min((1 << pt.fmt.va_bits) - 1, (1 << 64) - 1)
        super().__init__(
            hw,
            pt,
            pgsize_bitmap=pgsizes,
            aperture_start=0,
            aperture_end=end,
            nest_parent=bool(flags & U.IOMMU_HWPT_ALLOC_NEST_PARENT),
            dirty_tracking=bool(flags & U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING),
            pasid_compat=v2,
        )
        self.kernel = kernel
        try:
            self.id = kernel.domids.alloc()
        except OSError:
            self.pt.free()
            raise
        self.attached: set[tuple[int, int]] = set()  # (devid, pasid; 0 for the RID)
        self.viommus: list[AmdViommu] = []

    def iotlb_sync(self, gather: IotlbGather) -> None:
        """amd_iommu_iotlb_sync(): PDE only when the unmap freed a table (generic_pt frees
        every table the range covers whole: the gather's free list is not empty)."""
        frees_table = self.pt.covers_a_table(gather.first, gather.last)
        self.kernel.flush_domain(
            self, gather.first, gather.last - gather.first + 1, pde=frees_table
        )

    def free(self) -> None:
        super().free()
        self.kernel.domids.free(self.id)


class AmdNestedDomain(Domain):
    """``struct nested_domain``: guest DTE words over the vIOMMU's nest parent."""

    def __init__(
        self, hw: AmdIommu, viommu: AmdViommu, gdte: tuple[int, int, int, int], info: GdomInfo
    ) -> None:
        parent = viommu.parent
        assert isinstance(parent, AmdDomain)
        super().__init__(hw, DomainType.NESTED, parent=parent)
        self.parent_domain = parent
        self.viommu = viommu
        self.gdte = gdte
        self.gdom_id = gdte[1] & 0xFFFF
        self.ginfo = info
