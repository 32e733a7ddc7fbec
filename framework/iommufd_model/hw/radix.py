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

import attrs

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SHIFT, FrameMemory

ENTRY_SIZE = 8
U64 = (1 << 64) - 1


class PtFormat:
    """Encoding of one radix format with 512-entry (9-bit) levels of 4 KiB tables.

    Level 0 holds 4 KiB leaves; level ``n`` entries cover ``1 << (12 + 9 * n)`` bytes.
    Subclasses implement the five encode/decode methods.
    """

    name = "abstract"
    bits_per_level = 9
    #: levels (above 0) where a leaf may stand, e.g. {1, 2} for 2 MiB and 1 GiB pages
    large_leaf_levels: frozenset[int] = frozenset()

    def __init__(self, levels: int) -> None:
        self.levels = levels

    @property
    def va_bits(self) -> int:
        return PAGE_SHIFT + self.bits_per_level * self.levels

    def level_shift(self, level: int) -> int:
        return PAGE_SHIFT + self.bits_per_level * level

    def index(self, iova: int, level: int) -> int:
        return (iova >> self.level_shift(level)) & ((1 << self.bits_per_level) - 1)

    # -- encoding, per format --------------------------------------------------------------
    def make_table(self, table_pa: int, level: int) -> int:
        raise NotImplementedError

    def make_leaf(self, pa: int, level: int, prot: int) -> int:
        raise NotImplementedError

    def decode(self, entry: int, level: int) -> tuple[int, int, int]:
        """``(kind, address, prot)`` with kind ``INVALID``, ``TABLE`` or ``LEAF``."""
        raise NotImplementedError

    def is_dirty(self, entry: int) -> bool:
        return False

    def clear_dirty(self, entry: int) -> int:
        return entry


INVALID, TABLE, LEAF = 0, 1, 2


@attrs.define(slots=True)
class WalkResult:
    """A successful walk: the page it found and what the walk cost."""

    pa: int  # physical address of the byte at ``iova``
    shift: int  # page size of the leaf
    prot: int
    mem_refs: int


@attrs.define(slots=True)
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


class RadixPageTable:
    """A page table a driver owns and edits (map, unmap, dirty read-back, teardown).

    Tables are frames from ``memory``; ``map`` picks the largest leaf the format allows at
    the alignment of iova, pa and size. Everything is all-or-nothing: a failing map leaves
    no new entry behind.
    """

    def __init__(self, memory: FrameMemory, fmt: PtFormat) -> None:
        self.memory = memory
        self.fmt = fmt
        self.root = memory.alloc_frame() << PAGE_SHIFT
        self.tables: set[int] = {self.root}

    # -- helpers ---------------------------------------------------------------------------
    def _slot(self, table: int, iova: int, level: int) -> int:
        return table + self.fmt.index(iova, level) * ENTRY_SIZE

    def _leaf_level(self, iova: int, pa: int, size: int) -> int:
        fmt = self.fmt
        for level in sorted(fmt.large_leaf_levels, reverse=True):
            span = 1 << fmt.level_shift(level)
            if size >= span and not (iova | pa) & (span - 1):
                return level
        return 0

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
                addr = mem.alloc_frame() << PAGE_SHIFT
                self.tables.add(addr)
                mem.write_u64(slot, fmt.make_table(addr, level))
                created.append((slot, addr))
            table = addr
        return table

    # -- driver operations -----------------------------------------------------------------
    def map(self, iova: int, pa: int, size: int, prot: int) -> None:
        if (iova | pa | size) & ((1 << PAGE_SHIFT) - 1) or size <= 0:
            raise err(errno.EINVAL, "map needs 4 KiB aligned iova, pa and size")
        if (iova + size - 1) >> self.fmt.va_bits:
            raise err(errno.EINVAL, f"{iova:#x}+{size:#x} beyond the table's address width")
        fmt = self.fmt
        mem = self.memory
        created: list[tuple[int, int]] = []
        written: list[int] = []
        try:
            pos = 0
            while pos < size:
                level = self._leaf_level(iova + pos, pa + pos, size - pos)
                table = self._table_for(iova + pos, level, created)
                slot = self._slot(table, iova + pos, level)
                if fmt.decode(mem.read_u64(slot), level)[0] != INVALID:
                    raise err(errno.EEXIST, f"{iova + pos:#x} is already mapped")
                mem.write_u64(slot, fmt.make_leaf(pa + pos, level, prot))
                written.append(slot)
                pos += 1 << fmt.level_shift(level)
        except OSError:
            for slot in written:
                mem.write_u64(slot, 0)
            for slot, table_pa in reversed(created):
                mem.write_u64(slot, 0)
                self.tables.discard(table_pa)
                mem.put_frame(table_pa >> PAGE_SHIFT)
            raise

    def _leaves(self, first: int, last: int) -> list[tuple[int, int, int]]:
        """``(slot, iova, level)`` of every leaf overlapping ``[first, last]``."""
        fmt = self.fmt
        mem = self.memory
        out: list[tuple[int, int, int]] = []

        def visit(table: int, level: int, base: int) -> None:
            shift = fmt.level_shift(level)
            span = 1 << shift
            lo = max(first, base)
            hi = min(last, base + (span << fmt.bits_per_level) - 1)
            if lo > hi:
                return
            for idx in range((lo - base) >> shift, ((hi - base) >> shift) + 1):
                slot = table + idx * ENTRY_SIZE
                entry = mem.read_u64(slot)
                kind, addr, _ = fmt.decode(entry, level)
                start = base + (idx << shift)
                if kind == LEAF:
                    out.append((slot, start, level))
                elif kind == TABLE and level > 0:
                    visit(addr, level - 1, start)

        visit(self.root, fmt.levels - 1, 0)
        return out

    def unmap(self, iova: int, size: int) -> int:
        """Clear the leaves inside ``[iova, iova+size)``; a leaf sticking out is not split."""
        last = iova + size - 1
        leaves = self._leaves(iova, last)
        for _slot, start, level in leaves:
            end = start + (1 << self.fmt.level_shift(level)) - 1
            if start < iova or end > last:
                raise err(errno.EINVAL, f"unmap would split the large page at {start:#x}")
        done = 0
        for slot, _start, level in leaves:
            self.memory.write_u64(slot, 0)
            done += 1 << self.fmt.level_shift(level)
        return done

    def iova_to_phys(self, iova: int) -> int:
        res = walk(self.memory, self.fmt, self.root, iova, False)
        return res.pa if isinstance(res, WalkResult) else -1

    def read_and_clear_dirty(self, iova: int, length: int, clear: bool) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for slot, start, level in self._leaves(iova, iova + length - 1):
            entry = self.memory.read_u64(slot)
            if self.fmt.is_dirty(entry):
                runs.append((start, 1 << self.fmt.level_shift(level)))
                if clear:
                    self.memory.write_u64(slot, self.fmt.clear_dirty(entry))
        return runs

    def free(self) -> None:
        """Return every table frame (the domain is gone)."""
        for table in self.tables:
            self.memory.put_frame(table >> PAGE_SHIFT)
        self.tables.clear()
