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

The model's own ways of doing the walks in bulk, each giving what the per-leaf walk gives
(tests/core/test_mock_iommupt.py compares them with a literal per-leaf table): map counts
each stretch of equal leaves in one go (:func:`leaf_chunks`) and writes its entries with
one dict update; unmap finds where the walk stops from the entries present and removes them
at once; the dirty loops (read-and-clear's visit of the dirty leaves, the DIRTY op's
``set_dirty`` per set bit) run in C (``mock/_dirty.c``) when it is built, else in Python.
"""

from __future__ import annotations

import errno
from bisect import bisect_left, bisect_right
from itertools import filterfalse, repeat
from operator import and_
from typing import TYPE_CHECKING

from iommufd_model.errors import err
from iommufd_model.hw import compiled

if TYPE_CHECKING:
    from iommufd_model.paging import IotlbGather


#: ``mock/_dirty.c`` (the dirty loops in C), or None: the Python loops below do the same
_DIRTY = compiled.load_c_helper("iommufd_model.mock._dirty")


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


def leaf_chunks(
    pgsize_bitmap: int, va: int, pa: int, length: int
) -> list[tuple[int, int, int, int]]:
    """The leaves ``map_range()`` writes for ``[va, va + length)`` -> ``pa``, as ``(iova, pa,
    size log2, count)`` chunks of equal leaves: the steps of ``pt_compute_best_pgsize()``
    one by one, counted in one go (the model's own arithmetic; ENXIO when no size fits).

    While a step of ``2**lg2`` is taken, the next larger size of the bitmap (``nxt``) is
    chosen only once IOVA and address are both aligned to it with at least that much left:
    never when they differ below ``nxt``, else first after ``(-va) mod 2**nxt`` bytes; and
    ``lg2`` itself lasts while ``2**lg2`` bytes are left."""
    chunks: list[tuple[int, int, int, int]] = []
    while length:
        lg2 = best_pgsize_lg2(pgsize_bitmap, va, pa, length)
        if not lg2:
            raise err(errno.ENXIO, f"no page size fits {va:#x} -> {pa:#x} (+{length:#x})")
        count = length >> lg2
        above = pgsize_bitmap >> (lg2 + 1)
        if above:
            nxt = lg2 + (above & -above).bit_length()
            mask = (1 << nxt) - 1
            if not (va ^ pa) & mask:
                steps = ((-va) & mask) >> lg2
                if steps and length - (steps << lg2) >= 1 << nxt:
                    count = steps
        chunks.append((va, pa, lg2, count))
        va, pa, length = va + (count << lg2), pa + (count << lg2), length - (count << lg2)
    return chunks


def _gather_leaves(gather: IotlbGather, first: int, values: list[int]) -> None:
    """Add the leaves whose entries ``values`` (keys from ``first`` on, IOVA order) were
    cleared to ``gather``: one run per stretch of leaves of one size."""
    sizes = set(map(and_, values, repeat(SIZE_MASK)))
    if len(sizes) == 1:
        lg2 = sizes.pop() >> SIZE_SHIFT
        gather.add(first << GRANULE_SHIFT, len(values) << GRANULE_SHIFT, 1 << lg2)
        return
    at, start, run_lg2 = 0, 0, 0
    while at < len(values):
        lg2 = (values[at] & SIZE_MASK) >> SIZE_SHIFT
        if lg2 != run_lg2:
            if at > start:
                gather.add(
                    (first + start) << GRANULE_SHIFT, (at - start) << GRANULE_SHIFT, 1 << run_lg2
                )
            start, run_lg2 = at, lg2
        at += 1 << (lg2 - GRANULE_SHIFT)
    gather.add((first + start) << GRANULE_SHIFT, (at - start) << GRANULE_SHIFT, 1 << run_lg2)


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
        bitmap = self.pgsize_bitmap & ((pgsize << 1) - 1) if pgsize else self.pgsize_bitmap
        chunks = leaf_chunks(bitmap, iova, pa, size)
        first = iova >> GRANULE_SHIFT
        entries = self.entries
        if not entries.keys().isdisjoint(range(first, first + (size >> GRANULE_SHIFT))):
            raise err(errno.EADDRINUSE, f"IOVA range at {iova:#x} already mapped")
        flags = prot & (ENTRY_READ | ENTRY_WRITE)
        for va, oa, lg2, count in chunks:
            # every 2 KiB of the chunk's leaves: its address (oa is 2 KiB aligned, so | is
            # +) and tag; the addresses run on from leaf to leaf, so one range covers them
            base, n = va >> GRANULE_SHIFT, count << (lg2 - GRANULE_SHIFT)
            tag = flags | lg2 << SIZE_SHIFT
            entries.update(
                zip(
                    range(base, base + n),
                    range(oa | tag, (oa | tag) + (n << GRANULE_SHIFT), 1 << GRANULE_SHIFT),
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
        leaves cleared go into ``gather`` when one is given, one run per stretch of leaves
        of one size.

        Leaves tile the entries (every map and unmap writes or clears whole leaves), so the
        walk from a leaf's start goes on leaf by leaf up to the first empty item or past the
        end: the entries removed are those from ``iova`` up to the first missing one before
        the end, or else to the end of the leaf holding the range's last byte (the model's
        own way of counting the walk in one go)."""
        entries = self.entries
        first = iova >> GRANULE_SHIFT
        entry = entries.get(first) if size > 0 else None
        if entry is None or iova & ((1 << ((entry & SIZE_MASK) >> SIZE_SHIFT)) - 1):
            return 0  # nothing mapped, or a start inside a leaf: -EINVAL from the walk
        end_key = ((iova + size - 1) >> GRANULE_SHIFT) + 1
        stop = next(filterfalse(entries.__contains__, range(first, end_key)), None)
        if stop is None:
            last = entries[end_key - 1]
            span = (last & SIZE_MASK) >> SIZE_SHIFT
            stop = (((end_key - 1) >> (span - GRANULE_SHIFT)) + 1) << (span - GRANULE_SHIFT)
        removed = range(first, stop)
        if len(entries) == len(removed):
            values = list(map(entries.__getitem__, removed)) if gather is not None else []
            entries.clear()
        else:
            values = list(map(entries.pop, removed))
        dirty = self.dirty
        if len(dirty) < len(removed):
            dirty.difference_update([k for k in dirty if first <= k < stop])
        else:
            dirty.difference_update(removed)
        if gather is not None:
            _gather_leaves(gather, first, values)
        return len(removed) << GRANULE_SHIFT

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
        keys = sorted(self.dirty)
        keys = keys[bisect_left(keys, lo) : bisect_right(keys, hi)]
        if not keys:
            return runs
        if _DIRTY is not None:
            try:
                got: list[tuple[int, int]] = _DIRTY.visit(
                    entries, self.dirty, keys, iova, min(end, 1 << VASZ_LG2), clear
                )
            except ValueError:
                pass  # a range the C loop does not take (nothing changed): the Python loop
            else:
                return got
        return _visit_dirty(entries, self.dirty, keys, iova, end, clear)

    def set_dirty_bits(self, iova: int, page_size: int, bitmap: bytes, nbits: int) -> int:
        """:meth:`set_dirty` at ``iova + i * page_size`` for every set bit ``i`` < ``nbits`` of
        ``bitmap`` (bit 0 of byte 0 first), in order; returns how many bits were set (mapped
        there or not)."""
        if _DIRTY is not None:
            return int(
                _DIRTY.set_dirty_bits(self.entries, self.dirty, iova, page_size, bitmap, nbits)
            )
        count = 0
        for byte_index, byte in enumerate(bitmap[: (nbits + 7) >> 3]):
            while byte:
                low = byte & -byte
                byte ^= low
                bit = byte_index * 8 + low.bit_length() - 1
                if bit >= nbits:
                    break
                self.set_dirty(iova + bit * page_size)
                count += 1
        return count


def _visit_dirty(
    entries: dict[int, int], dirty: set[int], keys: list[int], iova: int, end: int, clear: bool
) -> list[tuple[int, int]]:
    """generic_pt's read-and-clear over the leaves of the sorted dirty ``keys`` in
    ``[iova, end)`` (``mock/_dirty.c``'s ``visit`` does the same in C).

    A leaf's D bits sit on the first entries of its items (:meth:`MockPageTable.set_dirty`)
    and ``keys`` holds every dirty key of every leaf the walk reaches, so clearing a leaf
    is clearing the keys from the one that reached it to the leaf's end."""
    runs: list[tuple[int, int]] = []
    done_to = iova  # the walk has passed every IOVA below this
    leaf_items = LEAF_ITEMS
    append = runs.append
    items_mask = (1 << ITEMS_LG2) - 1
    for at, key in enumerate(keys):
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
        # walked range's end within this table, whichever comes first. 7.2's bound is
        # log2_set_mod_max_t(index, num_contig_lg2), the group's last index itself (an
        # inclusive bound used as an exclusive one), so a contiguous leaf walked from its
        # first item reports one item less than its size; the model reports the same
        item = va >> isz
        index = item & items_mask
        stop = index | ((1 << contig) - 1)
        range_end = ((end - 1) >> isz) + 1 - (item - index)
        if range_end < stop:
            stop = range_end
        if stop > index:
            append((va, (stop - index) << isz))
        if clear:  # the leaf's dirty items: this key and the next ones inside the leaf
            j, stop_key = at, done_to >> GRANULE_SHIFT
            while j < len(keys) and keys[j] < stop_key:
                dirty.discard(keys[j])
                entries[keys[j]] &= ~ENTRY_DIRTY
                j += 1
    return runs
