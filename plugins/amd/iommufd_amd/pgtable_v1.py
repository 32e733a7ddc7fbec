"""The AMD v1 host page-table format (spec "I/O Page Tables for Host Translations"; kernel
``IOMMU_PTE_*`` / ``PM_*`` and generic_pt ``fmt/amdv1.h``).

Entry bits: PR[0], A[5], D[6] (HD), NextLevel[11:9], OutputAddress / next table[51:12],
reserved[58:52], U[59], FC[60], IR[61], IW[62]. Tables have ``mode`` (1..6) levels; radix
level ``r`` here is AMD level ``r + 1``. A PDE's NextLevel is the AMD level of the table it
points to; NextLevel 0 makes the entry a leaf of its level's size (2 MiB, 1 GiB ...) and
NextLevel 7 a leaf of the size encoded in its address (replicated over every slot the page
covers), which is how the driver maps 8 KiB .. 1 MiB and other in-between sizes.
"""

from __future__ import annotations

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.memory import PAGE_SHIFT, PhysicalMemory
from iommufd_model.hw.radix import INVALID, LEAF, TABLE, Entries, PtFormat, RadixPageTable

PTE_PR = 1 << 0  # IOMMU_PTE_PR
PTE_A = 1 << 5  # accessed
PTE_HD = 1 << 6  # IOMMU_PTE_HD: dirty
PTE_NL_SHIFT = 9  # NextLevel[11:9] (PM_LEVEL_ENC)
PTE_ADDR = ((1 << 52) - 1) & ~0xFFF  # PM_ADDR_MASK
PTE_RSVD = 0x7F << 52
PTE_U = 1 << 59  # IOMMU_PTE_U
PTE_FC = 1 << 60  # IOMMU_PTE_FC: force coherent
PTE_IR = 1 << 61  # IOMMU_PTE_IR
PTE_IW = 1 << 62  # IOMMU_PTE_IW
NL_LEAF = 0  # NextLevel 0: leaf of the level's size
NL_SIZED = 7  # NextLevel 7: leaf whose size is encoded in the address

#: AMD_IOMMU_PGSIZES: every power of two from 4 KiB, except 512 GiB (an erratum)
AMD_IOMMU_PGSIZES = (~0xFFF & ~(2 << 38)) & ((1 << 64) - 1)


def sized_pte_addr(pa: int, size: int) -> int:
    """Address field of a NextLevel-7 PTE for a ``size`` page at ``pa`` (PAGE_SIZE_PTE)."""
    return (pa | (size - 1)) & ~(size >> 1) & PTE_ADDR


def sized_pte_size(entry: int) -> int:
    """Page size of a NextLevel-7 PTE: 2 << (first clear bit at or above 12) (PTE_PAGE_SIZE)."""
    bit = 12
    while bit < 52 and entry >> bit & 1:
        bit += 1
    return 2 << bit


def _perm_bits(prot: int) -> int:
    return (PTE_IR if prot & IOMMU_READ else 0) | (PTE_IW if prot & IOMMU_WRITE else 0)


class AmdV1Format(PtFormat):
    """Mode 1..6 v1 tables. Large leaves by NextLevel 0 at 2 MiB and 1 GiB (level 1, 2)."""

    name = "amd_v1"
    large_leaf_levels = frozenset({1, 2})
    linear_leaves = True

    def __init__(self, mode: int = 4) -> None:
        if not 1 <= mode <= 6:
            raise ValueError("AMD v1 tables have modes 1..6")
        super().__init__(mode)

    def make_table(self, table_pa: int, level: int) -> int:
        # PM_LEVEL_PDE: the next table is AMD level ``level``; tables grant IR/IW.
        return (table_pa & PTE_ADDR) | (level << PTE_NL_SHIFT) | PTE_PR | PTE_IR | PTE_IW

    def make_leaf(self, pa: int, level: int, prot: int) -> int:
        return (pa & PTE_ADDR) | PTE_PR | PTE_FC | _perm_bits(prot)

    def decode(self, entry: int, level: int) -> tuple[int, int, int]:
        if not entry & PTE_PR or entry & PTE_RSVD:
            return INVALID, 0, 0
        prot = (IOMMU_READ if entry & PTE_IR else 0) | (IOMMU_WRITE if entry & PTE_IW else 0)
        nl = (entry >> PTE_NL_SHIFT) & 7
        if nl == NL_LEAF:
            return LEAF, entry & PTE_ADDR & ~((1 << self.level_shift(level)) - 1), prot
        if nl == NL_SIZED:
            return LEAF, entry & PTE_ADDR & ~(sized_pte_size(entry) - 1), prot
        if nl == level:
            return TABLE, entry & PTE_ADDR, prot
        # Level skipping (nl < level) is legal for hardware (walk.py handles it) but never
        # built by the driver; the engine treats it, and nl > level, as a bad entry.
        return INVALID, 0, 0

    def is_dirty(self, entry: int) -> bool:
        return bool(entry & PTE_HD)

    def clear_dirty(self, entry: int) -> int:
        return entry & ~PTE_HD


