"""The native (i64, word-view) walk paths equal the general ones, compiled and pure alike.

Every walker module has a fast path on native ints that reads entries through the memory's
word views, and a general path (plain ints, or a stage-2 callback through the first-stage
walker it is handed). Random tables -- including corrupted entries, skipped levels, sized
pages, entries with bit 63 set and pointers outside memory -- go through both, in the
compiled and the pure build, and every result and every byte of memory (A/D updates) agrees.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import pytest
from librt.vecs import vec
from mypy_extensions import i64

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.compiled import load_pure, load_walker
from iommufd_model.hw.memory import PAGE_SHIFT, PhysicalMemory, new_frame
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.x86_64 import X86_64Format

RW = IOMMU_READ | IOMMU_WRITE
MEM = 1 << 34
X86 = "iommufd_model.hw.walk_x86"
x86_builds = [load_walker(X86), load_pure(X86)]


def corrupt(mem: PhysicalMemory, tables: Iterable[int], rng: random.Random, n: int) -> None:
    """Overwrite ``n`` random entries of the given tables with random (sometimes wild) words."""
    order = sorted(tables)
    for _ in range(n):
        table = rng.choice(order)
        slot = table + rng.randrange(512) * 8
        kind = rng.random()
        if kind < 0.3:
            value = rng.getrandbits(64)
        elif kind < 0.6:  # a plausible entry pointing at another table or far outside memory
            target = rng.choice(order) if rng.random() < 0.7 else rng.getrandbits(52) & ~0xFFF
            value = target | rng.getrandbits(12) | (rng.getrandbits(12) << 52)
        else:  # an existing entry with some flag bits flipped
            value = mem.read_u64(slot) ^ (1 << rng.randrange(64))
        mem.write_u64(slot, value)


def other_walker(wrapped: Callable[..., Any]) -> Callable[..., Any]:
    """The same x86 walker under another name: vendor walkers then take their callback path."""

    def first_stage(*args: Any) -> Any:
        return wrapped(*args)

    return first_stage


# -- the framework's x86-64 walker ------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_x86_native_walk_equals_the_general_loop(seed: int) -> None:
    rng = random.Random(seed)
    mem = PhysicalMemory(MEM)
    levels = rng.choice([4, 5])
    pt = RadixPageTable(mem, X86_64Format(levels))
    for _ in range(40):
        with contextlib.suppress(OSError):
            pt.map(
                rng.randrange(1 << 20) << 12,
                rng.randrange(1 << 20) << 12,
                rng.choice([1, 512]) << 12,
                rng.choice([IOMMU_READ, RW]),
            )
    corrupt(mem, pt.tables, rng, 30)
    probes = [rng.randrange(1 << (12 + 9 * levels)) for _ in range(300)]
    probes += [1 << 63, (1 << 64) - 1, -4096]
    for iova in probes:
        write = rng.random() < 0.5
        results = set()
        for w in x86_builds:
            results.add(w.walk_x86(mem._pages, mem.size, pt.root, iova, levels, write, None))
            # The general loop: a memory size beyond the native range, and a plain page dict.
            results.add(w.walk_x86(dict(mem._pages), mem.size, pt.root, iova, levels, write, None))
            big = w.walk_x86(mem._pages, 1 << 63, pt.root, iova, levels, write, None)
            if big[0] != w.BAD_ENTRY:  # (a pointer past mem.size is a bad entry only below)
                results.add(big)
        assert len(results) == 1, (hex(iova), results)


# -- AMD --------------------------------------------------------------------------------------
amd_walk = pytest.importorskip("iommufd_amd.walk")
amd_builds = [load_walker("iommufd_amd.walk"), load_pure("iommufd_amd.walk")]


def amd_rig(seed: int) -> tuple[PhysicalMemory, dict[str, Any], list[int]]:
    from iommufd_amd.gcr3 import Gcr3Table, V2PageTable
    from iommufd_amd.pgtable_v1 import AmdV1PageTable

    rng = random.Random(seed)
    mem = PhysicalMemory(MEM)
    host_mode = rng.choice([3, 4, 6])
    host = AmdV1PageTable(mem, host_mode)
    guest_levels = rng.choice([4, 5])
    guest = V2PageTable(mem, guest_levels)
    glx = rng.choice([0, 1])
    gcr3 = Gcr3Table(mem, glx)
    gvas = []
    for i in range(40):
        gva = rng.randrange(1 << 30) & ~0xFFF
        gpa = (1 << 33) + (i << 21)
        with contextlib.suppress(OSError):
            guest.map(gva, gpa, 4096, rng.choice([IOMMU_READ, RW]))
            gvas.append(gva)
        if rng.random() < 0.9:
            with contextlib.suppress(OSError):
                host.map(
                    gpa, mem.alloc_frame() << PAGE_SHIFT, 4096, rng.choice([IOMMU_READ, RW, RW])
                )
    pasid = rng.randrange(1, 1 << (9 * (glx + 1)))
    gcr3.set(pasid, guest.root)
    for frame in sorted(set(guest.tables) | set(gcr3.tables)):
        if rng.random() < 0.95:
            host.map(frame, frame, 4096, RW)
    corrupt(mem, set(host.tables) | set(guest.tables) | set(gcr3.tables), rng, 12)
    args = dict(
        host_root=host.root,
        host_mode=host_mode,
        gcr3_root=gcr3.root,
        glx=glx,
        guest_levels=guest_levels,
        pasid=pasid,
    )
    probes = gvas + [rng.randrange(1 << 31) for _ in range(40)] + [1 << 60]
    return mem, args, probes


@pytest.mark.parametrize("seed", range(8))
def test_amd_native_nested_walk_equals_the_callback_walk(seed: int) -> None:
    rng = random.Random(seed)
    mem, a, probes = amd_rig(seed)
    # Each variant on its own copy of memory: A/D updates must land identically too.
    variants: list[tuple[ModuleType, Callable[..., Any]]] = [
        (w, f)
        for w in amd_builds
        for f in (
            x86_builds[0].walk_x86,
            x86_builds[1].walk_x86,
            other_walker(x86_builds[1].walk_x86),
        )
    ]
    mems = [PhysicalMemory(MEM) for _ in variants]
    for m in mems:
        for pfn, page in mem._pages.items():
            m._pages[pfn] = new_frame(memoryview(bytes(page)).cast("q"))
    for gva in probes:
        write = rng.random() < 0.5
        had = rng.choice([0, 1, 3])
        host_mode = a["host_mode"] if rng.random() < 0.8 else rng.choice([0, 0, 7])
        pasid = a["pasid"] if rng.random() < 0.9 else rng.randrange(1 << 10)
        results = set()
        for (w, x86), m in zip(variants, mems, strict=True):
            results.add(
                w.walk_nested(
                    m._pages,
                    m.size,
                    a["host_root"],
                    host_mode,
                    had,
                    a["gcr3_root"],
                    a["glx"],
                    a["guest_levels"],
                    pasid,
                    gva,
                    write,
                    x86,
                )
            )
        assert len(results) == 1, (hex(gva), results)
    for m in mems[1:]:
        assert dict(m._pages) == dict(mems[0]._pages)


@pytest.mark.parametrize("seed", range(6))
def test_amd_v1_walk_compiled_equals_pure_on_corrupted_tables(seed: int) -> None:
    rng = random.Random(seed)
    mem, a, _ = amd_rig(seed)
    mems = [PhysicalMemory(MEM) for _ in amd_builds]
    for m in mems:
        for pfn, page in mem._pages.items():
            m._pages[pfn] = new_frame(memoryview(bytes(page)).cast("q"))
    for _ in range(400):
        iova = rng.choice(
            [rng.randrange(1 << 36), rng.getrandbits(64), (1 << 33) + rng.randrange(1 << 27)]
        )
        write = rng.random() < 0.5
        had = rng.choice([0, 1, 2, 3])
        mode = a["host_mode"] if rng.random() < 0.9 else rng.randrange(0, 8)
        got = {
            w.walk_v1(m._pages, m.size, a["host_root"], mode, iova, write, had)
            for w, m in zip(amd_builds, mems, strict=True)
        }
        assert len(got) == 1, (hex(iova), got)
    assert dict(mems[0]._pages) == dict(mems[1]._pages)


# -- Intel VT-d -------------------------------------------------------------------------------
vtd_walk = pytest.importorskip("iommufd_intel_vtd.walk")
vtd_builds = [load_walker("iommufd_intel_vtd.walk"), load_pure("iommufd_intel_vtd.walk")]


@pytest.mark.parametrize("seed", range(8))
def test_vtd_native_walks_equal_the_general_ones(seed: int) -> None:
    from iommufd_intel_vtd.pgtable import SecondStageFormat

    rng = random.Random(seed)
    mem = PhysicalMemory(MEM)
    ss_levels = rng.choice([3, 4, 5])
    s2 = RadixPageTable(mem, SecondStageFormat(ss_levels))
    fs_levels = rng.choice([4, 5])
    s1 = RadixPageTable(mem, X86_64Format(fs_levels))
    for _ in range(60):
        page = rng.randrange(1 << 16)
        with contextlib.suppress(OSError):
            s2.map(
                page << 12,
                rng.randrange(1, 1 << 18) << 12,
                rng.choice([1, 512]) << 12,
                rng.choice([IOMMU_READ, RW, IOMMU_WRITE]),
            )
        with contextlib.suppress(OSError):
            s1.map(rng.randrange(1 << 20) << 12, page << 12, 4096, rng.choice([IOMMU_READ, RW]))
    for frame in sorted(s1.tables):
        with contextlib.suppress(OSError):
            s2.map(frame, frame, 4096, RW)
    corrupt(mem, set(s1.tables) | set(s2.tables), rng, 20)
    large = rng.choice([0, 0b10, 0b110])
    variants = [
        (w, f)
        for w in vtd_builds
        for f in (x86_builds[0].walk_x86, other_walker(x86_builds[1].walk_x86))
    ]
    mems = [PhysicalMemory(MEM) for _ in variants]
    for m in mems:
        for pfn, src in mem._pages.items():
            m._pages[pfn] = new_frame(memoryview(bytes(src)).cast("q"))
    for _ in range(300):
        write = rng.random() < 0.5
        set_ad = rng.random() < 0.5
        iova = rng.choice([rng.randrange(1 << 32), rng.randrange(1 << 20) << 12, 1 << 62])
        nested = set()
        single = set()
        for (w, fs), m in zip(variants, mems, strict=True):
            nested.add(
                w.walk_nested(
                    fs,
                    m._pages,
                    m.size,
                    s1.root,
                    iova,
                    fs_levels,
                    write,
                    s2.root,
                    ss_levels,
                    large,
                    set_ad,
                )
            )
            single.add(w.walk_ss(m._pages, m.size, s2.root, iova, ss_levels, write, large, set_ad))
        assert len(nested) == 1, (hex(iova), nested)
        assert len(single) == 1, (hex(iova), single)
    for m in mems[1:]:
        assert dict(m._pages) == dict(mems[0]._pages)


@pytest.mark.parametrize("w", vtd_builds, ids=["compiled", "pure"])
def test_vtd_canonical_low_of_any_input(w: ModuleType) -> None:
    """The canonical check of a first-stage input, on the signed i64 the native walk holds:
    the upper half (bit 63 set) is walked like the lower one, anything else is refused."""
    rng = random.Random(3)
    values = [0, 1 << 46, (1 << 47) - 1, 1 << 47, 1 << 55, 1 << 56, 1 << 62, (1 << 63) - 1]
    values += [1 << 63, (1 << 64) - 1, (1 << 64) - (1 << 47), (1 << 64) - (1 << 56), -1, 1 << 64]
    values += [rng.getrandbits(64) for _ in range(200)]
    values += [((1 << 64) - (1 << 47)) | rng.getrandbits(47) for _ in range(50)]
    for levels in range(7):
        for iova in values:
            top = 11 + 9 * levels
            want = -1
            if 0 < levels <= 5 and 0 <= iova < 1 << 64:
                high = iova >> top
                if high in (0, (1 << (64 - top)) - 1):
                    want = iova & ((1 << (top + 1)) - 1)
            assert w.canonical_low(iova, levels) == want, (hex(iova), levels)


def _signed(values: list[int]) -> vec[i64]:
    """64-bit addresses as the drivers' native array holds them (bit 63: negative)."""
    return vec[i64]([v - (1 << 64) if v >> 63 else v for v in values])


