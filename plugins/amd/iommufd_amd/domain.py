"""The AMD driver's domains: ``struct protection_domain`` of a paging domain (v1 host or
v2 x86-64 tables, on the framework's :class:`~iommufd_model.paging.PagingDomain`) and the
nested domain of a vIOMMU (guest DTE words over its nest parent).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from iommufd_amd.gcr3 import V2PageTable
from iommufd_amd.pgtable_v1 import AMD_IOMMU_PGSIZES, MAX_MODE, AmdV1PageTable, best_leaf_level
from iommufd_amd.viommu import AmdViommu, GdomInfo
from iommufd_model.api import Domain, DomainType, err
from iommufd_model.hw.memory import PAGE_SHIFT
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
            pt = V2PageTable(kernel.mem, levels)
            pgsizes = PGSIZES_V2
            end = (1 << (56 if levels == 5 else 47)) - 1  # no sign extension: lower half
        else:
            # amd_iommu_domain_alloc_paging_v1(): generic_pt amdv1 with PT_FEAT_DYNAMIC_TOP,
            # max_vasz_lg2 = amd_iommu_hpt_vasize. The aperture is the largest top's reach
            # (pt_iommu_init_domain); page sizes stop below 2^(max_vasz_lg2 - 1) (get_info).
            vasz = kernel.hpt_vasize
            pt = AmdV1PageTable(kernel.mem, min(kernel.domain_levels, hw.max_mode))
            pgsizes = AMD_IOMMU_PGSIZES & ((1 << (vasz - 1)) - 1)
            end = (1 << vasz) - 1
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

    @property
    def mode(self) -> int:
        """The DTE Mode of a v1 domain (its table's levels now); 0 for v2 (no host table)."""
        return self.pt.mode if isinstance(self.pt, AmdV1PageTable) else 0

    def map(self, iova: int, pa: int, size: int, prot: int, pgsize: int = 0) -> None:
        """generic_pt ``map_range()``: a v1 table whose top cannot reach the range, or cannot
        hold its leaves, grows first (``check_map_range()`` -> ``increase_top()``: ERANGE
        past the largest top ``amd_iommu_hpt_vasize`` allows), then the driver's
        ``change_top`` rewrites the DTEs (:meth:`AmdKernel.change_top`). A map that then fails
        leaves the grown top, as in 7.2."""
        if isinstance(self.pt, AmdV1PageTable) and size > 0:
            self.check_map(iova, size, prot)
            pgsizes = self.pgsize_bitmap & ((pgsize << 1) - 1) if pgsize else self.pgsize_bitmap
            leaf = best_leaf_level(pgsizes, iova, pa, size)
            mode = self.pt.mode_for(iova + size - 1, leaf)
            if mode != self.pt.mode:
                top_item = PAGE_SHIFT + 9 * (mode - 1)  # item size of the new top level
                if mode > MAX_MODE or top_item >= self.kernel.hpt_vasize:
                    raise err(errno.ERANGE, f"{iova:#x}+{size:#x} beyond the largest v1 top")
                self.pt.grow(mode)
                self.kernel.change_top(self)
        super().map(iova, pa, size, prot, pgsize)

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
