"""A radix page-table engine shared by every format (the kernel's generic_pt, in spirit).

A :class:`PtFormat` says how one format encodes table pointers and leaves at each level; the
engine builds tables (map / unmap / dirty / free) in any :class:`FrameMemory` -- host memory
for drivers, guest RAM for guest drivers -- and :func:`walk` is the reference hardware walk,
counting memory references. Vendors with odd
encodings (AMD v1's next-level field) subclass the format; vendors' hot walkers live in their
compiled ``walk.py`` and are checked against :func:`walk`.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

import attrs

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SHIFT, FrameMemory

if TYPE_CHECKING:
    from iommufd_model.paging import IotlbGather

ENTRY_SIZE = 8
#: table entries as ints (a range when they step by a fixed amount)
Entries = list[int] | range
U64 = (1 << 64) - 1
#: spans of at most this many entries use the u64 accessors (cheaper than a buffer access)
FEW_ENTRIES = 8


class PtFormat:
    """Encoding of one radix format with tables of one translation granule.

    With the default 4 KiB granule, tables hold 512 entries (9 bits a level), level 0 holds
    4 KiB leaves and level ``n`` entries cover ``1 << (12 + 9 * n)`` bytes. A format with a
    16 KiB or 64 KiB granule (``granule_shift`` 14 or 16: VMSAv8-64) has 11 or 13 bits a level
    and leaves of the granule's size. ``va_bits`` (the input size) may leave the top level
    narrower than a table (fewer entries) or wider (concatenated tables, a stage-2 start level:
    the root is one contiguous block). Subclasses implement the five encode/decode methods.
    """

    name = "abstract"
    bits_per_level = 9
    granule_shift = PAGE_SHIFT
    #: levels (above 0) where a leaf may stand, e.g. {1, 2} for 2 MiB and 1 GiB pages
    large_leaf_levels: frozenset[int] = frozenset()
    #: leaves differ only by their address field: ``make_leaf(pa + k * size)`` is
    #: ``make_leaf(pa) + k * size``, and an entry's kind does not depend on that field (the
    #: engine builds and reads back runs of consecutive pages without one call per entry)
    linear_leaves = False

    def __init__(self, levels: int, granule_shift: int = PAGE_SHIFT, va_bits: int = 0) -> None:
        self.levels = levels
        if granule_shift != PAGE_SHIFT:
            self.granule_shift = granule_shift
            self.bits_per_level = granule_shift - 3  # 8-byte entries fill one granule
        #: an input size other than whole levels (0: ``levels`` full levels)
        self.fixed_va_bits = va_bits

    @property
    def va_bits(self) -> int:
        return self.fixed_va_bits or self.granule_shift + self.bits_per_level * self.levels

    @property
    def root_bits(self) -> int:
        """Index bits of the top level: fewer than a level's for a short root table, more
        for concatenated ones."""
        return self.va_bits - self.level_shift(self.levels - 1)

    def table_bits(self, level: int) -> int:
        return self.root_bits if level == self.levels - 1 else self.bits_per_level

    def level_shift(self, level: int) -> int:
        return self.granule_shift + self.bits_per_level * level

    def index(self, iova: int, level: int) -> int:
        return (iova >> self.level_shift(level)) & ((1 << self.table_bits(level)) - 1)

    # -- encoding, per format --------------------------------------------------------------
    def make_table(self, table_pa: int, level: int) -> int:
        raise NotImplementedError

    def make_leaf(self, pa: int, level: int, prot: int) -> int:
        raise NotImplementedError

    def decode(self, entry: int, level: int) -> tuple[int, int, int]:
        """``(kind, address, prot)`` with kind ``INVALID``, ``TABLE`` or ``LEAF``.

        A zero entry must decode as ``INVALID`` (the engine skips zero entries unread).
        """
        raise NotImplementedError

    def make_leaves(self, pa: int, level: int, prot: int, count: int) -> Entries:
        """:meth:`make_leaf` of ``count`` consecutive pages of ``level`` from ``pa``.

        A linear format steps the first entry (checked against the last one, which catches
        a run leaving the address field); any other calls :meth:`make_leaf` per page.
        """
        size = 1 << self.level_shift(level)
        make = self.make_leaf
        if self.linear_leaves and count > 1:
            first = make(pa, level, prot)
            end = first + count * size
            if make(pa + (count - 1) * size, level, prot) == end - size:
                return range(first, end, size)
        return [make(pa + k * size, level, prot) for k in range(count)]

    def is_dirty(self, entry: int) -> bool:
        return False

    def clear_dirty(self, entry: int) -> int:
        return entry


INVALID, TABLE, LEAF = 0, 1, 2


@attrs.define
class WalkResult:
    """A successful walk: the page it found and what the walk cost."""

    pa: int  # physical address of the byte at ``iova``
    shift: int  # page size of the leaf
    prot: int
    mem_refs: int


@attrs.define
class WalkFault:
    """Why a walk failed: at which level, and a vendor-neutral reason."""

    level: int
    reason: str  # "not-present", "permission", "address-size", "bad-entry"
    mem_refs: int


def walk(
    memory: FrameMemory, fmt: PtFormat, root: int, iova: int, write: bool
) -> WalkResult | WalkFault:
    """Reference hardware walk of a single-stage table rooted at physical ``root``."""
    if iova >> fmt.va_bits:
        return WalkFault(fmt.levels - 1, "address-size", 0)
    table = root
    prot = IOMMU_READ | IOMMU_WRITE
    refs = 0
    for level in range(fmt.levels - 1, -1, -1):
        try:
            entry = memory.read_u64(table + fmt.index(iova, level) * ENTRY_SIZE)
        except OSError:
            return WalkFault(level, "bad-entry", refs)
        refs += 1
        kind, addr, eprot = fmt.decode(entry, level)
        if kind == INVALID:
            return WalkFault(level, "not-present", refs)
        prot &= eprot
        if kind == LEAF:
            shift = fmt.level_shift(level)
            if not prot & (IOMMU_WRITE if write else IOMMU_READ):
                return WalkFault(level, "permission", refs)
            return WalkResult(addr + (iova & ((1 << shift) - 1)), shift, prot, refs)
        table = addr
    return WalkFault(0, "bad-entry", refs)


#: ``(first slot, iova of the first leaf, level, entries)``: consecutive leaves of one table
LeafRun = tuple[int, int, int, list[int]]


def pack_entries(entries: Entries) -> bytes:
    """Little-endian u64 table entries, as memory holds them."""
    return struct.pack(f"<{len(entries)}Q", *entries)


class RadixPageTable:
    """A page table a driver owns and edits (map, unmap, dirty read-back, teardown).

    Tables are frames from ``memory``; ``map`` picks the largest leaf the format allows at
    the alignment of iova, pa and size. Everything is all-or-nothing: a failing map leaves
    no new entry behind. Entries are read and written a table span at a time (one descent
    and one memory access per leaf table, not per page); a span of a few entries goes through
    the u64 accessors, so a memory offering only those serves maps of a few pages.
    """

    def __init__(self, memory: FrameMemory, fmt: PtFormat) -> None:
        self.memory = memory
        self.fmt = fmt
        #: table address -> its size in 4 KiB frames (1 for every 4 KiB-granule table)
        self.tables: dict[int, int] = {}
        self.root = self._alloc_table(fmt.levels - 1)

    # -- helpers ---------------------------------------------------------------------------
    def _alloc_table(self, level: int) -> int:
        """A zeroed table for ``level``: one frame, or a contiguous block aligned to its size
        (a larger granule, or concatenated start-level tables) from a memory that has
        ``alloc_contiguous``."""
        frames = max(1, (ENTRY_SIZE << self.fmt.table_bits(level)) >> PAGE_SHIFT)
        if frames == 1:
            pa = self.memory.alloc_frame() << PAGE_SHIFT
        else:
            alloc = getattr(self.memory, "alloc_contiguous", None)
            if alloc is None:
                raise err(errno.ENOMEM, f"{frames}-frame tables need contiguous memory")
            pa = alloc(frames, frames) << PAGE_SHIFT
            self.memory.write(pa, bytes(frames << PAGE_SHIFT))
        self.tables[pa] = frames
        return pa

    def _free_table(self, pa: int) -> None:
        for k in range(self.tables.pop(pa, 1)):
            self.memory.put_frame((pa >> PAGE_SHIFT) + k)

    def _slot(self, table: int, iova: int, level: int) -> int:
        return table + self.fmt.index(iova, level) * ENTRY_SIZE

    def _pages(self, iova: int, pa: int, left: int, pgsize: int) -> tuple[int, int]:
        """``(page size, pages)``: the leaf to put at ``iova`` and how many of that size may
        follow (``map`` stops them at the leaf table's end, where a larger one could start).

        The largest leaf the format allows at this alignment, no larger than ``pgsize``.
        """
        fmt = self.fmt
        for level in sorted(fmt.large_leaf_levels, reverse=True):
            span = 1 << fmt.level_shift(level)
            if pgsize and span > pgsize:
                continue
            if left >= span and not (iova | pa) & (span - 1):
                return span, left >> fmt.level_shift(level)
        return 1 << fmt.granule_shift, left >> fmt.granule_shift

    def _leaf_entries(self, pa: int, psize: int, level: int, prot: int, count: int) -> Entries:
        """The ``count`` slots of ``level`` from ``pa`` filled with pages of ``psize``."""
        return self.fmt.make_leaves(pa, level, prot, count)

    def _read_entries(self, slot: int, count: int) -> list[int]:
        if count == 1:
            return [self.memory.read_u64(slot)]
        if count <= FEW_ENTRIES:
            read = self.memory.read_u64
            return [read(slot + k * ENTRY_SIZE) for k in range(count)]
        raw = self.memory.read(slot, count * ENTRY_SIZE)
        if raw.count(0) == len(raw):
            return [0] * count
        return list(struct.unpack(f"<{count}Q", raw))

    def _write_entries(self, slot: int, entries: Entries) -> None:
        if len(entries) == 1:
            self.memory.write_u64(slot, entries[0])
        elif len(entries) <= FEW_ENTRIES:
            write = self.memory.write_u64
            for k, entry in enumerate(entries):
                write(slot + k * ENTRY_SIZE, entry)
        else:
            self.memory.write(slot, pack_entries(entries))

    def _clear_entries(self, slot: int, count: int) -> None:
        if count <= FEW_ENTRIES:
            self._write_entries(slot, [0] * count)
        else:
            self.memory.write(slot, bytes(count * ENTRY_SIZE))

    def _table_for(self, iova: int, leaf_level: int, created: list[tuple[int, int]]) -> int:
        """Descend to the table holding ``leaf_level`` entries, creating tables on the way."""
        fmt = self.fmt
        mem = self.memory
        table = self.root
        for level in range(fmt.levels - 1, leaf_level, -1):
            slot = self._slot(table, iova, level)
            kind, addr, _ = fmt.decode(mem.read_u64(slot), level)
            if kind == LEAF:
                raise err(errno.EEXIST, f"{iova:#x} already mapped by a large page")
            if kind == INVALID:
                addr = self._alloc_table(level - 1)
                mem.write_u64(slot, fmt.make_table(addr, level))
                created.append((slot, addr))
            table = addr
        return table

    # -- driver operations -----------------------------------------------------------------
    def map(self, iova: int, pa: int, size: int, prot: int, pgsize: int = 0) -> None:
        """Map ``[iova, iova+size)`` to ``pa``; no leaf larger than ``pgsize`` when it is set.

        ``pgsize`` is the kernel's ``map_pages(pgsize, pgcount)`` page size (PAGE_SIZE when
        IOMMU_OPTION_HUGE_PAGES is off). Leaves go in one leaf table at a time: the span is
        checked for EEXIST as a whole, then written in one go.
        """
        fmt = self.fmt
        if (iova | pa | size) & ((1 << fmt.granule_shift) - 1) or size <= 0:
            raise err(errno.EINVAL, "map needs granule-aligned iova, pa and size")
        if (iova + size - 1) >> self.fmt.va_bits:
            raise err(errno.EINVAL, f"{iova:#x}+{size:#x} beyond the table's address width")
        created: list[tuple[int, int]] = []
        written: list[tuple[int, int]] = []
        try:
            pos = 0
            while pos < size:
                cur = iova + pos
                psize, npages = self._pages(cur, pa + pos, size - pos, pgsize)
                level = (psize.bit_length() - 1 - fmt.granule_shift) // fmt.bits_per_level
                table = self._table_for(cur, level, created)
                shift = fmt.level_shift(level)
                index = fmt.index(cur, level)
                count = min((1 << fmt.table_bits(level)) - index, (npages * psize) >> shift)
                slot = table + index * ENTRY_SIZE
                old = self._read_entries(slot, count)
                for k, entry in enumerate(old if any(old) else ()):
                    if entry and fmt.decode(entry, level)[0] != INVALID:
                        raise err(errno.EEXIST, f"{cur + (k << shift):#x} is already mapped")
                self._write_entries(slot, self._leaf_entries(pa + pos, psize, level, prot, count))
                written.append((slot, count))
                pos += count << shift
        except OSError:
            for slot, count in written:
                self._clear_entries(slot, count)
            for slot, table_pa in reversed(created):
                self.memory.write_u64(slot, 0)
                self._free_table(table_pa)
            raise

    def _leaf_runs(self, first: int, last: int) -> list[LeafRun]:
        """Every leaf overlapping ``[first, last]``, as runs of consecutive leaf slots."""
        fmt = self.fmt
        out: list[LeafRun] = []

        def visit(table: int, level: int, base: int) -> None:
            shift = fmt.level_shift(level)
            lo = max(first, base)
            hi = min(last, base + (1 << (shift + fmt.table_bits(level))) - 1)
            if lo > hi:
                return
            lo_idx = (lo - base) >> shift
            entries = self._read_entries(
                table + lo_idx * ENTRY_SIZE, ((hi - base) >> shift) + 1 - lo_idx
            )
            if self._one_run(entries, level):
                out.append((table + lo_idx * ENTRY_SIZE, base + (lo_idx << shift), level, entries))
                return
            run: list[int] = []
            run_idx = lo_idx

            def flush() -> None:
                out.append((table + run_idx * ENTRY_SIZE, base + (run_idx << shift), level, run))

            for idx, entry in enumerate(entries, lo_idx):
                kind, addr, _ = fmt.decode(entry, level) if entry else (INVALID, 0, 0)
                if kind == LEAF:
                    run.append(entry)
                    continue
                if run:
                    flush()
                    run = []
                run_idx = idx + 1
                if kind == TABLE and level > 0:
                    visit(addr, level - 1, base + (idx << shift))
            if run:
                flush()

        visit(self.root, fmt.levels - 1, 0)
        return out

    def _one_run(self, entries: list[int], level: int) -> bool:
        """Whether ``entries`` are leaves of consecutive pages, as a map of a run wrote them:
        for a linear format only the first and the last entry need decoding."""
        first = entries[0]
        count = len(entries)
        if count < 2 or not first or not self.fmt.linear_leaves:
            return False
        step = 1 << self.fmt.level_shift(level)
        end = first + count * step
        if entries != list(range(first, end, step)):
            return False
        kind, addr, _ = self.fmt.decode(first, level)
        last_kind, last_addr, _ = self.fmt.decode(end - step, level)
        return kind == last_kind == LEAF and last_addr == addr + (count - 1) * step

    def _page_of(self, start: int, level: int, entry: int) -> tuple[int, int]:
        """First and last IOVA of the page whose leaf at IOVA ``start`` is ``entry``."""
        return start, start + (1 << self.fmt.level_shift(level)) - 1

    def _leaves(self, first: int, last: int) -> list[tuple[int, int, int]]:
        """``(slot, iova, level)`` of every leaf overlapping ``[first, last]``."""
        return [
            (slot + k * ENTRY_SIZE, start + (k << self.fmt.level_shift(level)), level)
            for slot, start, level, entries in self._leaf_runs(first, last)
            for k in range(len(entries))
        ]

    def unmap(self, iova: int, size: int, gather: IotlbGather | None = None) -> int:
        """Clear the leaves inside ``[iova, iova+size)``; a leaf sticking out is not split.

        ``gather`` (optional) collects the runs of leaves cleared, for the driver's flush.
        """
        last = iova + size - 1
        runs = self._leaf_runs(iova, last)
        if runs:  # only the pages holding iova and last can stick out
            _slot, start, level, entries = runs[0]
            pages = [self._page_of(start, level, entries[0])]
            _slot, start, level, entries = runs[-1]
            start += (len(entries) - 1) << self.fmt.level_shift(level)
            pages.append(self._page_of(start, level, entries[-1]))
            for page_first, page_last in pages:
                if page_first < iova or page_last > last:
                    raise err(errno.EINVAL, f"unmap would split the page at {page_first:#x}")
        done = 0
        for slot, start, level, entries in runs:
            self._clear_entries(slot, len(entries))
            shift = self.fmt.level_shift(level)
            done += len(entries) << shift
            if gather is not None:
                gather.add(start, len(entries) << shift, 1 << shift)
        return done

    def covers_a_table(self, first: int, last: int) -> bool:
        """Whether ``[first, last]`` covers the whole span of some present table below the
        root: the tables generic_pt's unmap frees (``pt_entry_fully_covered``), which decide
        the flush hint a driver gives (AMD PDE, VT-d IH)."""
        fmt = self.fmt
        mem = self.memory

        def visit(table: int, level: int, base: int) -> bool:
            shift = fmt.level_shift(level)
            lo = (max(first, base) - base) >> shift
            hi = (min(last, base + (1 << (shift + fmt.table_bits(level))) - 1) - base) >> shift
            for i in range(lo, hi + 1):
                start = base + (i << shift)
                kind, addr, _ = fmt.decode(mem.read_u64(table + 8 * i), level)
                if kind != TABLE:
                    continue
                if first <= start and start + (1 << shift) - 1 <= last:
                    return True
                if visit(addr, level - 1, start):
                    return True
            return False

        return first <= last and visit(self.root, fmt.levels - 1, 0)

    def iova_to_phys(self, iova: int) -> int:
        res = walk(self.memory, self.fmt, self.root, iova, False)
        return res.pa if isinstance(res, WalkResult) else -1

    def read_and_clear_dirty(self, iova: int, length: int, clear: bool) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        fmt = self.fmt
        for slot, start, level, entries in self._leaf_runs(iova, iova + length - 1):
            shift = fmt.level_shift(level)
            for k, entry in enumerate(entries):
                if fmt.is_dirty(entry):
                    runs.append((start + (k << shift), 1 << shift))
                    if clear:
                        self.memory.write_u64(slot + k * ENTRY_SIZE, fmt.clear_dirty(entry))
        return runs

    def free(self) -> None:
        """Return every table frame (the domain is gone)."""
        for table in list(self.tables):
            self._free_table(table)
