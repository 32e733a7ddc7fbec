"""The mock's generic page table (mock/iommupt.py) and the 7.2 paths around it.

Facts from Linux 7.2: drivers/iommu/generic_pt/{fmt/amdv1.h, iommu_pt.h, pt_iter.h},
drivers/iommu/iommufd/{selftest.c, hw_pagetable.c, io_pagetable.c, iova_bitmap.c}.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest

from helpers import MOCK_APERTURE, PAGE, World, check_invariants, expect_errno, mock_domain
from iommufd_model.mock import iommupt as P
from iommufd_model.mock import selftest as T
from iommufd_model.paging import IotlbGather
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import iommufd as U

K2 = 2048
M1 = 1 << 20


def _hwpt(w: World, ioas: int, data: bytes | None, flags: int = 0) -> int:
    if data is None:
        return w.fd.hwpt_alloc(w.dev_id, ioas, flags=flags)
    return w.fd.hwpt_alloc(
        w.dev_id, ioas, flags=flags, data_type=T.IOMMU_HWPT_DATA_SELFTEST, data=data
    )


def test_paging_hwpt_takes_selftest_data() -> None:
    """mock_domain_alloc_paging_flags(): pagetable_type picks the table; bad data refused."""
    w = World()
    ioas = w.fd.ioas_alloc()
    default = mock_domain(w.fd, _hwpt(w, ioas, struct.pack("<II", 0, 0)))
    assert default.pgsize_bitmap == P.PGSIZE_BITMAP == ((1 << 37) - 1) & ~(K2 - 1)
    assert (default.aperture_start, default.aperture_end) == (MOCK_APERTURE, (1 << 31) - 1)
    huge = mock_domain(w.fd, _hwpt(w, ioas, struct.pack("<II", 0, 1)))
    assert huge.pgsize_bitmap == M1 | PAGE
    assert (huge.aperture_start, huge.aperture_end) == (0, (1 << 38) - 1)
    short = mock_domain(w.fd, _hwpt(w, ioas, struct.pack("<I", 0)))  # minimum: iotlb
    assert short.pgsize_bitmap == P.PGSIZE_BITMAP
    check_invariants(w.fd)
    sel = T.IOMMU_HWPT_DATA_SELFTEST

    def alloc(data: bytes, data_type: int = sel) -> U.IommuHwptAlloc:
        va = w.proc.mmap(PAGE)
        w.proc.write(va, data)
        return U.IommuHwptAlloc(
            dev_id=w.dev_id, pt_id=ioas, data_type=data_type, data_len=len(data), data_uptr=va
        )

    expect_errno(w.fd, U.IOMMU_HWPT_ALLOC, alloc(struct.pack("<II", 0, 2)), errno.EOPNOTSUPP)
    expect_errno(w.fd, U.IOMMU_HWPT_ALLOC, alloc(bytes(12)), errno.EINVAL)  # > sizeof
    expect_errno(w.fd, U.IOMMU_HWPT_ALLOC, alloc(bytes(2)), errno.EINVAL)  # < iotlb
    expect_errno(w.fd, U.IOMMU_HWPT_ALLOC, alloc(bytes(8), 1), errno.EOPNOTSUPP)  # a vendor type


def test_vendor_without_paging_data_refuses_it() -> None:
    """A driver whose domain_alloc_paging takes no data: EOPNOTSUPP, the data unread."""
    import iommufd_model as im

    machine = im.Machine.build(iommus=["amd"])
    dev = machine.add_pci_device(iommu=0)
    proc = machine.new_process()
    fd = proc.open_iommufd()
    dev_id = fd.bind(dev)
    ioas = fd.ioas_alloc()
    st = U.IommuHwptAlloc(
        dev_id=dev_id, pt_id=ioas, data_type=T.IOMMU_HWPT_DATA_SELFTEST, data_len=8, data_uptr=8
    )
    expect_errno(fd, U.IOMMU_HWPT_ALLOC, st, errno.EOPNOTSUPP)  # not EFAULT: never read


def test_map_picks_the_largest_page_and_unmap_rules() -> None:
    pt = P.MockPageTable(P.PGSIZE_BITMAP, (1 << 38) - 1)
    pt.map(MOCK_APERTURE, 0x4000_0000, 4 * M1 + PAGE, 3)
    assert pt.leaf_at(MOCK_APERTURE) == (MOCK_APERTURE, 22)  # one 4 MiB leaf
    assert pt.leaf_at(MOCK_APERTURE + 4 * M1) == (MOCK_APERTURE + 4 * M1, 12)
    assert pt.iova_to_phys(MOCK_APERTURE + 5) == 0x4000_0005
    assert pt.iova_to_phys(MOCK_APERTURE - K2) == 0
    assert_errno(errno.EADDRINUSE, lambda: pt.map(MOCK_APERTURE, 0x1000, PAGE, 3))
    assert_errno(errno.ENXIO, lambda: pt.map(MOCK_APERTURE + 8 * M1 + 1024, 0, K2, 3))
    assert_errno(errno.ERANGE, lambda: pt.map(1 << 38, 0, K2, 3))
    # a start inside a leaf unmaps nothing; an end inside one takes the whole leaf
    assert pt.unmap(MOCK_APERTURE + M1, M1) == 0
    assert pt.unmap(MOCK_APERTURE, M1) == 4 * M1
    # an empty item stops the walk
    pt.map(MOCK_APERTURE + 16 * M1, 0x8000_0000, PAGE, 3)
    assert pt.unmap(MOCK_APERTURE + 4 * M1, 16 * M1) == PAGE
    assert pt.leaf_at(MOCK_APERTURE + 16 * M1) is not None


def test_dirty_reporting_follows_generic_pt() -> None:
    """A 4 KiB leaf (2 items) reports 2 KiB (record_dirty's end is the last index); a 1 MiB
    level-1 leaf reports 1 MiB; clearing clears every item of the leaf."""
    pt = P.MockPageTable(P.PGSIZE_BITMAP, (1 << 38) - 1)
    base = MOCK_APERTURE
    pt.map(base, 0x4000_0000, PAGE, 3)  # 4 KiB: two 2 KiB items
    pt.map(base + M1, 0x4010_0000, M1, 3)  # one level-1 item
    pt.map(base + 2 * M1, 0x4020_0000, K2, 3)  # one level-0 item
    assert pt.set_dirty(base + K2)  # the second item of the 4 KiB leaf
    assert pt.set_dirty(base + M1 + 5 * PAGE)
    assert pt.set_dirty(base + 2 * M1)
    assert not pt.set_dirty(base + 3 * M1)
    runs = pt.read_and_clear_dirty(base, 3 * M1, clear=False)
    assert runs == [(base, K2), (base + M1, M1), (base + 2 * M1, K2)]
    assert pt.read_and_clear_dirty(base, 3 * M1, clear=True) == runs
    assert pt.read_and_clear_dirty(base, 3 * M1, clear=True) == []


def _reference_read_and_clear(
    pt: P.MockPageTable, iova: int, length: int, clear: bool
) -> list[tuple[int, int]]:
    """generic_pt's walk read literally: every present item of the range in IOVA order,
    each leaf once, its D bits read from the entries (the oracle for the indexed walk)."""
    runs: list[tuple[int, int]] = []
    end = iova + length
    entries = pt.entries
    first, last = iova >> P.GRANULE_SHIFT, (end - 1) >> P.GRANULE_SHIFT
    done_to = iova
    for key in sorted(k for k in entries if first <= k <= last):
        va = max(key << P.GRANULE_SHIFT, iova)
        if va < done_to:
            continue
        lg2 = (entries[key] & P.SIZE_MASK) >> P.SIZE_SHIFT
        isz = P.item_lg2(P.level_of(lg2))
        contig = lg2 - isz
        item = va >> isz
        group = item & ~((1 << contig) - 1)
        keys = [(group + k) << (isz - P.GRANULE_SHIFT) for k in range(1 << contig)]
        if any(entries[k] & P.ENTRY_DIRTY for k in keys):
            if contig == 0:
                dirty_len = 1 << isz
            else:
                table = item & ~((1 << P.ITEMS_LG2) - 1)
                index = item - table
                range_end = min(((end - 1) >> isz) + 1 - table, 1 << P.ITEMS_LG2)
                dirty_len = (min(index | ((1 << contig) - 1), range_end) - index) << isz
            if dirty_len:
                runs.append((va, dirty_len))
            if clear:
                for k in keys:
                    entries[k] &= ~P.ENTRY_DIRTY
        done_to = (group + (1 << contig)) << isz
    return runs


@pytest.mark.parametrize("seed", range(40))
def test_indexed_dirty_walk_equals_the_full_walk(seed: int) -> None:
    """The walk over the dirty index reports and clears exactly what the walk over every
    present item does: leaves of 2 KiB to 4 MiB, dirty items inside and around the range,
    ranges starting and ending inside leaves, NO_CLEAR and clear, after unmaps."""
    import random

    rnd = random.Random(seed)
    pt = P.MockPageTable(P.PGSIZE_BITMAP, (1 << 38) - 1)
    twin = P.MockPageTable(P.PGSIZE_BITMAP, (1 << 38) - 1)
    base = MOCK_APERTURE
    va, pa = base, 0x4000_0000
    leaves = []
    for _ in range(rnd.randrange(1, 12)):
        lg2 = rnd.choice([11, 12, 13, 16, 20, 21, 22])
        va = (va + (1 << lg2) - 1) & ~((1 << lg2) - 1)
        pa = (pa + (1 << lg2) - 1) & ~((1 << lg2) - 1)
        if rnd.random() < 0.3:
            va += 1 << lg2  # a hole
        for t in (pt, twin):
            t.map(va, pa, 1 << lg2, 3)
        leaves.append((va, 1 << lg2))
        va += 1 << lg2
        pa += 1 << lg2
    span = va - base
    for _ in range(3):
        for _ in range(rnd.randrange(0, 30)):
            at = base + rnd.randrange(span)
            assert pt.set_dirty(at) == twin.set_dirty(at)
        if rnd.random() < 0.3:
            start, size = rnd.choice(leaves)
            assert pt.unmap(start, size) == twin.unmap(start, size)
            leaves.remove((start, size))
            if not leaves:
                break
        for _ in range(4):
            lo = base + (rnd.randrange(span) & ~(K2 - 1))
            n = rnd.randrange(1, span // K2 + 1) * K2
            clear = rnd.random() < 0.5
            assert pt.read_and_clear_dirty(lo, n, clear) == _reference_read_and_clear(
                twin, lo, n, clear
            )
            assert pt.entries == twin.entries
            assert pt.dirty == {k for k, e in pt.entries.items() if e & P.ENTRY_DIRTY}


def _dirty_world(pagetable: int | None) -> tuple[World, int, int]:
    w = World()
    ioas = w.fd.ioas_alloc()
    w.fd.ioas_map(ioas, w.va, 8 * PAGE, iova=MOCK_APERTURE)
    w.fd.ioas_map(ioas, w.va + 9 * PAGE, PAGE, iova=MOCK_APERTURE + 9 * PAGE)  # after a gap
    data = None if pagetable is None else struct.pack("<II", 0, pagetable)
    hwpt = _hwpt(w, ioas, data, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    return w, ioas, hwpt


def test_get_dirty_bitmap_with_tracking_off_reads_and_clears() -> None:
    """7.2: no EINVAL; the bits left from the tracked period are reported and cleared."""
    w, _, hwpt = _dirty_world(None)
    w.fd.attach(w.dev_id, hwpt)
    w.fd.hwpt_set_dirty_tracking(hwpt, True)
    w.dev.dma_write(MOCK_APERTURE + 2 * PAGE, b"x")
    w.fd.hwpt_set_dirty_tracking(hwpt, False)
    w.dev.dma_write(MOCK_APERTURE + 3 * PAGE, b"y")  # not tracked
    got = w.fd.hwpt_get_dirty_bitmap(hwpt, MOCK_APERTURE, 8 * PAGE, PAGE)
    assert got == [MOCK_APERTURE + 2 * PAGE]
    assert w.fd.hwpt_get_dirty_bitmap(hwpt, MOCK_APERTURE, 8 * PAGE, PAGE) == []


def test_get_dirty_bitmap_stops_at_a_gap_and_drops_errors() -> None:
    """iopt_for_each_contig_area() ends at the first gap (its EINVAL is dropped); a bitmap
    nothing is written to is never touched, so a bad pointer still succeeds."""
    w, _, hwpt = _dirty_world(None)
    w.fd.hwpt_set_dirty_tracking(hwpt, True)
    mock = mock_domain(w.fd, hwpt)
    mock.pt.set_dirty(MOCK_APERTURE)
    mock.pt.set_dirty(MOCK_APERTURE + 9 * PAGE)  # beyond the gap at page 8
    got = w.fd.hwpt_get_dirty_bitmap(hwpt, MOCK_APERTURE, 10 * PAGE, PAGE, clear=False)
    assert got == [MOCK_APERTURE]
    # the gap is not at the start: the second area alone is walked
    got = w.fd.hwpt_get_dirty_bitmap(hwpt, MOCK_APERTURE + 9 * PAGE, PAGE, PAGE, clear=False)
    assert got == [MOCK_APERTURE + 9 * PAGE]
    # nothing dirty between 4 and 8: the bitmap at an unmapped address is never pinned
    st = U.IommuHwptGetDirtyBitmap(
        size=U.IommuHwptGetDirtyBitmap.SIZE,
        hwpt_id=hwpt,
        iova=MOCK_APERTURE + 4 * PAGE,
        length=4 * PAGE,
        page_size=PAGE,
        data=8,
    )
    buf = bytearray(st.pack())
    assert w.fd.ioctl(U.IOMMU_HWPT_GET_DIRTY_BITMAP, buf) == 0
    # something dirty there: the bits are lost, the ioctl still succeeds
    st.iova = MOCK_APERTURE
    assert w.fd.ioctl(U.IOMMU_HWPT_GET_DIRTY_BITMAP, bytearray(st.pack())) == 0
    assert w.fd.hwpt_get_dirty_bitmap(hwpt, MOCK_APERTURE, 8 * PAGE, PAGE) == []  # cleared
    check_invariants(w.fd)


@pytest.mark.parametrize(("start", "length", "code"), [(0, 0, errno.EINVAL), (2, -1, 0)])
def test_add_reserved_checks_the_range_first(start: int, length: int, code: int) -> None:
    """iommufd_test_add_reserved(): length 0 EINVAL, a wrap EOVERFLOW, before the lookup."""
    w = World()
    length &= (1 << 64) - 1
    payload = struct.pack("<QQ", start, length).ljust(48, b"\0")
    buf = bytearray(struct.pack("<IIII", 72, T.IOMMU_TEST_OP_ADD_RESERVED, 999, 0) + payload)
    buf += bytes(8)
    want = code or errno.EOVERFLOW
    assert_errno(want, lambda: w.fd.ioctl(T.IOMMU_TEST_CMD, buf))


def test_md_check_map_looks_the_hwpt_up_first() -> None:
    """iommufd_test_md_check_pa(): ENOENT for a bad id even with unaligned arguments."""
    w = World()
    payload = struct.pack("<QQQ", 1, 1, 1).ljust(48, b"\0")
    buf = bytearray(struct.pack("<IIII", 72, T.IOMMU_TEST_OP_MD_CHECK_MAP, 999, 0) + payload)
    buf += bytes(8)
    assert_errno(errno.ENOENT, lambda: w.fd.ioctl(T.IOMMU_TEST_CMD, buf))


# -- the whole-range map/unmap and the C dirty loops against the literal per-leaf table ------
class _LiteralTable(P.MockPageTable):
    """The mock table as generic_pt's walks read literally, one leaf at a time (the oracle
    of the chunked map, the run-based unmap and the C loops): map takes one
    ``pt_compute_best_pgsize()`` step per leaf, unmap clears leaf after leaf, read-and-clear
    is :func:`_reference_read_and_clear`, the DIRTY op one ``set_dirty`` per set bit."""

    def map(self, iova: int, pa: int, size: int, prot: int, pgsize: int = 0) -> None:
        if size <= 0:
            raise OSError(errno.EINVAL, "empty map")
        if iova + size - 1 > self.va_last:
            raise OSError(errno.ERANGE, "beyond the table")
        bitmap = self.pgsize_bitmap & ((pgsize << 1) - 1) if pgsize else self.pgsize_bitmap
        steps = []
        va, oa, left = iova, pa, size
        while left:
            lg2 = P.best_pgsize_lg2(bitmap, va, oa, left)
            if not lg2:
                raise OSError(errno.ENXIO, "no page size fits")
            steps.append((va, oa, lg2))
            va, oa, left = va + (1 << lg2), oa + (1 << lg2), left - (1 << lg2)
        first = iova >> P.GRANULE_SHIFT
        if any(k in self.entries for k in range(first, first + (size >> P.GRANULE_SHIFT))):
            raise OSError(errno.EADDRINUSE, "already mapped")
        for va, oa, lg2 in steps:
            for i in range(1 << (lg2 - P.GRANULE_SHIFT)):
                self.entries[(va >> P.GRANULE_SHIFT) + i] = (
                    oa + (i << P.GRANULE_SHIFT) | prot & 3 | lg2 << P.SIZE_SHIFT
                )

    def unmap(self, iova: int, size: int, gather: IotlbGather | None = None) -> int:
        va, done = iova, 0
        while va < iova + size:
            leaf = self.leaf_at(va)
            if leaf is None or leaf[0] != va:
                break
            for k in range(va >> P.GRANULE_SHIFT, (va + (1 << leaf[1])) >> P.GRANULE_SHIFT):
                del self.entries[k]
                self.dirty.discard(k)
            if gather is not None:
                gather.add(va, 1 << leaf[1], 1 << leaf[1])
            done += 1 << leaf[1]
            va += 1 << leaf[1]
        return done

    def read_and_clear_dirty(self, iova: int, length: int, clear: bool) -> list[tuple[int, int]]:
        runs = _reference_read_and_clear(self, iova, length, clear)
        if clear:
            self.dirty = {k for k, e in self.entries.items() if e & P.ENTRY_DIRTY}
        return runs

    def set_dirty_bits(self, iova: int, page_size: int, bitmap: bytes, nbits: int) -> int:
        bits = [i for i in range(nbits) if bitmap[i >> 3] >> (i & 7) & 1]
        for i in bits:
            self.set_dirty(iova + i * page_size)
        return len(bits)


def _leaves(gather: IotlbGather) -> list[tuple[int, int]]:
    """A gather's runs as one ``(iova, page size)`` per leaf."""
    return [
        (iova + i, pgsize) for iova, size, pgsize in gather.runs for i in range(0, size, pgsize)
    ]


