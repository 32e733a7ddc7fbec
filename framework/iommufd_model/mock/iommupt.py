"""The mock paging domain's page table: Linux 7.2's generic_pt AMDv1 "mock" format.

Linux 7.2's self-test driver builds its paging domains with generic_pt
(drivers/iommu/generic_pt/fmt/iommu_mock.c: the AMDv1 format with ``AMDV1_IOMMUFD_SELFTEST``,
set up by ``mock_domain_alloc_pgtable()`` in drivers/iommu/iommufd/selftest.c). The facts
kept here, all from fmt/amdv1.h, iommu_pt.h and pt_iter.h:

- a 2 KiB granule, 512 eight-byte items per 4 KiB table, starting level 2 and no dynamic
  top: item sizes are 2 KiB (level 0), 1 MiB (level 1) and 512 MiB (level 2), and the IOVA
  space is 38 bits;
- every power of two from an item's size up to 256 items is a leaf size at that level (the
  AMDv1 page-size encoding writes the leaf into 2^n consecutive items); ``get_info()`` hides
  sizes of a whole top-level table, so the page sizes are ``GENMASK(36, 11)``;
  ``MOCK_IOMMUPT_HUGE`` narrows them to 1 MiB | PAGE_SIZE;
- map picks, for each step, the largest page size that IOVA and physical address are aligned
  to and that fits the rest of the range (``pt_compute_best_pgsize``); a range not aligned
  to any page size is ENXIO, one that overlaps a present entry EADDRINUSE;
- unmap starting inside a leaf is EINVAL (nothing unmapped); a range ending inside a leaf
  removes the whole leaf (the return value is larger than asked); an empty item stops it;
- the dirty bit (D, bit 6) is per item: ``set_dirty`` (the self-test's DIRTY op) marks the
  item containing the IOVA; a leaf reads dirty when any of its items is; read-and-clear
  reports a multi-item leaf from the visited item up to, not including, the last item of
  the leaf or of the walked range within that table (``record_dirty()`` computes the end as
  the group's last index, not one past it), and clears D on all of its items;
- read-and-clear does not look at whether tracking is enabled.

The model keeps the table logically, one entry per 2 KiB of IOVA (what the mock checks and
DMA need), not as AMDv1 bytes in memory: no uAPI exposes the mock's table memory. That is
the model's own representation, and so is the index of dirty items beside it
(``MockPageTable.dirty``), which lets read-and-clear visit only the leaves it reports.
"""

from __future__ import annotations

import errno
from collections import deque
from typing import TYPE_CHECKING

from iommufd_model.errors import err

if TYPE_CHECKING:
    from iommufd_model.paging import IotlbGather

GRANULE_SHIFT = 11  # PT_GRANULE_LG2SZ of the mock variant
ITEMS_LG2 = 9  # 4 KiB tables of 8-byte items
TOP_LEVEL = 2  # cfg.starting_level, no PT_FEAT_DYNAMIC_TOP
VASZ_LG2 = GRANULE_SHIFT + ITEMS_LG2 * (TOP_LEVEL + 1)  # 38
MOCK_IOMMUPT_DEFAULT = 0
MOCK_IOMMUPT_HUGE = 1
MOCK_HUGE_PAGE_SIZE = 512 << GRANULE_SHIFT  # 1 MiB


def _genmask(hi: int, lo: int) -> int:
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


# The union of every level's possible sizes, without a whole top table (bit VASZ_LG2 - 1).
PGSIZE_BITMAP = _genmask(VASZ_LG2 - 2, GRANULE_SHIFT)

# Entry layout: the 2 KiB-aligned physical address, the IOMMU_READ/WRITE prot bits, the item's
# D bit, and the leaf's page size (log2) in the bits left below the address.
ENTRY_READ = 1
ENTRY_WRITE = 2
ENTRY_DIRTY = 4
SIZE_SHIFT = 3
SIZE_MASK = 0x3F << SIZE_SHIFT
ENTRY_FLAGS = (1 << GRANULE_SHIFT) - 1


