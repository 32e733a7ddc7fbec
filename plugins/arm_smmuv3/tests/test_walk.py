"""VMSAv8-64 walks: stage 1, stage 2 and nested; blocks, pages, AP/S2AP, AF, sizes, costs;
the compiled walker against its pure source and the framework's reference radix walk."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import pytest
from iommufd_arm_smmuv3 import walk as W
from iommufd_arm_smmuv3.guest import IpaFrames, stage1_tables
from iommufd_arm_smmuv3.hw import WALKER
from iommufd_arm_smmuv3.pgtable import Stage1Format, Stage2Format
from librt.vecs import vec
from mypy_extensions import i64

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.compiled import is_compiled, load_pure, load_walker
from iommufd_model.hw.memory import PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable, WalkResult, walk

RW = IOMMU_READ | IOMMU_WRITE
compiled = load_walker(WALKER)
pure = load_pure(WALKER)
G = 1 << 30  # guest RAM starts at IPA 1 GiB
OFF = 0x40_0000_0000  # and sits at PA G + OFF


def s1(
    mem: PhysicalMemory,
    va: int,
    write: bool = False,
    *,
    oa: int = 48,
    affd: bool = False,
    ha: bool = False,
    root: int = 0,
    walker: object = compiled,
) -> tuple[int, ...]:
    """A stage-1-only walk (no stage 2) of the 48-bit table at ``root``."""
    no_s2 = (False, 0, 0, 0, 0, False)
    args = (mem._pages, mem.size, root, va, 48, oa, write, affd, ha, *no_s2)
    return walker.walk_s1(*args)  # type: ignore[attr-defined,no-any-return]


def s2(
    mem: PhysicalMemory,
    root: int,
    ipa: int,
    write: bool = False,
    *,
    ia: int = 48,
    start: int = 0,
    affd: bool = False,
) -> tuple[int, ...]:
    got: tuple[int, ...] = compiled.walk_s2(
        mem._pages, mem.size, root, ipa, ia, start, 48, write, affd
    )
    return got


@pytest.fixture
def mem() -> PhysicalMemory:
    return PhysicalMemory(1 << 40)


def test_stage1_pages_and_blocks_count_references(mem: PhysicalMemory) -> None:
    pt = RadixPageTable(mem, Stage1Format())
    pt.map(0x1000_0000, 0x5000_0000, 4096, RW)
    pt.map(0x4020_0000, 0x6020_0000, 1 << 21, RW)  # 2 MiB block
    pt.map(0x80_0000_0000, 0x80_0000_0000, 1 << 30, RW)  # 1 GiB block
    assert s1(mem, 0x1000_0123, root=pt.root)[:5] == (W.OK, 0x5000_0123, 12, 4, 3)
    assert s1(mem, 0x4030_0004, root=pt.root)[:5] == (W.OK, 0x6030_0004, 21, 3, 3)
    assert s1(mem, 0x80_1234_5678, True, root=pt.root)[:5] == (W.OK, 0x80_1234_5678, 30, 2, 3)
    ref = walk(mem, pt.fmt, pt.root, 0x4030_0004, False)
    assert isinstance(ref, WalkResult) and ref.pa == 0x6030_0004 and ref.mem_refs == 3


def test_stage1_faults(mem: PhysicalMemory) -> None:
    pt = RadixPageTable(mem, Stage1Format())
    pt.map(0x1000, 0x9000, 4096, IOMMU_READ)
    r = s1(mem, 0x1000, True, root=pt.root)
    assert (r[0], r[4]) == (W.F_PERMISSION, 1)  # AP[2] read-only
    assert s1(mem, 0x2000, root=pt.root)[0] == W.F_TRANSLATION
    assert s1(mem, 1 << 48, root=pt.root)[:4] == (W.F_TRANSLATION, 0, 0, 0)  # beyond T0SZ
    assert s1(mem, 0x1000, root=pt.root, oa=12)[0] == W.F_ADDR_SIZE  # table above IPS
    slot = pt._leaves(0x1000, 0x1000)[0][0]
    leaf = mem.read_u64(slot)
    mem.write_u64(slot, leaf & ~W.S1_AP_UNPRIV)  # privileged-only page
    assert s1(mem, 0x1000, root=pt.root)[0] == W.F_PERMISSION
    mem.write_u64(slot, leaf & ~W.DESC_AF)
    assert s1(mem, 0x1000, root=pt.root)[0] == W.F_ACCESS
    assert s1(mem, 0x1000, root=pt.root, affd=True)[0] == W.OK
    assert s1(mem, 0x1000, root=pt.root, ha=True)[0] == W.OK  # hardware sets AF
    assert mem.read_u64(slot) == leaf
    mem.write_u64(slot, (leaf & ~3) | 1)  # block encoding at level 3 is reserved
    assert s1(mem, 0x1000, root=pt.root)[0] == W.F_TRANSLATION
    top = mem.size - 4096  # a table pointer at the end of memory
    mem.write_u64(pt.root, (top + 4096 * 4) | 3)
    r = s1(mem, 0x1000, root=pt.root)
    assert r[0] == W.F_WALK_EABT and r[1] == top + 4096 * 4


def test_stage1_aptable_read_only(mem: PhysicalMemory) -> None:
    pt = RadixPageTable(mem, Stage1Format())
    pt.map(0x1000, 0x9000, 4096, RW)
    mem.write_u64(pt.root, mem.read_u64(pt.root) | W.S1_APTABLE_RDONLY)
    r = s1(mem, 0x1000, True, root=pt.root)
    assert r[0] == W.F_PERMISSION and s1(mem, 0x1000, root=pt.root)[4] == 1


def test_stage2_s2ap_af_and_start_levels(mem: PhysicalMemory) -> None:
    pt = RadixPageTable(mem, Stage2Format())
    pt.map(0x1000, 0xA000, 4096, IOMMU_READ)
    pt.map(0x20_0000, 0x60_0000, 1 << 21, RW)
    assert s2(mem, pt.root, 0x1010)[:5] == (W.OK, 0xA010, 12, 4, 1)
    assert s2(mem, pt.root, 0x1010, True)[0] == W.F_PERMISSION  # S2AP write clear
    assert s2(mem, pt.root, 0x20_1000, True)[:4] == (W.OK, 0x60_1000, 21, 3)
    # SL0 = 1: a 39-bit IPA starts at level 1 with the level-1 table as S2TTB
    l1 = mem.read_u64(pt.root) & W.DESC_OA
    assert s2(mem, l1, 0x1010, ia=39, start=1)[:4] == (W.OK, 0xA010, 12, 3)
    assert s2(mem, l1, 1 << 39, ia=39, start=1)[0] == W.F_TRANSLATION
    slot = pt._leaves(0x1000, 0x1000)[0][0]
    mem.write_u64(slot, mem.read_u64(slot) & ~W.DESC_AF)
    assert s2(mem, pt.root, 0x1010)[0] == W.F_ACCESS
    assert s2(mem, pt.root, 0x1010, affd=True)[0] == W.OK


def test_stage2_concatenated_start_table(mem: PhysicalMemory) -> None:
    # 40-bit IPA from level 1: two concatenated level-1 tables (1024 entries).
    first = mem.alloc_contiguous(2, 2) << 12
    mem.write_u64(first + 512 * 8, (3 << 30) | W.DESC_VALID | W.DESC_AF | W.S2AP_READ)
    r = s2(mem, first, (1 << 39) + 0x1234, ia=40, start=1)
    assert r[:4] == (W.OK, (3 << 30) + 0x1234, 30, 1)


def nested_setup(mem: PhysicalMemory) -> tuple[RadixPageTable, RadixPageTable, IpaFrames]:
    s2pt = RadixPageTable(mem, Stage2Format())
    s2pt.map(G, G + OFF, 1 << 24, RW)  # 16 MiB of guest RAM
    guest = IpaFrames(mem, s2pt, G + (8 << 20))
    s1pt = stage1_tables(guest)
    return s2pt, s1pt, guest


def nested(
    mem: PhysicalMemory,
    s1pt: RadixPageTable,
    s2pt: RadixPageTable,
    va: int,
    write: bool = False,
    walker: object = compiled,
    *,
    s2_ia: int = 48,
    s2_start: int = 0,
    granule: int = 12,
    s2_granule: int = 12,
    ha: bool = False,
    hd: bool = False,
) -> tuple[int, ...]:
    """A nested walk of ``s1pt`` (48-bit input and output) through ``s2pt`` (48-bit output;
    its input size, start level, both granules and CD.HA / CD.HD as given)."""
    return walker.walk_s1(  # type: ignore[attr-defined,no-any-return]
        mem._pages,
        mem.size,
        s1pt.root,
        va,
        48,
        48,
        write,
        False,
        ha,
        True,
        s2pt.root,
        s2_ia,
        s2_start,
        48,
        False,
        hd,
        granule,
        s2_granule,
    )


def test_nested_walk_translates_every_table_access(mem: PhysicalMemory) -> None:
    s2pt, s1pt, _guest = nested_setup(mem)
    s1pt.map(0x7000_0000, G + 0x5000, 4096, RW)
    r = nested(mem, s1pt, s2pt, 0x7000_0042)
    # 4 stage-1 descriptors, each behind a stage-2 walk ending in a 2 MiB block (3 reads),
    # then the stage-2 walk of the output.
    assert r[:5] == (W.OK, G + OFF + 0x5042, 12, 4 + 4 * 3 + 3, 3)
    s1pt.map(0x4000_0000, G + (1 << 21), 1 << 21, IOMMU_READ)  # S1 block over S2 blocks
    r = nested(mem, s1pt, s2pt, 0x4000_1000)
    assert r[:3] == (W.OK, G + OFF + (1 << 21) + 0x1000, 21) and r[4] == 1
    assert nested(mem, s1pt, s2pt, 0x4000_1000, True)[0] == W.F_PERMISSION


def test_nested_stage2_faults_carry_ipa_and_class(mem: PhysicalMemory) -> None:
    s2pt, s1pt, _guest = nested_setup(mem)
    s1pt.map(0x7000_0000, G + (20 << 20), 4096, RW)  # output IPA outside guest RAM
    r = nested(mem, s1pt, s2pt, 0x7000_0000)
    assert (r[0], r[6], r[7], r[8]) == (W.F_TRANSLATION, 1, G + (20 << 20), W.CLASS_IN)
    s2pt.unmap(G + (8 << 20), 1 << 21)  # the block holding the guest's stage-1 root
    r = nested(mem, s1pt, s2pt, 0x7000_0000)
    assert (r[0], r[6], r[8]) == (W.F_TRANSLATION, 1, W.CLASS_TT)
    assert r[7] >> 12 == (G + (8 << 20)) >> 12


def _read_only_tables(mem: PhysicalMemory, s2pt: RadixPageTable) -> None:
    """Stage 2 maps the 2 MiB of guest RAM holding the guest's stage-1 tables read-only."""
    tables = G + (8 << 20)
    s2pt.unmap(tables, 1 << 21)
    s2pt.map(tables, tables + OFF, 1 << 21, IOMMU_READ)


