"""A real program's process behind the core's :class:`Process` interface.

The core asks a process what ``pin_user_pages`` and ``copy_{to,from}_user`` ask of Linux.
Here the answers come from the running program:

- ``read``/``write`` are ``process_vm_readv``/``process_vm_writev`` on its pid: an unmapped
  byte is EFAULT, as in the kernel.
- Pinning gives each user page a model frame (the model's PFN, stable while the page stays
  mapped: MD_CHECK_MAP and ACCESS_PAGES compare PFNs). Private memory gets a *mirror* frame
  per (process, page); shared mappings (memfds, and shared anonymous memory, which the
  preload turns into a memfd) are :class:`RealMemFile` frames per (file, page), so every
  process of the run and every IOAS_MAP_FILE of the same file see the same frames.
- Frame contents follow the program (the model's own design, see docs/running-programs.md):
  the core's CPU copies through pinned pages (``Pages.copy_out``/``copy_in``: the selftest's
  ACCESS_RW) first read the program's current bytes into the frames and write their result
  back; a reported ``munmap`` reads pinned pages one last time, so a pin outlives munmap
  with the contents the page had, as in the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import repeat
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

import attrs

from iommufd_model import creds
from iommufd_model.errors import err
from iommufd_model.failnth import failpoint
from iommufd_model.hw.memory import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from iommufd_model.process import MemFile, Process, Vma
from iommufd_model.run import native

if TYPE_CHECKING:
    from iommufd_model.core.mmap import IommufdVma
    from iommufd_model.machine import Machine
    from iommufd_model.run.server import Server

#: 4 KiB pages in a 2 MiB huge page (x86-64's default huge page size)
HUGE_PAGES = 512
#: frames of an ordinary memfd come in physically contiguous runs of this many pages: the
#: IOMMU maps a run in one call, and a run shorter than a huge page never forms one
SMALL_RUN = HUGE_PAGES - 1
#: where a frame's bytes live in the program (:meth:`Mirrors.where`)
MIRROR_NONE, MIRROR_ANON, MIRROR_FILE = 0, 1, 2


class MmioDevice(Protocol):
    """What a trapped mapping reaches: a device's registers (the PciFunction contract)."""

    def mmio_read(self, bar: int, offset: int, size: int) -> int: ...

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None: ...

    def mmio_write64b(self, bar: int, offset: int, data: bytes) -> None: ...


@attrs.define(eq=False)
class MmioWindow:
    """A trapped mapping of device registers (the model's own design, see preload.c):
    ``[start, start+length)`` of the program is ``bar`` of ``device`` from ``offset`` on.
    ``file`` is the model file mapped (the VMA's ``vm_file``)."""

    start: int
    length: int
    device: MmioDevice
    bar: int
    offset: int
    file: Any

    @property
    def end(self) -> int:
        return self.start + self.length

    def cut(self, va: int, end: int) -> list[MmioWindow]:
        """What is left of this window once ``[va, end)`` is unmapped (0, 1 or 2 pieces)."""
        left: list[MmioWindow] = []
        if self.start < va:
            left.append(attrs.evolve(self, length=va - self.start))
        if end < self.end:
            left.append(
                attrs.evolve(
                    self, start=end, length=self.end - end, offset=self.offset + end - self.start
                )
            )
        return left


# (a mutable record only because attrs makes those faster: one is made per page pinned)
@attrs.define
class _AnonSource:
    proc: RealProcess
    vpn: int


class _FileSource(NamedTuple):
    """A page of a file (a tuple, not attrs: a file's first touch makes one per page, up to
    a 2 MiB run at once, and tuples are made without a Python call: add_file_pages)."""

    file: RealMemFile
    page: int  # the page's index in the file


_file_source = cast(
    "Callable[[tuple[RealMemFile, int]], _FileSource]", partial(tuple.__new__, _FileSource)
)


