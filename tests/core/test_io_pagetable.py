"""IoPagetable against the kernel's iommufd selftests (iommufd_ioas fixture) and invariants.

The kernel tests run over three variants: no domain, one and two mock domains. The mock
domain has a 2 KiB granule (half a page) and the aperture [1 << 24, (1 << 31) - 1].
"""

from __future__ import annotations

import errno
import types
from collections.abc import Callable, Iterator
from functools import partial

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from iommufd_model.core.intervals import IntervalMap
from iommufd_model.core.io_pagetable import ULONG_MAX, IoPagetable
from iommufd_model.core.pages import Pages
from iommufd_model.driver import IOMMU_CACHE, IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.memory import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from iommufd_model.process import MemFile, Process
from iommufd_model.testing import assert_errno

RW = IOMMU_READ | IOMMU_WRITE | IOMMU_CACHE
MOCK_PAGE_SIZE = PAGE_SIZE // 2
MOCK_APERTURE_START = 1 << 24
MOCK_APERTURE_LAST = (1 << 31) - 1
HUGEPAGE_SIZE = 2 << 20
BUFFER_SIZE = PAGE_SIZE * 16


class FakeDomain:
    """A dict-like IO page table: exact map calls are kept, unmaps must cover whole maps."""

    def __init__(
        self,
        pgsize_bitmap: int = PAGE_SIZE | HUGEPAGE_SIZE,
        aperture_start: int = 0,
        aperture_end: int = ULONG_MAX,
    ) -> None:
        self.pgsize_bitmap = pgsize_bitmap
        self.aperture_start = aperture_start
        self.aperture_end = aperture_end
        self.maps: IntervalMap[tuple[int, int]] = IntervalMap()
        self.map_calls = 0
        self.unmap_calls = 0
        self.fail_at_call: int | None = None  # ENOMEM on this (1-based) map call

    def map(self, iova: int, pa: int, size: int, prot: int) -> None:
        granule = self.pgsize_bitmap & -self.pgsize_bitmap
        assert size > 0 and not (iova | pa | size) & (granule - 1), (iova, pa, size)
        assert self.aperture_start <= iova and iova + size - 1 <= self.aperture_end
        self.map_calls += 1
        if self.fail_at_call is not None and self.map_calls >= self.fail_at_call:
            raise OSError(errno.ENOMEM, "fake domain out of memory")
        self.maps.insert(iova, iova + size - 1, (pa, prot))

    def map_pages(self, iova: int, pa: int, pgsize: int, pgcount: int, prot: int) -> None:
        """``pgcount`` page maps, each kept (and counted) as its own call; all or nothing."""
        for k in range(pgcount):
            try:
                self.map(iova + k * pgsize, pa + k * pgsize, pgsize, prot)
            except OSError:
                if k:
                    self.maps.remove_overlapping(iova, iova + k * pgsize - 1)
                raise

    def unmap(self, iova: int, size: int) -> int:
        self.unmap_calls += 1
        hit = self.maps.remove_overlapping(iova, iova + size - 1)
        assert all(first >= iova and last <= iova + size - 1 for first, last, _ in hit)
        return sum(last - first + 1 for first, last, _ in hit)

    def translate(self, iova: int) -> tuple[int, int] | None:
        got = self.maps.get(iova)
        if got is None:
            return None
        first, _, (pa, prot) = got
        return pa + (iova - first), prot

    def mapped_bytes(self) -> int:
        return sum(last - first + 1 for first, last, _ in self.maps)


def mock_domain() -> FakeDomain:
    return FakeDomain(
        MOCK_PAGE_SIZE | (MOCK_PAGE_SIZE * 512), MOCK_APERTURE_START, MOCK_APERTURE_LAST
    )


class FakeAccess:
    """An mdev-like in-kernel access: remembers its pins and drops them when told to."""

    def __init__(self, iopt: IoPagetable, *, cooperative: bool = True) -> None:
        self.iopt = iopt
        self.iova_alignment = PAGE_SIZE
        self.cooperative = cooperative
        self.pins: list[tuple[int, int]] = []
        self.notified: list[tuple[int, int]] = []

    def pin(self, iova: int, length: int, write: bool = False) -> list[int]:
        pfns = self.iopt.access_pin(iova, length, write)
        self.pins.append((iova, length))
        return pfns

    def unpin_all(self) -> None:
        for iova, length in self.pins:
            self.iopt.access_unpin(iova, length)
        self.pins.clear()

    def unmap(self, iova: int, length: int) -> None:
        self.notified.append((iova, length))
        if not self.cooperative:
            return
        for pin in list(self.pins):
            if pin[0] <= iova + length - 1 and iova <= pin[0] + pin[1] - 1:
                self.iopt.access_unpin(*pin)
                self.pins.remove(pin)