@pytest.mark.parametrize("walker", [compiled, pure])
def test_nested_httu_update_is_a_stage2_write(mem: PhysicalMemory, walker: object) -> None:
    """HTTU in a nested walk: setting AF (CD.HA) or clearing AP[2] of a writable-clean leaf
    (CD.HD) writes the stage-1 descriptor, so stage 2 must let that IPA be written. A stage-2
    mapping that is read-only for the table page refuses the update: a stage-2 permission
    fault, CLASS TT, a write (tt_write = 1, TT_RnW 0), the descriptor's IPA, nothing written.
    Reads of the same tables go on; a writable mapping takes the updates as before."""
    s2pt, s1pt, guest = nested_setup(mem)
    s1pt.map(0x7000_0000, G + 0x5000, 4096, RW)
    leaf_ipa = s1pt._leaves(0x7000_0000, 0x7000_0000)[0][0]
    leaf = guest.read_u64(leaf_ipa)
    clean = leaf | W.S1_DBM | W.S1_AP_RDONLY  # writable-clean
    _read_only_tables(mem, s2pt)
    assert nested(mem, s1pt, s2pt, 0x7000_0010, walker=walker)[:2] == (W.OK, G + OFF + 0x5010)
    guest.write_u64(leaf_ipa, leaf & ~W.DESC_AF)
    before = _frames(mem)
    for write in (False, True):
        r = nested(mem, s1pt, s2pt, 0x7000_0010, write, walker, ha=True)
        assert (r[0], r[1], r[2], r[4], r[5]) == (W.F_PERMISSION, 0, 0, 0, 2)  # S2 level-2 block
        assert r[6:] == (1, leaf_ipa, W.CLASS_TT, 1)
        assert r[3] == 4 + 4 * 3  # every descriptor read, the update refused
        assert _frames(mem) == before
    # without HA the access flag fault is stage 1's own (nothing to write)
    r = nested(mem, s1pt, s2pt, 0x7000_0010, False, walker)
    assert (r[0], r[6], r[9]) == (W.F_ACCESS, 0, 0)
    guest.write_u64(leaf_ipa, clean)
    before = _frames(mem)
    assert nested(mem, s1pt, s2pt, 0x7000_0010, False, walker, ha=True, hd=True)[0] == W.OK
    r = nested(mem, s1pt, s2pt, 0x7000_0010, True, walker, ha=True, hd=True)
    assert (r[0], r[6:]) == (W.F_PERMISSION, (1, leaf_ipa, W.CLASS_TT, 1))
    assert _frames(mem) == before
    # the VMM maps the tables writable again: both updates land
    s2pt.unmap(G + (8 << 20), 1 << 21)
    s2pt.map(G + (8 << 20), G + OFF + (8 << 20), 1 << 21, RW)
    guest.write_u64(leaf_ipa, clean & ~W.DESC_AF)
    r = nested(mem, s1pt, s2pt, 0x7000_0010, True, walker, ha=True, hd=True)
    assert r[:2] == (W.OK, G + OFF + 0x5010) and r[6:] == (0, 0, W.CLASS_IN, 0)
    assert guest.read_u64(leaf_ipa) == (clean | W.DESC_AF) & ~W.S1_AP_RDONLY