def _probes(rng: random.Random, bits: int) -> list[int]:
    """Addresses for the own-loop drivers: mapped-looking, random, and beyond any size."""
    values = [rng.randrange(1 << 20) << 12 for _ in range(150)]
    values += [rng.randrange(1 << bits) for _ in range(100)]
    return [*values, 1 << 62, 1 << 63, (1 << 64) - 4096, ((1 << 64) - (1 << 47)) | 0x5000]


@pytest.mark.parametrize("seed", range(3))
def test_own_loop_drivers_walk_as_the_public_walkers(seed: int) -> None:
    """Each benchmark driver applies its public walker's checks and then its native walk: on
    corrupted tables and on addresses beyond the walked size or with bit 63 set, it counts as
    many successful walks as the public walker gives, in the compiled and the pure build."""
    from iommufd_amd.pgtable_v1 import AmdV1PageTable
    from iommufd_intel_vtd.pgtable import SecondStageFormat

    rng = random.Random(seed)
    mem = PhysicalMemory(MEM)
    v1 = AmdV1PageTable(mem, 4)
    fs = RadixPageTable(mem, X86_64Format(4))
    ss = RadixPageTable(mem, SecondStageFormat(4))
    for _ in range(60):
        page = rng.randrange(1 << 20) << 12
        for pt in (v1, fs, ss):
            with contextlib.suppress(OSError):
                pt.map(page, rng.randrange(1, 1 << 20) << 12, rng.choice([1, 512]) << 12, RW)
    for frame in sorted(fs.tables):
        with contextlib.suppress(OSError):
            ss.map(frame, frame, 4096, RW)
    corrupt(mem, set(v1.tables) | set(fs.tables) | set(ss.tables), rng, 25)
    pages, size = mem._pages, mem.size
    probes = _probes(rng, 48)
    native = _signed(probes)
    for x86, amd, vtd in zip(x86_builds, amd_builds, vtd_builds, strict=True):
        want = sum(x86.walk_x86(pages, size, fs.root, v, 4, False, None)[0] == 0 for v in probes)
        assert x86.walk_many(pages, size, fs.root, native, 4, 2) == 2 * want
        for mode in (3, 4, 6, 0):
            want = sum(amd.walk_v1(pages, size, v1.root, mode, v, False, 0)[0] == 0 for v in probes)
            assert amd.bench_v1(pages, size, v1.root, mode, native, 2) == 2 * want
        for levels in (4, 6):
            want = sum(
                vtd.walk_ss(pages, size, ss.root, v, levels, False, 0, False)[0] == 0
                for v in probes
            )
            assert vtd.bench_ss(pages, size, ss.root, native, levels, 2) == 2 * want
        for first_stage in (x86.walk_x86, other_walker(x86.walk_x86)):
            want = sum(
                vtd.walk_nested(
                    first_stage, pages, size, fs.root, v, 4, False, ss.root, 4, 0, False
                )[0]
                == 0
                for v in probes
            )
            got = vtd.bench_nested(first_stage, pages, size, fs.root, native, 4, ss.root, 4, 2)
            assert got == 2 * want
