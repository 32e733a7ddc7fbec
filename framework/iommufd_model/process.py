"""User processes: a virtual address space over :class:`PhysicalMemory`, and a file table.

What iommufd needs from a process is what ``pin_user_pages`` and ``copy_{to,from}_user`` need
from Linux: resolve a user VA to a frame (faulting anonymous memory in on first touch),
take a pin reference that outlives ``munmap``, and fail with ``EFAULT`` where no mapping
exists. memfds are files whose frames are shared by every mapping and by IOAS_MAP_FILE.
"""

from __future__ import annotations

import bisect
import errno
import os
from typing import TYPE_CHECKING, Protocol

import attrs

from iommufd_model import creds
from iommufd_model.errors import err
from iommufd_model.failnth import failpoint
from iommufd_model.hw.memory import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from iommufd_model.ida import lowest_free
from iommufd_model.locking import SerializedSubclasses, serialized

if TYPE_CHECKING:
    from iommufd_model.machine import Machine

USER_VA_BASE = 0x7F00_0000_0000
USER_VA_END = 0x7FFF_FFFF_F000
HUGE_MASK = (2 << 20) - 1  # x86-64's default huge page: 2 MiB


class FileLike(Protocol):
    """What the process file table holds: memfds, iommufds, fault and vEVENTQ fds."""

    def release(self) -> None:
        """Called when the last descriptor for the file is closed."""


class MemFile:
    """A memfd: a sized file whose frames are allocated on first touch and shared."""

    #: True for a dma-buf exporter's file (the kernel tells by ``file->f_op``): its pages
    #: map into domains but refuse CPU accesses (``iopt_is_dmabuf()`` in Linux 7.2 pages.c).
    is_dmabuf = False

    def __init__(self, memory: PhysicalMemory, size: int) -> None:
        self.memory = memory
        self.size = size
        self._pfns: dict[int, int] = {}

    def pfn(self, index: int) -> int:
        """Frame backing page ``index`` of the file, allocated on first touch."""
        if index < 0 or (index << PAGE_SHIFT) >= self.size:
            raise err(errno.EFAULT, f"memfd page {index} beyond end of file")
        pfn = self._pfns.get(index)
        if pfn is None:
            pfn = self._pfns[index] = self.memory.alloc_frame()
        return pfn

    def pin(self, start: int, length: int) -> list[int]:
        """Pin the frames of ``[start, start+length)``; ``start`` must be page aligned."""
        if start & PAGE_MASK or start + length > self.size:
            raise err(errno.EINVAL, "memfd range out of file")
        first = start >> PAGE_SHIFT
        last = (start + length - 1) >> PAGE_SHIFT
        pfns = [self.pfn(i) for i in range(first, last + 1)]
        for p in pfns:
            self.memory.get_frame(p)
        return pfns

    def sync_frames_in(self, pfns: list[int], offset: int, length: int) -> None:
        """Before the CPU reads bytes ``[offset, offset+length)`` of this run of pinned frames:
        nothing to do, the frames are the pages.

        A real program's file (run/process.py) refreshes them from the file first."""

    def sync_frames_out(self, pfns: list[int], offset: int, length: int) -> None:
        """After the CPU wrote bytes ``[offset, offset+length)`` of this run of frames."""

    def release(self) -> None:
        """Drop the file's own references; pinned or mapped frames stay alive."""
        for pfn in self._pfns.values():
            self.memory.put_frame(pfn)
        self._pfns.clear()


@attrs.define
class Vma:
    """One mapping: ``[start, end)`` backed by anonymous memory or a file at ``offset``."""

    start: int
    end: int
    file: MemFile | None = None
    offset: int = 0


