"""The compiled walkers: identical to their pure source, and the 2-D walk's memory references."""

from __future__ import annotations

import os
import random
from types import ModuleType

import pytest
from iommufd_amd.gcr3 import Gcr3Table, V2PageTable
from iommufd_amd.pgtable_v1 import AmdV1PageTable

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.compiled import is_compiled, load_pure, load_walker
from iommufd_model.hw.memory import PAGE_SHIFT, PhysicalMemory

NAME = "iommufd_amd.walk"
X86 = "iommufd_model.hw.walk_x86"
compiled = load_walker(NAME)
pure = load_pure(NAME)
RW = IOMMU_READ | IOMMU_WRITE
GPA_BASE = 1 << 36  # guest data lives here in guest-physical space


def test_the_installed_walker_is_compiled_unless_pure_is_forced() -> None:
    assert is_compiled(compiled) == (os.environ.get("IOMMUFD_MODEL_PURE") != "1")
    assert not is_compiled(pure)


def test_status_numbers_match_the_framework_walker() -> None:
    x86 = load_walker(X86)
    for name in ("OK", "NOT_PRESENT", "PERMISSION", "ADDRESS_SIZE", "BAD_ENTRY", "S2_FAULT"):
        assert getattr(compiled, name) == getattr(pure, name) == getattr(x86, name)


class NestedRig:
    """Host v1 table (GPA -> SPA), a guest v2 table and GCR3 table, all in one memory.

    The guest's own structures are placed at GPA == SPA (the host maps their frames
    1:1), the guest's data pages at GPA_BASE + i map to scattered system frames.
    """

    def __init__(self, seed: int, host_mode: int = 4, guest_levels: int = 4, glx: int = 0):
        rng = random.Random(seed)
        self.mem = mem = PhysicalMemory(1 << 40)
        self.host = AmdV1PageTable(mem, host_mode)
        self.guest = V2PageTable(mem, guest_levels)
        self.gcr3 = Gcr3Table(mem, glx)
        self.host_mode = host_mode
        self.guest_levels = guest_levels
        self.pasid = rng.randrange(1, 1 << (9 * (glx + 1)))
        self.gvas: list[int] = []
        self.ok: dict[int, int] = {}  # gva -> the byte its page holds, when fully mapped
        for i in range(24):
            gva = rng.randrange(0, 1 << 30) & ~0xFFF
            gpa = GPA_BASE + (i << 12)
            spa = mem.alloc_frame() << PAGE_SHIFT
            mem.write(spa, bytes([i]) * 16)
            try:
                self.guest.map(gva, gpa, 4096, RW if i % 3 else IOMMU_READ)
            except OSError:
                continue
            if i % 7:  # some guest pages have no stage-2 mapping
                self.host.map(gpa, spa, 4096, RW)
                self.ok[gva] = i
            self.gvas.append(gva)
        self.gcr3.set(self.pasid, self.guest.root)
        for frame in sorted(set(self.guest.tables) | set(self.gcr3.tables)):
            self.host.map(frame, frame, 4096, RW)

    def walk(
        self,
        mod: ModuleType,
        x86: ModuleType,
        gva: int,
        write: bool,
        pasid: int | None = None,
        host_mode: int | None = None,
    ) -> tuple[int, int, int, int, int]:
        mem = self.mem
        result: tuple[int, int, int, int, int] = mod.walk_nested(
            mem._pages,
            mem.size,
            self.host.root,
            self.host_mode if host_mode is None else host_mode,
            0,
            self.gcr3.root,
            self.gcr3.glx,
            self.guest_levels,
            self.pasid if pasid is None else pasid,
            gva,
            write,
            x86.walk_x86,
        )
        return result


