"""The VT-d driver's domains (``struct dmar_domain``): a kernel-owned paging domain of one stage
(first-stage x86-64 or second-stage tables, on the framework's
:class:`~iommufd_model.paging.PagingDomain`) and a user stage-1 domain nested over a
second-stage nest parent (nested.c), with the DID and cache tags every dmar_domain carries.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import attrs

from iommufd_intel_vtd import regs as R
from iommufd_intel_vtd import tables as T
from iommufd_intel_vtd.pgtable import SecondStageFormat
from iommufd_model.api import IOMMU_WRITE, Domain, DomainType, err
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.x86_64 import X86_64Format
from iommufd_model.paging import IotlbGather, PagingDomain
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_intel_vtd.hw import IntelVtd
    from iommufd_intel_vtd.kernel import IommuState


CACHE_TAG_IOTLB, CACHE_TAG_DEVTLB, CACHE_TAG_NESTING_IOTLB, CACHE_TAG_NESTING_DEVTLB = range(4)


@attrs.define
class CacheTag:
    """``struct cache_tag`` (cache.c): one cache a domain's translations may sit in."""

    type: int  # CACHE_TAG_*
    did: int
    pasid: int
    rid: int  # the device of a DEVTLB tag; -1 for IOTLB tags (one per IOMMU)
    users: int = 1


class DomainIds:
    """What every dmar_domain carries: its DID on the unit (allocated at the first attach,
    freed at the last detach: domain_attach_iommu / domain_detach_iommu) and its cache tags
    in assignment order (cache_tag_assign: a new tag goes after the unit's last tag)."""

    did: int | None
    did_refs: int
    tags: list[CacheTag]

    def init_ids(self) -> None:
        self.did = None
        self.did_refs = 0
        self.tags = []


class VtdPaging(PagingDomain[RadixPageTable], DomainIds):
    """A kernel-owned paging domain (``struct dmar_domain``) of one stage."""

    def __init__(self, hw: IntelVtd, state: IommuState, *, first_stage: bool, flags: int) -> None:
        if first_stage:
            levels = state.fs_levels
            fmt: Any = X86_64Format(levels)
            if not hw.cap & R.CAP_FL1GP:
                fmt.large_leaf_levels = frozenset({1})
            va_bits = fmt.va_bits - 1  # canonical lower half only
            pgsizes = 1 << 12 | 1 << 21 | ((1 << 30) if hw.cap & R.CAP_FL1GP else 0)
        else:
            fmt = SecondStageFormat(T.aw_levels(state.agaw), hw.sllps)
            va_bits = min(fmt.va_bits, hw.mgaw)
            pgsizes = 1 << 12 | sum(1 << fmt.level_shift(lv) for lv in fmt.large_leaf_levels)
        super().__init__(
            hw,
            RadixPageTable(hw.memory, fmt),
            pgsize_bitmap=pgsizes,
            aperture_start=0,
            aperture_end=(1 << va_bits) - 1,
            nest_parent=bool(flags & U.IOMMU_HWPT_ALLOC_NEST_PARENT),
            dirty_tracking=bool(flags & U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING),
            pasid_compat=bool(flags & U.IOMMU_HWPT_ALLOC_PASID),
        )
        self.init_ids()
        self.hw = hw
        self.state = state  # the unit's driver state, which flushes for this domain
        self.first_stage = first_stage
        self.attached: set[tuple[int, int]] = set()  # (rid, pasid)
        self.children: list[VtdNested] = []
        self.tracking = False  # intel's dmar_domain->dirty_tracking (enabled state)
        self.force_snooping = False  # enforce_cache_coherency() was called and held

    def check_map(self, iova: int, size: int, prot: int) -> None:
        """intel_iommu_map()'s checks before the table."""
        if self.nest_parent and not prot & IOMMU_WRITE:
            # ERRATA_772415_SPR17: no read-only mapping in a nest parent.
            raise err(errno.EINVAL, "read-only mapping in a nest parent")
        if iova + size - 1 > self.aperture_end:
            raise err(errno.EFAULT, "mapping beyond the domain's address width")

    def iotlb_sync(self, gather: IotlbGather) -> None:
        """intel_iommu_tlb_sync(): generic_pt frees every table the range covers whole; the
        flush then has IH = 0 (paging-structure caches too), else IH = 1 (leaves only).
        Nothing when nothing was unmapped."""
        if gather.runs:
            frees_tables = self.pt.covers_a_table(gather.first, gather.last)
            self.state.flush_range(self, gather.first, gather.last, not frees_tables)


class VtdNested(Domain, DomainIds):
    """A user stage-1 domain over a nest-parent second-stage domain (nested.c)."""

    def __init__(
        self, hw: IntelVtd, state: IommuState, parent: VtdPaging, cfg: U.IommuHwptVtdS1, flags: int
    ) -> None:
        super().__init__(
            hw,
            DomainType.NESTED,
            parent=parent,
            pasid_compat=bool(flags & U.IOMMU_HWPT_ALLOC_PASID),
        )
        self.init_ids()
        self.hw = hw
        self.s2 = parent
        self.cfg = cfg
        self.attached: set[tuple[int, int]] = set()


VtdDomain = VtdPaging | VtdNested
