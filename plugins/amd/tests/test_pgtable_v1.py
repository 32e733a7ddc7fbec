"""The v1 host format: modes 1..6, large pages (NextLevel 0 and 7), skip levels, bad tables."""

from __future__ import annotations

import pytest
from iommufd_amd.pgtable_v1 import (
    NL_SIZED,
    PTE_IR,
    PTE_IW,
    PTE_NL_SHIFT,
    PTE_PR,
    AmdV1Format,
    AmdV1PageTable,
    sized_pte_addr,
    sized_pte_size,
)

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.compiled import load_walker
from iommufd_model.hw.memory import PAGE_SHIFT, PhysicalMemory
from iommufd_model.hw.radix import WalkResult, walk

W = load_walker("iommufd_amd.walk")
RW = IOMMU_READ | IOMMU_WRITE
MEM = 1 << 40


def hw_walk(
    mem: PhysicalMemory, pt: AmdV1PageTable, iova: int, write: bool = False, had: int = 0
) -> tuple[int, int, int, int, int]:
    got: tuple[int, int, int, int, int] = W.walk_v1(
        mem._pages, mem.size, pt.root, pt.fmt.levels, iova, write, had
    )
    return got


@pytest.mark.parametrize("mode", [1, 2, 3, 4, 5, 6])
def test_every_mode_walks_as_many_levels(mode: int) -> None:
    mem = PhysicalMemory(MEM)
    pt = AmdV1PageTable(mem, mode)
    top = min(pt.fmt.va_bits, 64)
    iova = ((1 << top) - 1) & ~0xFFF  # the highest page the mode can address
    pa = mem.alloc_frame() << PAGE_SHIFT
    pt.map(iova, pa, 4096, RW)
    st, out, shift, refs, prot = hw_walk(mem, pt, iova + 0x123)
    assert (st, out, shift, refs, prot) == (W.OK, pa + 0x123, 12, mode, 3)
    ref = walk(mem, pt.fmt, pt.root, iova + 0x123, False)
    assert isinstance(ref, WalkResult) and (ref.pa, ref.mem_refs) == (out, refs)
    if mode < 6:
        assert hw_walk(mem, pt, 1 << pt.fmt.va_bits)[0] == W.ADDRESS_SIZE


def test_next_level_zero_large_pages() -> None:
    mem = PhysicalMemory(MEM)
    pt = AmdV1PageTable(mem, 4)
    pt.map(1 << 30, 1 << 31, 1 << 30, RW)  # 1 GiB leaf at level 3 (AMD)
    pt.map(1 << 21, 3 << 21, 1 << 21, IOMMU_READ)  # 2 MiB leaf
    assert hw_walk(mem, pt, (1 << 30) + 0x12345)[:4] == (W.OK, (1 << 31) + 0x12345, 30, 2)
    st, out, shift, refs, prot = hw_walk(mem, pt, (1 << 21) + 0x1000)
    assert (st, out, shift, refs, prot) == (W.OK, (3 << 21) + 0x1000, 21, 3, IOMMU_READ)
    assert hw_walk(mem, pt, (1 << 21) + 0x1000, write=True)[0] == W.PERMISSION