def test_the_installed_walker_is_compiled_unless_pure_is_forced(smmu_machine: Any) -> None:
    assert is_compiled(compiled) == (os.environ.get("IOMMUFD_MODEL_PURE") != "1")
    assert not is_compiled(pure)
    _m, hw, _smmu = smmu_machine()
    assert hw.walker is compiled


def test_compiled_and_pure_agree_on_a_random_workload(mem: PhysicalMemory) -> None:
    rng = random.Random(7)
    s2pt, s1pt, _guest = nested_setup(mem)
    flat = RadixPageTable(mem, Stage1Format())
    for _ in range(60):
        size = rng.choice([4096, 3 * 4096, 1 << 21])
        va = rng.randrange(0, 1 << 33, size if size == 1 << 21 else 4096)
        ipa = G + rng.randrange(0, 1 << 24, 1 << 21 if size == 1 << 21 else 4096)
        prot = rng.choice([IOMMU_READ, RW])
        for pt in (s1pt, flat):
            with contextlib.suppress(OSError):
                pt.map(va, ipa if pt is s1pt else ipa + OFF, size, prot)
    probes = [rng.randrange(0, 1 << 33) for _ in range(400)]
    for va in probes:
        for write in (False, True):
            a = nested(mem, s1pt, s2pt, va, write, compiled)
            b = nested(mem, s1pt, s2pt, va, write, pure)
            assert a == b
            c = s1(mem, va, write, root=flat.root)
            assert c == s1(mem, va, write, root=flat.root, walker=pure)
            ref = walk(mem, flat.fmt, flat.root, va, write)
            assert (c[0] == W.OK) == isinstance(ref, WalkResult)
            if isinstance(ref, WalkResult):
                assert (c[1], c[2], c[3]) == (ref.pa, ref.shift, ref.mem_refs)