#: generic_pt amdv1 PT_MAX_TOP_LEVEL: the top table is at most level 5 (Mode 6)
MAX_MODE = 6


def best_leaf_level(pgsizes: int, iova: int, pa: int, size: int) -> int:
    """generic_pt ``pt_compute_best_pgsize()`` then ``pt_pgsz_lg2_to_level()``: the level of
    the largest allowed page that ``iova`` and ``pa`` are aligned to and ``size`` holds."""
    limit = (iova | pa | 1 << (size.bit_length() - 1)) & -(iova | pa | 1 << (size.bit_length() - 1))
    sizes = pgsizes & ((limit << 1) - 1)
    if not sizes:
        return 0
    return (sizes.bit_length() - 1 - PAGE_SHIFT) // 9


class AmdV1PageTable(RadixPageTable):
    """The driver's v1 table: the engine's map with NextLevel-7 pages for in-between sizes
    (every power of two the driver's pgsize_bitmap has, as ``iommu_pgsize()`` picks them).

    Its top grows on demand (generic_pt PT_FEAT_DYNAMIC_TOP, ``increase_top()``): ``mode`` is
    the number of levels now, :meth:`grow` adds levels above the root."""

    fmt: AmdV1Format

    def __init__(self, memory: PhysicalMemory, mode: int) -> None:
        super().__init__(memory, AmdV1Format(mode))

    @property
    def mode(self) -> int:
        """The DTE Mode of this table: its number of levels."""
        return self.fmt.levels

    def mode_for(self, last: int, leaf_level: int) -> int:
        """The smallest Mode (at least the current one) whose top reaches IOVA ``last`` and
        can hold a leaf at radix level ``leaf_level`` (the top level never holds leaves in
        Mode 6: ``amdv1pt_can_have_leaf``)."""
        mode = self.mode
        while last >> (PAGE_SHIFT + 9 * mode) or leaf_level > mode - 1:
            mode += 1
        return mode

    def grow(self, mode: int) -> None:
        """``increase_top()``: one new table per added level, its entry 0 pointing to the old
        top (a PDE whose NextLevel is the old top's level); nothing below moves."""
        while self.mode < mode:
            top = self.memory.alloc_frame() << PAGE_SHIFT
            self.memory.write_u64(top, self.fmt.make_table(self.root, self.mode))
            self.tables[top] = 1
            self.root = top
            self.fmt = AmdV1Format(self.mode + 1)

    def _chunk(self, iova: int, pa: int, left: int) -> int:
        """The largest supported page size that fits alignment and length."""
        align = (iova | pa) & -(iova | pa) if iova | pa else 1 << 63
        size = 1 << (min(align, left).bit_length() - 1)
        while not size & AMD_IOMMU_PGSIZES or (size >> PAGE_SHIFT) == 0:
            size >>= 1
        top = 1 << self.fmt.va_bits if self.fmt.va_bits < 64 else 1 << 64
        return min(size, top)

    def _pages(self, iova: int, pa: int, left: int, pgsize: int) -> tuple[int, int]:
        size = self._chunk(iova, pa, left)
        if pgsize:
            size = min(size, pgsize)
        fmt = self.fmt
        level = (size.bit_length() - 1 - PAGE_SHIFT) // fmt.bits_per_level
        if level and level not in fmt.large_leaf_levels and size == 1 << fmt.level_shift(level):
            # A level without leaves (256 TiB ...): the engine's largest leaves cover it.
            return super()._pages(iova, pa, size, 0)
        # Pages of this size follow while iova and pa differ at it (their alignment stays
        # exactly this size) or while map_pages() fixes the size; else the next may be larger.
        steady = size == pgsize or (iova ^ pa) & size
        return size, left // size if steady else 1

    def _leaf_entries(self, pa: int, psize: int, level: int, prot: int, count: int) -> Entries:
        span = 1 << self.fmt.level_shift(level)
        if psize == span:
            return self.fmt.make_leaves(pa, level, prot, count)
        # NextLevel-7 pages, each PTE replicated over every slot its page covers.
        flags = (NL_SIZED << PTE_NL_SHIFT) | PTE_PR | PTE_FC | _perm_bits(prot)
        slots = psize // span
        entries: list[int] = []
        for page in range(pa, pa + count * span, psize):
            entries += [sized_pte_addr(page, psize) | flags] * slots
        return entries

    def _page_of(self, start: int, level: int, entry: int) -> tuple[int, int]:
        # A NextLevel-7 page is one page over all its slots: unmap never cuts it either.
        if (entry >> PTE_NL_SHIFT) & 7 != NL_SIZED:
            return super()._page_of(start, level, entry)
        size = sized_pte_size(entry)
        base = start & ~(size - 1)
        return base, base + size - 1