class World:
    """One process with a 2 MiB-aligned buffer and an IOAS with ``ndomains`` mock domains."""

    def __init__(self, ndomains: int = 0, *, domain: Callable[[], FakeDomain] = mock_domain):
        self.memory = PhysicalMemory(1 << 32)
        machine = types.SimpleNamespace(memory=self.memory, granted_caps=0)
        self.proc = Process(machine, pid=1)  # type: ignore[arg-type]
        self.buffer = self.proc.mmap(BUFFER_SIZE, align=HUGEPAGE_SIZE)
        self.proc.write(self.buffer, bytes(range(256)) * (BUFFER_SIZE // 256))
        self.iopt = IoPagetable(self.memory)
        self.domains = [domain() for _ in range(ndomains)]
        for d in self.domains:
            self.iopt.add_domain(d)
        self.base_iova = MOCK_APERTURE_START if ndomains else 0

    def frame(self, va: int) -> int:
        return self.proc.translate(va)

    def refs(self, va: int, length: int) -> list[int]:
        first = va & ~PAGE_MASK
        return [self.memory.frame_refs(self.frame(p)) for p in range(first, va + length, PAGE_SIZE)]

    def check_iova(self, va: int, iova: int, length: int) -> None:
        """IOMMU_TEST_OP_MD_CHECK_MAP: each domain maps iova to the frames behind va."""
        for d in self.domains:
            for off in range(0, length, MOCK_PAGE_SIZE):
                want = (self.frame(va + off) << PAGE_SHIFT) | ((va + off) & PAGE_MASK)
                got = d.translate(iova + off)
                assert got is not None and got[0] == want, hex(iova + off)
            assert self.iopt.lookup(iova) == (self.frame(va), RW)


VARIANTS = {"no_domain": 0, "mock_domain": 1, "two_mock_domain": 2}


@pytest.fixture(params=list(VARIANTS))
def w(request: pytest.FixtureRequest) -> World:
    return World(VARIANTS[request.param])


def snapshot(w: World) -> tuple[object, ...]:
    """Everything a refusal must leave untouched."""
    return (
        [(a[0], a[1], a[2], id(a[3]), a[4]) for a in w.iopt.areas()],
        [list(d.maps) for d in w.domains],
        w.iopt.iova_ranges(),
        w.iopt.allowed(),
        w.iopt.iova_alignment,
        w.proc.locked_pages,
        w.memory.frames_in_use,
        w.refs(w.buffer, BUFFER_SIZE),
    )


# -- iommufd_ioas selftests -------------------------------------------------------------


def test_area(w: World) -> None:
    iopt, base = w.iopt, w.base_iova
    for i in range(10):
        assert_errno(errno.ENOENT, partial(iopt.unmap, i * PAGE_SIZE, PAGE_SIZE))
    for i in range(10):
        iopt.map_user(w.proc, w.buffer, PAGE_SIZE, base + i * PAGE_SIZE, RW)
    for i in range(10):
        assert iopt.unmap(base + i * PAGE_SIZE, PAGE_SIZE) == PAGE_SIZE
    # Split fails
    iopt.map_user(w.proc, w.buffer, PAGE_SIZE * 2, base + 16 * PAGE_SIZE, RW)
    assert_errno(errno.ENOENT, lambda: iopt.unmap(base + 16 * PAGE_SIZE, PAGE_SIZE))
    assert_errno(errno.ENOENT, lambda: iopt.unmap(base + 17 * PAGE_SIZE, PAGE_SIZE))
    # Over map fails
    for pages, at in ((2, 16), (1, 16), (1, 17), (2, 15), (3, 15)):
        assert_errno(
            errno.EEXIST,
            partial(iopt.map_user, w.proc, w.buffer, PAGE_SIZE * pages, base + at * PAGE_SIZE, RW),
        )
    assert iopt.unmap_all() == 2 * PAGE_SIZE
    assert iopt.unmap_all() == 0
    assert w.proc.locked_pages == 0
    assert all(r == 1 for r in w.refs(w.buffer, BUFFER_SIZE))


def test_unmap_fully_contained_areas(w: World) -> None:
    iopt = w.iopt
    base = w.base_iova + 4 * PAGE_SIZE
    for i in range(4):
        iopt.map_user(w.proc, w.buffer, 8 * PAGE_SIZE, base + i * 16 * PAGE_SIZE, RW)
    before = snapshot(w)
    assert_errno(errno.ENOENT, lambda: iopt.unmap(base - 4 * PAGE_SIZE, 8 * PAGE_SIZE))
    last_partial = base + 3 * 16 * PAGE_SIZE + 8 * PAGE_SIZE - 4 * PAGE_SIZE
    assert_errno(errno.ENOENT, lambda: iopt.unmap(last_partial, 8 * PAGE_SIZE))
    assert snapshot(w) == before
    got = iopt.unmap(base - 4 * PAGE_SIZE, (3 * 16 + 8 + 4) * PAGE_SIZE)
    assert got == 32 * PAGE_SIZE


def test_unmap_removes_covered_areas_before_the_refused_one(w: World) -> None:
    """Linux 7.2's iopt_unmap_iova_range(): areas 0..2, fully covered and met first, are
    unmapped before area 3 sticks out; the call fails with ENOENT and they stay gone."""
    iopt = w.iopt
    base = w.base_iova + 4 * PAGE_SIZE
    for i in range(4):
        iopt.map_user(w.proc, w.buffer, 8 * PAGE_SIZE, base + i * 16 * PAGE_SIZE, RW)
    assert_errno(errno.ENOENT, lambda: iopt.unmap(base, 3 * 16 * PAGE_SIZE + 4 * PAGE_SIZE))
    assert [a[0] for a in iopt.areas()] == [base + 3 * 16 * PAGE_SIZE]
    assert iopt.unmap(base, 4 * 16 * PAGE_SIZE) == 8 * PAGE_SIZE


def test_area_auto_iova(w: World) -> None:
    iopt = w.iopt
    iovas = [iopt.map_user(w.proc, w.buffer, PAGE_SIZE, None, RW) for _ in range(10)]
    assert len(set(iovas)) == 10 and all(i >= PAGE_SIZE for i in iovas)
    for iova in iovas:
        iopt.unmap(iova, PAGE_SIZE)
    # Kernel automatically aligns IOVAs properly
    va = w.buffer if w.domains else 1 << 31  # no domain: nothing is pinned, any VA maps
    for i in range(10):
        length = PAGE_SIZE * (i + 1)
        iovas[i] = iopt.map_user(w.proc, va, length, None, RW)
        assert iovas[i] % (length & -length) == 0
    for i in range(10):
        iopt.unmap(iovas[i], PAGE_SIZE * (i + 1))
    # Avoids a reserved region
    res_start, res_len = PAGE_SIZE * 4, PAGE_SIZE * 100
    iopt.reserve(None, res_start, res_start + res_len - 1)
    for i in range(10):
        length = PAGE_SIZE * (i + 1)
        iovas[i] = iopt.map_user(w.proc, w.buffer, length, None, RW)
        assert iovas[i] % (length & -length) == 0
        assert not res_start < iovas[i] < res_start + res_len
    for i in range(10):
        iopt.unmap(iovas[i], PAGE_SIZE * (i + 1))
    # Allowed region intersects with a reserved region
    assert_errno(errno.EADDRINUSE, lambda: iopt.set_allowed([(PAGE_SIZE, PAGE_SIZE * 600)]))
    # Allocate from an allowed region
    if w.domains:
        allowed = (MOCK_APERTURE_START + PAGE_SIZE, MOCK_APERTURE_START + PAGE_SIZE * 600 - 1)
    else:
        allowed = (PAGE_SIZE * 200, PAGE_SIZE * 600 - 1)
    iopt.set_allowed([allowed])
    for i in range(10):
        length = PAGE_SIZE * (i + 1)
        iovas[i] = iopt.map_user(w.proc, w.buffer, length, None, RW)
        assert iovas[i] % (length & -length) == 0
        assert allowed[0] <= iovas[i] and iovas[i] + length <= allowed[1] + 1
    for i in range(10):
        iopt.unmap(iovas[i], PAGE_SIZE * (i + 1))


def test_area_allowed(w: World) -> None:
    iopt = w.iopt
    allowed = (w.base_iova, w.base_iova + PAGE_SIZE * 600)
    iopt.set_allowed([allowed])
    res = (allowed[0] + PAGE_SIZE, allowed[0] + 2 * PAGE_SIZE - 1)
    assert_errno(errno.EADDRINUSE, lambda: iopt.reserve(None, *res))
    iopt.set_allowed([])
    iopt.reserve(None, *res)
    assert_errno(errno.EADDRINUSE, lambda: iopt.set_allowed([allowed]))
    assert iopt.allowed() == []


def test_set_allowed_validation(w: World) -> None:
    iopt = w.iopt
    assert_errno(errno.EINVAL, lambda: iopt.set_allowed([(10, 10)]))
    assert_errno(errno.EINVAL, lambda: iopt.set_allowed([(10, 20), (20, 30)]))
    b = w.base_iova
    iopt.set_allowed([(b + 0x10000, b + 0x1FFFF), (b + 0x20000, b + 0x2FFFF)])
    # Adjacent allowed ranges form one window for placement, as the kernel's span iterator:
    # with a 4 KiB-aligned source the 96 KiB fit only across the seam.
    buf = w.proc.mmap(0x18000)
    assert iopt.map_user(w.proc, buf, 0x18000, None, RW) == b + 0x10000


def test_iova_ranges(w: World) -> None:
    iopt = w.iopt
    if not w.domains:
        assert iopt.iova_ranges() == [(0, ULONG_MAX)] and iopt.iova_alignment == 1
    else:
        assert iopt.iova_ranges() == [(MOCK_APERTURE_START, MOCK_APERTURE_LAST)]
        assert iopt.iova_alignment == MOCK_PAGE_SIZE
    iopt.reserve(None, PAGE_SIZE, 2 * PAGE_SIZE - 1)
    if not w.domains:
        assert iopt.iova_ranges() == [(0, PAGE_SIZE - 1), (2 * PAGE_SIZE, ULONG_MAX)]
    else:
        assert iopt.iova_ranges() == [(MOCK_APERTURE_START, MOCK_APERTURE_LAST)]
    iopt.unreserve_owner(None)
    for d in list(w.domains):
        iopt.remove_domain(d)
    assert iopt.iova_ranges() == [(0, ULONG_MAX)] and iopt.iova_alignment == 1


def test_ioas_iova_alloc(w: World) -> None:
    iopt = w.iopt
    for length in range(1, PAGE_SIZE * 2):
        if w.domains and length % MOCK_PAGE_SIZE:
            assert_errno(errno.EINVAL, partial(iopt.map_user, w.proc, w.buffer, length, None, RW))
        else:
            iova = iopt.map_user(w.proc, w.buffer, length, None, RW)
            assert iopt.unmap(iova, length) == length
    assert w.proc.locked_pages == 0


def test_ioas_align_change() -> None:
    w = World(0)
    iopt, buf = w.iopt, w.buffer
    iopt.map_user(w.proc, buf, PAGE_SIZE, MOCK_APERTURE_START, RW)
    iopt.set_large_pages(False)
    assert iopt.iova_alignment == PAGE_SIZE and not iopt.allow_large_pages
    assert_errno(
        errno.EINVAL,
        lambda: iopt.map_user(
            w.proc, buf + MOCK_PAGE_SIZE, PAGE_SIZE, MOCK_APERTURE_START + PAGE_SIZE, RW
        ),
    )
    iopt.set_large_pages(False)
    iopt.set_large_pages(True)
    assert iopt.iova_alignment == 1
    iopt.map_user(w.proc, buf + MOCK_PAGE_SIZE, PAGE_SIZE, MOCK_APERTURE_START + PAGE_SIZE, RW)
    assert_errno(errno.EADDRINUSE, lambda: iopt.set_large_pages(False))
    assert iopt.allow_large_pages and iopt.iova_alignment == 1
    iopt.unmap(MOCK_APERTURE_START + PAGE_SIZE, PAGE_SIZE)
    iopt.unmap(MOCK_APERTURE_START, PAGE_SIZE)


def test_huge_pages_option_with_domain() -> None:
    w = World(1, domain=FakeDomain)
    w.iopt.map_user(w.proc, w.buffer, BUFFER_SIZE, None, RW)
    assert_errno(errno.EINVAL, lambda: w.iopt.set_large_pages(False))
    w.iopt.unmap_all()
    w.iopt.set_large_pages(False)


@pytest.mark.parametrize("huge", [True, False])
def test_map_call_granularity(huge: bool) -> None:
    w = World(0)
    w.iopt.allow_large_pages = huge
    d = FakeDomain()
    w.iopt.add_domain(d)
    w.iopt.map_user(w.proc, w.buffer, BUFFER_SIZE, PAGE_SIZE * 64, RW)
    pfns = [w.frame(w.buffer + i * PAGE_SIZE) for i in range(16)]
    assert pfns == list(range(pfns[0], pfns[0] + 16))  # fresh memory is contiguous
    assert d.map_calls == (1 if huge else 16)
    w.iopt.unmap_all()
    assert d.unmap_calls == 1 and d.mapped_bytes() == 0


def test_copy_area(w: World) -> None:
    iopt = w.iopt
    iopt.map_user(w.proc, w.buffer, PAGE_SIZE, w.base_iova, RW)
    iopt.copy_from(iopt, w.base_iova, PAGE_SIZE, w.base_iova + PAGE_SIZE, RW)
    dst = IoPagetable(w.memory)
    dst.copy_from(iopt, w.base_iova, PAGE_SIZE, 0, RW)
    areas = list(iopt.areas()) + list(dst.areas())
    assert len({id(a[3]) for a in areas}) == 1 and areas[0][3].refs == 3
    if w.domains:
        w.check_iova(w.buffer, w.base_iova + PAGE_SIZE, PAGE_SIZE)
        assert w.refs(w.buffer, PAGE_SIZE) == [2] and w.proc.locked_pages == 1


def test_copy_sweep(w: World) -> None:
    dst = IoPagetable(w.memory)
    last_iova = MOCK_APERTURE_START + BUFFER_SIZE - (1 if w.domains else 2)
    w.iopt.map_user(w.proc, w.buffer, last_iova - MOCK_APERTURE_START + 1, MOCK_APERTURE_START, RW)
    for iova in range(MOCK_APERTURE_START - PAGE_SIZE, last_iova + 1, 511):
        if iova < MOCK_APERTURE_START or iova + MOCK_PAGE_SIZE - 1 > last_iova:
            assert_errno(
                errno.ENOENT,
                partial(dst.copy_from, w.iopt, iova, MOCK_PAGE_SIZE, MOCK_APERTURE_START, RW),
            )
        else:
            dst.copy_from(w.iopt, iova, MOCK_PAGE_SIZE, MOCK_APERTURE_START, RW)
            va = w.buffer + iova - MOCK_APERTURE_START
            assert dst.access_rw(MOCK_APERTURE_START, MOCK_PAGE_SIZE, False) == w.proc.read(
                va, MOCK_PAGE_SIZE
            )
            dst.unmap(MOCK_APERTURE_START, MOCK_PAGE_SIZE)


def test_copy_errnos() -> None:
    w = World(0)
    src = w.iopt
    src.map_user(w.proc, w.buffer, 4 * PAGE_SIZE, 0x10000, IOMMU_READ)
    src.map_user(w.proc, w.buffer, 4 * PAGE_SIZE, 0x14000, RW)  # adjacent: copy spans both
    dst = IoPagetable(w.memory)
    assert_errno(errno.EINVAL, lambda: dst.copy_from(src, 0x10000, 0, None, RW))
    assert_errno(errno.ENOENT, lambda: dst.copy_from(src, 0x18000, PAGE_SIZE, None, RW))
    # Read-only pages cannot become writable through a copy
    assert_errno(errno.EPERM, lambda: dst.copy_from(src, 0x10000, 8 * PAGE_SIZE, None, RW))
    iova = dst.copy_from(src, 0x12000, 4 * PAGE_SIZE, None, IOMMU_READ)
    assert [(a[0], a[1], a[4]) for a in dst.areas()] == [
        (iova, iova + 2 * PAGE_SIZE - 1, 2 * PAGE_SIZE),
        (iova + 2 * PAGE_SIZE, iova + 4 * PAGE_SIZE - 1, 0),
    ]
    # A 2 KiB-granule destination refuses a slice starting mid-granule
    dst2 = IoPagetable(w.memory)
    dst2.add_domain(mock_domain())
    assert_errno(
        errno.EINVAL, lambda: dst2.copy_from(src, 0x10000 + 512, MOCK_PAGE_SIZE, None, IOMMU_READ)
    )


def test_check_iova_errnos() -> None:
    w = World(1)
    iopt, proc, buf = w.iopt, w.proc, w.buffer
    start = MOCK_APERTURE_START
    assert_errno(errno.EINVAL, lambda: iopt.map_user(proc, buf, 0, start, RW))
    assert_errno(errno.EINVAL, lambda: iopt.map_user(proc, buf, PAGE_SIZE, start + 1024, RW))
    assert_errno(errno.EOVERFLOW, lambda: iopt.map_user(proc, buf, PAGE_SIZE, ULONG_MAX - 2047, RW))
    assert_errno(errno.EOVERFLOW, lambda: iopt.map_user(proc, buf, PAGE_SIZE, ULONG_MAX, RW))
    assert_errno(errno.EINVAL, lambda: iopt.map_user(proc, buf, PAGE_SIZE, 0, RW))  # reserved
    assert_errno(errno.EINVAL, lambda: iopt.map_user(proc, buf, PAGE_SIZE, start, 0))
    iopt.map_user(proc, buf, PAGE_SIZE, start, RW)
    assert_errno(errno.EEXIST, lambda: iopt.map_user(proc, buf, PAGE_SIZE, start, RW))
    assert_errno(errno.EINVAL, lambda: iopt.unmap(start, 0))
    assert_errno(errno.EOVERFLOW, lambda: iopt.unmap(ULONG_MAX, 1))
    assert_errno(errno.EOVERFLOW, lambda: iopt.unmap(ULONG_MAX - 1, 3))
    assert_errno(errno.ENOENT, lambda: iopt.unmap(start + PAGE_SIZE, PAGE_SIZE))
    # Sub-page source offset must respect the IOAS alignment
    assert_errno(
        errno.EINVAL, lambda: iopt.map_user(proc, buf + 512, MOCK_PAGE_SIZE, start + PAGE_SIZE, RW)
    )
    assert_errno(errno.EINVAL, lambda: iopt.map_user(proc, buf + 512, MOCK_PAGE_SIZE, None, RW))
    # user VA + length wrapping the address space
    assert_errno(
        errno.EOVERFLOW,
        lambda: iopt.map_user(proc, ULONG_MAX - PAGE_SIZE + 1, 2 * PAGE_SIZE, None, RW),
    )


def test_auto_iova_enospc() -> None:
    w = World(0)
    w.iopt.set_allowed([(PAGE_SIZE, 4 * PAGE_SIZE - 1)])
    w.iopt.map_user(w.proc, w.buffer, 2 * PAGE_SIZE, None, RW)
    assert_errno(errno.ENOSPC, lambda: w.iopt.map_user(w.proc, w.buffer, 2 * PAGE_SIZE, None, RW))
    assert_errno(errno.EOVERFLOW, lambda: w.iopt.map_user(w.proc, w.buffer, 1 << 63, None, RW))


def test_auto_iova_follows_user_alignment() -> None:
    w = World(0)
    va = w.proc.mmap(8 << 20, align=8 << 20)
    iova = w.iopt.map_user(w.proc, va, 4 << 20, None, RW)
    assert iova == HUGEPAGE_SIZE  # alignment capped at HPAGE_SIZE although VA and length allow 4M
    iova2 = w.iopt.map_user(w.proc, va + 0x3000, PAGE_SIZE * 4, None, RW)
    assert iova2 % 0x1000 == 0  # the 16 KiB length would allow more; the VA only 4 KiB
    iova3 = w.iopt.map_user(w.proc, w.buffer + 0x123, 0x100, None, RW)
    assert iova3 & PAGE_MASK == 0x123  # sub-page offset kept


# -- domains ----------------------------------------------------------------------------


def test_pinned_once_across_domains_and_copies() -> None:
    w = World(2)
    w.iopt.map_user(w.proc, w.buffer, BUFFER_SIZE, MOCK_APERTURE_START, RW)
    other = IoPagetable(w.memory)
    od = mock_domain()
    other.add_domain(od)
    other.copy_from(w.iopt, MOCK_APERTURE_START, BUFFER_SIZE, None, RW)
    assert w.refs(w.buffer, BUFFER_SIZE) == [2] * 16
    assert w.proc.locked_pages == 16
    w.check_iova(w.buffer, MOCK_APERTURE_START, BUFFER_SIZE)
    w.iopt.unmap_all()
    assert w.refs(w.buffer, BUFFER_SIZE) == [2] * 16  # the copy still holds the pages
    other.remove_domain(od)
    assert w.refs(w.buffer, BUFFER_SIZE) == [1] * 16 and w.proc.locked_pages == 0
    assert od.mapped_bytes() == 0 and all(d.mapped_bytes() == 0 for d in w.domains)


def test_lazy_pin_then_efault_on_attach() -> None:
    w = World(0)
    va = w.proc.mmap(4 * PAGE_SIZE)
    w.iopt.map_user(w.proc, w.buffer, BUFFER_SIZE, PAGE_SIZE * 32, RW)
    w.iopt.map_user(w.proc, va, 4 * PAGE_SIZE, PAGE_SIZE * 64, RW)
    assert w.proc.locked_pages == 0
    w.proc.munmap(va, 4 * PAGE_SIZE)
    before = snapshot(w)
    d = FakeDomain(aperture_start=PAGE_SIZE)
    assert_errno(errno.EFAULT, lambda: w.iopt.add_domain(d))
    assert snapshot(w) == before and d.mapped_bytes() == 0 and not w.iopt.domains
    assert w.iopt.reserved() == []


def test_map_efault_half_way() -> None:
    w = World(1)
    buf = w.proc.mmap(8 * PAGE_SIZE)
    w.proc.munmap(buf + 4 * PAGE_SIZE, 4 * PAGE_SIZE)
    before = snapshot(w)
    assert_errno(errno.EFAULT, lambda: w.iopt.map_user(w.proc, buf, 8 * PAGE_SIZE, None, RW))
    assert snapshot(w) == before


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_domain_map_failure_is_undone(fail_at: int) -> None:
    w = World(0)
    d1, d2 = FakeDomain(), FakeDomain()
    w.iopt.allow_large_pages = False
    w.iopt.add_domain(d1)
    w.iopt.add_domain(d2)
    w.iopt.map_user(w.proc, w.buffer, PAGE_SIZE, 0x100000, RW)
    before = snapshot(w)
    d2.map_calls, d2.fail_at_call = 0, fail_at
    assert_errno(
        errno.ENOMEM, lambda: w.iopt.map_user(w.proc, w.buffer + PAGE_SIZE, 4 * PAGE_SIZE, None, RW)
    )
    assert snapshot(w) == before
    d2.fail_at_call = None
    # A new domain failing part way through the fill is left empty and not attached.
    d3 = FakeDomain(aperture_start=PAGE_SIZE)
    w.iopt.map_user(w.proc, w.buffer + PAGE_SIZE, 4 * PAGE_SIZE, 0x200000, RW)
    d3.fail_at_call = 1 + fail_at
    before = snapshot(w)
    assert_errno(errno.ENOMEM, lambda: w.iopt.add_domain(d3))
    assert snapshot(w) == before and d3.mapped_bytes() == 0 and w.iopt.reserved() == []


def test_first_domain_failure_unpins() -> None:
    w = World(0)
    w.iopt.map_user(w.proc, w.buffer, 4 * PAGE_SIZE, 0x100000, RW)
    w.iopt.map_user(w.proc, w.buffer + 8 * PAGE_SIZE, 4 * PAGE_SIZE, 0x200000, RW)
    before = snapshot(w)
    d = FakeDomain()
    d.fail_at_call = 2
    assert_errno(errno.ENOMEM, lambda: w.iopt.add_domain(d))
    assert snapshot(w) == before and w.proc.locked_pages == 0 and d.mapped_bytes() == 0


def test_add_domain_constraints() -> None:
    w = World(0)
    w.iopt.map_user(w.proc, w.buffer, 3 * 1024, 0x10000, RW)  # byte granular, no domain
    before = snapshot(w)
    assert_errno(errno.EADDRINUSE, lambda: w.iopt.add_domain(mock_domain()))
    assert_errno(errno.EINVAL, lambda: w.iopt.add_domain(FakeDomain(pgsize_bitmap=2 * PAGE_SIZE)))
    w.iopt.unmap_all()
    w.iopt.map_user(w.proc, w.buffer, PAGE_SIZE, 0x10000, RW)
    before = snapshot(w)
    assert_errno(errno.EADDRINUSE, lambda: w.iopt.add_domain(mock_domain()))  # aperture
    assert snapshot(w) == before and w.iopt.reserved() == []
    d = FakeDomain()
    w.iopt.add_domain(d)
    assert_errno(errno.EEXIST, lambda: w.iopt.add_domain(d))
    w.iopt.remove_domain(d)
    assert_errno(errno.ENOENT, lambda: w.iopt.remove_domain(d))


def test_reserve_conflicts() -> None:
    w = World(0)
    w.iopt.map_user(w.proc, w.buffer, PAGE_SIZE, 0x10000, RW)
    assert_errno(errno.EADDRINUSE, lambda: w.iopt.reserve("dev", 0x10FFF, 0x11FFF))
    w.iopt.reserve("dev", 0x11000, 0x11FFF)
    w.iopt.reserve("dev2", 0x11800, 0x12FFF)  # reserved ranges may overlap
    w.iopt.unreserve_owner("dev")
    assert w.iopt.iova_ranges() == [(0, 0x117FF), (0x13000, ULONG_MAX)]


def test_all_aligns_mock_domain() -> None:
    """iommufd_mock_domain.all_aligns + all_aligns_copy: every 2 KiB start/end in 8 pages."""
    w = World(1)
    buf_size = PAGE_SIZE * 8
    buf = w.proc.mmap(buf_size)
    for p in range(0, buf_size, PAGE_SIZE):
        w.proc.write(buf + p, bytes([p >> 12]) * 8)
    for start in range(0, buf_size, MOCK_PAGE_SIZE):
        for end in range(start + MOCK_PAGE_SIZE, buf_size, MOCK_PAGE_SIZE):
            length = end - start
            iova = w.iopt.map_user(w.proc, buf + start, length, None, RW)
            w.check_iova(buf + start, iova, length)
            pinned = w.refs(
                buf + start // PAGE_SIZE * PAGE_SIZE,
                end // PAGE_SIZE * PAGE_SIZE - start // PAGE_SIZE * PAGE_SIZE,
            )
            assert pinned == [2] * len(pinned)
            # Add and destroy a domain while the area exists
            extra = mock_domain()
            w.iopt.add_domain(extra)
            got = extra.translate(iova)
            assert got is not None
            assert got[0] == (w.frame(buf + start) << PAGE_SHIFT) | (start & PAGE_MASK)
            w.iopt.remove_domain(extra)
            assert extra.mapped_bytes() == 0
            w.iopt.unmap(iova, length)
    assert w.refs(buf, buf_size) == [1] * 8 and w.proc.locked_pages == 0


def test_lookup(w: World) -> None:
    iova = w.iopt.map_user(w.proc, w.buffer, 4 * PAGE_SIZE, None, IOMMU_READ)
    assert w.iopt.lookup(iova - 1) is None
    if w.domains:
        assert w.iopt.lookup(iova + PAGE_SIZE + 5) == (w.frame(w.buffer + PAGE_SIZE), IOMMU_READ)
    else:
        assert w.iopt.lookup(iova) is None  # nothing pinned yet


# -- accesses ---------------------------------------------------------------------------


def test_access_pin_unmap(w: World) -> None:
    acc = FakeAccess(w.iopt)
    w.iopt.add_access(acc)
    assert w.iopt.iova_alignment == PAGE_SIZE
    w.iopt.map_user(w.proc, w.buffer, BUFFER_SIZE, MOCK_APERTURE_START, RW)
    pfns = acc.pin(MOCK_APERTURE_START, BUFFER_SIZE)
    assert pfns == [w.frame(w.buffer + i * PAGE_SIZE) for i in range(16)]
    acc.pin(MOCK_APERTURE_START, BUFFER_SIZE)  # double user shares the record
    assert w.refs(w.buffer, BUFFER_SIZE) == [2] * 16 and w.proc.locked_pages == 16
    assert w.iopt.unmap(MOCK_APERTURE_START, BUFFER_SIZE) == BUFFER_SIZE
    assert acc.notified == [(MOCK_APERTURE_START, BUFFER_SIZE)] and acc.pins == []
    assert w.refs(w.buffer, BUFFER_SIZE) == [1] * 16 and w.proc.locked_pages == 0
    w.iopt.remove_access(acc)
    assert w.iopt.iova_alignment == (MOCK_PAGE_SIZE if w.domains else 1)


def test_access_pin_with_domain_churn() -> None:
    """iommufd_ioas.access_pin: add/remove a domain while an access holds pins."""
    w = World(0)
    acc = FakeAccess(w.iopt)
    w.iopt.add_access(acc)
    for npages in range(1, 16):
        w.iopt.map_user(w.proc, w.buffer, BUFFER_SIZE, MOCK_APERTURE_START, RW)
        acc.pin(MOCK_APERTURE_START, npages * PAGE_SIZE)
        d = mock_domain()
        w.iopt.add_domain(d)
        w.domains = [d]
        w.check_iova(w.buffer, MOCK_APERTURE_START, BUFFER_SIZE)
        w.iopt.remove_domain(d)
        w.domains = []
        assert w.proc.locked_pages == npages
        acc.unpin_all()
        assert w.proc.locked_pages == 0
        w.iopt.unmap(MOCK_APERTURE_START, BUFFER_SIZE)


def test_access_that_never_unpins_gets_edeadlk() -> None:
    w = World(1)
    acc = FakeAccess(w.iopt, cooperative=False)
    w.iopt.add_access(acc)
    w.iopt.map_user(w.proc, w.buffer, PAGE_SIZE * 2, MOCK_APERTURE_START, RW)
    w.iopt.map_user(w.proc, w.buffer, PAGE_SIZE * 2, MOCK_APERTURE_START + 2 * PAGE_SIZE, RW)
    acc.pin(MOCK_APERTURE_START + 2 * PAGE_SIZE, PAGE_SIZE)
    assert_errno(errno.EDEADLK, lambda: w.iopt.unmap_all())
    assert len(acc.notified) == 101
    # As Linux 7.2, the first area (no access on it) went before the stuck second one.
    assert [a[0] for a in w.iopt.areas()] == [MOCK_APERTURE_START + 2 * PAGE_SIZE]
    acc.pin(MOCK_APERTURE_START + 2 * PAGE_SIZE, PAGE_SIZE)  # prevent_access was cleared
    acc.unpin_all()
    assert w.iopt.unmap_all() == 2 * PAGE_SIZE


def test_locked_area_refuses_unmap() -> None:
    w = World(1)
    acc = FakeAccess(w.iopt)
    w.iopt.add_access(acc)
    w.iopt.map_user(w.proc, w.buffer, BUFFER_SIZE, MOCK_APERTURE_START, RW)
    w.iopt.access_pin(MOCK_APERTURE_START, PAGE_SIZE, True, lock=True)
    assert_errno(errno.EBUSY, lambda: w.iopt.unmap(MOCK_APERTURE_START, BUFFER_SIZE))
    assert acc.notified == []
    assert_errno(errno.EINVAL, lambda: w.iopt.access_unpin(MOCK_APERTURE_START, PAGE_SIZE))
    w.iopt.access_unpin(MOCK_APERTURE_START, PAGE_SIZE, lock=True)
    assert w.iopt.unmap(MOCK_APERTURE_START, BUFFER_SIZE) == BUFFER_SIZE


def test_access_pin_errnos() -> None:
    w = World(0)
    iopt = w.iopt
    iopt.map_user(w.proc, w.buffer, 4 * PAGE_SIZE, 0x10000, IOMMU_READ)
    iopt.map_user(w.proc, w.buffer + 0x800, 4 * PAGE_SIZE, 0x20000, RW)
    before = snapshot(w)
    assert_errno(errno.EINVAL, lambda: iopt.access_pin(0x10000, 0, False))
    assert_errno(errno.EOVERFLOW, lambda: iopt.access_pin(ULONG_MAX, 2, False))
    assert_errno(errno.EPERM, lambda: iopt.access_pin(0x10000, PAGE_SIZE, True))
    assert_errno(errno.EINVAL, lambda: iopt.access_pin(0x10800, PAGE_SIZE, False))
    assert_errno(errno.EINVAL, lambda: iopt.access_pin(0x20000, PAGE_SIZE, False))
    assert_errno(errno.ENOENT, lambda: iopt.access_pin(0x10000, 5 * PAGE_SIZE, False))
    assert_errno(errno.ENOENT, lambda: iopt.access_pin(0x30000, PAGE_SIZE, False))
    assert_errno(errno.EINVAL, lambda: iopt.access_unpin(0x10000, PAGE_SIZE))
    assert snapshot(w) == before
    # Pins spanning two back-to-back areas
    iopt.map_user(w.proc, w.buffer + 4 * PAGE_SIZE, 4 * PAGE_SIZE, 0x14000, IOMMU_READ)
    pfns = iopt.access_pin(0x12000, 4 * PAGE_SIZE, False)
    assert pfns == [w.frame(w.buffer + i * PAGE_SIZE) for i in (2, 3, 4, 5)]
    assert w.proc.locked_pages == 4
    iopt.access_unpin(0x12000, 4 * PAGE_SIZE)
    assert w.proc.locked_pages == 0


def test_access_rw(w: World) -> None:
    iova = w.iopt.map_user(w.proc, w.buffer, BUFFER_SIZE, None, RW)
    for at in range(iova + PAGE_SIZE - 50, iova + PAGE_SIZE + 50, 7):
        for length in (1, 13, 31):
            va = w.buffer + at - iova
            assert w.iopt.access_rw(at, length, False) == w.proc.read(va, length)
            data = bytes((at + k) & 0xFF for k in range(length))
            assert w.iopt.access_rw(at, data, True) is None
            assert w.proc.read(va, length) == data
    assert w.iopt.access_rw(iova, BUFFER_SIZE, False) == w.proc.read(w.buffer, BUFFER_SIZE)
    assert w.proc.locked_pages == 0 or w.domains


def test_access_rw_unaligned_and_errnos() -> None:
    w = World(0)
    iova = MOCK_PAGE_SIZE
    w.iopt.map_user(w.proc, w.buffer, BUFFER_SIZE, iova, RW)
    assert w.iopt.access_rw(iova, BUFFER_SIZE, False) == w.proc.read(w.buffer, BUFFER_SIZE)
    w.iopt.map_user(w.proc, w.buffer, PAGE_SIZE, 0x100000, IOMMU_READ)
    before = snapshot(w)
    assert_errno(errno.EPERM, lambda: w.iopt.access_rw(0x100000, b"x", True))
    assert_errno(errno.EINVAL, lambda: w.iopt.access_rw(0x100000, 0, False))
    assert_errno(errno.ENOENT, lambda: w.iopt.access_rw(0x100000, PAGE_SIZE + 1, False))
    w.proc.munmap(w.buffer, BUFFER_SIZE)
    # Pages nobody pinned are resolved through the (now gone) mapping: EFAULT.
    in_use = w.memory.frames_in_use
    assert_errno(errno.EFAULT, lambda: w.iopt.access_rw(iova, 8, False))
    assert (w.memory.frames_in_use, w.proc.locked_pages) == (in_use, 0)
    areas = before[0]
    assert isinstance(areas, list)
    assert [a[:3] for a in w.iopt.areas()] == [a[:3] for a in areas]


def test_access_alignment_conflict() -> None:
    w = World(0)
    w.iopt.map_user(w.proc, w.buffer + 0x800, PAGE_SIZE, 0x10000, RW)
    acc = FakeAccess(w.iopt)
    assert_errno(errno.EADDRINUSE, lambda: w.iopt.add_access(acc))
    assert w.iopt.accesses == () and w.iopt.iova_alignment == 1


def test_pages_partial_pin_failure_is_undone() -> None:
    w = World(0)
    va = w.proc.mmap(4 * PAGE_SIZE)
    pages, start_byte = Pages.from_user(w.proc, va, 4 * PAGE_SIZE, True)
    assert start_byte == 0 and pages.npages == 4
    assert pages.use(1, 2) == [w.frame(va + PAGE_SIZE), w.frame(va + 2 * PAGE_SIZE)]
    w.proc.munmap(va + 3 * PAGE_SIZE, PAGE_SIZE)
    p0 = w.frame(va)
    before = (w.memory.frame_refs(p0), w.proc.locked_pages, pages.npinned)
    assert_errno(errno.EFAULT, lambda: pages.use(0, 3))  # index 0 pinned, then 3 fails
    assert (w.memory.frame_refs(p0), w.proc.locked_pages, pages.npinned) == before
    assert pages.use(0, 2)[1:] == pages.pfns(1, 2)
    pages.unuse(0, 2)
    pages.unuse(1, 2)
    assert pages.npinned == 0 and w.proc.locked_pages == 0
    assert_errno(errno.EINVAL, lambda: pages.unuse(1, 1))
    assert_errno(errno.EINVAL, lambda: pages.use(0, 4))


# -- memfd ------------------------------------------------------------------------------


def test_map_file() -> None:
    """A memfd maps and pins its frames (CHANGE_PROCESS and the charges: test_accounting)."""
    w = World(1)
    mf = MemFile(w.memory, 8 * PAGE_SIZE)
    iova = w.iopt.map_file(mf, PAGE_SIZE, 4 * PAGE_SIZE, None, RW, w.proc)
    assert iova % (4 * PAGE_SIZE) == 0
    assert w.proc.locked_pages == 4
    got = w.domains[0].translate(iova)
    assert got is not None and got[0] == mf.pfn(1) << PAGE_SHIFT
    assert w.memory.frame_refs(mf.pfn(1)) == 2  # the file's own + the pin
    assert w.iopt.all_areas_from_files()
    w.iopt.unmap_all()
    assert w.proc.locked_pages == 0 and w.memory.frame_refs(mf.pfn(1)) == 1
    # Beyond the end of the file: lazily accepted, refused when pinned.
    before = snapshot(w)
    assert_errno(
        errno.EINVAL, lambda: w.iopt.map_file(mf, 6 * PAGE_SIZE, 4 * PAGE_SIZE, None, RW, w.proc)
    )
    assert snapshot(w) == before
    assert_errno(errno.EINVAL, lambda: w.iopt.map_file(mf, 0, 0, None, RW, w.proc))
    w.iopt.map_user(w.proc, w.buffer, PAGE_SIZE, None, RW)
    assert not w.iopt.all_areas_from_files()


# -- random sequences against a reference model -----------------------------------------

NPAGES = 48  # IOVA pages 0..47 above BASE; the buffer has as many pages
BASE = 0x40000000


class IoptMachine(RuleBasedStateMachine):
    """Random map/unmap/copy/domain/access sequences checked against plain dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = PhysicalMemory(1 << 32)
        self.proc = Process(types.SimpleNamespace(memory=self.memory, granted_caps=0), pid=1)  # type: ignore[arg-type]
        self.buf = self.proc.mmap(NPAGES * PAGE_SIZE)
        self.proc.write(self.buf, b"\x01" * (NPAGES * PAGE_SIZE))  # fault everything in
        self.iopt = IoPagetable(self.memory)
        self.domains: list[FakeDomain] = []
        self.access = FakeAccess(self.iopt)
        self.iopt.add_access(self.access)
        # reference areas: (iova_page, npages, buf_page of first page, Pages id). Each
        # IOAS_MAP makes a new Pages; copies share their source's.
        self.ref: list[tuple[int, int, int, int]] = []
        self.next_pages_id = 0

    def _ref_pages(self) -> dict[int, tuple[int, int]]:
        """iova page -> (buffer page, Pages id)."""
        out = {}
        for iova_page, n, buf_page, pid in self.ref:
            for k in range(n):
                out[iova_page + k] = (buf_page + k, pid)
        return out

    def _new_pid(self) -> int:
        self.next_pages_id += 1
        return self.next_pages_id

    def _overlapping(self, first: int, n: int) -> list[tuple[int, int, int, int]]:
        return [a for a in self.ref if a[0] < first + n and first < a[0] + a[1]]

    @rule(at=st.integers(0, NPAGES - 1), n=st.integers(1, 8), src=st.integers(0, NPAGES - 8))
    def map_fixed(self, at: int, n: int, src: int) -> None:
        va = self.buf + src * PAGE_SIZE
        if self._overlapping(at, n):
            assert_errno(
                errno.EEXIST,
                lambda: self.iopt.map_user(self.proc, va, n * PAGE_SIZE, BASE + at * PAGE_SIZE, RW),
            )
            return
        self.iopt.map_user(self.proc, va, n * PAGE_SIZE, BASE + at * PAGE_SIZE, RW)
        self.ref.append((at, n, src, self._new_pid()))

    @rule(n=st.integers(1, 8), src=st.integers(0, NPAGES - 8))
    def map_auto(self, n: int, src: int) -> None:
        self.iopt.set_allowed([(BASE, BASE + NPAGES * PAGE_SIZE - 1)])
        va = self.buf + src * PAGE_SIZE
        try:
            iova = self.iopt.map_user(self.proc, va, n * PAGE_SIZE, None, RW)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            return
        finally:
            self.iopt.set_allowed([])
        at = (iova - BASE) // PAGE_SIZE
        assert iova % min(1 << (n * PAGE_SIZE - 1).bit_length(), va & -va) == 0
        assert not self._overlapping(at, n) and at + n <= NPAGES
        self.ref.append((at, n, src, self._new_pid()))

    @rule(at=st.integers(0, NPAGES - 1), n=st.integers(1, 24))
    def unmap(self, at: int, n: int) -> None:
        hit = sorted(self._overlapping(at, n))
        if not hit or any(a[0] < at or a[0] + a[1] > at + n for a in hit):
            assert_errno(
                errno.ENOENT, lambda: self.iopt.unmap(BASE + at * PAGE_SIZE, n * PAGE_SIZE)
            )
            # Linux 7.2: the covered areas met before the one sticking out are gone
            for a in hit:
                if a[0] < at or a[0] + a[1] > at + n:
                    break
                self.ref.remove(a)
            return
        got = self.iopt.unmap(BASE + at * PAGE_SIZE, n * PAGE_SIZE)
        assert got == sum(a[1] for a in hit) * PAGE_SIZE
        for a in hit:
            self.ref.remove(a)

    @rule(src=st.integers(0, NPAGES - 1), n=st.integers(1, 8), dst=st.integers(0, NPAGES - 1))
    def copy(self, src: int, n: int, dst: int) -> None:
        pages = self._ref_pages()
        covered = all(src + k in pages for k in range(n))
        if not covered:
            assert_errno(
                errno.ENOENT,
                lambda: self.iopt.copy_from(
                    self.iopt, BASE + src * PAGE_SIZE, n * PAGE_SIZE, BASE + dst * PAGE_SIZE, RW
                ),
            )
            return
        if self._overlapping(dst, n):
            assert_errno(
                errno.EEXIST,
                lambda: self.iopt.copy_from(
                    self.iopt, BASE + src * PAGE_SIZE, n * PAGE_SIZE, BASE + dst * PAGE_SIZE, RW
                ),
            )
            return
        self.iopt.copy_from(
            self.iopt, BASE + src * PAGE_SIZE, n * PAGE_SIZE, BASE + dst * PAGE_SIZE, RW
        )
        # one area per source area crossed
        k = 0
        while k < n:
            area = next(a for a in self.ref if a[0] <= src + k < a[0] + a[1])
            take = min(n - k, area[0] + area[1] - (src + k))
            self.ref.append((dst + k, take, pages[src + k][0], area[3]))
            k += take

    @precondition(lambda self: len(self.domains) < 2)
    @rule(huge=st.booleans())
    def add_domain(self, huge: bool) -> None:
        d = FakeDomain(PAGE_SIZE | (HUGEPAGE_SIZE if huge else 0))
        self.iopt.add_domain(d)
        self.domains.append(d)

    @precondition(lambda self: self.domains)
    @rule(which=st.integers(0, 1))
    def remove_domain(self, which: int) -> None:
        d = self.domains.pop(which % len(self.domains))
        self.iopt.remove_domain(d)
        assert d.mapped_bytes() == 0

    @rule(at=st.integers(0, NPAGES - 1), n=st.integers(1, 6))
    def access_pin(self, at: int, n: int) -> None:
        pages = self._ref_pages()
        if all(at + k in pages for k in range(n)):
            pfns = self.access.pin(BASE + at * PAGE_SIZE, n * PAGE_SIZE)
            assert pfns == [
                self.proc.translate(self.buf + pages[at + k][0] * PAGE_SIZE) for k in range(n)
            ]
        else:
            assert_errno(
                errno.ENOENT,
                lambda: self.iopt.access_pin(BASE + at * PAGE_SIZE, n * PAGE_SIZE, False),
            )

    @precondition(lambda self: self.access.pins)
    @rule()
    def access_unpin(self) -> None:
        iova, length = self.access.pins.pop()
        self.iopt.access_unpin(iova, length)

    @invariant()
    def consistent(self) -> None:
        pages = self._ref_pages()
        got = {}
        for iova, last, prot, _, _ in self.iopt.areas():
            assert prot == RW
            for p in range(iova, last + 1, PAGE_SIZE):
                got[(p - BASE) // PAGE_SIZE] = True
        assert set(got) == set(pages)
        pinned: set[tuple[int, int]] = set()  # (buffer page, Pages id): one pin each
        if self.domains:
            pinned |= set(pages.values())
        for iova, length in self.access.pins:
            for p in range(iova, iova + length, PAGE_SIZE):
                pinned.add(pages[(p - BASE) // PAGE_SIZE])
        for b in range(NPAGES):
            pfn = self.proc.translate(self.buf + b * PAGE_SIZE)
            assert self.memory.frame_refs(pfn) == 1 + sum(1 for q in pinned if q[0] == b), b
        assert self.proc.locked_pages == len(pinned)
        for d in self.domains:
            assert d.mapped_bytes() == len(pages) * PAGE_SIZE
            for ipage, (bpage, _) in pages.items():
                hit = d.translate(BASE + ipage * PAGE_SIZE)
                pfn = self.proc.translate(self.buf + bpage * PAGE_SIZE)
                assert hit is not None and hit[0] == pfn << PAGE_SHIFT
                assert self.iopt.lookup(BASE + ipage * PAGE_SIZE) == (pfn, RW)
        assert self.iopt.warnings == []

    def teardown(self) -> None:
        self.access.unpin_all()
        self.iopt.unmap_all()
        for d in self.domains:
            self.iopt.remove_domain(d)
        assert self.proc.locked_pages == 0
        assert all(
            self.memory.frame_refs(self.proc.translate(self.buf + b * PAGE_SIZE)) == 1
            for b in range(NPAGES)
        )


TestIoptMachine = IoptMachine.TestCase
TestIoptMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _iter_areas(iopt: IoPagetable) -> Iterator[tuple[int, int]]:
    for iova, last, _, _, _ in iopt.areas():
        yield iova, last


def test_unmap_all_reports_every_area() -> None:
    w = World(1)
    for _ in range(5):
        w.iopt.map_user(w.proc, w.buffer, PAGE_SIZE, None, RW)
    assert len(list(_iter_areas(w.iopt))) == 5
    assert w.iopt.unmap_all() == 5 * PAGE_SIZE
    assert list(_iter_areas(w.iopt)) == [] and w.domains[0].mapped_bytes() == 0


# -- iopt_cut_iova (VFIO type1 unmap inside a mapping) -----------------------------------


def test_cut_iova_splits_an_area_in_place() -> None:
    w = World(1)
    w.iopt.allow_large_pages = False
    empty = snapshot(w)
    iova = w.iopt.map_user(w.proc, w.buffer, BUFFER_SIZE, MOCK_APERTURE_START, RW)
    before = snapshot(w)
    sb = next(w.iopt.areas())[4]
    # iova + 1 must be aligned to the IOAS (PAGE_SIZE): refused, nothing changes
    assert_errno(errno.EINVAL, lambda: w.iopt.cut_iova([iova + MOCK_PAGE_SIZE - 1]))
    # the ends of an area and IOVAs in no area need no cut
    w.iopt.cut_iova([iova - 1, iova + BUFFER_SIZE - 1, iova + BUFFER_SIZE])
    assert snapshot(w) == before
    w.iopt.cut_iova([iova + 2 * PAGE_SIZE - 1, iova + PAGE_SIZE - 1])
    assert [(a[0], a[1], a[4]) for a in w.iopt.areas()] == [
        (iova, iova + PAGE_SIZE - 1, sb),
        (iova + PAGE_SIZE, iova + 2 * PAGE_SIZE - 1, sb + PAGE_SIZE),
        (iova + 2 * PAGE_SIZE, iova + BUFFER_SIZE - 1, sb + 2 * PAGE_SIZE),
    ]
    # the domain and the pins are untouched: same translations, same frame references
    w.check_iova(w.buffer, iova, BUFFER_SIZE)
    assert snapshot(w)[1:] == before[1:]
    assert w.iopt.unmap(iova + PAGE_SIZE, PAGE_SIZE) == PAGE_SIZE
    assert w.iopt.unmap_all() == BUFFER_SIZE - PAGE_SIZE
    assert snapshot(w) == empty


def test_cut_iova_refusals() -> None:
    w = World(1)  # large pages allowed: the domain may hold large IOPTEs
    iova = w.iopt.map_user(w.proc, w.buffer, BUFFER_SIZE, MOCK_APERTURE_START, RW)
    before = snapshot(w)
    assert_errno(errno.EINVAL, lambda: w.iopt.cut_iova([iova + PAGE_SIZE - 1]))
    assert snapshot(w) == before
    w = World(0)
    w.iopt.allow_large_pages = False
    iova = w.iopt.map_user(w.proc, w.buffer, BUFFER_SIZE, None, RW)
    acc = FakeAccess(w.iopt)
    w.iopt.add_access(acc)
    acc.pin(iova, PAGE_SIZE)
    before = snapshot(w)
    assert_errno(errno.EINVAL, lambda: w.iopt.cut_iova([iova + PAGE_SIZE - 1]))
    assert snapshot(w) == before
    acc.unpin_all()
    w.iopt.cut_iova([iova + PAGE_SIZE - 1])
    assert len(list(w.iopt.areas())) == 2
