"""``struct iopt_pages``: a linear run of 4 KiB pages that one or more IOVA areas map.

A ``Pages`` is created by IOAS_MAP (user memory) or IOAS_MAP_FILE (a memfd) and shared by
every area IOAS_COPY derives from it, in any IOAS, so memory is pinned and accounted once.
Indexes count PAGE_SIZE units from the page-aligned start of the source.

Pinning follows the kernel's rule (drivers/iommu/iommufd/pages.c): an index is pinned while
some *user* covers it -- an area that is filled into at least one domain (the kernel's
``domains_itree``) or an in-kernel access range (``access_itree``). The first user pins
through the source, later users share that PFN, and the last one to leave unpins. The
kernel stores the PFNs of pinned indexes in three tiers (xarray, a "storage" domain, the
source); this model keeps one per-index table instead, which is observably the same: same
PFNs, same pin counts, same ``locked_pages``.

Accounting is the kernel's (core/accounting.py): a fill first pins (``npinned``), then
charges what it pinned (``update_pinned()``, the kernel's ``pfn_reader_user_update_pinned()``:
``last_npinned`` catches up with ``npinned``), and a refused charge (ENOMEM) is unwound by
the caller like any other failure of the fill; unpinning uncharges at once.
"""

from __future__ import annotations

import errno
import weakref
from typing import TYPE_CHECKING

import attrs

from iommufd_model.core.accounting import (
    ACCOUNT_MM,
    ACCOUNT_NONE,
    ACCOUNT_USER,
    UserStruct,
    update_pinned,
    user_of,
)
from iommufd_model.errors import err
from iommufd_model.failnth import failpoint
from iommufd_model.hw.memory import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, PhysicalMemory

if TYPE_CHECKING:
    from iommufd_model.core.io_pagetable import Area, IoPagetable
    from iommufd_model.process import MemFile, Process


