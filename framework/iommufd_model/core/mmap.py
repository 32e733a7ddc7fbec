"""mmap() of the iommufd: driver regions of a vIOMMU handed to user space by file offset.

Linux 7.2 lets a vIOMMU driver expose a physical range (an MMIO page of the IOMMU, a page of
its own memory) to the VMM: the driver registers it with ``iommufd_viommu_alloc_mmap()``
(drivers/iommu/iommufd/driver.c), the core picks an offset in the context's ``mt_mmap``
range tree and the driver returns that offset to the user, who passes it to ``mmap()`` of the
iommufd (``iommufd_fops_mmap()``, main.c). Facts kept from those files:

- allocation: the address must be page aligned and the length a positive multiple of
  PAGE_SIZE, else EINVAL; the offset is the lowest free range at or above PAGE_SIZE (the
  first page is skipped so a zero offset never names a region);
- mmap: not MAP_SHARED -> EINVAL; PROT_EXEC -> EPERM; an offset inside no region, or a region
  whose owner is being destroyed -> ENXIO; an offset or length other than exactly the
  region's -> ENXIO (the lookup finds the region for any offset inside it, only the exact
  one may be mapped);
- every VMA holds a ``users`` reference on the owning object (IOMMU_DESTROY of the vIOMMU is
  EBUSY while mapped; ``vma_open``/``vma_close`` on fork and split) and, through
  ``vma->vm_file``, the file: closing the fd with live mappings defers the release of the
  context until the last munmap.

The generic syscall layer adds its own checks before the driver sees anything (mm/mmap.c:
a zero length is EINVAL, the length is rounded up to whole pages, an offset that is not page
aligned is EINVAL); :meth:`MmapTable.mmap` makes them in that order too.

Regions are :class:`MmapRegion` objects: the bytes behind the offset. Two adapters cover the
kernel's users: :class:`PhysicalRegion` (machine RAM, e.g. the mock vIOMMU's two pages) and
:class:`MmioRegion` (a window of a register file, e.g. a VINTF page or an AMD VF MMIO page).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

import attrs

from iommufd_model.errors import err
from iommufd_model.failnth import failpoint
from iommufd_model.hw.memory import PAGE_MASK, PAGE_SIZE, PhysicalMemory
from iommufd_model.hw.regs import Mmio
from iommufd_model.locking import serialized

if TYPE_CHECKING:
    from iommufd_model.core.main import IommuFd
    from iommufd_model.core.objects import IommufdObject

# <uapi/asm-generic/mman-common.h>, <linux/mman.h>: what an mmap() caller passes.
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_SHARED_VALIDATE = 0x03
MAP_TYPE = 0x0F

ULONG_MAX = (1 << 64) - 1


class MmapRegion(Protocol):
    """The bytes a driver exposes at one mmap offset (``length`` is whole pages)."""

    @property
    def length(self) -> int: ...

    def read(self, offset: int, n: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


def _bounds(length: int, offset: int, n: int) -> None:
    """An access outside the VMA is a fault in the process (SIGSEGV): EFAULT here."""
    if offset < 0 or n < 0 or offset + n > length:
        raise err(errno.EFAULT, f"access [{offset:#x}, +{n:#x}) outside a {length:#x} mapping")


def _page_aligned(what: str) -> Callable[[object, object, int], None]:
    """An attrs validator: a region's start must be page aligned (EINVAL, as
    ``_iommufd_alloc_mmap()`` refuses it)."""

    def check(_obj: object, _field: object, addr: int) -> None:
        if addr & PAGE_MASK:
            raise err(errno.EINVAL, f"{what} at {addr:#x} is not page aligned")

    return check


@attrs.define
class PhysicalRegion:
    """``length`` bytes of machine RAM at physical address ``pa``.

    The kernel checks the address's alignment in ``_iommufd_alloc_mmap()``; the model checks
    it here, where the address is known (same errno, EINVAL)."""

    memory: PhysicalMemory
    pa: int = attrs.field(validator=_page_aligned("mmap region"))
    length: int

    def read(self, offset: int, n: int) -> bytes:
        _bounds(self.length, offset, n)
        return self.memory.read(self.pa + offset, n)

    def write(self, offset: int, data: bytes) -> None:
        _bounds(self.length, offset, len(data))
        self.memory.write(self.pa + offset, data)


@attrs.define
class MmioRegion:
    """A ``length``-byte window of register file ``mmio`` starting at register offset ``base``.

    Accesses go through the registers (their write side effects run); each access is split
    into naturally aligned 8-byte accesses where an 8-byte register sits and 4-byte ones
    elsewhere. Anything not 4-byte aligned and sized is EINVAL, as :class:`Mmio` refuses it.
    """

    mmio: Mmio
    base: int = attrs.field(validator=_page_aligned("MMIO window"))
    length: int

    def _width(self, at: int, left: int) -> int:
        if at % 8 == 0 and left >= 8:
            try:
                if self.mmio.reg(at).width == 8:
                    return 8
            except KeyError:
                pass
        return 4

    def _check(self, offset: int, n: int) -> None:
        _bounds(self.length, offset, n)
        if offset % 4 or n % 4:
            raise err(errno.EINVAL, f"MMIO access {offset:#x}/{n} is not in 32-bit units")

    def read(self, offset: int, n: int) -> bytes:
        self._check(offset, n)
        out = bytearray()
        pos = 0
        while pos < n:
            at = self.base + offset + pos
            width = self._width(at, n - pos)
            out += self.mmio.read(at, width).to_bytes(width, "little")
            pos += width
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        pos = 0
        while pos < len(data):
            at = self.base + offset + pos
            width = self._width(at, len(data) - pos)
            self.mmio.write(at, int.from_bytes(data[pos : pos + width], "little"), width)
            pos += width


@attrs.define(eq=False)
class Immap:
    """``struct iommufd_mmap``: one entry of the context's range tree."""

    owner: MmapOwner
    offset: int
    region: MmapRegion

    @property
    def length(self) -> int:
        return self.region.length