def _mutated_tables(seed: int) -> tuple[PhysicalMemory, int, int, int, list[int], list[int]]:
    """Flat and nested stage-1 tables (4 KiB pages, 2 MiB and 1 GiB blocks) whose descriptors
    are then damaged at random, at every level: cleared AF, AP / S2AP bits, APTable bits, DBM,
    table bits, output addresses above 48 bits, invalid entries. Built from ``seed`` alone, so
    that two calls give equal memories. Returns the memory, the flat root, the nested stage-1
    root, the stage-2 root, the descriptor addresses that were damaged and the addresses of
    the mapped pages and blocks."""
    rng = random.Random(seed)
    mem = PhysicalMemory(1 << 40)
    s2pt, s1pt, _guest = nested_setup(mem)
    flat = RadixPageTable(mem, Stage1Format())
    mapped = []
    for _ in range(40):
        size = rng.choice([4096, 1 << 21, 1 << 30])
        va = rng.randrange(0, 1 << 48, size)
        mapped.append(va + rng.randrange(0, min(size, 1 << 21), 8))
        ipa = G + rng.randrange(0, 1 << 24, min(size, 1 << 21))
        with contextlib.suppress(OSError):
            flat.map(va, rng.randrange(0, 1 << 39, size), size, RW)
        if size < 1 << 30:
            with contextlib.suppress(OSError):
                s1pt.map(va, ipa, min(size, 1 << 21), RW)
    bits = [0, 1, 6, 7, 10, 47, 51, 61, 62, 63]
    damaged = []
    for pfn in sorted(mem._pages):
        for at, word in enumerate(mem._pages[pfn]):
            if word & W.DESC_VALID and rng.random() < 0.3:
                slot = (pfn << 12) + at * 8
                mem.write_u64(slot, mem.read_u64(slot) ^ (1 << rng.choice(bits)))
                damaged.append(slot)
    return mem, flat.root, s1pt.root, s2pt.root, damaged, mapped