def level_of(size_lg2: int) -> int:
    """The level a leaf of ``2**size_lg2`` bytes stands at."""
    return min((size_lg2 - GRANULE_SHIFT) // ITEMS_LG2, TOP_LEVEL)


def item_lg2(level: int) -> int:
    return GRANULE_SHIFT + ITEMS_LG2 * level


#: by a leaf's size log2: (log2 of the size of its items, log2 of how many items it spans)
LEAF_ITEMS: list[tuple[int, int]] = [
    (item_lg2(level_of(lg2)), lg2 - item_lg2(level_of(lg2))) if lg2 >= GRANULE_SHIFT else (0, 0)
    for lg2 in range(64)
]


def best_pgsize_lg2(pgsize_bitmap: int, va: int, pa: int, length: int) -> int:
    """``pt_compute_best_pgsize()``: 0 when no page size fits."""
    mask = va | pa | (1 << (length.bit_length() - 1))
    best = (mask & -mask).bit_length() - 1
    fit = pgsize_bitmap & ((1 << (best + 1)) - 1)
    return fit.bit_length() - 1 if fit else 0


class MockPageTable:
    """``entries[iova >> 11] = pa | prot | D | size_lg2 << 3`` for every mapped 2 KiB."""

    def __init__(self, pgsize_bitmap: int, aperture_last: int) -> None:
        self.pgsize_bitmap = pgsize_bitmap
        self.va_last = aperture_last
        self.entries: dict[int, int] = {}
        # keys of the items whose D bit is set (the model's index: read-and-clear visits
        # these and the leaves they belong to, not every mapped 2 KiB)
        self.dirty: set[int] = set()

    # -- map / unmap ------------------------------------------------------------------------
    def map(self, iova: int, pa: int, size: int, prot: int, pgsize: int = 0) -> None:
        """``map_range()``: all or nothing (``iommu_map()`` unmaps a partial map); no leaf
        larger than ``pgsize`` when it is set."""
        if size <= 0:
            raise err(errno.EINVAL, "empty map")
        if iova + size - 1 > self.va_last:
            raise err(errno.ERANGE, f"[{iova:#x}, +{size:#x}) is beyond the table")
        steps: list[tuple[int, int, int]] = []
        va, oa, left = iova, pa, size
        bitmap = self.pgsize_bitmap & ((pgsize << 1) - 1) if pgsize else self.pgsize_bitmap
        while left:
            lg2 = best_pgsize_lg2(bitmap, va, oa, left)
            if not lg2:
                raise err(errno.ENXIO, f"no page size fits {va:#x} -> {oa:#x} (+{left:#x})")
            steps.append((va, oa, lg2))
            va, oa, left = va + (1 << lg2), oa + (1 << lg2), left - (1 << lg2)
        first = iova >> GRANULE_SHIFT
        entries = self.entries
        if not entries.keys().isdisjoint(range(first, first + (size >> GRANULE_SHIFT))):
            raise err(errno.EADDRINUSE, f"IOVA range at {iova:#x} already mapped")
        flags = prot & (ENTRY_READ | ENTRY_WRITE)
        for va, oa, lg2 in steps:
            # every 2 KiB of the leaf: its address (oa is 2 KiB aligned, so | is +) and tag
            base, count = va >> GRANULE_SHIFT, 1 << (lg2 - GRANULE_SHIFT)
            tag = flags | lg2 << SIZE_SHIFT
            entries.update(
                zip(
                    range(base, base + count),
                    range(oa | tag, (oa | tag) + (count << GRANULE_SHIFT), 1 << GRANULE_SHIFT),
                    strict=True,
                )
            )

    def leaf_at(self, iova: int) -> tuple[int, int] | None:
        """``(leaf start IOVA, size log2)`` of the leaf mapping ``iova``."""
        entry = self.entries.get(iova >> GRANULE_SHIFT)
        if entry is None:
            return None
        lg2 = (entry & SIZE_MASK) >> SIZE_SHIFT
        return iova & ~((1 << lg2) - 1), lg2

    def unmap(self, iova: int, size: int, gather: IotlbGather | None = None) -> int:
        """``unmap_range()``: returns the bytes unmapped (see the module docstring); the
        leaves cleared go into ``gather`` when one is given."""
        end = iova + size
        va = iova
        done = 0
        while va < end:
            leaf = self.leaf_at(va)
            if leaf is None:
                break  # an empty item ends the walk
            start, lg2 = leaf
            if start != va:
                break  # a start inside a leaf: -EINVAL from the walk
            base = start >> GRANULE_SHIFT
            count = 1 << (lg2 - GRANULE_SHIFT)
            deque(map(self.entries.__delitem__, range(base, base + count)), maxlen=0)
            if self.dirty:
                self.dirty.difference_update(range(base, base + count))
            if gather is not None:
                gather.add(start, 1 << lg2, 1 << lg2)
            done += 1 << lg2
            va = start + (1 << lg2)
        return done

    def iova_to_phys(self, iova: int) -> int:
        """The physical address of ``iova``, 0 when unmapped (generic_pt's answer)."""
        entry = self.entries.get(iova >> GRANULE_SHIFT)
        if entry is None:
            return 0
        return (entry & ~ENTRY_FLAGS) + (iova & ((1 << GRANULE_SHIFT) - 1))

    def free(self) -> None:
        """The domain is gone: every entry with it."""
        self.entries.clear()
        self.dirty.clear()

    # -- dirty tracking ------------------------------------------------------------------------
    def set_dirty(self, iova: int) -> bool:
        """``set_dirty()`` of the self-test: False (ENOENT) where nothing is mapped."""
        entry = self.entries.get(iova >> GRANULE_SHIFT)
        if entry is None:
            return False
        isz = LEAF_ITEMS[(entry & SIZE_MASK) >> SIZE_SHIFT][0]
        key = (iova >> isz) << (isz - GRANULE_SHIFT)  # the item's first entry holds its D
        self.entries[key] |= ENTRY_DIRTY
        self.dirty.add(key)
        return True

    def read_and_clear_dirty(self, iova: int, length: int, clear: bool) -> list[tuple[int, int]]:
        """``read_and_clear_dirty()`` over ``[iova, iova + length)``: ``(iova, bytes)`` runs.

        Only leaves holding a dirty item report, so the walk visits the dirty items (the
        ``dirty`` index) whose leaf reaches into the range, in IOVA order, each leaf once:
        the bits of generic_pt's walk over every present item, at the cost of the dirty
        items alone. A leaf is visited at its start, or at ``iova`` when it starts before."""
        runs: list[tuple[int, int]] = []
        if not self.dirty:
            return runs
        end = iova + length
        entries = self.entries
        first, last = iova >> GRANULE_SHIFT, (end - 1) >> GRANULE_SHIFT
        # a dirty item before ``iova`` (or after the end) counts when its leaf reaches in
        lo, hi = first, last
        leaf = self.leaf_at(iova)
        if leaf is not None:
            lo = leaf[0] >> GRANULE_SHIFT
        leaf = self.leaf_at(end - 1)
        if leaf is not None:
            hi = (leaf[0] + (1 << leaf[1]) - 1) >> GRANULE_SHIFT
        if hi - lo < len(self.dirty):
            keys = [k for k in range(lo, hi + 1) if k in self.dirty]
        else:
            keys = sorted(k for k in self.dirty if lo <= k <= hi)
        done_to = iova  # the walk has passed every IOVA below this
        leaf_items = LEAF_ITEMS
        append = runs.append
        dirty = self.dirty
        items_mask = (1 << ITEMS_LG2) - 1
        for key in keys:
            isz, contig = leaf_items[(entries[key] & SIZE_MASK) >> SIZE_SHIFT]
            if not contig:  # a one-item leaf: the whole item, from where the walk enters it
                start = key << GRANULE_SHIFT
                va = start if start > iova else iova
                if va < done_to:
                    continue
                done_to = start + (1 << isz)
                append((va, 1 << isz))
                if clear:
                    dirty.discard(key)
                    entries[key] &= ~ENTRY_DIRTY
                continue
            lg2 = isz + contig
            start = (key << GRANULE_SHIFT) >> lg2 << lg2
            va = start if start > iova else iova
            if va < done_to:
                continue  # a leaf already visited
            done_to = start + (1 << lg2)
            # record_dirty(): from the visited item to the leaf's last item, or to the
            # walked range's end within this table, whichever comes first
            item = va >> isz
            index = item & items_mask
            stop = index | ((1 << contig) - 1)
            range_end = ((end - 1) >> isz) + 1 - (item - index)
            if range_end < stop:
                stop = range_end
            if stop > index:
                append((va, (stop - index) << isz))
            if clear:
                step = 1 << (isz - GRANULE_SHIFT)
                for k in range(start >> GRANULE_SHIFT, done_to >> GRANULE_SHIFT, step):
                    if k in dirty:
                        dirty.discard(k)
                        entries[k] &= ~ENTRY_DIRTY
        return runs