@serialized()
class Process(SerializedSubclasses):
    """A simulated user process (VMM): its address space and its open files."""

    def __init__(self, machine: Machine, pid: int) -> None:
        self.machine = machine
        self.memory = machine.memory
        self.pid = pid
        self._vma_starts: list[int] = []
        self._vmas: list[Vma] = []
        self._ptes: dict[int, int] = {}  # user VPN -> PFN (one reference each)
        self._next_va = USER_VA_BASE
        self.files: dict[int, FileLike] = {}
        # pages iommufd pinned from this mm (the kernel's mm->pinned_vm: VmPin), and those
        # of them accounted IOPT_PAGES_ACCOUNT_MM (mm->locked_vm: VmLck)
        self.locked_pages = 0
        self.locked_vm = 0
        # The model's processes run as root unless a test drops the capability.
        self._sys_resource = True
        # the mm is gone (exit, exec): the kernel's mmget_not_zero() on it fails
        self.gone = False

    # -- the caller's credentials, as pinned-page accounting reads them -----------------
    # (core/accounting.py). The in-process model's caller is the Python process itself:
    # its CAP_IPC_LOCK, RLIMIT_MEMLOCK and real uid, read when iommufd reads them (set them
    # with capset/prctl and resource.setrlimit). A real program's process reads its own
    # (run/process.py).
    def capable(self, cap: int) -> bool:
        """``capable(cap)`` of this caller: a capability the machine grants every process
        (``Machine.granted_caps``) or one it holds. In-process, CAP_SYS_RESOURCE is
        ``capable_sys_resource``'s own flag (held unless a test clears it); any other is
        the Python process's effective set."""
        if self.machine.granted_caps >> cap & 1:
            return True
        if cap == creds.CAP_SYS_RESOURCE:
            return self._sys_resource
        return creds.capable(cap)

    @property
    def capable_sys_resource(self) -> bool:
        """``capable(CAP_SYS_RESOURCE)`` (IOMMU_OPTION_RLIMIT_MODE)."""
        return self.capable(creds.CAP_SYS_RESOURCE)

    @capable_sys_resource.setter
    def capable_sys_resource(self, value: bool) -> None:
        self._sys_resource = value

    @property
    def capable_ipc_lock(self) -> bool:
        """``capable(CAP_IPC_LOCK)``: pages made by this caller are not charged."""
        return self.capable(creds.CAP_IPC_LOCK)

    @property
    def memlock_limit(self) -> int:
        """The soft RLIMIT_MEMLOCK in bytes (the kernel's ``task_rlimit()``)."""
        limit = creds.memlock_limit()
        return creds.RLIM_INFINITY if limit is None else limit

    @property
    def uid(self) -> int:
        """The real uid (the kernel's ``current_user()``)."""
        return os.getuid()

    def mm_locked_vm(self) -> int:
        """The mm's ``locked_vm`` in pages as ``__account_locked_vm()`` compares it."""
        return self.locked_vm

    # -- address space ------------------------------------------------------------
    def mmap(
        self,
        length: int,
        *,
        fd: int | None = None,
        offset: int = 0,
        align: int = PAGE_SIZE,
        hugetlb: bool = False,
    ) -> int:
        """Map ``length`` bytes (rounded up to pages), anonymous or from a memfd; return VA.

        ``hugetlb``: anonymous ``MAP_HUGETLB | MAP_POPULATE`` memory: the length is rounded
        up to 2 MiB and every 2 MiB is backed at once by physically contiguous, 2 MiB
        aligned frames, as huge pages are (the model's stand-in for a huge page pool).
        """
        if length <= 0:
            raise err(errno.EINVAL, "mmap length must be positive")
        if hugetlb:
            if fd is not None:
                raise err(errno.EINVAL, "the model's MAP_HUGETLB is anonymous only")
            length = (length + HUGE_MASK) & ~HUGE_MASK
            align = max(align, HUGE_MASK + 1)
        length = (length + PAGE_MASK) & ~PAGE_MASK
        file: MemFile | None = None
        if fd is not None:
            f = self.files.get(fd)
            if not isinstance(f, MemFile):
                raise err(errno.EBADF, "mmap of a descriptor that is not a memfd")
            if offset & PAGE_MASK or offset + length > f.size:
                raise err(errno.EINVAL, "mmap beyond memfd size")
            file = f
        align = max(align, PAGE_SIZE)
        va = -(-self._next_va // align) * align
        if va + length > USER_VA_END:
            raise err(errno.ENOMEM, "user address space exhausted")
        self._next_va = va + length + PAGE_SIZE  # leave a guard page between mappings
        i = bisect.bisect(self._vma_starts, va)
        self._vma_starts.insert(i, va)
        self._vmas.insert(i, Vma(va, va + length, file, offset))
        if hugetlb:
            per_huge = (HUGE_MASK + 1) >> PAGE_SHIFT
            try:
                for huge in range(va, va + length, HUGE_MASK + 1):
                    first = self.memory.alloc_contiguous(per_huge, align=per_huge)
                    for k in range(per_huge):
                        self._ptes[(huge >> PAGE_SHIFT) + k] = first + k
            except OSError:
                self.munmap(va, length)  # MAP_POPULATE could not fill it: no mapping
                raise
        return va

    def munmap(self, va: int, length: int) -> None:
        """Remove whole mappings in ``[va, va+length)``; pinned frames survive their pins."""
        if va & PAGE_MASK or length <= 0:
            raise err(errno.EINVAL, "munmap needs a page aligned start and a length")
        end = va + ((length + PAGE_MASK) & ~PAGE_MASK)
        keep_starts: list[int] = []
        keep: list[Vma] = []
        for vma in self._vmas:
            if vma.end <= va or vma.start >= end:
                keep_starts.append(vma.start)
                keep.append(vma)
                continue
            lo, hi = max(vma.start, va), min(vma.end, end)
            for vpn in range(lo >> PAGE_SHIFT, hi >> PAGE_SHIFT):
                pfn = self._ptes.pop(vpn, None)
                if pfn is not None:
                    self.memory.put_frame(pfn)
            if vma.start < lo:
                keep_starts.append(vma.start)
                keep.append(Vma(vma.start, lo, vma.file, vma.offset))
            if hi < vma.end:
                keep_starts.append(hi)
                keep.append(Vma(hi, vma.end, vma.file, vma.offset + (hi - vma.start)))
        self._vma_starts, self._vmas = keep_starts, keep

    def _vma(self, va: int) -> Vma | None:
        i = bisect.bisect(self._vma_starts, va) - 1
        if i >= 0:
            vma = self._vmas[i]
            if va < vma.end:
                return vma
        return None

    def translate(self, va: int) -> int:
        """Resolve a user VA to its PFN, faulting the page in; ``EFAULT`` if unmapped."""
        return self._translate(va)

    def _translate(self, va: int) -> int:
        # The loops of read/write/pin_pages call this one: they already hold the model lock,
        # and a locked call per page would cost the IOAS map benchmark 10%. A subclass that
        # resolves addresses its own way (the program runner's RealProcess) overrides this.
        vpn = va >> PAGE_SHIFT
        pfn = self._ptes.get(vpn)
        if pfn is not None:
            return pfn
        if va < 0:
            raise err(errno.EFAULT, f"bad user address {va:#x}")
        vma = self._vma(va)
        if vma is None:
            raise err(errno.EFAULT, f"no mapping at user address {va:#x}")
        if vma.file is None:
            pfn = self.memory.alloc_frame()
        else:
            pfn = vma.file.pfn((vma.offset + (va - vma.start)) >> PAGE_SHIFT)
            self.memory.get_frame(pfn)
        self._ptes[vpn] = pfn
        return pfn

    def is_mapped(self, va: int, length: int) -> bool:
        """True when every page of ``[va, va+length)`` lies inside some mapping."""
        pos = va & ~PAGE_MASK
        end = va + length
        while pos < end:
            vma = self._vma(pos)
            if vma is None:
                return False
            pos = vma.end
        return True

    def read(self, va: int, n: int, *, pinned: bool = False) -> bytes:
        """``copy_from_user``: ``EFAULT`` if any byte is unmapped.

        ``pinned``: the kernel reads through a page it pins for the copy, which fault
        injection does not fail (as :meth:`write`)."""
        if n < 0:
            raise err(errno.EINVAL)
        if not pinned:
            failpoint("process.copy_from_user", errno.EFAULT)
        if not self.is_mapped(va, n):
            raise err(errno.EFAULT, f"user read {va:#x}+{n:#x} not mapped")
        out = bytearray()
        while n:
            off = va & PAGE_MASK
            chunk = min(n, PAGE_SIZE - off)
            out += self.memory.read((self._translate(va) << PAGE_SHIFT) | off, chunk)
            va += chunk
            n -= chunk
        return bytes(out)

    def write(self, va: int, data: bytes | bytearray | memoryview, *, pinned: bool = False) -> None:
        """``copy_to_user``: ``EFAULT`` (and nothing written) if any byte is unmapped.

        ``pinned``: the kernel writes through pages it pinned earlier (a dirty bitmap), which
        cannot fail by fault injection; the caller checked the range when it pinned it.
        """
        if not pinned:
            failpoint("process.copy_to_user", errno.EFAULT)
        n = len(data)
        if not self.is_mapped(va, n):
            raise err(errno.EFAULT, f"user write {va:#x}+{n:#x} not mapped")
        pos = 0
        while pos < n:
            off = va & PAGE_MASK
            chunk = min(n - pos, PAGE_SIZE - off)
            self.memory.write((self._translate(va) << PAGE_SHIFT) | off, data[pos : pos + chunk])
            va += chunk
            pos += chunk

    # -- pinning (pin_user_pages) -------------------------------------------------
    def pin_pages(self, va: int, npages: int) -> list[int]:
        """Pin ``npages`` pages from page-aligned ``va``; all-or-nothing, ``EFAULT`` if unmapped."""
        if va & PAGE_MASK:
            raise err(errno.EINVAL, "pin start must be page aligned")
        if not self.is_mapped(va, npages << PAGE_SHIFT):
            raise err(errno.EFAULT, f"pin of unmapped user range {va:#x}")
        pfns = [self._translate(va + (i << PAGE_SHIFT)) for i in range(npages)]
        for pfn in pfns:
            self.memory.get_frame(pfn)
        return pfns

    def unpin_pages(self, pfns: list[int]) -> None:
        for pfn in pfns:
            self.memory.put_frame(pfn)

    def sync_frames_in(self, pfns: list[int], offset: int, length: int) -> None:
        """Before the CPU reads bytes ``[offset, offset+length)`` of this run of pinned frames:
        nothing here, the frames are the pages.

        A real program's process (run/process.py) refreshes them from its memory first."""

    def sync_frames_out(self, pfns: list[int], offset: int, length: int) -> None:
        """After the CPU wrote bytes ``[offset, offset+length)`` of this run of frames."""

    # -- files --------------------------------------------------------------------
    def install_file(self, file: FileLike) -> int:
        """Install ``file`` at the lowest free descriptor number (0..2 are stdio)."""
        fd = lowest_free(self.files, 3)
        self.files[fd] = file
        return fd

    def file(self, fd: int) -> FileLike:
        f = self.files.get(fd)
        if f is None:
            raise err(errno.EBADF, f"fd {fd} is not open")
        return f

    def close(self, fd: int) -> None:
        f = self.files.pop(fd, None)
        if f is None:
            raise err(errno.EBADF, f"fd {fd} is not open")
        if all(other is not f for other in self.files.values()):
            f.release()

    def memfd_create(self, size: int) -> int:
        """Create a memfd of ``size`` bytes (rounded up to pages) and return its fd."""
        if size <= 0:
            raise err(errno.EINVAL, "memfd size must be positive")
        return self.install_file(MemFile(self.memory, (size + PAGE_MASK) & ~PAGE_MASK))

    def open_iommufd(self) -> IommuFdHandle:
        """Open ``/dev/iommu``: a new iommufd context owned by this process."""
        # cycle: core.main -> core.ioas -> process (MemFile) -> core.main
        from iommufd_model.core.main import IommuFd

        ictx = IommuFd(self.machine, self)
        ictx.fd = self.install_file(ictx)
        return ictx


if TYPE_CHECKING:
    from iommufd_model.core.main import IommuFd as IommuFdHandle
