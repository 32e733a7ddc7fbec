"""The compiled x86-64 walker, its pure source and the reference radix walk agree exactly."""

from __future__ import annotations

import contextlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.compiled import is_compiled, load_pure, load_walker
from iommufd_model.hw.memory import PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable, WalkResult, walk
from iommufd_model.hw.x86_64 import X86_64Format

NAME = "iommufd_model.hw.walk_x86"
compiled = load_walker(NAME)
pure = load_pure(NAME)


def test_the_installed_walker_is_compiled_unless_pure_is_forced() -> None:
    # CI installs with mypyc; IOMMUFD_MODEL_PURE=1 at install or run time selects the source.
    assert is_compiled(compiled) == (os.environ.get("IOMMUFD_MODEL_PURE") != "1")
    assert not is_compiled(pure)


@settings(max_examples=40, deadline=None)
@given(
    maps=st.lists(
        st.tuples(st.integers(0, 4095), st.sampled_from([1, 2, 512, 513]), st.booleans()),
        max_size=8,
    ),
    probes=st.lists(st.integers(0, (4096 + 600) << 12), min_size=1, max_size=40),
    levels=st.sampled_from([4, 5]),
)
def test_compiled_pure_and_reference_agree(
    maps: list[tuple[int, int, bool]], probes: list[int], levels: int
) -> None:
    mem = PhysicalMemory(1 << 40)
    pt = RadixPageTable(mem, X86_64Format(levels))
    for page, npages, writable in maps:
        prot = IOMMU_READ | (IOMMU_WRITE if writable else 0)
        with contextlib.suppress(OSError):  # overlapping draws are refused, as they must be
            pt.map(page << 12, (page + 0x10000) << 12, npages << 12, prot)
    for iova in probes:
        for write in (False, True):
            a = compiled.walk_x86(mem._pages, mem.size, pt.root, iova, levels, write, None)
            b = pure.walk_x86(mem._pages, mem.size, pt.root, iova, levels, write, None)
            assert a == b
            ref = walk(mem, pt.fmt, pt.root, iova, write)
            if isinstance(ref, WalkResult):
                assert a[0] == compiled.OK and (a[1], a[2], a[3]) == (
                    ref.pa,
                    ref.shift,
                    ref.mem_refs,
                )
            else:
                assert a[0] != compiled.OK and a[3] == ref.mem_refs


def test_nested_walk_translates_every_table_pointer_through_stage2() -> None:
    mem = PhysicalMemory(1 << 40)
    guest = RadixPageTable(mem, X86_64Format(4))
    guest.map(0x1000, 0x5000, 0x1000, IOMMU_READ | IOMMU_WRITE)
    calls: list[int] = []

    def s2(gpa: int, write: bool) -> tuple[int, int, int]:
        calls.append(gpa)
        return 0, gpa, 4  # identity stage 2 costing a 4-level walk per access

    res = compiled.walk_x86(mem._pages, mem.size, guest.root, 0x1234, 4, False, s2)
    assert res[0] == compiled.OK and res[1] == 0x5234
    # 4 guest table reads + the final output: 5 stage-2 translations of 4 refs each, + 4.
    assert len(calls) == 5 and res[3] == 5 * 4 + 4
    refused = compiled.walk_x86(
        mem._pages, mem.size, guest.root, 0x1234, 4, False, lambda gpa, w: (1, 0, 2)
    )
    assert refused[0] == compiled.S2_FAULT and refused[1] == guest.root + 0