@pytest.mark.parametrize("size_log2", [13, 15, 16, 20, 22, 26, 29, 31, 38])
def test_next_level_seven_page_sizes(size_log2: int) -> None:
    mem = PhysicalMemory(MEM)
    pt = AmdV1PageTable(mem, 4)
    size = 1 << size_log2
    iova = 7 << 39 | size * 3
    pa = size * 5
    pt.map(iova, pa, size, RW)
    level = (size_log2 - 12) // 9  # radix level holding the replicated PTEs
    slots = pt._leaves(iova, iova + size - 1)
    assert len(slots) == size >> (12 + 9 * level)
    entry = mem.read_u64(slots[0][0])
    assert (entry >> PTE_NL_SHIFT) & 7 == NL_SIZED and sized_pte_size(entry) == size
    assert len({mem.read_u64(s) for s, _i, _l in slots}) == 1  # the same PTE everywhere
    for off in (0, size // 2 + 0x10, size - 8):
        st, out, shift, refs, _ = hw_walk(mem, pt, iova + off)
        assert (st, out, shift, refs) == (W.OK, pa + off, size_log2, 4 - level)
    assert pt.iova_to_phys(iova) == pa
    with pytest.raises(OSError):  # never split a NextLevel-7 page
        pt.unmap(iova, size // 2)
    assert pt.unmap(iova, size) == size
    assert hw_walk(mem, pt, iova)[0] == W.NOT_PRESENT


def test_sized_pte_encoding_matches_the_kernel_macros() -> None:
    # PAGE_SIZE_PTE(0x12340000, 64 KiB): low bits 12..14 set, bit 15 clear
    assert sized_pte_addr(0x1234_0000, 1 << 16) == 0x1234_7000
    assert sized_pte_size(0x1234_7000) == 1 << 16


def _raw(mem: PhysicalMemory) -> int:
    return mem.alloc_frame() << PAGE_SHIFT


def test_skip_levels_and_illegal_encodings() -> None:
    mem = PhysicalMemory(MEM)
    root, l1 = _raw(mem), _raw(mem)
    page = _raw(mem)
    perms = PTE_PR | PTE_IR | PTE_IW
    # Mode 4 root whose entry 0 points straight at a level-1 table (levels 3 and 2 skipped).
    mem.write_u64(root, l1 | 1 << PTE_NL_SHIFT | perms)
    mem.write_u64(l1 + 5 * 8, page | perms)
    pages, size = mem._pages, mem.size
    assert W.walk_v1(pages, size, root, 4, 5 << 12, False, 0)[:4] == (W.OK, page, 12, 2)
    # The skipped levels' index bits must be zero.
    assert W.walk_v1(pages, size, root, 4, 1 << 30 | 5 << 12, False, 0)[0] == W.NOT_PRESENT
    # NextLevel >= own level is illegal; so are reserved bits [58:52].
    mem.write_u64(root + 8, l1 | 4 << PTE_NL_SHIFT | perms)
    assert W.walk_v1(pages, size, root, 4, 1 << 39, False, 0)[0] == W.BAD_ENTRY
    mem.write_u64(root + 16, l1 | 3 << PTE_NL_SHIFT | perms | 1 << 55)
    assert W.walk_v1(pages, size, root, 4, 2 << 39, False, 0)[0] == W.BAD_ENTRY
    # A NextLevel-7 PTE whose size is not bigger than its level's entry is illegal.
    mem.write_u64(l1 + 6 * 8, (page & ~0x1000) | NL_SIZED << PTE_NL_SHIFT | perms)
    assert W.walk_v1(pages, size, root, 4, 6 << 12, False, 0)[0] == W.OK  # 8 KiB: fine
    mem.write_u64(l1 + 7 * 8, (page | 0x1F_F000) | NL_SIZED << PTE_NL_SHIFT | perms)
    assert W.walk_v1(pages, size, root, 4, 7 << 12, False, 0)[0] == W.BAD_ENTRY  # 2 MiB
    # The engine's decode refuses what it cannot build (skip, bad NextLevel).
    fmt = AmdV1Format(4)
    assert fmt.decode(l1 | 1 << PTE_NL_SHIFT | perms, 3)[0] == 0


def test_loops_and_pointers_outside_memory_terminate_with_a_status() -> None:
    mem = PhysicalMemory(1 << 30)
    root = _raw(mem)
    perms = PTE_PR | PTE_IR | PTE_IW
    # Every entry of the root points back at the root, as the next level down: the walk
    # reinterprets it level by level and must end (NextLevel strictly decreases).
    for i in range(512):
        mem.write_u64(root + 8 * i, root | 5 << PTE_NL_SHIFT | perms)
    for iova in (0, 0x1234_5678_9000, (1 << 57) - 4096):
        st, _v, _s, refs, _p = W.walk_v1(mem._pages, mem.size, root, 6, iova, False, 0)
        assert st in (W.OK, W.BAD_ENTRY, W.NOT_PRESENT) and refs <= 6
    # A table pointer beyond the end of memory: a hardware error naming the address.
    mem.write_u64(root, (mem.size + (1 << 20)) | 3 << PTE_NL_SHIFT | perms)
    st, val, _s, refs, _p = W.walk_v1(mem._pages, mem.size, root, 4, 0, False, 0)
    assert (st, val, refs) == (W.HW_ERROR, mem.size + (1 << 20), 1)


def test_hardware_sets_access_and_dirty_bits() -> None:
    mem = PhysicalMemory(MEM)
    pt = AmdV1PageTable(mem, 3)
    pa = _raw(mem)
    pt.map(0x5000, pa, 4096, RW)
    hw_walk(mem, pt, 0x5000, write=False, had=3)
    ((slot, _i, _l),) = pt._leaves(0x5000, 0x5FFF)
    assert mem.read_u64(slot) & (1 << 5) and not mem.read_u64(slot) & (1 << 6)
    hw_walk(mem, pt, 0x5000, write=True, had=0)
    assert not pt.fmt.is_dirty(mem.read_u64(slot))  # HAD off: no dirty update
    hw_walk(mem, pt, 0x5000, write=True, had=3)
    assert pt.read_and_clear_dirty(0, 1 << 20, True) == [(0x5000, 4096)]
    assert pt.read_and_clear_dirty(0, 1 << 20, True) == []


@pytest.mark.parametrize("pgsize", [0, 4096])
def test_runs_of_pages_write_the_bytes_of_one_map_per_page(pgsize: int) -> None:
    """iova and pa 8 KiB apart modulo 16 KiB: 8 KiB NextLevel-7 pages all along (or 4 KiB
    ones under map_pages()); one map of the run equals one map per page, byte for byte."""
    iova, pa, size = 1 << 30, (5 << 30) + 0x2000, 3 << 20
    step = pgsize or 0x2000
    tables = []
    for batched in (True, False):
        mem = PhysicalMemory(MEM)
        pt = AmdV1PageTable(mem, 4)
        if batched:
            pt.map(iova, pa, size, RW, pgsize)
        else:
            for off in range(0, size, step):
                pt.map(iova + off, pa + off, step, RW)
        tables.append([mem.read(t, 4096) for t in sorted(pt.tables)])
        assert pt.unmap(iova, size) == size
    assert tables[0] == tables[1]
    entry = int.from_bytes(tables[0][-1][:8], "little")
    assert ((entry >> PTE_NL_SHIFT) & 7 == NL_SIZED) == (not pgsize)
