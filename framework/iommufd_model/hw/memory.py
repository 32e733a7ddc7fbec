"""Simulated physical memory: sparse 4 KiB frames and a refcounted frame allocator.

Pages are materialised only when written; reading a frame that was never written yields
zeros without allocating storage, so a machine can have terabytes of address space.

Frames live in :class:`Frames`, a ``dict`` pfn -> ``bytearray`` that the compiled table walkers
index directly. Beside it, ``Frames.words`` holds, for the frames that u64 accessors touched, a
``memoryview`` cast to signed 64-bit words over the *same* bytes (in a two-level list indexed
by pfn): a table entry is then one indexing operation instead of a slice and
``int.from_bytes`` (4-6x faster, more in compiled walkers), and it can never go stale
because it shares the frame's storage. Views are made on demand (walkers make them too) and
dropped with the frame.
"""

from __future__ import annotations

import errno
import io
from collections import deque
from typing import Protocol, cast

from iommufd_model.core.failnth import failpoint
from iommufd_model.errors import err

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_VIEW = memoryview(_ZERO_PAGE)
U64 = (1 << 64) - 1
_SIGN = 1 << 63


#: word views are kept for frames below ``WORDS_MAX_PFN`` (1 TiB); above it they are made per use
WORDS_CHUNK_BITS = 12
WORDS_MAX_PFN = 1 << 28
Words = list[list[memoryview | None] | None]


def remember_view(words: Words, pfn: int, page: bytearray) -> memoryview:
    """Make ``page``'s word view and keep it in ``words`` at ``pfn`` (when below the limit).

    Walker modules carry a copy of this function (they import nothing from the framework).
    """
    view = memoryview(page).cast("q")
    if 0 <= pfn < WORDS_MAX_PFN:
        top = pfn >> WORDS_CHUNK_BITS
        if top >= len(words):
            words.extend([None] * (top + 1 - len(words)))
        chunk = words[top]
        if chunk is None:
            chunk = words[top] = [None] * (1 << WORDS_CHUNK_BITS)
        chunk[pfn & ((1 << WORDS_CHUNK_BITS) - 1)] = view
    return view


