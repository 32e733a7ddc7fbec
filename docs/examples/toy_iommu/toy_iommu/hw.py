"""The toy IOMMU as hardware: a context table (RID -> root, domain ID), radix page tables in
machine memory, an IOTLB tagged by domain ID and one invalidation command.

Everything hard is shared with the real vendors: the page-table format is a
:class:`~iommufd_model.hw.radix.PtFormat` (five small methods), the walk is the engine's
reference :func:`~iommufd_model.hw.radix.walk`, the cache is an
:class:`~iommufd_model.hw.iotlb.Iotlb`. The toy format is its own invention (no real IOMMU
encodes entries this way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommufd_model.api import (
    INVALID,
    IOMMU_READ,
    IOMMU_WRITE,
    LEAF,
    TABLE,
    FastPath,
    Ida,
    IommuHw,
    Iotlb,
    PtFormat,
    TlbEntry,
    WalkResult,
    page_run,
    walk,
)

if TYPE_CHECKING:
    from iommufd_model.api import Machine, PciDevice

# A toy page-table entry: bit 0 valid, bit 1 readable, bit 2 writable, bit 3 "points to a
# table", bits 12..51 the address.
V, R, W, T = 1, 2, 4, 8
ADDR = ((1 << 52) - 1) & ~0xFFF


class ToyFormat(PtFormat):
    """Three 9-bit levels (39-bit IOVAs), 4 KiB leaves and 2 MiB leaves at level 1."""

    name = "toy"
    large_leaf_levels = frozenset({1})
    linear_leaves = True  # a leaf differs from the next page's only in its address field

    def make_table(self, table_pa: int, level: int) -> int:
        return table_pa | T | V

    def make_leaf(self, pa: int, level: int, prot: int) -> int:
        rw = (R if prot & IOMMU_READ else 0) | (W if prot & IOMMU_WRITE else 0)
        return pa | rw | V

    def decode(self, entry: int, level: int) -> tuple[int, int, int]:
        if not entry & V:
            return INVALID, 0, 0
        if entry & T:
            return TABLE, entry & ADDR, IOMMU_READ | IOMMU_WRITE
        prot = (IOMMU_READ if entry & R else 0) | (IOMMU_WRITE if entry & W else 0)
        return LEAF, entry & ADDR, prot


FORMAT = ToyFormat(levels=3)


class ToyIommu(IommuHw):
    """One toy IOMMU: per-RID context entries, an IOTLB, no PASID."""

    def __init__(self, machine: Machine, index: int) -> None:
        super().__init__(machine, index)
        self.context: dict[int, tuple[int, int]] = {}  # RID -> (table root, domain ID)
        self.iotlb = Iotlb()
        # The driver's domain IDs (kept here for brevity): the kit checks none leaks.
        self.domain_ids = Ida("domain ID", 1, 255, owner=self)

    def translate(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        self.stats.translations += 1
        ctx = self.context.get(dev.rid) if pasid is None else None
        if ctx is None:
            raise self.fault(dev, iova, write, pasid, "blocked")
        root, domid = ctx
        need = IOMMU_WRITE if write else IOMMU_READ
        hit = self.iotlb.lookup(domid, iova)
        if hit is not None:
            self.stats.iotlb_hits += 1
            if not hit.perm & need:
                raise self.fault(dev, iova, write, pasid, "permission")
            offset = iova & ((1 << hit.shift) - 1)
            return hit.pa + offset, page_run(iova, 1 << hit.shift)
        self.stats.iotlb_misses += 1
        res = walk(self.memory, FORMAT, root, iova, write)
        self.stats.walk_mem_refs += res.mem_refs
        if not isinstance(res, WalkResult):
            raise self.fault(dev, iova, write, pasid, res.reason)
        size = 1 << res.shift
        base = iova & ~(size - 1)
        self.iotlb.insert(domid, base, TlbEntry(res.pa - (iova - base), res.shift, res.prot))
        return res.pa, page_run(iova, size)

    def iotlb_fast(self, dev: PciDevice, pasid: int | None, write: bool) -> FastPath | None:
        """The rest of a burst is looked up in the IOTLB natively (an optional speed-up)."""
        ctx = self.context.get(dev.rid) if pasid is None else None
        if ctx is None:
            return None
        return self.iotlb, ctx[1], IOMMU_WRITE if write else IOMMU_READ

    def invalidate(self, domid: int, first: int = 0, last: int = (1 << 64) - 1) -> None:
        """The toy's one command: drop the domain's cached translations in a range."""
        self.stats.commands += 1
        self.iotlb.flush_range(lambda tag: tag == domid, first, last)