class Mirrors:
    """pfn -> where the frame's bytes live in the program (a page of a process or a file)."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self._src: dict[int, _AnonSource | _FileSource] = {}
        # bumped by the server at each request: what a file's size was within one request
        # is still its size (see RealMemFile.size)
        self.epoch = 0

    def add_anon(self, pfn: int, proc: RealProcess, vpn: int) -> None:
        self._src[pfn] = _AnonSource(proc, vpn)

    def add_file(self, pfn: int, file: RealMemFile, index: int) -> None:
        self._src[pfn] = _FileSource(file, index)

    def add_file_pages(
        self, file: RealMemFile, indexes: Iterable[int], pfns: Iterable[int]
    ) -> None:
        """:meth:`add_file` of each page of ``indexes`` at the frame of ``pfns`` beside it."""
        sources = map(_file_source, zip(repeat(file), indexes))
        self._src.update(zip(pfns, sources, strict=True))

    def _live(self, pfn: int) -> _AnonSource | _FileSource | None:
        src = self._src.get(pfn)
        if isinstance(src, _AnonSource):
            if src.proc._ptes.get(src.vpn) != pfn or src.proc.gone:
                return None
        elif isinstance(src, _FileSource) and src.file._pfns.get(src.page) != pfn:
            return None
        return src

    def where(self, pfn: int) -> tuple[int, int, int]:
        """Where :meth:`pull` and :meth:`push` reach the bytes of frame ``pfn`` now, for a
        caller that repeats them without Python (run/_fastrw.c): ``(MIRROR_ANON, pid, va)``
        of the page in a process, ``(MIRROR_FILE, fd, pos)`` of the page in a file (the
        server's own descriptor), or ``(MIRROR_NONE, 0, 0)``: the frame is its own."""
        src = self._live(pfn)
        if isinstance(src, _AnonSource):
            return MIRROR_ANON, src.proc.pid, src.vpn << PAGE_SHIFT
        if isinstance(src, _FileSource):
            return MIRROR_FILE, src.file.fd, src.page << PAGE_SHIFT
        return MIRROR_NONE, 0, 0

    def pull(self, pfns: list[int], offset: int = 0, length: int = -1) -> None:
        """Refresh bytes ``[offset, offset+length)`` of a run of frames (all of them when
        ``length`` is -1) from the program's current bytes; pages no longer mapped keep
        what they have."""
        if length < 0:
            length = len(pfns) * PAGE_SIZE - offset
        for pfn in pfns:
            chunk = min(length, PAGE_SIZE - offset)
            if chunk <= 0:
                break
            src = self._live(pfn)
            data: bytes | None = None
            if isinstance(src, _AnonSource):
                data = native.vm_read(src.proc.pid, (src.vpn << PAGE_SHIFT) + offset, chunk)
            elif isinstance(src, _FileSource):
                data = src.file.read_at((src.page << PAGE_SHIFT) + offset, chunk)
            if data is not None:
                self.memory.write((pfn << PAGE_SHIFT) + offset, data)
            length -= chunk
            offset = 0

    def push(self, pfns: list[int], offset: int, length: int) -> None:
        """Write bytes ``[offset, offset+length)`` of the run of frames back to the program."""
        for pfn in pfns:
            chunk = min(length, PAGE_SIZE - offset)
            if chunk <= 0:
                break
            src = self._live(pfn)
            data = self.memory.read((pfn << PAGE_SHIFT) + offset, chunk)
            if isinstance(src, _AnonSource):
                native.vm_write(src.proc.pid, (src.vpn << PAGE_SHIFT) + offset, data)
            elif isinstance(src, _FileSource):
                src.file.write_at((src.page << PAGE_SHIFT) + offset, data)
            length -= chunk
            offset = 0


class DmaCoherence:
    """Device DMA sees the program's memory as it is (the model's own design).

    A device's DMA (``IommuHw.dma_read``/``dma_write``: a descriptor fetch, a copy, a
    completion record) reaches physical memory through ``PhysicalMemory.read_runs`` and
    ``write_from`` only. While a run serves the machine, those two are wrapped: the frames a
    DMA read covers are first refreshed from the program's bytes (``Mirrors.pull``), and what
    a DMA write stored is written back into the program at once (``Mirrors.push``). Frames no
    program page backs cost one dict lookup. CPU copies of the core (``memory.write``) keep
    their own explicit syncs and are not pushed twice."""

    def __init__(self, memory: PhysicalMemory, mirrors: Mirrors) -> None:
        self.memory = memory
        self.mirrors = mirrors
        self._cpu_write = 0
        self._read_runs = memory.read_runs
        self._write = memory.write
        self._write_from = memory.write_from
        memory.read_runs = self.read_runs  # type: ignore[method-assign]
        memory.write = self.write  # type: ignore[method-assign]
        memory.write_from = self.write_from  # type: ignore[method-assign]

    @staticmethod
    def _pfns(pa: int, n: int) -> list[int]:
        return list(range(pa >> PAGE_SHIFT, ((pa + n - 1) >> PAGE_SHIFT) + 1)) if n > 0 else []

    def read_runs(self, runs: list[tuple[int, int]]) -> bytes:
        for pa, n in runs:
            self.mirrors.pull(self._pfns(pa, n), pa & PAGE_MASK, n)
        return self._read_runs(runs)

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        self._cpu_write += 1
        try:
            self._write(pa, data)
        finally:
            self._cpu_write -= 1

    def write_from(self, pa: int, src: bytes, pos: int, n: int) -> None:
        self._write_from(pa, src, pos, n)
        if not self._cpu_write:
            self.mirrors.push(self._pfns(pa, n), pa & PAGE_MASK, n)

    def close(self) -> None:
        """The run is over: the machine's memory is plain memory again."""
        for name in ("read_runs", "write", "write_from"):
            vars(self.memory).pop(name, None)


class RealMemFile(MemFile):
    """A file of the program (a memfd) through the server's own reference to it.

    The size is the file's size now (the program may ftruncate it); a frame per page is
    made on first touch and keeps the page cache's reference, as :class:`MemFile` does.
    """

    def __init__(self, memory: PhysicalMemory, fd: int, mirrors: Mirrors) -> None:
        self.fd = fd
        self.mirrors = mirrors
        # pages some process maps: one reference for all of them (see mapped_pfn)
        self._mapped: set[int] = set()
        # the core took the file by fd (IOAS_MAP_FILE): its objects may hold it
        self.fget_used = False
        # backs a MAP_HUGETLB mapping: pages come in physically contiguous 2 MiB runs
        self.huge = False
        self._size = (-1, 0)  # (epoch, size): one fstat per request
        super().__init__(memory, 0)

    @property
    def size(self) -> int:
        epoch, size = self._size
        if epoch == self.mirrors.epoch:
            return size
        try:
            size = os.fstat(self.fd).st_size
        except OSError:
            size = 0
        self._size = (self.mirrors.epoch, size)
        return size

    @size.setter
    def size(self, value: int) -> None:
        """The size is the file's: MemFile's constructor value is ignored."""

    def pfn(self, index: int) -> int:
        known = index in self._pfns
        if not known:
            if self.huge:
                self._huge_run(index)
            elif index >= 0 and (index << PAGE_SHIFT) < self.size:
                self._small_run(index)
        pfn = super().pfn(index)
        if not known:
            self.mirrors.add_file(pfn, self, index)
        return pfn

    def _huge_run(self, index: int) -> None:
        """Give the 2 MiB run holding page ``index`` aligned, contiguous frames at once, as
        a huge page is (the model's stand-in for the host's huge page pool)."""
        first = index & ~(HUGE_PAGES - 1)
        if (first + HUGE_PAGES) << PAGE_SHIFT > self.size:
            return  # a partial run (the file is not a whole number of huge pages)
        indexes = range(first, first + HUGE_PAGES)
        if not self._pfns.keys().isdisjoint(indexes):
            return
        base = self.memory.alloc_contiguous(HUGE_PAGES, align=HUGE_PAGES)
        self._add_run(indexes, base)

    def _add_run(self, indexes: Sequence[int], base: int) -> None:
        """Pages ``indexes`` (ascending) get frames ``base``, ``base + 1`` ..."""
        pfns = range(base, base + len(indexes))
        self._pfns.update(zip(indexes, pfns, strict=True))
        self.mirrors.add_file_pages(self, indexes, pfns)

    def _small_run(self, index: int) -> None:
        """Give the free pages of the ``SMALL_RUN``-page block holding ``index`` contiguous
        frames at once (the model's choice: one IOMMU map call per run instead of one per
        page; never a huge IOPTE, as a shmem page of Linux without THP is 4 KiB). Without
        a contiguous range left, pages get single frames."""
        first = index - index % SMALL_RUN
        last = min(first + SMALL_RUN, -(-self.size >> PAGE_SHIFT))
        todo = [i for i in range(first, last) if i not in self._pfns]
        if len(todo) < 2:
            return
        try:
            base = self.memory.alloc_contiguous(len(todo))
        except OSError:
            return
        self._add_run(todo, base)

    def mapped_pfn(self, index: int) -> int:
        """The frame of page ``index`` as a shared mapping sees it.

        Every process mapping the page shares one mapping reference (taken on first use,
        dropped with the file), so the selftest's pin count of a shared page, which takes
        one mapping reference for the caller, does not count other processes' mappings as
        pins (the kernel counts pins apart from mappings)."""
        pfn = self.pfn(index)
        if index not in self._mapped:
            self.memory.get_frame(pfn)
            self._mapped.add(index)
        return pfn

    def mapped_pfns(self, first: int, count: int) -> list[int]:
        """:meth:`mapped_pfn` of pages ``first`` .. ``first + count - 1``: one lookup of the
        whole run when every page has its frame and mapping reference already."""
        indexes = range(first, first + count)
        pfns, mapped = self._pfns, self._mapped
        got = list(map(pfns.get, indexes))
        if None not in got and mapped.issuperset(indexes):
            return got  # type: ignore[return-value]
        if first < 0 or (first + count - 1) << PAGE_SHIFT >= self.size:
            return [self.mapped_pfn(i) for i in indexes]  # EFAULT where the file ends
        # Within the file: what mapped_pfn() of each page in turn does, in bulk. Frames are
        # made in page order as there (the first page of a run makes the whole run), then
        # the pages not mapped yet take their mapping reference.
        for i in indexes:
            if i not in pfns:
                self.pfn(i)
        out = [pfns[i] for i in indexes]
        new = [k for k, i in enumerate(indexes) if i not in mapped]
        self.memory.get_frames(out[k] for k in new)
        mapped.update(first + k for k in new)
        return out

    def pinned(self) -> bool:
        """Some page of the file holds more than the file's and the mappings' references."""
        refs = self.memory.frame_refs
        return any(refs(pfn) > 1 + (i in self._mapped) for i, pfn in self._pfns.items())

    def read_at(self, pos: int, n: int) -> bytes | None:
        """``n`` bytes of the file at ``pos`` (zeros past its end, as a page past EOF)."""
        try:
            return os.pread(self.fd, n, pos).ljust(n, b"\0")
        except OSError:
            return None

    def write_at(self, pos: int, data: bytes) -> None:
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, data, pos)

    def sync_frames_in(self, pfns: list[int], offset: int, length: int) -> None:
        self.mirrors.pull(pfns, offset, length)

    def sync_frames_out(self, pfns: list[int], offset: int, length: int) -> None:
        self.mirrors.push(pfns, offset, length)

    def close(self) -> None:
        for index in self._mapped:
            self.memory.put_frame(self._pfns[index])
        self._mapped.clear()
        self.release()
        os.close(self.fd)