class Frames(dict[int, bytearray]):
    """pfn -> 4 KiB frame storage, the dict every walker indexes, plus ``words``.

    ``words[pfn >> 12][pfn & 0xFFF]`` (when the chunk and the entry exist) is
    ``memoryview(self[pfn]).cast("q")``: the frame as 512 little-endian signed 64-bit words,
    sharing its bytes. A two-level list rather than a dict: a lookup is two list indexings,
    no key object and no hash probe (1.5-2x faster walks than a dict of views). Replacing or
    removing a frame drops its view, so a view always aliases the frame stored under the
    same pfn. A frame with a view cannot be resized (frames never are).
    """

    __slots__ = ("words",)

    def __init__(self) -> None:
        super().__init__()
        self.words: Words = []

    def _forget(self, pfn: int) -> None:
        top = pfn >> WORDS_CHUNK_BITS
        if 0 <= top < len(self.words):
            chunk = self.words[top]
            if chunk is not None:
                chunk[pfn & ((1 << WORDS_CHUNK_BITS) - 1)] = None

    def __setitem__(self, pfn: int, page: bytearray) -> None:
        self._forget(pfn)
        super().__setitem__(pfn, page)

    def __delitem__(self, pfn: int) -> None:
        self._forget(pfn)
        super().__delitem__(pfn)

    def pop(self, pfn: int, *default: bytearray | None) -> bytearray | None:  # type: ignore[override]
        self._forget(pfn)
        return super().pop(pfn, *default)

    def clear(self) -> None:
        self.words.clear()
        super().clear()

    def view(self, pfn: int) -> memoryview | None:
        """The frame's word view (made now if needed), or None for a never-written frame."""
        words = self.words
        top = pfn >> WORDS_CHUNK_BITS
        if 0 <= top < len(words):
            chunk = words[top]
            if chunk is not None:
                view = chunk[pfn & ((1 << WORDS_CHUNK_BITS) - 1)]
                if view is not None:
                    return view
        page = self.get(pfn)
        if page is None:
            return None
        return remember_view(words, pfn, page)

    def has_view(self, pfn: int) -> bool:
        top = pfn >> WORDS_CHUNK_BITS
        if not 0 <= top < len(self.words):
            return False
        chunk = self.words[top]
        return chunk is not None and chunk[pfn & ((1 << WORDS_CHUNK_BITS) - 1)] is not None


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
        self._pages = Frames()
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
        off = pa & PAGE_MASK
        if off + n <= PAGE_SIZE:
            page = self._pages.get(pa >> PAGE_SHIFT)
            if page is None:
                return bytes(n)
            return bytes(page) if n == PAGE_SIZE else bytes(memoryview(page)[off : off + n])
        # Whole frames join without an intermediate slice: one copy of every byte in all.
        pieces: list[bytes | bytearray | memoryview] = []
        self._gather(pa, n, pieces)
        return b"".join(pieces)

    def gather(self, pa: int, n: int, out: list[bytes | bytearray | memoryview]) -> None:
        """Append zero-copy pieces that cover ``[pa, pa+n)`` to ``out`` (counted as one read).

        The pieces alias the frames: join or copy them before memory changes (the DMA engine
        gathers every translated run, then joins once: one copy of every byte in all).
        """
        self._check(pa, n)
        self.reads += 1
        self._gather(pa, n, out)

    def _gather(self, pa: int, n: int, out: list[bytes | bytearray | memoryview]) -> None:
        get = self._pages.get
        append = out.append
        off = pa & PAGE_MASK
        pfn = pa >> PAGE_SHIFT
        while n:
            chunk = min(n, PAGE_SIZE - off)
            page = get(pfn)
            if chunk == PAGE_SIZE:
                append(_ZERO_PAGE if page is None else page)
            elif page is None:
                append(_ZERO_VIEW[off : off + chunk])
            else:
                append(memoryview(page)[off : off + chunk])
            pfn += 1
            n -= chunk
            off = 0

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        off = pa & PAGE_MASK
        if n and off + n <= PAGE_SIZE:
            self._check(pa, n)
            self.writes += 1
            self._frame(pa >> PAGE_SHIFT)[off : off + n] = data
            return
        # ``BytesIO`` shares a ``bytes`` source (no copy); any other source is copied once.
        self.write_stream(pa, n, io.BytesIO(data))

    def write_stream(self, pa: int, n: int, src: io.BytesIO) -> None:
        """Write the next ``n`` bytes of ``src`` (which must hold them) at ``pa``.

        Whole frames are filled by ``src.readinto(frame)`` mapped over the frame list in C:
        one ``memcpy`` per frame and no slice object, 2-3x faster than slicing the source per
        frame (benchmarks/bench_dma.py). A frame never written is materialised first.
        """
        self._check(pa, n)
        self.writes += 1
        pages = self._pages
        off = pa & PAGE_MASK
        pfn = pa >> PAGE_SHIFT
        if off:  # the head, up to the first frame boundary
            head = min(n, PAGE_SIZE - off)
            src.readinto(memoryview(self._frame(pfn))[off : off + head])
            n -= head
            pfn += 1
        whole = n >> PAGE_SHIFT
        if whole:
            got = list(map(pages.get, range(pfn, pfn + whole)))
            frames = (
                [self._frame(p) for p in range(pfn, pfn + whole)]
                if None in got
                else cast("list[bytearray]", got)
            )
            deque(map(src.readinto, frames), maxlen=0)
            pfn += whole
            n &= PAGE_MASK
        if n:  # the tail
            src.readinto(memoryview(self._frame(pfn))[:n])

    def read_u64(self, pa: int) -> int:
        """Read a naturally aligned little-endian u64 (the table walkers' primitive)."""
        if pa & 7 or pa < 0 or pa + 8 > self.size:
            raise err(errno.EFAULT, f"bad u64 read at {pa:#x}")
        self.reads += 1
        view = self._pages.view(pa >> PAGE_SHIFT)
        if view is None:
            return 0
        return view[(pa & PAGE_MASK) >> 3] & U64

    def write_u64(self, pa: int, value: int) -> None:
        if pa & 7 or pa < 0 or pa + 8 > self.size:
            raise err(errno.EFAULT, f"bad u64 write at {pa:#x}")
        self.writes += 1
        pages = self._pages
        pfn = pa >> PAGE_SHIFT
        view = pages.view(pfn)
        if view is None:
            pages[pfn] = bytearray(PAGE_SIZE)
            view = pages.view(pfn)
            assert view is not None
        value &= U64
        view[(pa & PAGE_MASK) >> 3] = value - (_SIGN << 1) if value & _SIGN else value

    def _frame(self, pfn: int) -> bytearray:
        """Frame ``pfn``'s storage, made on first write (callers checked the bounds)."""
        page = self._pages.get(pfn)
        if page is None:
            page = self._pages[pfn] = bytearray(PAGE_SIZE)
        return page

    def fill(self, pa: int, n: int, byte: int = 0) -> None:
        self.write(pa, bytes([byte]) * n)
