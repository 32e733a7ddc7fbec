"""The shared radix engine with the x86-64 format: builds, walks, unmaps and rolls back."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.memory import PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable, WalkFault, WalkResult, walk
from iommufd_model.hw.x86_64 import X86_D, X86_PS, X86_64Format, canonical
from iommufd_model.testing import assert_errno

RW = IOMMU_READ | IOMMU_WRITE
MIB2 = 1 << 21
GIB = 1 << 30


def _table(levels: int = 4) -> tuple[PhysicalMemory, RadixPageTable]:
    mem = PhysicalMemory(1 << 40)
    return mem, RadixPageTable(mem, X86_64Format(levels))


def test_4k_map_walk_costs_one_ref_per_level() -> None:
    mem, pt = _table()
    pt.map(0x1234_5000, 0x8_0000_0000, 0x1000, RW)
    res = walk(mem, pt.fmt, pt.root, 0x1234_5678, write=True)
    assert isinstance(res, WalkResult)
    assert (res.pa, res.shift, res.mem_refs) == (0x8_0000_0678, 12, 4)
    five = _table(5)
    five[1].map(0x1000, 0x2000, 0x1000, RW)
    deep = walk(five[0], five[1].fmt, five[1].root, 0x1008, write=False)
    assert isinstance(deep, WalkResult) and deep.mem_refs == 5


def test_large_pages_are_used_when_aligned() -> None:
    mem, pt = _table()
    pt.map(GIB, 4 * GIB, GIB + MIB2 + 0x1000, RW)
    one_g = walk(mem, pt.fmt, pt.root, GIB + 5, write=False)
    two_m = walk(mem, pt.fmt, pt.root, 2 * GIB + 5, write=False)
    four_k = walk(mem, pt.fmt, pt.root, 2 * GIB + MIB2 + 5, write=False)
    assert [r.shift for r in (one_g, two_m, four_k) if isinstance(r, WalkResult)] == [30, 21, 12]
    assert isinstance(one_g, WalkResult) and one_g.mem_refs == 2


def test_read_only_leaf_refuses_writes_and_unmapped_faults() -> None:
    mem, pt = _table()
    pt.map(0x10000, 0x20000, 0x1000, IOMMU_READ)
    bad = walk(mem, pt.fmt, pt.root, 0x10000, write=True)
    assert isinstance(bad, WalkFault) and bad.reason == "permission"
    miss = walk(mem, pt.fmt, pt.root, 0x11000, write=False)
    assert isinstance(miss, WalkFault) and miss.reason == "not-present" and miss.level == 0
    wide = walk(mem, pt.fmt, pt.root, 1 << 48, write=False)
    assert isinstance(wide, WalkFault) and wide.reason == "address-size"


def test_failed_map_leaves_nothing_behind() -> None:
    mem, pt = _table()
    pt.map(0x200000, 0x1000000, 0x1000, RW)
    frames = mem.frames_in_use
    with pytest.raises(OSError) as exc:
        # 0x1FF000 needs a new last-level table, then 0x200000 collides: all undone.
        pt.map(0x1FF000, 0x3000000, 0x2000, RW)
    assert exc.value.errno == errno.EEXIST
    assert pt.iova_to_phys(0x1FF000) == -1
    assert pt.iova_to_phys(0x200000) == 0x1000000
    assert mem.frames_in_use == frames


def test_unmap_refuses_to_split_a_large_page() -> None:
    _mem, pt = _table()
    pt.map(0, 0, MIB2, RW)
    assert_errno(errno.EINVAL, lambda: pt.unmap(0, 0x1000))
    assert pt.unmap(0, MIB2) == MIB2
    assert pt.iova_to_phys(0) == -1


def test_dirty_bits_read_and_clear() -> None:
    mem, pt = _table()
    pt.map(0, 0x100000, 0x3000, RW)
    slot_leaf = next(s for s, _i, _lvl in pt._leaves(0x1000, 0x1FFF))
    mem.write_u64(slot_leaf, mem.read_u64(slot_leaf) | X86_D)  # as hardware does on write
    assert pt.read_and_clear_dirty(0, 0x3000, clear=False) == [(0x1000, 0x1000)]
    assert pt.read_and_clear_dirty(0, 0x3000, clear=True) == [(0x1000, 0x1000)]
    assert pt.read_and_clear_dirty(0, 0x3000, clear=True) == []


def test_ps_in_pml4_is_not_a_leaf() -> None:
    fmt = X86_64Format(4)
    assert fmt.decode(X86_PS | 1 | 0x1000, 3)[0] == 0


def test_canonical() -> None:
    assert canonical(0x7FFF_FFFF_FFFF, 48) and canonical(0xFFFF_8000_0000_0000, 48)
    assert not canonical(0x8000_0000_0000, 48)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1023), st.integers(1, 8), st.booleans()), max_size=12))
def test_random_maps_agree_with_a_dict_model(ops: list[tuple[int, int, bool]]) -> None:
    _mem, pt = _table()
    model: dict[int, int] = {}
    for page, npages, unmap in ops:
        iova = page << 12
        span = range(page, page + npages)
        if unmap:
            if all(p in model for p in span):
                assert pt.unmap(iova, npages << 12) == npages << 12
                for p in span:
                    del model[p]
            continue
        if any(p in model for p in span):
            with pytest.raises(OSError):
                pt.map(iova, 0x4000_0000 + iova, npages << 12, RW)
        else:
            pt.map(iova, 0x4000_0000 + iova, npages << 12, RW)
            model.update({p: 0x4000_0000 + (p << 12) for p in span})
    for p in range(0, 1032):
        assert pt.iova_to_phys(p << 12) == model.get(p, -1)


def _table_bytes(mem: PhysicalMemory, pt: RadixPageTable) -> list[bytes]:
    """Every table page by address (the same tables in the same order get the same frames)."""
    return [mem.read(table, 0x1000) for table in sorted(pt.tables)]


@settings(max_examples=40, deadline=None)
@given(
    first=st.integers(0, 1100),
    pages=st.integers(1, 1600),
    pa_page=st.integers(1, 1 << 20),
    pgsize=st.sampled_from([0, 0x1000, MIB2]),
)
def test_batched_map_writes_the_bytes_of_page_by_page_maps(
    first: int, pages: int, pa_page: int, pgsize: int
) -> None:
    """One map of a run (one write per leaf table) leaves exactly the bytes that a map per
    page (with huge pages off) or per largest page would, and unmaps back to empty."""
    iova, pa, size = GIB + (first << 12), pa_page << 12, pages << 12
    mem_a, batched = _table()
    batched.map(iova, pa, size, RW, pgsize)
    mem_b, single = _table()
    if pgsize == 0x1000:
        for k in range(pages):
            single.map(iova + (k << 12), pa + (k << 12), 0x1000, RW)
    else:  # page by page through the largest page each position allows
        pos = 0
        while pos < size:
            at = iova + pos | pa + pos
            step = next(
                s
                for s in (GIB, MIB2, 0x1000)
                if (not pgsize or s <= pgsize) and size - pos >= s and not at % s
            )
            single.map(iova + pos, pa + pos, step, RW)
            pos += step
    assert _table_bytes(mem_a, batched) == _table_bytes(mem_b, single)
    assert batched.unmap(iova, size) == size
    assert batched._leaves(0, (1 << 48) - 1) == []


def test_batched_map_rolls_back_a_collision_in_a_later_table() -> None:
    mem, pt = _table()
    pt.map(GIB + 3 * MIB2 + 0x5000, 0x1000, 0x1000, RW)
    frames = mem.frames_in_use
    before = _table_bytes(mem, pt)
    # three leaf tables: two new, the third collides
    assert_errno(
        errno.EEXIST,
        lambda: pt.map(GIB + MIB2 - 0x2000, 0x4000_0000, 2 * MIB2 + 0x8000, RW, 0x1000),
    )
    assert mem.frames_in_use == frames and _table_bytes(mem, pt) == before