def _frames(mem: PhysicalMemory) -> dict[int, list[int]]:
    return {pfn: list(frame) for pfn, frame in mem._pages.items()}


@pytest.mark.parametrize("seed", range(4))
def test_compiled_and_pure_agree_on_damaged_tables_with_af_and_dirty_updates(seed: int) -> None:
    """Faults at every level, high and non-canonical inputs (bit 63 set, beyond 2**64 - 1),
    input sizes that start the walk at level 0, 1 or 2, blocks, and the hardware AF (HA) and
    dirty-state (HD) updates: the compiled walker gives the pure source's answers and leaves
    the same words in memory."""
    mems = {}
    for walker in (compiled, pure):
        mem, flat_root, s1_root, s2_root, damaged, mapped = _mutated_tables(seed)
        mems[walker] = (mem, flat_root, s1_root, s2_root, damaged)
    rng = random.Random(100 + seed)
    first = mems[compiled]
    vas = [rng.randrange(0, 1 << 48) for _ in range(100)] + mapped * 6
    vas += [(1 << 63) | 0x1000, (1 << 64) - 4096, 1 << 64, 1 << 52, (1 << 48) - 1]
    statuses: set[tuple[int, int, int]] = set()
    for va in vas:
        ia = rng.choice([48, 48, 39, 30, 52, 53])
        oa = rng.choice([48, 44, 40])
        write = rng.random() < 0.5
        affd, ha, hd = (rng.random() < 0.3 for _ in range(3))
        nest = rng.random() < 0.4
        results = []
        for walker in (compiled, pure):
            mem, flat_root, s1_root, s2_root, _damaged = mems[walker]
            root = s1_root if nest else flat_root
            results.append(
                walker.walk_s1(
                    mem._pages,
                    mem.size,
                    root,
                    va,
                    ia,
                    oa,
                    write,
                    affd,
                    ha,
                    nest,
                    s2_root,
                    48,
                    0,
                    48,
                    affd,
                    hd,
                )
            )
        assert results[0] == results[1], (hex(va), ia, write, affd, ha, hd, nest)
        statuses.add((results[0][0], results[0][5], results[0][6]))
    assert _frames(first[0]) == _frames(mems[pure][0])
    assert first[4]  # descriptors were damaged: the walks met faults at many levels
    faults = {st for st, _level, _s2 in statuses} - {W.OK}
    assert W.OK in {st for st, _level, _s2 in statuses} and len(faults) >= 3


@pytest.mark.parametrize("nest", [False, True])
def test_bench_drivers_walk_as_walk_s1(nest: bool) -> None:
    """The own-loop drivers apply walk_s1's checks and rules: as many walks succeed as
    walk_s1 says, on damaged tables and with inputs beyond the input size."""
    mem, flat_root, s1_root, s2_root, _damaged, mapped = _mutated_tables(9)
    rng = random.Random(5)
    vas = [rng.randrange(0, 1 << 49) for _ in range(100)] + mapped + [-4096, 1 << 62]
    for walker in (compiled, pure):
        for ia in (48, 39, 53):
            root = s1_root if nest else flat_root
            want = sum(
                walker.walk_s1(
                    mem._pages,
                    mem.size,
                    root,
                    va & ((1 << 64) - 1),
                    ia,
                    48,
                    False,
                    False,
                    False,
                    nest,
                    s2_root,
                    48,
                    0,
                    48,
                    False,
                    False,
                )[0]
                == W.OK
                for va in vas
            )
            if nest:
                got = walker.bench_nested(mem._pages, mem.size, root, s2_root, vec[i64](vas), ia, 2)
            else:
                got = walker.bench_s1(mem._pages, mem.size, root, vec[i64](vas), ia, 2)
            assert got == 2 * want