def _first_difference(seed: int) -> str | None:
    """One random sequence of maps (any alignment, page-size caps, overlaps, bad sizes),
    unmaps (inside leaves, over gaps, past the end), DIRTY bitmaps and read-and-clears, on
    the model's table and on the literal one: the first result, errno, entry, dirty index
    or gathered leaf that differs, or None."""
    import random

    rnd = random.Random(seed)
    table = P.MockPageTable(P.PGSIZE_BITMAP, (1 << 38) - 1)
    twin = _LiteralTable(P.PGSIZE_BITMAP, (1 << 38) - 1)
    base, span = MOCK_APERTURE, 64 * M1

    def both(name: str, *args: object) -> str | None:
        got = []
        for t in (table, twin):
            try:
                got.append(("ok", getattr(t, name)(*args)))
            except OSError as exc:
                got.append(("errno", exc.errno))
        if got[0] != got[1]:
            return f"{name}{args}: {got[0]} != {got[1]}"
        if table.entries != twin.entries or table.dirty != twin.dirty:
            return f"{name}{args}: the tables differ after it"
        return None

    for _ in range(rnd.randrange(10, 40)):
        op = rnd.random()
        at = base + (rnd.randrange(span) & ~(K2 - 1))
        if op < 0.35:
            lg2 = rnd.choice([11, 12, 13, 16, 20, 21, 22])
            size = rnd.randrange(1, 5) << lg2 if rnd.random() < 0.7 else rnd.randrange(1, 3000) * K2
            pa = (rnd.randrange(1 << 30) & ~((1 << rnd.choice([11, 12, 20, 21])) - 1)) | (
                at & rnd.choice([0, (1 << 22) - 1])
            )
            pa &= ~(K2 - 1)
            if rnd.random() < 0.05:
                size += 512  # not a multiple of the granule: ENXIO
            pgsize = rnd.choice([0, 0, 1 << 12, 1 << 20, 1 << 13])
            problem = both("map", at, pa, size, 3, pgsize)
        elif op < 0.55:
            if rnd.random() < 0.5 and table.entries:
                at = rnd.choice(list(table.entries)) << P.GRANULE_SHIFT
            size = rnd.randrange(1, 9000) * K2 if rnd.random() < 0.8 else rnd.randrange(1, 1 << 23)
            gathers = [IotlbGather(at, at + size - 1) for _ in range(2)]
            got = [t.unmap(at, size, g) for t, g in zip((table, twin), gathers, strict=True)]
            problem = None
            if got[0] != got[1] or _leaves(gathers[0]) != _leaves(gathers[1]):
                problem = f"unmap({at:#x}, {size:#x}): {got[0]} != {got[1]} or its leaves"
            elif table.entries != twin.entries or table.dirty != twin.dirty:
                problem = f"unmap({at:#x}, {size:#x}): the tables differ after it"
        elif op < 0.75:
            page = rnd.choice([K2, PAGE, 8 * PAGE, M1])
            nbits = rnd.randrange(1, 4000)
            bitmap = bytes(
                rnd.choice([0, 0, 1, 0x55, 0xFF, rnd.randrange(256)])
                for _ in range((nbits + 7) // 8)
            )
            problem = both("set_dirty_bits", at - rnd.randrange(4) * page, page, bitmap, nbits)
        else:
            length = rnd.randrange(1, span // K2) * K2
            problem = both("read_and_clear_dirty", at, length, rnd.random() < 0.5)
        if problem:
            return problem
    return None


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure"])
@pytest.mark.parametrize("seed", range(60))
def test_fast_table_equals_the_literal_one(
    seed: int, pure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunked map, run-based unmap and the dirty loops (``mock/_dirty.c`` and its
    Python twin) do exactly what the per-leaf table does."""
    if pure:
        monkeypatch.setattr(P, "_DIRTY", None)
    elif P._DIRTY is None:
        pytest.skip("mock/_dirty.c is not built (IOMMUFD_MODEL_PURE=1)")
    assert _first_difference(seed) is None


def test_the_differential_test_catches_a_broken_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deliberate break of each fast part is found by the seeds above: a run one item short,
    a clear that leaves one D bit, a chunk one leaf too long."""
    real_visit, real_chunks = P._visit_dirty, P.leaf_chunks
    monkeypatch.setattr(P, "_DIRTY", None)

    def short(*args: Any) -> list[tuple[int, int]]:
        runs = real_visit(*args)
        return [*runs[:-1], (runs[-1][0], runs[-1][1] - K2)] if runs else runs

    def sticky(entries: dict[int, int], dirty: set[int], keys: list[int], *rest: Any) -> Any:
        return (
            real_visit(entries, dirty, keys[:-1], *rest)
            if len(keys) > 1
            else real_visit(entries, dirty, keys, *rest)
        )

    def long_chunk(*args: int) -> list[tuple[int, int, int, int]]:
        chunks = real_chunks(*args)
        va, pa, lg2, count = chunks[-1]
        return [*chunks[:-1], (va, pa, lg2, count + 1)]

    for name, broken in (
        ("_visit_dirty", short),
        ("_visit_dirty", sticky),
        ("leaf_chunks", long_chunk),
    ):
        with monkeypatch.context() as m:
            m.setattr(P, name, broken)
            assert any(_first_difference(seed) for seed in range(60)), name


def test_the_differential_test_catches_a_broken_c_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for the C loops: their answers, one run short or one bit left unset."""
    if P._DIRTY is None:
        pytest.skip("mock/_dirty.c is not built (IOMMUFD_MODEL_PURE=1)")
    compiled: Any = P._DIRTY

    class Short:
        set_dirty_bits = staticmethod(compiled.set_dirty_bits)

        @staticmethod
        def visit(*args: Any) -> list[tuple[int, int]]:
            return list(compiled.visit(*args))[:-1]

    class Unset:
        visit = staticmethod(compiled.visit)

        @staticmethod
        def set_dirty_bits(
            entries: Any, dirty: Any, iova: int, page: int, bitmap: bytes, n: int
        ) -> int:
            return int(compiled.set_dirty_bits(entries, dirty, iova, page, bitmap, n - 1)) + (
                bitmap[(n - 1) >> 3] >> ((n - 1) & 7) & 1
            )

    for broken in (Short, Unset):
        with monkeypatch.context() as m:
            m.setattr(P, "_DIRTY", broken)
            assert any(_first_difference(seed) for seed in range(60)), broken.__name__