class MmapTable:
    """``iommufd_ctx::mt_mmap``: offset -> region, allocated lowest-first from PAGE_SIZE."""

    def __init__(self) -> None:
        self._by_offset: dict[int, Immap] = {}
        self.vmas: set[IommufdVma] = set()  # live mappings of this context's regions

    def alloc(self, owner: MmapOwner, region: MmapRegion) -> int:
        """``_iommufd_alloc_mmap()``: register ``region``; return the offset for mmap()."""
        length = region.length
        if not length or length & PAGE_MASK:
            raise err(errno.EINVAL, f"mmap region length {length:#x} is not whole pages")
        failpoint("mmap.alloc")  # kzalloc of the entry + mtree_alloc_range
        start = PAGE_SIZE
        for entry in sorted(self._by_offset.values(), key=lambda e: e.offset):
            if entry.offset - start >= length:
                break
            start = max(start, entry.offset + entry.length)
        if start + length - 1 > ULONG_MAX:
            raise err(errno.EBUSY, "no free mmap offset range")
        self._by_offset[start] = Immap(owner, start, region)
        return start

    def destroy(self, owner: MmapOwner, offset: int) -> None:
        """``_iommufd_destroy_mmap()``: a driver erasing what it does not own is its bug."""
        entry = self._by_offset.get(offset)
        if entry is None or entry.owner is not owner:
            raise ValueError(f"driver bug: no mmap region of this owner at {offset:#x}")
        del self._by_offset[offset]

    def lookup(self, offset: int) -> Immap | None:
        """``mtree_load()``: the region containing ``offset``, if any."""
        for entry in self._by_offset.values():
            if entry.offset <= offset < entry.offset + entry.length:
                return entry
        return None

    def regions(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every registered region, by offset."""
        return sorted((e.offset, e.length) for e in self._by_offset.values())

    def of_owner(self, owner: MmapOwner) -> list[int]:
        return [e.offset for e in self._by_offset.values() if e.owner is owner]

    def __iter__(self) -> Iterator[Immap]:
        return iter(list(self._by_offset.values()))

    def __len__(self) -> int:
        return len(self._by_offset)


class MmapOwner:
    """What a driver gets as ``mmap`` in ``viommu_alloc``: alloc/destroy bound to one vIOMMU.

    The iommufd object does not exist in the model while the driver's hook runs, so the
    owner is bound to it afterwards (:meth:`bind`); until then the regions cannot be mapped
    (ENXIO, as the kernel's ``refcount_inc_not_zero`` failing on an object not yet live).
    The core calls :meth:`release` when the allocation fails after the hook (rollback) and
    when the vIOMMU is destroyed, so regions die with their vIOMMU even if a driver leaves
    one registered.
    """

    def __init__(self, ictx: IommuFd) -> None:
        self.ictx = ictx
        self.obj: IommufdObject | None = None

    def alloc(self, region: MmapRegion) -> int:
        return self.ictx.mmaps.alloc(self, region)

    def destroy(self, offset: int) -> None:
        self.ictx.mmaps.destroy(self, offset)

    def bind(self, obj: IommufdObject) -> None:
        self.obj = obj

    def release(self) -> None:
        for offset in self.ictx.mmaps.of_owner(self):
            self.ictx.mmaps.destroy(self, offset)
        self.obj = None


def fops_mmap(ictx: IommuFd, offset: int, length: int, prot: int, flags: int) -> IommufdVma:
    """``mmap(NULL, length, prot, flags, iommufd, offset)``: the syscall's checks, then
    ``iommufd_fops_mmap()``'s."""
    if ictx.closed:
        raise err(errno.EBADF, "iommufd is closed")
    # mm/mmap.c (ksys_mmap_pgoff / do_mmap), before the file sees the VMA.
    if offset < 0 or offset & PAGE_MASK:
        raise err(errno.EINVAL, f"mmap offset {offset:#x} is not page aligned")
    if length <= 0:
        raise err(errno.EINVAL, "mmap length must be positive")
    length = (length + PAGE_MASK) & ~PAGE_MASK
    if length > ULONG_MAX:
        raise err(errno.ENOMEM, "mmap length overflows")
    if offset + length > ULONG_MAX:
        raise err(errno.EOVERFLOW, "mmap offset + length overflows")
    if flags & MAP_TYPE not in (MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE):
        raise err(errno.EINVAL, f"mmap flags {flags:#x} name no mapping type")
    # iommufd_fops_mmap()
    if flags & MAP_TYPE == MAP_PRIVATE:
        raise err(errno.EINVAL, "iommufd regions map only MAP_SHARED")
    if prot & PROT_EXEC:
        raise err(errno.EPERM, "iommufd regions are not executable")
    entry = ictx.mmaps.lookup(offset)
    obj = entry.owner.obj if entry is not None else None
    if entry is None or obj is None or obj.users == 0:
        raise err(errno.ENXIO, f"no mmap region at offset {offset:#x}")
    if offset != entry.offset or length != entry.length:
        raise err(errno.ENXIO, f"mmap must cover exactly [{entry.offset:#x}, +{entry.length:#x})")
    return IommufdVma(ictx, entry, obj, writable=bool(prot & PROT_WRITE))


@serialized()
class IommufdVma:
    """One live mapping of an iommufd region (a VMA): read/write into the region, ``close()``
    = munmap. It holds a ``users`` reference on the owning object and a reference on the file.
    """

    def __init__(self, ictx: IommuFd, entry: Immap, obj: IommufdObject, *, writable: bool) -> None:
        self.ictx = ictx
        self.entry = entry
        self.obj = obj
        self.writable = writable
        self.offset = entry.offset
        self.length = entry.length
        self.closed = False
        obj.users += 1  # iommufd_fops_mmap / vma_open
        ictx.file_refs += 1  # vma->vm_file
        ictx.mmaps.vmas.add(self)

    def _live(self) -> None:
        if self.closed:
            raise err(errno.EFAULT, "access to an unmapped iommufd region")

    def read(self, offset: int, n: int) -> bytes:
        self._live()
        return self.entry.region.read(offset, n)

    def write(self, offset: int, data: bytes) -> None:
        self._live()
        if not self.writable:
            raise err(errno.EFAULT, "write to a mapping without PROT_WRITE")
        self.entry.region.write(offset, bytes(data))

    def dup(self) -> IommufdVma:
        """``iommufd_fops_vma_open()``: a copy of this VMA (fork, or a VMA split by a partial
        munmap) with its own references."""
        self._live()
        return IommufdVma(self.ictx, self.entry, self.obj, writable=self.writable)

    def close(self) -> None:
        """munmap (``iommufd_fops_vma_close()``); closing twice is a no-op, as munmap of an
        unmapped range is."""
        if self.closed:
            return
        self.closed = True
        self.ictx.mmaps.vmas.discard(self)
        self.obj.users -= 1
        self.ictx.put_file_ref()

    def __enter__(self) -> IommufdVma:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
