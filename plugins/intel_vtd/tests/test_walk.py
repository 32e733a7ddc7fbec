"""First-stage, second-stage and nested walks: results, memory references, A/D, compiled = pure."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import pytest
from iommufd_intel_vtd import hw as H
from iommufd_intel_vtd.pgtable import SS_A, SS_D, SecondStageFormat

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw import walk_x86 as X
from iommufd_model.hw.compiled import is_compiled, load_pure, load_walker
from iommufd_model.hw.memory import PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable, WalkResult, walk
from iommufd_model.hw.x86_64 import X86_64Format

NAME = "iommufd_intel_vtd.walk"
compiled = load_walker(NAME)
pure = load_pure(NAME)
RW = IOMMU_READ | IOMMU_WRITE
G = 1 << 30
M2 = 1 << 21


def test_the_installed_walker_is_compiled_unless_pure_is_forced(world: Any) -> None:
    want = os.environ.get("IOMMUFD_MODEL_PURE") != "1"
    assert is_compiled(compiled) == want
    assert not is_compiled(pure)
    # The hardware model runs the compiled walker (the one the installer built).
    assert H.WALKER_MODULE == NAME and is_compiled(world.hw.walker) == want


def test_status_codes_match_the_framework_walker() -> None:
    for name in ("OK", "NOT_PRESENT", "PERMISSION", "ADDRESS_SIZE", "BAD_ENTRY", "S2_FAULT"):
        assert getattr(pure, name) == getattr(X, name) == getattr(compiled, name)


@pytest.mark.parametrize("levels", [4, 5])
@pytest.mark.parametrize(("size", "shift"), [(4096, 12), (M2, 21), (G, 30)])
def test_first_stage_walk_refs_and_page_sizes(levels: int, size: int, shift: int) -> None:
    mem = PhysicalMemory(1 << 40)
    pt = RadixPageTable(mem, X86_64Format(levels))
    pt.map(3 * G, 5 * G, size, RW)
    st, pa, got_shift, refs, prot = X.walk_x86(
        mem._pages, mem.size, pt.root, 3 * G + 0x123, levels, True, None
    )
    assert (st, pa, got_shift, prot) == (X.OK, 5 * G + 0x123, shift, RW)
    assert refs == levels - (shift - 12) // 9  # one read per level down to the leaf


@pytest.mark.parametrize("levels", [3, 4, 5])
@pytest.mark.parametrize(("size", "shift"), [(4096, 12), (M2, 21), (G, 30)])
def test_second_stage_walk_refs_and_page_sizes(levels: int, size: int, shift: int) -> None:
    mem = PhysicalMemory(1 << 40)
    fmt = SecondStageFormat(levels)
    pt = RadixPageTable(mem, fmt)
    pt.map(G, 7 * G, size, IOMMU_READ)
    for w in (compiled, pure):
        st, pa, got_shift, refs, prot = w.walk_ss(
            mem._pages, mem.size, pt.root, G + 0x42, levels, False, 0b110, False
        )
        assert (st, pa, got_shift, prot) == (w.OK, 7 * G + 0x42, shift, IOMMU_READ)
        assert refs == levels - (shift - 12) // 9

        def status(addr: int, write: bool, w: Any = w) -> int:
            res = w.walk_ss(mem._pages, mem.size, pt.root, addr, levels, write, 0b110, False)
            return int(res[0])

        assert status(G, True) == w.PERMISSION
        assert status(0, False) == w.NOT_PRESENT
        assert status(1 << (12 + 9 * levels), False) == w.ADDRESS_SIZE


def test_second_stage_large_page_without_sllps_is_reserved() -> None:
    mem = PhysicalMemory(1 << 40)
    pt = RadixPageTable(mem, SecondStageFormat(4))
    pt.map(0, G, M2, RW)
    got = compiled.walk_ss(mem._pages, mem.size, pt.root, 0, 4, False, 0, False)
    assert got[0] == compiled.BAD_ENTRY
    assert SecondStageFormat(4, sllps=0).large_leaf_levels == frozenset()


def test_second_stage_sets_accessed_and_dirty_only_with_ssade() -> None:
    mem = PhysicalMemory(1 << 40)
    fmt = SecondStageFormat(4)
    pt = RadixPageTable(mem, fmt)
    pt.map(0, G, 4096, RW)
    compiled.walk_ss(mem._pages, mem.size, pt.root, 0, 4, True, 0b110, False)
    assert pt.read_and_clear_dirty(0, 4096, False) == []
    compiled.walk_ss(mem._pages, mem.size, pt.root, 0, 4, False, 0b110, True)
    assert pt.read_and_clear_dirty(0, 4096, False) == []  # a read sets A only
    assert mem.read_u64(pt.root) & SS_A
    compiled.walk_ss(mem._pages, mem.size, pt.root, 0, 4, True, 0b110, True)
    assert pt.read_and_clear_dirty(0, 4096, True) == [(0, 4096)]
    assert pt.read_and_clear_dirty(0, 4096, False) == []
    assert not any(mem.read_u64(t) & SS_D for t in pt.tables)


@pytest.mark.parametrize(("fs_levels", "ss_levels"), [(4, 4), (5, 4), (4, 3), (5, 5)])
def test_nested_walk_counts_every_stage2_reference(fs_levels: int, ss_levels: int) -> None:
    mem = PhysicalMemory(1 << 40)
    s2 = RadixPageTable(mem, SecondStageFormat(ss_levels))
    gpa_base = 1 << 32  # 8 MiB of guest RAM at GPA 4 GiB, backed by contiguous host frames
    host = mem.alloc_contiguous(2048, align=512) << 12
    s2.map(gpa_base, host, 8 << 20, RW)

    class Guest:
        nxt = gpa_base

        def alloc_frame(self) -> int:
            self.nxt += 4096
            return (self.nxt - 4096) >> 12

        def read_u64(self, gpa: int) -> int:
            return mem.read_u64(gpa - gpa_base + host)

        def write_u64(self, gpa: int, v: int) -> None:
            mem.write_u64(gpa - gpa_base + host, v)

        def put_frame(self, pfn: int) -> None:
            pass

    s1 = RadixPageTable(Guest(), X86_64Format(fs_levels))  # type: ignore[arg-type]
    s1.map(0x5000, gpa_base + (4 << 20), 4096, RW)
    for w in (compiled, pure):
        st, pa, shift, refs, prot, s2st = w.walk_nested(
            X.walk_x86,
            mem._pages,
            mem.size,
            s1.root,
            0x5123,
            fs_levels,
            True,
            s2.root,
            ss_levels,
            0b110,
            False,
        )
        assert (st, pa, shift, prot, s2st) == (w.OK, host + (4 << 20) + 0x123, 12, RW, w.OK)
        # Each first-stage level: a stage-2 walk of the table pointer + the entry itself;
        # then a stage-2 walk of the output. The S2 maps guest RAM with 2 MiB pages.
        s2_walk = ss_levels - 1
        assert refs == fs_levels * (s2_walk + 1) + s2_walk
    # A GPA outside the stage-2 mapping: S2_FAULT with the stage-2 reason.
    s1.map(0x6000, 1 << 40, 4096, RW)
    st, gpa, *_rest, s2st = compiled.walk_nested(
        X.walk_x86,
        mem._pages,
        mem.size,
        s1.root,
        0x6000,
        fs_levels,
        False,
        s2.root,
        ss_levels,
        0b110,
        False,
    )
    assert st == compiled.S2_FAULT and s2st in (compiled.NOT_PRESENT, compiled.ADDRESS_SIZE)
    assert gpa == 1 << 40


def test_compiled_and_pure_agree_on_a_random_workload() -> None:
    rng = random.Random(8)
    mem = PhysicalMemory(1 << 40)
    s2 = RadixPageTable(mem, SecondStageFormat(4))
    for _ in range(60):
        page = rng.randrange(0, 4096)
        n = rng.choice([1, 2, 512, 513])
        prot = rng.choice([IOMMU_READ, RW, IOMMU_WRITE])
        with contextlib.suppress(OSError):
            s2.map(page << 12, (page + 0x20000) << 12, n << 12, prot)
    s1 = RadixPageTable(mem, X86_64Format(4))
    for _ in range(40):
        page = rng.randrange(0, 1024)
        with contextlib.suppress(OSError):
            s1.map(page << 12, rng.randrange(0, 5000) << 12, 4096, rng.choice([IOMMU_READ, RW]))
    for _ in range(2000):
        addr = rng.randrange(0, (4096 + 600) << 12)
        write = rng.random() < 0.5
        a = compiled.walk_ss(mem._pages, mem.size, s2.root, addr, 4, write, 0b110, False)
        b = pure.walk_ss(mem._pages, mem.size, s2.root, addr, 4, write, 0b110, False)
        assert a == b
        ref = walk(mem, s2.fmt, s2.root, addr, write)
        if isinstance(ref, WalkResult):
            assert (a[0], a[1], a[2], a[3]) == (0, ref.pa, ref.shift, ref.mem_refs)
        else:
            assert a[0] != 0 and a[3] == ref.mem_refs
        iova = rng.randrange(0, 1100) << 12
        args = (X.walk_x86, mem._pages, mem.size, s1.root, iova, 4, write, s2.root, 4, 0b110, False)
        assert compiled.walk_nested(*args) == pure.walk_nested(*args)


@pytest.mark.parametrize("w", [compiled, pure], ids=["compiled", "pure"])
def test_second_stage_depths_and_roots_outside_the_native_walk(w: Any) -> None:
    """Depths no second stage has fault BAD_ENTRY without a reference; a root outside memory
    faults ACCESS at the top level; an address above the depth faults ADDRESS_SIZE."""
    mem = PhysicalMemory(1 << 40)
    pt = RadixPageTable(mem, SecondStageFormat(4))
    pt.map(0x1000, 0x5000, 4096, IOMMU_READ | IOMMU_WRITE)
    pages, size = mem._pages, mem.size
    for levels in (0, -3, 6, 9):
        assert w.walk_ss(pages, size, pt.root, 0x1000, levels, False, 0, False) == (
            w.BAD_ENTRY,
            0,
            0,
            0,
            0,
        )
    for root in (1 << 62, (1 << 64) - 4096, size):
        assert w.walk_ss(pages, size, root, 0x1000, 4, False, 0, False)[:4] == (
            w.ACCESS,
            3,
            0,
            0,
        )
    assert w.walk_ss(pages, size, pt.root, 1 << 48, 4, False, 0, False)[:2] == (
        w.ADDRESS_SIZE,
        3,
    )
    assert w.walk_ss(pages, size, pt.root, 0x1234, 4, False, 0, False)[:4] == (w.OK, 0x5234, 12, 4)