class ProgramFiles:
    """The program's file table as the core sees it: ``files.get(fd)`` is ``fget(fd)``."""

    def __init__(self, server: Server, proc: RealProcess) -> None:
        self.server = server
        self.proc = proc

    def get(self, fd: int, default: Any = None) -> Any:
        got = self.server.fget(self.proc, fd)
        return default if got is None else got

    def values(self) -> list[Any]:
        return []


class RealProcess(Process):
    """One process (one mm) of the program; see the module docstring."""

    def __init__(self, machine: Machine, pid: int, server: Server) -> None:
        super().__init__(machine, pid)
        self.server = server
        self.mirrors = server.mirrors
        self.files = ProgramFiles(server, self)  # type: ignore[assignment]
        self.gone = False
        # the last RLIMIT_MEMLOCK and real uid read (a gone process keeps them)
        self._last: dict[str, int] = {"memlock": creds.RLIM_INFINITY, "uid": os.getuid()}
        # What was read of the credentials, kept while Server.creds_generation stays
        # (see _creds_fresh): the capabilities capable() counts, and which of the values
        # above this generation read.
        self._creds_generation = -1
        self._counted_caps: int | None = None
        self._read: set[str] = set()  # which of _last this generation read
        self._start = self._start_time()
        # a pidfd of the process (-1 if it is gone already): which file an fd number names
        # is asked through it (Server.resolve_fd), never through a pid that may be reused
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            self.pidfd = -1
        # private pages found readable during the current request (see is_mapped)
        self._probed: set[int] = set()
        # mappings of iommufd regions: start -> the core's VMA (closed by munmap, at exit)
        self.iommufd_vmas: dict[int, IommufdVma] = {}
        # trapped mappings of device registers, by start address
        self.mmio: dict[int, MmioWindow] = {}

    # -- liveness -------------------------------------------------------------------------
    def _start_time(self) -> str | None:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        if fields[0] in ("Z", "X"):
            return None
        return fields[19]

    def alive(self) -> bool:
        """The mm still exists: the pid runs (not a zombie) and is the same process."""
        if self.gone:
            return False
        if self.server.has_connections(self.pid):  # closed at exit, before the mm goes
            return True
        if self._start is None or self._start_time() != self._start:
            self.gone = True
        return not self.gone

    # -- credentials, read from the process when the kernel reads them (creds.py) ---------
    # Reading them costs system calls and /proc reads (capget, readlink, prlimit, status):
    # most of a map's server time. So a value read is kept until the program may have
    # changed it: the preload reports every call that can (setrlimit, prlimit, capset, the
    # setuid family, unshare, setns; OP_CREDS), which moves Server.creds_generation before
    # the call returns to the program, so the next read of any process is fresh. The
    # values the kernel would read are the same; only the reads are fewer.
    def _creds_fresh(self) -> None:
        generation = self.server.creds_generation
        if self._creds_generation != generation:
            self._creds_generation = generation
            self._counted_caps = None
            self._read.clear()

    def capable(self, cap: int) -> bool:
        """``capable(cap)`` of the process now: granted to the run (``--cap``), or in its
        effective set while it is in the model's user namespace."""
        if self.machine.granted_caps >> cap & 1:
            return True
        if self._creds_generation != self.server.creds_generation:
            self._creds_fresh()
        caps = self._counted_caps
        if caps is None:
            caps = self._counted_caps = creds.counted_caps(self.pid)
        return bool(caps >> cap & 1)

    @property
    def capable_sys_resource(self) -> bool:
        """``capable(CAP_SYS_RESOURCE)`` of the process now (IOMMU_OPTION_RLIMIT_MODE)."""
        return self.capable(creds.CAP_SYS_RESOURCE)

    @capable_sys_resource.setter
    def capable_sys_resource(self, value: bool) -> None:
        """Read from the process itself: the constructor's default is ignored."""

    def _kept(self, name: str, read: Callable[[int], int | None]) -> int:
        """``read(pid)`` of credential ``name`` once per generation; once the process is
        gone, the last value read."""
        self._creds_fresh()
        if name not in self._read:
            got = read(self.pid)
            if got is not None:
                self._last[name] = got
            self._read.add(name)
        return self._last[name]

    @property
    def memlock_limit(self) -> int:
        """The process's soft RLIMIT_MEMLOCK now, in bytes; once it is gone, the last one
        read (the kernel keeps the source task's limits with the task)."""
        return self._kept("memlock", creds.memlock_limit)

    @property
    def uid(self) -> int:
        """The process's real uid now; once it is gone, the last one read."""
        return self._kept("uid", creds.real_uid)

    def mm_locked_vm(self) -> int:
        """The mm's ``locked_vm`` as the kernel would hold it: the host's (the program's own
        mlock()ed pages) plus what the model charged (VmLck shows the same sum)."""
        host = creds.status_fields(self.pid, "VmLck").get("VmLck") if not self.gone else None
        return self.locked_vm + (int(host[0]) >> 2 if host else 0)

    # -- address space (reported by the preload) -------------------------------------------
    def unmap_range(self, va: int, length: int) -> None:
        """The program is about to unmap ``[va, va+length)``: keep pinned pages' contents."""
        if length <= 0 or va & PAGE_MASK:
            return
        end = va + ((length + PAGE_MASK) & ~PAGE_MASK)
        first, last = va >> PAGE_SHIFT, end >> PAGE_SHIFT
        if last - first > len(self._ptes):
            vpns = [v for v in self._ptes if first <= v < last]
        else:
            vpns = [v for v in range(first, last) if v in self._ptes]
        memory = self.memory
        pinned = [self._ptes[v] for v in vpns if memory.frame_refs(self._ptes[v]) > 1]
        if pinned:
            self.mirrors.pull(pinned)
        for v in vpns:
            memory.put_frame(self._ptes.pop(v))
        for start, vma in list(self.iommufd_vmas.items()):
            if start < end and va < start + vma.length:
                del self.iommufd_vmas[start]
                vma.close()
        for start, win in list(self.mmio.items()):
            if start < end and va < win.end:
                del self.mmio[start]
                for piece in win.cut(va, end):
                    self.mmio[piece.start] = piece
        super().munmap(va, end - va)

    def add_vma(self, start: int, vma: IommufdVma) -> None:
        """The program mapped an iommufd region at ``start``."""
        self.iommufd_vmas[start] = vma

    def add_mmio(self, window: MmioWindow) -> None:
        """The program mapped device registers (trapped by the preload) at ``window.start``."""
        self.mmio[window.start] = window

    def mmio_at(self, va: int, size: int) -> MmioWindow:
        """The trapped window holding ``[va, va+size)`` (EFAULT if none holds it whole)."""
        for win in self.mmio.values():
            if win.start <= va and va + size <= win.end:
                return win
        raise err(errno.EFAULT, f"no device registers mapped at {va:#x}+{size}")

    def map_shared(self, va: int, length: int, file: RealMemFile, offset: int) -> None:
        """A shared mapping of ``file`` at ``offset`` now covers ``[va, va+length)``."""
        if length <= 0 or va & PAGE_MASK or offset & PAGE_MASK:
            return
        length = (length + PAGE_MASK) & ~PAGE_MASK
        self.unmap_range(va, length)
        i = 0
        while i < len(self._vma_starts) and self._vma_starts[i] < va:
            i += 1
        self._vma_starts.insert(i, va)
        self._vmas.insert(i, Vma(va, va + length, file, offset))

    def inherit(self, parent: RealProcess) -> None:
        """fork(): the child's shared mappings are the parent's (private pages are its own)."""
        self._vma_starts = list(parent._vma_starts)
        self._vmas = [Vma(v.start, v.end, v.file, v.offset) for v in parent._vmas]
        self.mmio = {start: attrs.evolve(win) for start, win in parent.mmio.items()}

    # -- the core's interface --------------------------------------------------------------
    def _translate(self, va: int) -> int:
        vpn = va >> PAGE_SHIFT
        pfn = self._ptes.get(vpn)
        if pfn is not None:
            return pfn
        if va < 0 or va >= 1 << 64:
            raise err(errno.EFAULT, f"bad user address {va:#x}")
        vma = self._vma(va)
        if vma is not None and isinstance(vma.file, RealMemFile):
            index = (vma.offset + (va - vma.start)) >> PAGE_SHIFT
            if index << PAGE_SHIFT >= vma.file.size:
                raise err(errno.EFAULT, f"user address {va:#x} beyond the end of its file")
            return vma.file.mapped_pfn(index)
        if self.gone or not native.vm_readable_pages(self.pid, [va & ~PAGE_MASK]):
            raise err(errno.EFAULT, f"no mapping at user address {va:#x}")
        pfn = self.memory.alloc_frame()
        self._ptes[vpn] = pfn
        self.mirrors.add_anon(pfn, self, vpn)
        return pfn

    def pin_pages(self, va: int, npages: int) -> list[int]:
        """:meth:`Process.pin_pages`, with the pages of a shared mapping (a memfd) looked up
        a mapping at a time rather than a page at a time (the same frames)."""
        if va & PAGE_MASK:
            raise err(errno.EINVAL, "pin start must be page aligned")
        end = va + (npages << PAGE_SHIFT)
        if not self.is_mapped(va, end - va):
            raise err(errno.EFAULT, f"pin of unmapped user range {va:#x}")
        pfns: list[int] = []
        pos = va
        while pos < end:
            vma = self._vma(pos)
            stop = end if vma is None else min(end, vma.end)
            vpns = range(pos >> PAGE_SHIFT, stop >> PAGE_SHIFT)
            if (
                vma is not None
                and isinstance(vma.file, RealMemFile)
                and self._ptes.keys().isdisjoint(vpns)
            ):
                first = (vma.offset + (pos - vma.start)) >> PAGE_SHIFT
                pfns += vma.file.mapped_pfns(first, len(vpns))
            else:
                pfns += [self._translate(v << PAGE_SHIFT) for v in vpns]
            pos = stop
        self.memory.get_frames(pfns)
        return pfns

    def new_request(self) -> None:
        """A request begins: pages probed for an earlier one may have been unmapped since."""
        self._probed.clear()

    def is_mapped(self, va: int, length: int) -> bool:
        """Every page of ``[va, va+length)`` is mapped: a shared page inside its file, a
        private one readable now (probed once per request: the calling thread waits for the
        answer, so what it saw mapped stays mapped unless another thread unmaps it)."""
        if not self.alive():
            return False
        pos = va & ~PAGE_MASK
        end = va + length
        probe: list[int] = []
        probed = self._probed
        while pos < end:
            vma = self._vma(pos)
            if vma is not None and vma.file is not None:
                stop = min(end, vma.end)
                last = (vma.offset + (stop - 1 - vma.start)) & ~PAGE_MASK
                if last >= vma.file.size:
                    return False
                pos = (stop + PAGE_MASK) & ~PAGE_MASK
                continue
            if pos not in probed and (pos >> PAGE_SHIFT) not in self._ptes:
                probe.append(pos)
            pos += PAGE_SIZE
        if probe and not native.vm_readable_pages(self.pid, probe):
            return False
        probed.update(probe)
        return True

    def read(self, va: int, n: int, *, pinned: bool = False) -> bytes:
        if n < 0:
            raise err(errno.EINVAL)
        if not pinned:  # as Process.read: reads through pinned pages are not injected
            failpoint("process.copy_from_user", errno.EFAULT)
        data = native.vm_read(self.pid, va, n)
        if data is None:
            raise err(errno.EFAULT, f"user read {va:#x}+{n:#x} not mapped")
        return data

    def write(self, va: int, data: bytes | bytearray | memoryview, *, pinned: bool = False) -> None:
        if not pinned:
            failpoint("process.copy_to_user", errno.EFAULT)
        if not native.vm_write(self.pid, va, bytes(data)):
            raise err(errno.EFAULT, f"user write {va:#x}+{len(data):#x} not mapped")

    def sync_frames_in(self, pfns: list[int], offset: int, length: int) -> None:
        self.mirrors.pull(pfns, offset, length)

    def sync_frames_out(self, pfns: list[int], offset: int, length: int) -> None:
        self.mirrors.push(pfns, offset, length)

    def get_fd(self, fd: int) -> int:
        """The model's own descriptor for the program's ``fd`` (an IRQ eventfd VFIO_DEVICE_SET_IRQS
        names): ``pidfd_getfd``, as ``fget`` takes a reference. The caller closes it."""
        return native.pidfd_getfd(self.pid, fd)

    def install_file(self, file: Any) -> int:
        """A new fd in the program that is making the current request."""
        return self.server.install(file)

    def forget(self) -> None:
        """The mm is gone (exit, exec, end of the run): drop every mapping's frame reference."""
        self.gone = True
        for vma in self.iommufd_vmas.values():
            vma.close()
        self.iommufd_vmas.clear()
        self.mmio.clear()
        for pfn in self._ptes.values():
            self.memory.put_frame(pfn)
        self._ptes.clear()
        self._vma_starts.clear()
        self._vmas.clear()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