#: ``iommufd_access_rw()``'s flags (include/linux/iommufd.h, Linux 7.2)
ACCESS_RW_WRITE = 1 << 0
ACCESS_RW_KTHREAD = 1 << 1
#: ``__IOMMUFD_ACCESS_RW_SLOW_PATH``: the self-test's way to force the pinned-page path
ACCESS_RW_SLOW_PATH = 1 << 2


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Group ascending indexes into ``(first, count)`` runs of consecutive values."""
    out: list[tuple[int, int]] = []
    if not indexes:
        return out
    start = prev = indexes[0]
    for i in indexes[1:]:
        if i != prev + 1:
            out.append((start, prev - start + 1))
            start = i
        prev = i
    out.append((start, prev - start + 1))
    return out


@attrs.define(eq=False)
class Pages:
    """A pinnable backing of ``npages`` pages from a process range or a memfd.

    ``base`` is the page-aligned source address (user VA, or memfd byte offset): it is what
    automatic IOVA placement reads its alignment hint from. ``proc`` is the mm the pins are
    accounted to (the kernel's ``source_mm`` and ``source_task``), ``source_user`` the user
    (with ``account_mode`` ACCOUNT_USER): every charged pin counts in ``proc.locked_pages``
    (the mm's ``pinned_vm``, VmPin), and per ``account_mode`` in the user's or the mm's
    ``locked_vm`` (core/accounting.py).
    """

    memory: PhysicalMemory
    npages: int
    writable: bool
    proc: Process | None
    base: int
    memfile: MemFile | None = None
    # Areas referencing this Pages (the kernel's kref, minus the transient list references).
    refs: int = 0
    npinned: int = 0
    # index -> pinned pfn (0 = not pinned) and index -> number of users; allocated on first pin.
    _pfns: list[int] | None = None
    _uses: list[int] | None = None
    # (first_index, last_index) -> users: the kernel's iopt_pages_access records.
    _accesses: dict[tuple[int, int], int] = attrs.Factory(dict)
    # how pins are charged (core/accounting.py), and to which user in ACCOUNT_USER
    account_mode: int = ACCOUNT_NONE
    source_user: UserStruct | None = None
    # pins charged so far (the kernel's last_npinned; npinned runs ahead during a fill)
    last_npinned: int = 0
    # a dma-buf's exporter revoked it (the kernel's phys.len == 0): for good
    revoked: bool = False
    # a dma-buf's areas and the io_pagetables they are in (the kernel's dmabuf.tracker)
    _dmabuf_areas: list[tuple[IoPagetable, Area]] | None = None

    # -- construction (iopt_alloc_user_pages / iopt_alloc_file_pages) ----------------
    @classmethod
    def from_user(cls, proc: Process, uptr: int, length: int, writable: bool) -> tuple[Pages, int]:
        """Pages over ``[uptr, uptr+length)`` of ``proc``; returns ``(pages, start_byte)``.

        Nothing is pinned or even looked up yet: a map into an IOAS with no domain must
        succeed for any address, as the kernel's does.
        """
        if uptr < 0 or uptr + length > (1 << 64) - 1:
            raise err(errno.EOVERFLOW, "user range wraps")
        return cls._alloc(proc.memory, uptr, length, writable, proc, None)

    @classmethod
    def from_file(
        cls, memfile: MemFile, start: int, length: int, writable: bool, proc: Process | None
    ) -> tuple[Pages, int]:
        """Pages over bytes ``[start, start+length)`` of a memfd; returns (pages, start_byte)."""
        if length == 0:
            raise err(errno.EINVAL, "zero length")
        if start < 0 or start + length - 1 > (1 << 64) - 1:
            raise err(errno.EOVERFLOW, "file range wraps")
        return cls._alloc(memfile.memory, start, length, writable, proc, memfile)

    @classmethod
    def _alloc(
        cls,
        memory: PhysicalMemory,
        start: int,
        length: int,
        writable: bool,
        proc: Process | None,
        memfile: MemFile | None,
    ) -> tuple[Pages, int]:
        """Pages over ``[start, start+length)`` of a process's address space or a memfd (both
        callers' page-aligned base and offset into the first page): ``(pages, start_byte)``."""
        base = start & ~PAGE_MASK
        start_byte = start - base
        # iopt_alloc_pages(): SIZE_MAX - PAGE_SIZE bounds DIV_ROUND_UP; zero is meaningless.
        if length == 0 or length > (1 << 64) - 1 - PAGE_SIZE:
            raise err(errno.EINVAL, "bad length")
        failpoint("pages.alloc")  # kzalloc of struct iopt_pages
        npages = (length + start_byte + PAGE_MASK) >> PAGE_SHIFT
        pages = cls(memory, npages, writable, proc, base, memfile)
        # iopt_alloc_pages(): a caller with CAP_IPC_LOCK is not charged; a dma-buf never is
        # (iopt_alloc_dmabuf_pages(): it pins nothing)
        if pages.is_dmabuf:
            assert memfile is not None
            _attachments(memfile).add(pages)  # iopt_map_dmabuf(): dma_buf_dynamic_attach()
        elif proc is not None and not proc.capable_ipc_lock:
            pages.account_mode = ACCOUNT_USER
            pages.source_user = user_of(proc)
        return pages, start_byte

    def account_per_mm(self) -> None:
        """``iopt_map_common()`` in RLIMIT_MODE per process: ACCOUNT_USER becomes ACCOUNT_MM
        (pages that are not charged stay so)."""
        if self.account_mode == ACCOUNT_USER:
            self.account_mode = ACCOUNT_MM

    @property
    def is_file(self) -> bool:
        """IOPT_ADDRESS_FILE: a memfd (a dma-buf is IOPT_ADDRESS_DMABUF)."""
        return self.memfile is not None and not self.memfile.is_dmabuf

    @property
    def is_dmabuf(self) -> bool:
        return self.memfile is not None and self.memfile.is_dmabuf

    def source(self) -> tuple[Process | None, int, UserStruct | None]:
        """Whom the pins are charged to, and how: (mm, account mode, user)."""
        return self.proc, self.account_mode, self.source_user

    # -- one page, one area (what an IOAS keeps as a row: io_pagetable.py) ------------
    def sole_pfn(self) -> int | None:
        """The PFN (0 when unpinned) of a one-page user Pages whose only user is the area
        being published (no other area, copy or access); None for any other Pages.

        Such a Pages carries nothing an IOAS row cannot hold (see
        :meth:`IoPagetable._row <iommufd_model.core.io_pagetable.IoPagetable._row>`), and
        :meth:`sole` rebuilds it identically."""
        if self.refs or self.npages != 1 or self.memfile is not None or self.proc is None:
            return None
        if self._accesses or self.last_npinned != self.npinned:
            return None
        if self._pfns is None or self._uses is None:
            return 0 if not self.npinned else None
        pfn, uses = self._pfns[0], self._uses[0]
        if (uses, self.npinned) == ((1, 1) if pfn else (0, 0)):
            return pfn
        return None

    @classmethod
    def sole(
        cls,
        source: tuple[Process | None, int, UserStruct | None],
        base: int,
        writable: bool,
        pfn: int,
    ) -> Pages:
        """The Pages of a row: one user page at ``base`` of the mm of ``source`` (charged as
        :meth:`source` says), used by one area, pinned at ``pfn`` (0: not pinned)."""
        proc, mode, user = source
        assert proc is not None  # rows are user pages
        pinned = 1 if pfn else 0
        pfns, uses = ([pfn], [1]) if pfn else (None, None)
        return cls(
            proc.memory,
            1,
            writable,
            proc,
            base,
            refs=1,
            npinned=pinned,
            pfns=pfns,
            uses=uses,
            account_mode=mode,
            source_user=user,
            last_npinned=pinned,
        )

    # -- the source (pin_user_pages / memfd_pin_folios) --------------------------------
    def _source_pin(self, first: int, count: int) -> list[int]:
        # pfn_reader_user_pin(): iommufd_should_fail() before pinning
        failpoint("pages.source_pin")
        addr = self.base + (first << PAGE_SHIFT)
        if self.memfile is not None:
            return self.memfile.pin(addr, count << PAGE_SHIFT)
        if self.proc is None:  # user pages always have one; a memfd carries its own frames
            raise err(errno.EFAULT, "user pages without a process")
        return self.proc.pin_pages(addr, count)

    def _source_unpin(self, pfns: list[int]) -> None:
        if self.memfile is None and self.proc is not None:
            self.proc.unpin_pages(pfns)
            return
        put = self.memory.put_frame
        for pfn in pfns:
            put(pfn)

    # -- accounting (pages.c: iopt_pages_add_npinned ... iopt_pages_update_pinned) ------
    def _add_npinned(self, delta: int) -> None:
        """Pins taken (or dropped, negative) from the source; a dma-buf pins nothing."""
        if not self.is_dmabuf:
            self.npinned += delta

    def update_pinned(self) -> None:
        """``pfn_reader_user_update_pinned()``: charge the pins a fill took (ENOMEM over the
        limit: the caller unwinds the fill, which unpins them), or uncharge."""
        if self.npinned == self.last_npinned or self.proc is None:
            self.last_npinned = self.npinned
            return
        inc = self.npinned > self.last_npinned
        if inc:
            failpoint("pages.update_pinned")  # iommufd_should_fail(): -ENOMEM
        update_pinned(
            self.account_mode,
            self.proc,
            self.source_user,
            abs(self.npinned - self.last_npinned),
            inc,
        )
        self.last_npinned = self.npinned

    def _update_unpinned(self) -> None:
        """``update_unpinned()``: uncharge pins dropped below what was charged."""
        if self.npinned < self.last_npinned and self.proc is not None:
            update_pinned(
                self.account_mode,
                self.proc,
                self.source_user,
                self.last_npinned - self.npinned,
                False,
            )
            self.last_npinned = self.npinned

    def need_charge_update(self, proc: Process) -> bool:
        """``need_charge_update()`` (ioas.c): CHANGE_PROCESS to ``proc`` moves the charge."""
        if self.account_mode == ACCOUNT_NONE:
            return False
        if self.account_mode == ACCOUNT_MM:
            return self.proc is not proc
        return self.source_user is not user_of(proc) or self.proc is not proc

    def change_mm(self, proc: Process) -> None:
        """``change_mm()`` (ioas.c): ``proc`` becomes the source mm, task and user. The
        charge itself is moved by the caller (core/ioas.py ``change_process``)."""
        self.proc = proc
        if self.account_mode == ACCOUNT_USER:
            self.source_user = user_of(proc)

    # -- dma-buf revocation (pages.c: iopt_dmabuf_track_*, iopt_revoke_notify) ----------
    def dmabuf_track(self, iopt: IoPagetable, area: Area) -> None:
        """A dma-buf area was published in ``iopt``: a revocation zaps it there."""
        if self._dmabuf_areas is None:
            self._dmabuf_areas = []
        self._dmabuf_areas.append((iopt, area))

    def dmabuf_untrack(self, area: Area) -> None:
        if self._dmabuf_areas is not None:
            self._dmabuf_areas = [(i, a) for i, a in self._dmabuf_areas if a is not area]

    def revoke_notify(self) -> None:
        """``iopt_revoke_notify()``: the exporter invalidated its mappings. Every area of
        these pages is unmapped from every domain it is in, and the pages are revoked for
        good (whatever the exporter says later): their areas stay, map nothing in domains
        attached later, and unmap without touching a domain."""
        if self.revoked:
            return
        for iopt, area in self._dmabuf_areas or ():
            iopt.dmabuf_zap(area)
        self.revoked = True
        if self._pfns is not None:  # the model's frames of the exported range
            self._source_unpin([pfn for pfn in self._pfns if pfn])
        self._pfns = self._uses = None

    # -- users --------------------------------------------------------------------------
    def _check_range(self, first: int, last: int) -> None:
        if not 0 <= first <= last < self.npages:
            raise err(errno.EINVAL, f"page index range [{first}, {last}] outside {self.npages}")

    def use(self, first: int, last: int) -> list[int]:
        """Add one user to indexes ``[first, last]``, pinning those nobody held; return PFNs.

        All-or-nothing: if the source refuses (EFAULT for an unmapped VA, EINVAL beyond the
        end of a memfd) everything pinned by this call is unpinned and nothing changes.
        """
        self._check_range(first, last)
        if self._pfns is None or self._uses is None:
            self._pfns = [0] * self.npages
            self._uses = [0] * self.npages
        pfns, uses = self._pfns, self._uses
        end = last + 1
        seg = uses[first:end]
        if not any(seg):
            got = self._source_pin(first, end - first)
            pfns[first:end] = got
            uses[first:end] = [1] * (end - first)
            self._add_npinned(end - first)
            return got
        missing = [first + k for k, u in enumerate(seg) if u == 0]
        pinned: list[tuple[int, list[int]]] = []
        try:
            for run_first, count in _runs(missing):
                pinned.append((run_first, self._source_pin(run_first, count)))
        except OSError:
            for _, got in pinned:
                self._source_unpin(got)
            raise
        for run_first, got in pinned:
            pfns[run_first : run_first + len(got)] = got
        uses[first:end] = [u + 1 for u in seg]
        self._add_npinned(len(missing))
        return pfns[first:end]

    def unuse(self, first: int, last: int) -> None:
        """Drop one user from ``[first, last]``; unpin the indexes left with none."""
        self._check_range(first, last)
        pfns, uses = self._pfns, self._uses
        if pfns is None or uses is None or min(uses[first : last + 1]) <= 0:
            raise err(errno.EINVAL, f"unbalanced unuse of [{first}, {last}]")
        end = last + 1
        seg = [u - 1 for u in uses[first:end]]
        uses[first:end] = seg
        if not any(seg):
            gone = pfns[first:end]
            pfns[first:end] = [0] * (end - first)
        else:
            gone = []
            for k, u in enumerate(seg):
                if u == 0:
                    gone.append(pfns[first + k])
                    pfns[first + k] = 0
        if gone:
            self._source_unpin(gone)
            self._add_npinned(-len(gone))
            self._update_unpinned()

    def pfns(self, first: int, last: int) -> list[int]:
        """PFNs of indexes that are already pinned (EINVAL if any is not)."""
        self._check_range(first, last)
        if self._pfns is None:
            raise err(errno.EINVAL, "pages not pinned")
        got = self._pfns[first : last + 1]
        if 0 in got:
            raise err(errno.EINVAL, "pages not pinned")
        return got

    def pinned_pfns(self, first: int, last: int) -> list[int]:
        """PFNs of indexes ``[first, last]`` (clipped to the pages), 0 where not pinned."""
        first, last = max(first, 0), min(last, self.npages - 1)
        if self._pfns is None:
            return [0] * max(last - first + 1, 0)
        return self._pfns[first : last + 1]

    def pfn(self, index: int) -> int | None:
        """PFN of ``index`` if it is pinned, else None."""
        if self._pfns is None or not 0 <= index < self.npages:
            return None
        return self._pfns[index] or None

    # -- in-kernel accesses (iopt_area_add_access / iopt_area_remove_access) ------------
    def _refuse_dmabuf(self) -> None:
        """Linux 7.2 gives in-kernel accesses no dma-buf pages: pinning them and CPU copies
        through them are EINVAL (``iopt_area_add_access``, ``iopt_pages_rw_access``), checked
        after the read-only EPERM as there."""
        if self.memfile is not None and self.memfile.is_dmabuf:
            raise err(errno.EINVAL, "in-kernel access to dma-buf pages")

    def add_access(self, first: int, last: int, write: bool) -> list[int]:
        """Record an access over ``[first, last]``: an exact repeat only counts another user."""
        if write and not self.writable:
            raise err(errno.EPERM, "write access to read-only pages")
        self._refuse_dmabuf()
        key = (first, last)
        users = self._accesses.get(key)
        if users is not None:
            self._accesses[key] = users + 1
            return self.pfns(first, last)
        failpoint("pages.add_access")  # kzalloc of struct iopt_pages_access
        got = self.use(first, last)  # iopt_pages_fill_xarray(): pin, then charge
        try:
            self.update_pinned()
        except OSError:
            self.unuse(first, last)
            raise
        self._accesses[key] = 1
        return got

    def access_users(self, first: int, last: int) -> int:
        """How many pins the access record of exactly ``[first, last]`` holds (0 = none)."""
        return self._accesses.get((first, last), 0)

    def remove_access(self, first: int, last: int) -> None:
        """Undo one :meth:`add_access` of exactly ``[first, last]`` (EINVAL if none)."""
        key = (first, last)
        users = self._accesses.get(key)
        if users is None:
            raise err(errno.EINVAL, f"no access pinned exactly [{first}, {last}]")
        if users > 1:
            self._accesses[key] = users - 1
            return
        del self._accesses[key]
        self.unuse(first, last)

    # -- CPU copies (iopt_pages_rw_access) ---------------------------------------------
    def rw_access(
        self,
        start_byte: int,
        data: bytes | memoryview | int,
        flags: int,
        current: Process | None,
    ) -> bytes | None:
        """``iopt_pages_rw_access()``: write ``data`` into the pages from ``start_byte``
        (``ACCESS_RW_WRITE``), or read ``data`` bytes from there (returned).

        ``current`` is the calling process (the kernel's ``current->mm``; None for a kernel
        thread). The paths are Linux 7.2's: a memfd's pages go through the pinned pages
        (the "slow" path); user pages of the caller's own mm are copied through the owning
        mm's addresses (``copy_to_user``/``copy_from_user``, no pinning: a page remapped or
        unmapped under a pinned range is seen as the process sees it now, EFAULT if gone);
        from another mm, or with ``ACCESS_RW_SLOW_PATH``, one page is pinned from that mm
        and copied (``iopt_pages_rw_page()``) and more go through the pinned pages, unless
        ``ACCESS_RW_KTHREAD`` lets the copy use that mm as its own. An mm that is gone
        (``mmget_not_zero()`` fails) falls back to the pinned pages.
        """
        write = bool(flags & ACCESS_RW_WRITE)
        length = data if isinstance(data, int) else len(data)
        if write and not self.writable:
            raise err(errno.EPERM, "write access to read-only pages")
        self._refuse_dmabuf()
        direct = self.direct_source(flags, current)
        va = self.base + start_byte
        if direct is not None:  # copy_to_user / copy_from_user through the source mm
            if isinstance(data, int):
                return direct.read(va, data)
            direct.write(va, data)
            return None
        first, last = start_byte >> PAGE_SHIFT, (start_byte + length - 1) >> PAGE_SHIFT
        offset = start_byte & PAGE_MASK
        src = self.proc
        if src is None or self.memfile is not None or first != last or src.gone:
            return self._rw_slow(first, last, offset, data)
        # iopt_pages_rw_page(): pin_user_pages_remote() of the one page, then a copy
        failpoint("pages.rw_page", errno.EINVAL)  # iommufd_should_fail()
        if isinstance(data, int):
            return src.read(va, data, pinned=True)
        src.write(va, data, pinned=True)
        return None

    def direct_source(self, flags: int, current: Process | None) -> Process | None:
        """The process whose addresses ``iopt_pages_rw_access()`` copies through with
        ``copy_to_user``/``copy_from_user`` (Linux 7.2's fast path), or None when it takes
        the pinned-page paths: user pages (not a memfd) whose source mm is the caller's own
        and no ``ACCESS_RW_SLOW_PATH``, or, with ``ACCESS_RW_KTHREAD``, any live source mm
        (``kthread_use_mm()``). The permission and dma-buf checks come first (rw_access)."""
        src = self.proc
        if self.memfile is not None or src is None:
            return None
        if current is src and not flags & ACCESS_RW_SLOW_PATH:
            return src
        if flags & ACCESS_RW_KTHREAD and not src.gone:
            return src
        return None

    def _rw_slow(
        self, first: int, last: int, offset: int, data: bytes | memoryview | int
    ) -> bytes | None:
        """``iopt_pages_rw_slow()``: pin ``[first, last]`` (or share the pins there), copy
        through the pinned frames, unpin; the transient pins are never charged."""
        frames = self.use(first, last)
        try:
            if isinstance(data, int):
                return self.copy_out(frames, offset, data)
            self.copy_in(frames, offset, data)
            return None
        finally:
            self.unuse(first, last)

    def _source(self) -> MemFile | Process | None:
        return self.memfile if self.memfile is not None else self.proc

    def copy_in(self, frames: list[int], offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` into ``frames``, starting ``offset`` bytes into the first one."""
        mem, pos, length = self.memory, 0, len(data)
        start = offset
        for pfn in frames:
            chunk = min(length - pos, PAGE_SIZE - offset)
            mem.write((pfn << PAGE_SHIFT) + offset, data[pos : pos + chunk])
            pos += chunk
            offset = 0
        src = self._source()
        if src is not None:  # a real program sees the bytes (run/process.py)
            src.sync_frames_out(frames, start, length)

    def copy_out(self, frames: list[int], offset: int, length: int) -> bytes:
        """Read ``length`` bytes from ``frames``, starting ``offset`` bytes into the first one."""
        src = self._source()
        if src is not None:  # a real program's current bytes (run/process.py)
            src.sync_frames_in(frames, offset, length)
        out = bytearray()
        for pfn in frames:
            chunk = min(length - len(out), PAGE_SIZE - offset)
            out += self.memory.read((pfn << PAGE_SHIFT) + offset, chunk)
            offset = 0
        return bytes(out)

    def __repr__(self) -> str:
        src = "memfd" if self.memfile is not None else "user"
        return (
            f"<Pages {src} base={self.base:#x} npages={self.npages} "
            f"npinned={self.npinned} refs={self.refs}>"
        )


# -- dma-buf attachments (dma_buf_dynamic_attach / dma_buf_invalidate_mappings) ------------
# dma-buf file -> the Pages attached to it (gone with the Pages: iopt_release_pages() detaches)
_ATTACH: weakref.WeakKeyDictionary[MemFile, weakref.WeakSet[Pages]] = weakref.WeakKeyDictionary()


def _attachments(dmabuf: MemFile) -> weakref.WeakSet[Pages]:
    got = _ATTACH.get(dmabuf)
    if got is None:
        got = _ATTACH[dmabuf] = weakref.WeakSet()
    return got


def dmabuf_invalidate_mappings(dmabuf: MemFile) -> None:
    """``dma_buf_invalidate_mappings()`` by the exporter: every iommufd attachment's
    ``iopt_revoke_notify()`` (Linux 7.2 pages.c). It does not look at why: an exporter that
    invalidates to un-revoke revokes the pages mapped before as well."""
    for pages in list(_ATTACH.get(dmabuf, ())):
        pages.revoke_notify()