def test_two_dimensional_walk_memory_references() -> None:
    rig = NestedRig(1)
    x86 = load_walker(X86)
    gva, byte = next(iter(rig.ok.items()))
    st, pa, shift, refs, _ = rig.walk(compiled, x86, gva + 0x8, False)
    assert st == compiled.OK and shift == 12
    assert rig.mem.read(pa, 8) == bytes([byte]) * 8
    # 1-level GCR3 + 4 guest levels, each pointer through a 4-level host walk, plus the
    # final guest-physical output: (1 + 4) * (4 + 1) + 4 = 29 references.
    assert refs == (1 + 4) * (4 + 1) + 4
    # 5-level host, 2-level GCR3: (2 + 4) * (5 + 1) + 5 = 41
    rig5 = NestedRig(2, host_mode=5, glx=1)
    st, _pa, _s, refs, _ = rig5.walk(compiled, x86, next(iter(rig5.ok)), False)
    assert st == compiled.OK and refs == (2 + 4) * (5 + 1) + 5
    # No host stage (v2 only): GCR3 and guest tables are system-physical: 1 + 4
    st, pa2, _s, refs, _ = rig.walk(compiled, x86, gva + 0x8, False, host_mode=0)
    assert refs == 5 and st == compiled.OK and GPA_BASE <= pa2 < GPA_BASE + (24 << 12)


@pytest.mark.parametrize("seed", range(6))
def test_compiled_and_pure_agree_on_a_random_workload(seed: int) -> None:
    rng = random.Random(seed)
    rig = NestedRig(
        seed,
        host_mode=rng.choice([4, 5, 6]),
        guest_levels=rng.choice([4, 5]),
        glx=rng.choice([0, 1]),
    )
    cx86, px86 = load_walker(X86), load_pure(X86)
    mem = rig.mem
    probes = [g + rng.randrange(4096) for g in rig.gvas] + [
        rng.randrange(1 << 48) for _ in range(40)
    ]
    seen = set()
    for iova in probes:
        for write in (False, True):
            for pasid in (None, rig.pasid ^ 1):
                a = rig.walk(compiled, cx86, iova, write, pasid)
                b = rig.walk(pure, px86, iova, write, pasid)
                assert a == b
                seen.add(a[0])
            gpa = GPA_BASE + rng.randrange(40 << 12)
            args = (mem._pages, mem.size, rig.host.root, rig.host_mode, gpa, write, 0)
            assert compiled.walk_v1(*args) == pure.walk_v1(*args)
    assert compiled.OK in seen and compiled.S2_FAULT in seen and compiled.NOT_PRESENT in seen


@pytest.mark.parametrize("host_mode", [4, 6])
def test_wide_iovas_walk_alike_compiled_and_pure(host_mode: int) -> None:
    """IOVAs of 60 to 65 bits (a hostile guest's DMA): the native walks take 64-bit IOVAs as
    signed i64 and must neither raise nor answer differently from the pure walks."""
    rig = NestedRig(3, host_mode=host_mode)
    cx86, px86 = load_walker(X86), load_pure(X86)
    mem = rig.mem
    wide = [1 << 60, (1 << 63) - 4096, 1 << 63, (1 << 63) + 0x1234, (1 << 64) - 8, 1 << 64]
    for iova in wide:
        for write in (False, True):
            assert rig.walk(compiled, cx86, iova, write) == rig.walk(pure, px86, iova, write)
            args = (mem._pages, mem.size, rig.host.root, host_mode, iova, write, 0)
            assert compiled.walk_v1(*args) == pure.walk_v1(*args)
    assert compiled.walk_v1(mem._pages, mem.size, rig.host.root, 6, 1 << 64, False, 0)[0] == (
        compiled.ADDRESS_SIZE
    )


def test_nested_walk_hardware_errors() -> None:
    rig = NestedRig(3)
    x86 = load_walker(X86)
    mem = rig.mem
    gva = next(iter(rig.ok))
    # A host table pointer beyond memory, met while translating a guest table pointer.
    root_slot = rig.host.root
    saved = mem.read_u64(root_slot)
    mem.write_u64(root_slot, (mem.size + (1 << 30)) | (saved & 0xFFF) | (saved & (3 << 61)))
    st, val, *_ = rig.walk(compiled, x86, gva, False)
    assert (st, val) == (compiled.HW_ERROR, mem.size + (1 << 30))
    mem.write_u64(root_slot, saved)
    # A GCR3 table root outside memory (no host stage): hardware error too.
    st, val, *_ = compiled.walk_nested(
        mem._pages, mem.size, 0, 0, 0, mem.size + 4096, 0, 4, rig.pasid, gva, False, x86.walk_x86
    )
    assert st == compiled.HW_ERROR
    # A PASID beyond the GCR3 table's reach is simply not present.
    assert rig.walk(compiled, x86, gva, False, pasid=1 << 9)[0] == compiled.NOT_PRESENT
