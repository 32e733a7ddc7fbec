"""Simulated physical memory: sparse 4 KiB frames and a refcounted frame allocator.

Pages are materialised only when written; reading a frame that was never written yields
zeros without allocating storage, so a machine can have terabytes of address space.
Hardware table walkers read through :meth:`PhysicalMemory.read_u64`, which is the hot path.
"""

from __future__ import annotations

import errno
from typing import Protocol

from iommufd_model.core.failnth import failpoint
from iommufd_model.errors import err

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
_ZERO_PAGE = bytes(PAGE_SIZE)


class FrameMemory(Protocol):
    """What table builders and walkers need from a memory: host physical memory, or a
    guest's RAM seen by its own IOMMU driver (addresses are then guest-physical)."""

    def alloc_frame(self) -> int: ...

    def put_frame(self, pfn: int) -> None: ...

    def read_u64(self, pa: int) -> int: ...

    def write_u64(self, pa: int, value: int) -> None: ...

    def read(self, pa: int, n: int) -> bytes: ...

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None: ...


class PhysicalMemory:
    """Byte-addressable system memory of ``size`` bytes made of sparse 4 KiB frames.

    Frames are handed out by :meth:`alloc_frame` and refcounted: a frame returns to the free
    pool when its last reference is dropped (a process mapping, a pin, a page-table page).
    Accesses beyond ``size`` raise ``OSError(EFAULT)``; hardware models turn that into their
    own "hardware error" events.
    """

    def __init__(self, size: int = 1 << 36) -> None:
        if size <= 0 or size & PAGE_MASK:
            raise err(errno.EINVAL, "memory size must be a positive multiple of 4 KiB")
        self.size = size
        self.nr_frames = size >> PAGE_SHIFT
        self._pages: dict[int, bytearray] = {}
        self._refs: dict[int, int] = {}
        self._free: list[int] = []
        # Frame 0 is never handed out so that a zero physical address is never valid data.
        self._next_pfn = 1
        self.reads = 0
        self.writes = 0

    # -- frames -----------------------------------------------------------------------
    def alloc_frame(self) -> int:
        """Return the PFN of a fresh zeroed frame with one reference."""
        failpoint("memory.alloc_frame")  # alloc_page() under fail_page_alloc
        if self._free:
            pfn = self._free.pop()
        elif self._next_pfn < self.nr_frames:
            pfn = self._next_pfn
            self._next_pfn += 1
        else:
            raise err(errno.ENOMEM, "physical memory exhausted")
        self._refs[pfn] = 1
        return pfn

    def alloc_frames(self, count: int) -> list[int]:
        """Allocate ``count`` frames or none (all-or-nothing)."""
        got: list[int] = []
        try:
            for _ in range(count):
                got.append(self.alloc_frame())
        except OSError:
            for pfn in got:
                self.put_frame(pfn)
            raise
        return got

    def alloc_contiguous(self, count: int, align: int = 1) -> int:
        """Allocate ``count`` physically contiguous frames aligned to ``align`` frames.

        Contiguous ranges come from the never-used top of the pool so that they stay
        contiguous; returns the first PFN.
        """
        failpoint("memory.alloc_contiguous")
        start = -(-self._next_pfn // align) * align
        if start + count > self.nr_frames:
            raise err(errno.ENOMEM, "no contiguous physical range left")
        # The skipped alignment gap goes back to the free pool.
        self._free.extend(range(self._next_pfn, start))
        for pfn in range(start, start + count):
            self._refs[pfn] = 1
        self._next_pfn = start + count
        return start

    def get_frame(self, pfn: int) -> None:
        """Take another reference on an allocated frame."""
        self._refs[pfn] += 1

    def put_frame(self, pfn: int) -> None:
        """Drop a reference; the frame is zeroed and freed when none are left."""
        left = self._refs[pfn] - 1
        if left:
            self._refs[pfn] = left
            return
        del self._refs[pfn]
        self._pages.pop(pfn, None)
        self._free.append(pfn)

    def frame_refs(self, pfn: int) -> int:
        """References held on ``pfn`` (0 for a free frame)."""
        return self._refs.get(pfn, 0)

    @property
    def frames_in_use(self) -> int:
        return len(self._refs)

    @property
    def frames_materialised(self) -> int:
        """Frames that actually hold storage (written at least once)."""
        return len(self._pages)

    # -- byte access ------------------------------------------------------------------
    def _check(self, pa: int, n: int) -> None:
        if pa < 0 or n < 0 or pa + n > self.size:
            raise err(errno.EFAULT, f"physical access {pa:#x}+{n:#x} outside memory")

    def read(self, pa: int, n: int) -> bytes:
        self._check(pa, n)
        self.reads += 1
        pages = self._pages
        off = pa & PAGE_MASK
        if off + n <= PAGE_SIZE:
            page = pages.get(pa >> PAGE_SHIFT)
            return bytes(n) if page is None else bytes(page[off : off + n])
        out = bytearray()
        while n:
            chunk = min(n, PAGE_SIZE - off)
            page = pages.get(pa >> PAGE_SHIFT)
            out += _ZERO_PAGE[:chunk] if page is None else page[off : off + chunk]
            pa += chunk
            n -= chunk
            off = 0
        return bytes(out)

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self._check(pa, n)
        self.writes += 1
        pages = self._pages
        off = pa & PAGE_MASK
        pos = 0
        while pos < n:
            chunk = min(n - pos, PAGE_SIZE - off)
            pfn = pa >> PAGE_SHIFT
            page = pages.get(pfn)
            if page is None:
                page = pages[pfn] = bytearray(PAGE_SIZE)
            page[off : off + chunk] = data[pos : pos + chunk]
            pa += chunk
            pos += chunk
            off = 0

    def read_u64(self, pa: int) -> int:
        """Read a naturally aligned little-endian u64 (the table walkers' primitive)."""
        if pa & 7 or pa < 0 or pa + 8 > self.size:
            raise err(errno.EFAULT, f"bad u64 read at {pa:#x}")
        self.reads += 1
        page = self._pages.get(pa >> PAGE_SHIFT)
        if page is None:
            return 0
        off = pa & PAGE_MASK
        return int.from_bytes(page[off : off + 8], "little")

    def write_u64(self, pa: int, value: int) -> None:
        if pa & 7 or pa < 0 or pa + 8 > self.size:
            raise err(errno.EFAULT, f"bad u64 write at {pa:#x}")
        self.write(pa, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))

    def page_view(self, pfn: int) -> bytearray:
        """The frame's backing store, materialised (for bulk DMA copies)."""
        page = self._pages.get(pfn)
        if page is None:
            if pfn <= 0 or pfn >= self.nr_frames:
                raise err(errno.EFAULT, f"pfn {pfn:#x} outside memory")
            page = self._pages[pfn] = bytearray(PAGE_SIZE)
        return page

    def fill(self, pa: int, n: int, byte: int = 0) -> None:
        self.write(pa, bytes([byte]) * n)
