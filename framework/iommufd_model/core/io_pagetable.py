"""``struct io_pagetable``: the IOVA space of one IOAS and the domains it fills.

Follows drivers/iommu/iommufd/io_pagetable.c, the io_pagetable half of ioas.c and the area
side of pages.c and device.c (in-kernel accesses). An IOVA range is covered by *areas*; each
area maps a byte slice of a :class:`~iommufd_model.core.pages.Pages`. With no domain
attached an area is only a promise (nothing is pinned, so any user address maps); the first
domain pins every area and each further domain maps the same PFNs. Byte granularity is
real: with no domain the alignment is 1, and a domain with a sub-page granule (the mock's
2 KiB) makes areas with a sub-page offset into their first page.

Where the model intentionally differs from the kernel:

* ``unmap`` does what Linux 7.2 does: it walks the areas in IOVA order and removes each
  fully covered one before it looks at the next, so an area that sticks out (ENOENT) or is
  locked (EBUSY) fails the call with the areas before it gone. After EDEADLK the
  ``prevent_access`` mark is cleared again (the kernel leaves it set).
* Programming errors the kernel only WARNs about are refused: ``access_unpin`` without an
  exactly matching pin (EINVAL), ``remove_domain``/``remove_access`` of an unknown object
  (ENOENT). A domain ``unmap`` that returns a short count is recorded in ``warnings``.
* The kernel's PFN storage tiers (xarray, storage domain, source) are one table in
  ``Pages``; PFNs, pin counts and ``locked_pages`` are the same.
* A domain gets one ``map`` per physically contiguous run (the kernel's pfn_batch can split
  a run at a batch boundary) and one ``unmap`` per area (the kernel cuts the unmap at PFN
  discontinuities when in-kernel accesses keep part of the area pinned). Both pair every
  unmap with whole maps, which is what drivers rely on.
* Accounting is Linux 7.2's (core/accounting.py): pins are charged after a fill mapped
  them into every domain (or into an access) and a refused charge (ENOMEM) unwinds the fill.
* Storage (the model's own): a one-page area whose Pages no other area, copy or in-kernel
  access uses is kept as one packed int in the area map (a *row*: PFN, offset, prot,
  writable, source page) instead of an ``Area`` and a ``Pages`` object, 40-odd bytes instead
  of several hundred; it becomes the two objects again, identical, the first time anything
  but a lookup needs them (unmap, copy, an access, a new domain, iteration). This is what
  keeps an IOAS of a million one-page areas under 200 bytes of heap an area
  (benchmarks/bench_ioas.py). Every errno, partial effect and failpoint is the objects'.
* dma-buf Pages (IOAS_MAP_FILE of a dma-buf) follow Linux 7.2: they pin and charge nothing,
  in-kernel accesses are refused, a split is EOPNOTSUPP, and once the exporter revokes them
  (``Pages.revoke_notify``) their IOPTEs are zapped in every domain, later domains map
  nothing for them, and unmapping them touches no domain.
* Not modelled here: the dirty bitmap walkers.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import attrs

from iommufd_model.core.intervals import (
    U64_MAX,
    IntervalMap,
    IntervalSet,
    covered_spans,
    find_hole,
    holes,
)
from iommufd_model.core.pages import ACCESS_RW_WRITE, Pages
from iommufd_model.driver import IOMMU_CACHE as IOMMU_CACHE  # re-exported for callers
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.errors import err
from iommufd_model.failnth import failpoint
from iommufd_model.hw.memory import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, PhysicalMemory

if TYPE_CHECKING:
    from iommufd_model.core.accounting import UserStruct
    from iommufd_model.process import MemFile, Process

ULONG_MAX = U64_MAX
# Automatic IOVAs are never aligned beyond a THP (HPAGE_SIZE on x86-64 with THP).
HPAGE_SIZE = 2 << 20
# iopt_add_access() allocates ids with xa_limit_16b.
ACCESS_LIMIT = 1 << 16
# iopt_unmap_iova_range() gives up on an access that ignores this many unmap notifications.
UNMAP_NOTIFY_TRIES = 100


class IoDomain(Protocol):
    """What an io_pagetable needs from an ``iommu_domain``."""

    @property
    def pgsize_bitmap(self) -> int:
        """Supported page sizes; the lowest set bit is the granule."""

    @property
    def aperture_start(self) -> int:
        """First translatable IOVA."""

    @property
    def aperture_end(self) -> int:
        """Last translatable IOVA (inclusive)."""

    def map(self, iova: int, pa: int, size: int, prot: int) -> None:
        """Map ``size`` bytes; may raise OSError (e.g. ENOMEM) having mapped nothing."""

    def map_pages(self, iova: int, pa: int, pgsize: int, pgcount: int, prot: int) -> None:
        """``pgcount`` maps of ``pgsize`` bytes each (no larger page), all or nothing."""

    def unmap(self, iova: int, size: int) -> int:
        """Unmap a range made of whole earlier maps; returns the bytes unmapped."""


class IoAccess(Protocol):
    """An in-kernel access (``struct iommufd_access``) as the io_pagetable sees it.

    ``iova_alignment`` is PAGE_SIZE for accesses that pin pages, else 1. ``unmap`` is the
    driver's ``ops->unmap``: it must unpin whatever it pinned inside ``[iova, iova+length)``.
    An access with a true ``internal`` attribute (the HW queue's) is never notified.
    """

    @property
    def iova_alignment(self) -> int: ...

    def unmap(self, iova: int, length: int) -> None: ...


@attrs.define(eq=False)
class Area:
    """``struct iopt_area``: IOVA ``[iova, last]`` backed by ``pages`` from ``start_byte``."""

    iova: int
    last: int
    pages: Pages
    start_byte: int  # byte offset into pages of the byte at ``iova``
    prot: int
    num_accesses: int = 0
    num_locks: int = 0
    prevent_access: bool = False

    @property
    def length(self) -> int:
        return self.last - self.iova + 1

    @property
    def page_offset(self) -> int:
        return self.start_byte & PAGE_MASK

    @property
    def first_index(self) -> int:
        return self.start_byte >> PAGE_SHIFT

    @property
    def last_index(self) -> int:
        return (self.start_byte + self.length - 1) >> PAGE_SHIFT

    def start_byte_at(self, iova: int) -> int:
        """``iopt_area_start_byte()``: offset into ``pages`` of the byte at ``iova``."""
        return self.start_byte + (iova - self.iova)

    def index_at(self, iova: int) -> int:
        return self.start_byte_at(iova) >> PAGE_SHIFT


@attrs.frozen
class DirectWindow:
    """How :meth:`IoPagetable.access_rw` copies through one area for the process
    ``current`` (:meth:`DirectWindow.of`), for a caller that repeats such copies without
    the model (run/_fastrw.c): IOVAs ``[first, last]`` are bytes ``start_byte`` on of
    ``pages``, which are ``src``'s bytes from ``va`` on for user pages. With ``direct``, a
    copy without ``ACCESS_RW_SLOW_PATH`` goes through them whatever its range
    (``copy_to_user``: the caller's own mm); with ``page``, a copy within one page goes
    through them (``iopt_pages_rw_page()``: a live mm, pinned for the copy). Anything else
    takes the pinned pages (``iopt_pages_rw_slow()``: a memfd's pages, a gone mm, another
    mm across a page boundary, ``ACCESS_RW_SLOW_PATH``), whose PFNs
    :meth:`Pages.pinned_pfns` gives. Reads need ``readable``, writes ``writable`` (the
    area's prot, and the pages' for a write)."""

    first: int
    last: int
    src: Process | None
    va: int
    readable: bool
    writable: bool
    direct: bool
    page: bool
    pages: Pages
    start_byte: int

    @classmethod
    def of(cls, area: Area, current: Process) -> DirectWindow | None:
        """The window of ``area`` for ``current``; None for a dma-buf's pages, which no
        CPU copy reaches (``iopt_pages_rw_access()`` refuses them)."""
        pages = area.pages
        if pages.is_dmabuf:
            return None
        src = pages.proc
        user = src is not None and pages.memfile is None
        return cls(
            area.iova,
            area.last,
            src,
            pages.base + area.start_byte if user else 0,
            readable=bool(area.prot & IOMMU_READ),
            writable=bool(area.prot & IOMMU_WRITE) and pages.writable,
            direct=user and pages.direct_source(0, current) is current,
            page=user and src is not None and not src.gone,
            pages=pages,
            start_byte=area.start_byte,
        )


_Segment = tuple[Area, int, int]  # area, first iova used in it, last iova used in it

# A row (see the module docstring): bit fields of one int.
_ROW_PFN_MASK = (1 << 64) - 1
_ROW_OFFSET_SHIFT = 64  # start_byte, below PAGE_SIZE
_ROW_PROT_SHIFT = _ROW_OFFSET_SHIFT + PAGE_SHIFT  # prot, 8 bits
_ROW_WRITABLE_SHIFT = _ROW_PROT_SHIFT + 8  # Pages.writable
_ROW_BASE_SHIFT = _ROW_WRITABLE_SHIFT + 1  # Pages.base >> PAGE_SHIFT


def _lowbit(x: int) -> int:
    return x & -x


def _roundup_pow_of_two(x: int) -> int:
    return 1 << (x - 1).bit_length()


def _check_prot(prot: int) -> None:
    if not prot & (IOMMU_READ | IOMMU_WRITE):
        raise err(errno.EINVAL, "mapping must be readable or writable")


def _check_u64_args(*values: int | None) -> None:
    """ioas.c rejects a raw ``iova``/``length`` of ULONG_MAX or more before anything else."""
    for v in values:
        if v is not None and not 0 <= v < ULONG_MAX:
            raise err(errno.EOVERFLOW, f"{v:#x} is not below ULONG_MAX")


def _last_of(iova: int, length: int) -> int:
    """Last byte of ``[iova, iova+length)``: EINVAL for zero length, EOVERFLOW on wrap."""
    if length == 0:
        raise err(errno.EINVAL, "zero length")
    if iova < 0 or length < 0 or iova + length - 1 > ULONG_MAX:
        raise err(errno.EOVERFLOW, "range wraps")
    return iova + length - 1


class IoPagetable:
    """The IOVA space of an IOAS: areas, allowed and reserved ranges, domains, accesses."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self._areas: IntervalMap[Area | int] = IntervalMap(track_coverage=True)
        # The process every row's Pages belongs to, and how many rows there are.
        self._row_source: tuple[Process | None, int, UserStruct | None] | None = None
        self._rows = 0
        self._allowed: IntervalMap[None] = IntervalMap()
        self._reserved = IntervalSet()
        self._domains: list[IoDomain] = []
        self._accesses: list[IoAccess] = []
        # iopt_init_table(): a table with no domain accepts any byte-granular IOVA.
        self._iova_alignment = 1
        self._disable_large_pages = False
        # WARN_ON()s the kernel would print (driver unmap returning a short count ...).
        self.warnings: list[str] = []

    # -- introspection ------------------------------------------------------------------
    @property
    def iova_alignment(self) -> int:
        return self._iova_alignment

    @property
    def domains(self) -> tuple[IoDomain, ...]:
        return tuple(self._domains)

    @property
    def accesses(self) -> tuple[IoAccess, ...]:
        return tuple(self._accesses)

    def areas(self) -> Iterator[tuple[int, int, int, Pages, int]]:
        """``(iova, last, prot, pages, start_byte)`` of every area, in IOVA order."""
        for area in self.area_objects():
            yield area.iova, area.last, area.prot, area.pages, area.start_byte

    def area_objects(self) -> list[Area]:
        """Every area as its ``Area`` object, in IOVA order (rows become objects)."""
        return [self._area(iova, last, value) for iova, last, value in self._areas]

    def area_at(self, iova: int) -> Area | None:
        got = self._areas.get(iova)
        return None if got is None else self._area(*got)

    def maps_any(self, first: int, last: int) -> bool:
        """Whether any area intersects ``[first, last]``."""
        return self._areas.overlaps(first, last)

    # -- rows (the module docstring) ------------------------------------------------------
    def _row(self, area: Area) -> Area | int:
        """``area`` packed as a row when it and its Pages fit one, else ``area`` itself.

        Called as the area is published, before it takes its reference on the Pages."""
        pages = area.pages
        if area.num_accesses or area.num_locks or area.prevent_access:
            return area
        if area.start_byte >> PAGE_SHIFT or area.prot >> 8:
            return area
        pfn = pages.sole_pfn()
        if pfn is None or bool(pfn) != bool(self._domains):  # filled into domains = pinned
            return area
        source = pages.source()
        if self._row_source is None:
            self._row_source = source
        elif source != self._row_source:  # Process and UserStruct compare by identity
            return area
        self._rows += 1
        return (
            pfn
            | area.start_byte << _ROW_OFFSET_SHIFT
            | area.prot << _ROW_PROT_SHIFT
            | pages.writable << _ROW_WRITABLE_SHIFT
            | (pages.base >> PAGE_SHIFT) << _ROW_BASE_SHIFT
        )

    def _area(self, iova: int, last: int, value: Area | int) -> Area:
        """The ``Area`` behind an entry of the area map: a row becomes its objects for good."""
        if isinstance(value, Area):
            return value
        source = self._row_source
        assert source is not None  # rows exist only with their process
        pages = Pages.sole(
            source,
            (value >> _ROW_BASE_SHIFT) << PAGE_SHIFT,
            bool(value >> _ROW_WRITABLE_SHIFT & 1),
            value & _ROW_PFN_MASK,
        )
        start_byte = value >> _ROW_OFFSET_SHIFT & PAGE_MASK
        area = Area(iova, last, pages, start_byte, value >> _ROW_PROT_SHIFT & 0xFF)
        self._areas.replace(iova, area)
        self._rows -= 1
        if not self._rows:
            self._row_source = None
        return area

    def lookup(self, iova: int) -> tuple[int, int] | None:
        """``(pfn, prot)`` of the page behind ``iova``; None if unmapped or not pinned.

        Pages are pinned while a domain (or an access) uses them, so with any domain attached
        every mapped IOVA resolves.
        """
        got = self._areas.get(iova)
        if got is None:
            return None
        value = got[2]
        if not isinstance(value, Area):
            row_pfn = value & _ROW_PFN_MASK
            return (row_pfn, value >> _ROW_PROT_SHIFT & 0xFF) if row_pfn else None
        pfn = value.pages.pfn(value.index_at(iova))
        return None if pfn is None else (pfn, value.prot)

    def reserved(self) -> list[tuple[int, int, object]]:
        return self._reserved.entries()

    def allowed(self) -> list[tuple[int, int]]:
        return [(first, last) for first, last, _ in self._allowed]

    # -- IOMMU_OPTION_HUGE_PAGES --------------------------------------------------------
    @property
    def allow_large_pages(self) -> bool:
        return not self._disable_large_pages

    @allow_large_pages.setter
    def allow_large_pages(self, value: bool) -> None:
        if value:
            # iopt_enable_large_pages(): lowering the alignment cannot fail.
            self._disable_large_pages = False
            self._recalculate_alignment(warn=True)
            return
        # iopt_disable_large_pages()
        if self._disable_large_pages:
            return
        if self._domains and self._areas:
            raise err(errno.EINVAL, "domains already hold mappings made with large pages")
        self._disable_large_pages = True
        try:
            self._recalculate_alignment()
        except OSError:
            self._disable_large_pages = False
            raise

    def set_large_pages(self, value: bool) -> None:
        """IOMMU_OPTION_HUGE_PAGES set: the same as assigning :attr:`allow_large_pages`."""
        self.allow_large_pages = value

    # -- alignment (iopt_calculate_iova_alignment / iopt_check_iova_alignment) ----------
    def _check_areas_alignment(self, alignment: int) -> None:
        mask = alignment - 1
        for area in self.area_objects():
            iova, last = area.iova, area.last
            if iova & mask or (last - iova + 1) & mask or area.page_offset & mask:
                raise err(errno.EADDRINUSE, f"area at {iova:#x} is not {alignment:#x} aligned")

    def _recalculate_alignment(self, *, warn: bool = False) -> None:
        new = PAGE_SIZE if self._disable_large_pages else 1
        for domain in self._domains:
            new = max(new, _lowbit(domain.pgsize_bitmap))
        for access in self._accesses:
            new = max(new, access.iova_alignment)
        if new > self._iova_alignment:
            try:
                self._check_areas_alignment(new)
            except OSError as e:
                if not warn:
                    raise
                self.warnings.append(f"alignment {new:#x} conflicts with areas: {e}")
                return
        self._iova_alignment = new

    # -- IOVA placement -------------------------------------------------------------------
    def _check_iova(self, iova: int, length: int) -> None:
        """``iopt_check_iova()``."""
        if iova & (self._iova_alignment - 1):
            raise err(errno.EINVAL, f"iova {iova:#x} misaligned")
        if iova + length - 1 > ULONG_MAX:
            raise err(errno.EOVERFLOW, "iova range wraps")
        last = iova + length - 1
        if self._reserved.overlaps(iova, last):
            raise err(errno.EINVAL, "iova range hits a reserved region")
        if self._areas.overlaps(iova, last):
            raise err(errno.EEXIST, "iova range already mapped")

    def _alloc_iova(self, addr: int, length: int) -> int:
        """``iopt_alloc_iova()``: first fit, aligned like ``addr`` and ``length`` allow."""
        page_offset = addr % PAGE_SIZE
        if length == 0 or length >= ULONG_MAX // 2:
            raise err(errno.EOVERFLOW, "length too large for automatic placement")
        alignment = _roundup_pow_of_two(length)
        if addr:
            alignment = min(alignment, _lowbit(addr))
        alignment = min(alignment, HPAGE_SIZE)
        if alignment < self._iova_alignment:
            raise err(errno.EINVAL, "source alignment below the IOAS alignment")
        if self._allowed:
            windows: Iterator[tuple[int, int]] = covered_spans(
                self._allowed, PAGE_SIZE, ULONG_MAX - PAGE_SIZE
            )
        else:
            windows = iter([(PAGE_SIZE, ULONG_MAX - PAGE_SIZE)])
        for first, last in windows:
            found = find_hole(
                first, last, length, alignment, page_offset, (self._reserved, self._areas.coverage)
            )
            if found is not None:
                return found
        raise err(errno.ENOSPC, "no free IOVA range")

    # -- mapping --------------------------------------------------------------------------
    def map_user(
        self,
        proc: Process,
        user_va: int,
        length: int,
        iova: int | None,
        prot: int,
        account_mm: bool = False,
    ) -> int:
        """IOMMU_IOAS_MAP: map ``length`` bytes of ``proc`` at ``user_va``; returns the IOVA.
        ``account_mm``: the iommufd's RLIMIT_MODE is per process (iopt_map_common() turns
        the new pages' IOPT_PAGES_ACCOUNT_USER into IOPT_PAGES_ACCOUNT_MM)."""
        _check_u64_args(iova, length)
        _check_prot(prot)
        pages, start_byte = Pages.from_user(proc, user_va, length, bool(prot & IOMMU_WRITE))
        if account_mm:
            pages.account_per_mm()
        return self._map_pages([(pages, start_byte, length)], length, iova, prot)

    def map_file(
        self,
        memfile: MemFile,
        start: int,
        length: int,
        iova: int | None,
        prot: int,
        proc: Process | None,
        account_mm: bool = False,
    ) -> int:
        """IOMMU_IOAS_MAP_FILE: map bytes ``[start, start+length)`` of a memfd
        (``account_mm`` as for :meth:`map_user`)."""
        _check_u64_args(iova, length)
        _check_prot(prot)
        pages, start_byte = Pages.from_file(memfile, start, length, bool(prot & IOMMU_WRITE), proc)
        if account_mm:
            pages.account_per_mm()
        return self._map_pages([(pages, start_byte, length)], length, iova, prot)

    def copy_from(
        self, src: IoPagetable, src_iova: int, length: int, iova: int | None, prot: int
    ) -> int:
        """IOMMU_IOAS_COPY: map what ``src`` maps at ``src_iova`` here, sharing its Pages."""
        _check_u64_args(length, src_iova, iova)
        _check_prot(prot)
        elems = src._get_pages(src_iova, length)
        return self._map_pages(elems, length, iova, prot)

    def check_copy_source(self, iova: int, length: int) -> None:
        """Refuse a copy source as ``iopt_get_pages()`` would (EINVAL/EOVERFLOW/ENOENT)."""
        self._get_pages(iova, length)

    def _get_pages(self, iova: int, length: int) -> list[tuple[Pages, int, int]]:
        """``iopt_get_pages()``: the slices of Pages behind a fully mapped range."""
        last = _last_of(iova, length)
        segments, done = self._contig(iova, last)
        if not done:
            raise err(errno.ENOENT, "source range is not fully mapped")
        return [
            (area.pages, area.start_byte_at(cur), seg_last - cur + 1)
            for area, cur, seg_last in segments
        ]

    def _map_pages(
        self, elems: Sequence[tuple[Pages, int, int]], length: int, iova: int | None, prot: int
    ) -> int:
        """``iopt_map_pages()``: place, validate, fill every domain, then publish the areas."""
        alignment = self._iova_alignment
        if length & (alignment - 1) or length == 0:
            raise err(errno.EINVAL, "length is not a multiple of the IOAS alignment")
        if iova is None:
            pages0, start_byte0, _ = elems[0]
            iova = self._alloc_iova(pages0.base + start_byte0, length)
            try:
                self._check_iova(iova, length)
            except OSError as e:  # the kernel WARNs here under CONFIG_IOMMUFD_TEST
                self.warnings.append(f"allocated iova {iova:#x} fails check: {e}")
                raise err(errno.EINVAL, "bad automatic iova") from None
        else:
            self._check_iova(iova, length)
        new: list[Area] = []
        cur = iova
        for pages, start_byte, elem_len in elems:
            # iopt_insert_area()
            if prot & IOMMU_WRITE and not pages.writable:
                raise err(errno.EPERM, "writable mapping of read-only pages")
            if (start_byte % PAGE_SIZE) & (alignment - 1):
                raise err(errno.EINVAL, "source offset misaligned for the IOAS")
            if cur + elem_len - 1 > ULONG_MAX:
                raise err(errno.EOVERFLOW, "iova range wraps")
            if (start_byte + elem_len - 1) >> PAGE_SHIFT >= pages.npages:
                raise err(errno.EOVERFLOW, "slice beyond its pages")
            failpoint("iopt.alloc_area")  # iopt_alloc_area(): kzalloc
            new.append(Area(cur, cur + elem_len - 1, pages, start_byte, prot))
            cur += elem_len
        filled: list[Area] = []
        try:
            for area in new:
                self._fill_area(area)
                filled.append(area)
        except OSError:
            for area in filled:
                self._unfill_area(area)
            raise
        for area in new:
            self._areas.insert(area.iova, area.last, self._row(area))
            area.pages.refs += 1
            if area.pages.is_dmabuf:
                area.pages.dmabuf_track(self, area)
        return iova

    # -- IOMMU_IOAS_CHANGE_PROCESS (core/ioas.py change_process) --------------------------
    def all_areas_from_files(self) -> bool:
        """True when every area maps a memfd (only those can change owning process)."""
        return all(area.pages.is_file for area in self.area_objects())

    # -- domain filling (pages.c: batch_to_domain, iopt_area_fill_domains ...) -----------
    def _domain_unmap(self, domain: IoDomain, iova: int, size: int) -> None:
        got = domain.unmap(iova, size)
        if got != size:
            self.warnings.append(
                f"domain {domain!r} unmapped {got:#x} of {size:#x} bytes at {iova:#x}"
            )

    def _map_area(self, domain: IoDomain, area: Area, pfns: list[int]) -> None:
        """Map ``area`` into ``domain``: one call per physically contiguous run.

        On failure whatever this call mapped is unmapped again before re-raising.
        """
        end = area.last + 1
        iova = area.iova
        offset = area.page_offset
        prot = area.prot
        small = self._disable_large_pages
        n = len(pfns)
        i = 0
        try:
            while i < n:
                j = i + 1
                prev = pfns[i]
                while j < n and pfns[j] == prev + 1:
                    prev = pfns[j]
                    j += 1
                pa = (pfns[i] << PAGE_SHIFT) + offset
                run_end = min(end, iova + ((j - i) << PAGE_SHIFT) - offset)
                if small:
                    # batch_iommu_map_small(): VFIO type1 compatibility maps page by page, one
                    # iommu_map() of PAGE_SIZE each; the domain takes the run's pages at once.
                    domain.map_pages(iova, pa, PAGE_SIZE, (run_end - iova) >> PAGE_SHIFT, prot)
                else:
                    domain.map(iova, pa, run_end - iova, prot)
                iova = run_end
                offset = 0
                i = j
        except OSError:
            if iova != area.iova:
                self._domain_unmap(domain, area.iova, iova - area.iova)
            raise

    def _fill_area(self, area: Area) -> None:
        """``iopt_area_fill_domains()``: pin once, map into every domain, charge the pins,
        all or nothing. A revoked dma-buf maps nothing."""
        if not self._domains:
            return
        if area.pages.is_dmabuf:
            for _ in self._domains:
                failpoint("pages.dmabuf_track")  # iopt_dmabuf_track_domain(): kzalloc
            if area.pages.revoked:
                return
        pfns = area.pages.use(area.first_index, area.last_index)
        done: list[IoDomain] = []
        try:
            for domain in self._domains:
                self._map_area(domain, area, pfns)
                done.append(domain)
            area.pages.update_pinned()
        except OSError:
            for domain in done:
                self._domain_unmap(domain, area.iova, area.length)
            area.pages.unuse(area.first_index, area.last_index)
            raise

    def dmabuf_zap(self, area: Area) -> None:
        """``iopt_revoke_notify()`` for one area here: unmap it from every domain."""
        for domain in self._domains:
            self._domain_unmap(domain, area.iova, area.length)

    def _unfill_area(self, area: Area) -> None:
        """``iopt_area_unfill_domains()``: unmap from every domain, then unpin (a revoked
        dma-buf's IOPTEs are gone already)."""
        if not self._domains or area.pages.revoked:
            return
        for domain in self._domains:
            self._domain_unmap(domain, area.iova, area.length)
        area.pages.unuse(area.first_index, area.last_index)

    # -- domains (iopt_table_add_domain / iopt_table_remove_domain) ----------------------
    def add_domain(self, domain: IoDomain) -> None:
        """Attach a domain: enforce its granule and aperture, then fill every area into it."""
        if any(d is domain for d in self._domains):
            raise err(errno.EEXIST, "domain already in this IOAS")
        if domain.pgsize_bitmap <= 0:
            raise err(errno.EINVAL, "domain has no page sizes")
        new_alignment = max(_lowbit(domain.pgsize_bitmap), self._iova_alignment)
        if new_alignment > PAGE_SIZE:
            raise err(errno.EINVAL, "domain cannot map PAGE_SIZE")
        if new_alignment != self._iova_alignment:
            self._check_areas_alignment(new_alignment)
        try:
            if domain.aperture_start != 0:
                self.reserve(domain, 0, domain.aperture_start - 1)
            if domain.aperture_end != ULONG_MAX:
                self.reserve(domain, domain.aperture_end + 1, ULONG_MAX)
        except OSError:
            self._reserved.remove_owner(domain)
            raise
        first_domain = not self._domains
        done: list[Area] = []
        try:
            for area in self.area_objects():
                if area.pages.is_dmabuf:
                    failpoint("pages.dmabuf_track")  # iopt_dmabuf_track_domain(): kzalloc
                    if area.pages.revoked:  # iopt_area_fill_domain() maps nothing
                        continue
                if first_domain:
                    pfns = area.pages.use(area.first_index, area.last_index)
                else:
                    pfns = area.pages.pfns(area.first_index, area.last_index)
                try:
                    self._map_area(domain, area, pfns)
                except OSError:
                    if first_domain:
                        area.pages.unuse(area.first_index, area.last_index)
                    raise
                if first_domain:  # iopt_area_fill_domain(): charged once mapped
                    try:
                        area.pages.update_pinned()
                    except OSError:
                        self._domain_unmap(domain, area.iova, area.length)
                        area.pages.unuse(area.first_index, area.last_index)
                        raise
                done.append(area)
        except OSError:
            for area in done:
                self._domain_unmap(domain, area.iova, area.length)
                if first_domain:
                    area.pages.unuse(area.first_index, area.last_index)
            self._reserved.remove_owner(domain)
            raise
        self._iova_alignment = new_alignment
        self._domains.append(domain)

    def remove_domain(self, domain: IoDomain) -> None:
        """Detach a domain: unmap everything from it; the last domain out unpins."""
        index = next((i for i, d in enumerate(self._domains) if d is domain), -1)
        if index < 0:
            raise err(errno.ENOENT, "domain not in this IOAS")
        # The kernel keeps its xarray dense by moving the tail entry into the hole.
        tail = self._domains.pop()
        if index != len(self._domains):
            self._domains[index] = tail
        last_one = not self._domains
        for area in self.area_objects():
            if area.pages.revoked:
                continue
            self._domain_unmap(domain, area.iova, area.length)
            if last_one:
                area.pages.unuse(area.first_index, area.last_index)
        self._reserved.remove_owner(domain)
        self._recalculate_alignment(warn=True)

    # -- allowed and reserved ranges -------------------------------------------------------
    def iova_ranges(self) -> list[tuple[int, int]]:
        """IOMMU_IOAS_IOVA_RANGES: the gaps between reserved ranges over the whole u64 space."""
        return list(holes(0, ULONG_MAX, (self._reserved,)))

    def set_allowed(self, ranges: Sequence[tuple[int, int]]) -> None:
        """IOMMU_IOAS_ALLOW_IOVAS: replace the allowed list (empty = everything allowed)."""
        new: IntervalMap[None] = IntervalMap()
        for start, last in ranges:
            if start < 0 or last > ULONG_MAX or start >= last:
                raise err(errno.EINVAL, f"bad allowed range [{start:#x}, {last:#x}]")
            if new.overlaps(start, last):
                raise err(errno.EINVAL, "allowed ranges overlap")
            failpoint("iopt.set_allowed")  # kzalloc of struct iopt_allowed
            new.insert(start, last, None)
        for start, last, _ in new:
            if self._reserved.overlaps(start, last):
                raise err(errno.EADDRINUSE, "allowed range intersects a reserved range")
        self._allowed = new

    def reserve(self, owner: object, start: int, last: int) -> None:
        """``iopt_reserve_iova()``: keep ``[start, last]`` out of the IOAS for ``owner``."""
        if not 0 <= start <= last <= ULONG_MAX:
            raise err(errno.EINVAL, f"bad reserved range [{start:#x}, {last:#x}]")
        if self._areas.overlaps(start, last) or self._allowed.overlaps(start, last):
            raise err(errno.EADDRINUSE, "range is mapped or explicitly allowed")
        failpoint("iopt.reserve")  # kzalloc of struct iopt_reserved
        self._reserved.add(start, last, owner)

    def unreserve_owner(self, owner: object) -> None:
        self._reserved.remove_owner(owner)

    # -- unmapping ---------------------------------------------------------------------------
    def unmap(self, iova: int, length: int) -> int:
        """IOMMU_IOAS_UNMAP of a range: whole areas only; ENOENT if nothing was mapped."""
        _check_u64_args(iova, length)
        last = _last_of(iova, length)
        unmapped = self._unmap_range(iova, last)
        if not unmapped:
            raise err(errno.ENOENT, "nothing mapped in range")
        return unmapped

    def cut_iova(self, iovas: Sequence[int]) -> None:
        """``iopt_cut_iova()``: split the area holding each IOVA so that the IOVA ends an area.

        The cut follows the kernel's iopt_cut_iova()/iopt_area_split() (io_pagetable.c): an
        IOVA in no area is skipped, the first failing split stops the call and the splits
        done before it stay. VFIO type1 unmap cuts at the ends of its range first.
        """
        for iova in iovas:
            area = self.area_at(iova)
            if area is not None:
                self._split_area(area, iova)

    def _split_area(self, area: Area, iova: int) -> None:
        """``iopt_area_split()``: replace ``area`` by ``[area.iova, iova]`` and the rest.

        Both halves share the area's Pages (one more reference); the domains keep their
        IOPTEs and the pages their pins, as the split needs ``iova + 1`` aligned to the
        IOAS (PAGE_SIZE or more once type1 forbids large pages).
        """
        if iova in (area.iova, area.last):
            return
        if area.prevent_access:
            raise err(errno.EBUSY, f"area at {area.iova:#x} is being unmapped")
        if area.pages.is_dmabuf:
            raise err(errno.EOPNOTSUPP, "dma-buf areas are not split")
        new_start = iova + 1
        mask = self._iova_alignment - 1
        if new_start & mask or area.start_byte_at(new_start) & mask:
            raise err(errno.EINVAL, f"cut after {iova:#x} is not aligned to the IOAS")
        failpoint("iopt.alloc_area")  # iopt_area_alloc() of the left half
        failpoint("iopt.alloc_area")  # and of the right half
        if area.num_accesses:
            raise err(errno.EINVAL, "an access has pinned pages of the area")
        if self._domains and not self._disable_large_pages:
            raise err(errno.EINVAL, "domains may hold large IOPTEs over the area")
        lhs = Area(area.iova, iova, area.pages, area.start_byte, area.prot)
        rhs = Area(new_start, area.last, area.pages, area.start_byte_at(new_start), area.prot)
        self._areas.remove(area.iova)
        self._areas.insert(lhs.iova, lhs.last, lhs)
        self._areas.insert(rhs.iova, rhs.last, rhs)
        area.pages.refs += 1

    def unmap_all(self) -> int:
        """IOMMU_IOAS_UNMAP with iova 0, length U64_MAX: succeeds on an empty IOAS."""
        return self._unmap_range(0, ULONG_MAX)

    def _unmap_range(self, start: int, last: int) -> int:
        """``iopt_unmap_iova_range()``: one area at a time, in IOVA order.

        As Linux 7.2 (io_pagetable.c), each fully covered area is unmapped before the next
        is looked at: an area that sticks out of the range (ENOENT) or is locked by a kernel
        object (EBUSY) fails the call, and the areas unmapped before it stay unmapped (the
        ioctl reports only the error). An area with in-kernel accesses is first offered to
        them (``iommufd_access_notify_unmap``) until they let go.
        """
        unmapped = 0
        tries = 0
        flagged: list[Area] = []  # prevent_access set by this call (cleared on failure)
        while True:
            hit = self._areas.first_overlap(start, last)
            if hit is None:
                return unmapped
            first, area_last, value = hit
            area = self._area(first, area_last, value)
            if area.num_locks:
                raise err(errno.EBUSY, f"area at {first:#x} is locked by a kernel object")
            if first < start or area_last > last:
                raise err(errno.ENOENT, f"area [{first:#x}, {area_last:#x}] would be split")
            if first != start:
                tries = 0
            if area.num_accesses:
                start = first
                if not area.prevent_access:
                    area.prevent_access = True
                    flagged.append(area)
                try:
                    self._notify_unmap(first, area.length)
                    tries += 1
                    if tries > UNMAP_NOTIFY_TRIES:
                        self.warnings.append(f"access did not unpin area at {first:#x}")
                        raise err(errno.EDEADLK, "an access keeps the area pinned")
                except OSError:
                    for a in flagged:
                        a.prevent_access = False
                    raise
                continue
            self._unfill_area(area)
            area.pages.refs -= 1
            if area.pages.is_dmabuf:
                area.pages.dmabuf_untrack(area)
            self._areas.remove(first)
            unmapped += area.length
            if area_last >= last:
                return unmapped
            start = area_last + 1

    def _notify_unmap(self, iova: int, length: int) -> None:
        """``iommufd_access_notify_unmap()``: every non-internal access must unpin."""
        for access in list(self._accesses):
            if getattr(access, "internal", False):
                continue
            access.unmap(iova, length)

    # -- in-kernel accesses (iopt_add_access, iommufd_access_pin_pages ...) -----------------
    def add_access(self, access: IoAccess) -> None:
        if any(a is access for a in self._accesses):
            raise err(errno.EEXIST, "access already attached")
        if len(self._accesses) >= ACCESS_LIMIT:
            raise err(errno.EBUSY, "access ids exhausted")
        failpoint("iopt.add_access")  # xa_alloc into iopt->access_list
        self._accesses.append(access)
        try:
            self._recalculate_alignment()
        except OSError:
            self._accesses.pop()
            raise

    def remove_access(self, access: IoAccess) -> None:
        """Detach an access; like the kernel, its pins must already be gone."""
        for index, a in enumerate(self._accesses):
            if a is access:
                del self._accesses[index]
                break
        else:
            raise err(errno.ENOENT, "access not attached")
        self._recalculate_alignment(warn=True)

    def _contig(self, iova: int, last: int) -> tuple[list[_Segment], bool]:
        """``iopt_for_each_contig_area``: areas covering ``[iova, last]`` back to back.

        Returns the segments found from ``iova`` on and whether they reach ``last``.
        """
        segments: list[_Segment] = []
        got = self._areas.get(iova)
        cur = iova
        while got is not None:
            area = self._area(*got)
            segments.append((area, cur, min(last, area.last)))
            if area.last >= last:
                return segments, True
            cur = area.last + 1
            got = self._areas.get(cur)
        return segments, False

    def access_rw_area(self, iova: int, length: int, write: bool) -> Area | None:
        """The one area :meth:`access_rw` copies the whole of ``[iova, iova+length)``
        through, when one area covers the range and passes the walk's checks (not being
        unmapped, the access's permission), so that the call is that area's
        ``Pages.rw_access``; None for every other case (several areas, a hole, a refusal),
        which :meth:`access_rw` itself serves or refuses.

        Nothing is changed but the one-page row of the area becoming its objects, as
        :meth:`access_rw` does; the answer is the table's state now (no cache to go stale).
        """
        if length <= 0 or iova < 0 or iova + length - 1 > ULONG_MAX:
            return None
        got = self._areas.get(iova)
        if got is None or got[1] < iova + length - 1:
            return None
        area = self._area(*got)
        if area.prevent_access or not area.prot & (IOMMU_WRITE if write else IOMMU_READ):
            return None
        return area

    def access_pin(self, iova: int, length: int, write: bool, *, lock: bool = False) -> list[int]:
        """``iommufd_access_pin_pages()``: pin and return the PFNs under ``[iova, +length)``.

        ``lock`` marks the pin as an internal access's (HW queue): the areas then refuse
        unmap with EBUSY until the matching ``access_unpin(..., lock=True)``.
        """
        last = _last_of(iova, length)
        segments, done = self._contig(iova, last)
        out: list[int] = []
        taken: list[tuple[Area, int, int]] = []
        try:
            for area, cur, seg_last in segments:
                reaches_end = area.last >= last
                if area.prevent_access or not self._pin_aligned(area, cur, reaches_end):
                    raise err(errno.EINVAL, f"cannot pin at {cur:#x}")
                needed = IOMMU_WRITE if write else IOMMU_READ
                if not area.prot & needed:
                    raise err(errno.EPERM, "area lacks the access permission")
                first_index, last_index = area.index_at(cur), area.index_at(seg_last)
                out += area.pages.add_access(first_index, last_index, write)
                area.num_accesses += 1
                if lock:
                    area.num_locks += 1
                taken.append((area, first_index, last_index))
            if not done:
                raise err(errno.ENOENT, "range not fully mapped")
        except OSError:
            for area, first_index, last_index in reversed(taken):
                area.pages.remove_access(first_index, last_index)
                area.num_accesses -= 1
                if lock:
                    area.num_locks -= 1
            raise
        return out

    @staticmethod
    def _pin_aligned(area: Area, cur: int, reaches_end: bool) -> bool:
        """``iopt_area_contig_is_aligned()``: pins deal in whole pages only."""
        if area.start_byte_at(cur) % PAGE_SIZE:
            return False
        return reaches_end or area.start_byte_at(area.last) % PAGE_SIZE == PAGE_SIZE - 1

    def access_unpin(self, iova: int, length: int, *, lock: bool = False) -> None:
        """``iommufd_access_unpin_pages()``: undo an ``access_pin`` of exactly this range."""
        last = _last_of(iova, length)
        segments, done = self._contig(iova, last)
        if not done:
            raise err(errno.ENOENT, "range not fully mapped")
        plan: list[tuple[Area, int, int]] = []
        need: Counter[tuple[int, int, int]] = Counter()
        area_need: Counter[int] = Counter()
        for area, cur, seg_last in segments:
            first_index, last_index = area.index_at(cur), area.index_at(seg_last)
            plan.append((area, first_index, last_index))
            need[(id(area.pages), first_index, last_index)] += 1
            area_need[id(area)] += 1
        for area, first_index, last_index in plan:
            users = area.pages.access_users(first_index, last_index)
            if users < need[(id(area.pages), first_index, last_index)]:
                raise err(errno.EINVAL, "no matching pin")
            held = area.num_locks if lock else area.num_accesses - area.num_locks
            if held < area_need[id(area)]:
                raise err(errno.EINVAL, "no matching pin")
        for area, first_index, last_index in plan:
            area.pages.remove_access(first_index, last_index)
            area.num_accesses -= 1
            if lock:
                area.num_locks -= 1

    def access_rw(
        self,
        iova: int,
        data_or_len: bytes | bytearray | memoryview | int,
        write: bool,
        *,
        flags: int = 0,
        current: Process | None = None,
    ) -> bytes | None:
        """``iommufd_access_rw()``: CPU copy to (``write``) or from the memory under ``iova``.

        ``flags`` adds ``ACCESS_RW_KTHREAD`` / ``ACCESS_RW_SLOW_PATH`` (core/pages.py) and
        ``current`` is the calling process (None: a kernel thread), which pick the copy's
        path (``Pages.rw_access``). As in Linux 7.2 the areas are copied in IOVA order as
        the walk reaches them: an area being unmapped (EINVAL), one without the access's
        permission (EPERM), a failing copy, or a range that is not fully mapped (ENOENT)
        fails the call after a write has written the areas before it.
        """
        length = data_or_len if isinstance(data_or_len, int) else len(data_or_len)
        if write and isinstance(data_or_len, int):
            raise err(errno.EINVAL, "write needs data")
        last = _last_of(iova, length)
        segments, done = self._contig(iova, last)
        flags = (flags & ~ACCESS_RW_WRITE) | (ACCESS_RW_WRITE if write else 0)
        needed = IOMMU_WRITE if write else IOMMU_READ
        data = None if isinstance(data_or_len, int) else memoryview(bytes(data_or_len))
        out: list[bytes] = []
        pos = 0
        for area, cur, seg_last in segments:
            if area.prevent_access:
                raise err(errno.EINVAL, "area is being unmapped")
            if not area.prot & needed:
                raise err(errno.EPERM, "area lacks the access permission")
            seg_len = seg_last - cur + 1
            got = area.pages.rw_access(
                area.start_byte_at(cur),
                seg_len if data is None else data[pos : pos + seg_len],
                flags,
                current,
            )
            if got is not None:
                out.append(got)
            pos += seg_len
        if not done:
            raise err(errno.ENOENT, "range not fully mapped")
        return None if write else b"".join(out)
