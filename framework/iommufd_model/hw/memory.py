"""Simulated physical memory: sparse 4 KiB frames and a refcounted frame allocator.

Pages are materialised only when written; reading a frame that was never written yields
zeros without allocating storage, so a machine can have terabytes of address space.

A frame is a :data:`Frame`, mypyc's native ``vec[i64]`` of 512 little-endian 64-bit words
(librt): compiled table walkers read an entry with one bounds-checked C array load (about 3 ns;
a ``memoryview`` word costs 24-40 ns, which capped walks near 6 M/s however tight the rest).
Its buffer is read-only to Python, so bytes leave a frame as zero-copy views (or, for a DMA
read, copied out by ``hw/frame_copy.c``) and enter it by item stores: a few words from here, a
DMA write's bytes through ``hw/frame_copy.c`` (one memcpy per frame, in place) or, in the pure
build, by building new frames from the source buffer.
Frames live in :class:`Frames`, the dict pfn -> frame that the walkers index, with a flat vec
of frames beside it for the walkers' lookups.
"""

from __future__ import annotations

import errno
import importlib
import os
from collections import deque
from collections.abc import Iterable
from types import ModuleType
from typing import Protocol

from librt.vecs import extend, vec
from mypy_extensions import i64

from iommufd_model.errors import err
from iommufd_model.failnth import failpoint
from iommufd_model.hw.compiled import PURE_ENV

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
WORDS_PER_FRAME = PAGE_SIZE // 8
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_VIEW = memoryview(_ZERO_PAGE)
_ZERO_WORDS = _ZERO_VIEW.cast("q")
U64 = (1 << 64) - 1
_SIGN = 1 << 63
#: a partial write touching more words than this rebuilds the frame instead of storing words
_PATCH_WORDS = 16
#: frames a long write builds before storing them (bounds the memory it holds twice)
_WRITE_BATCH = 256


def _frame_copy() -> ModuleType | None:
    """``hw/frame_copy.c`` (DMA writes copied into the frames in place, DMA reads copied out of
    them), or None in a pure build (``IOMMUFD_MODEL_PURE=1`` at install or run time), which
    rebuilds frames and joins frame views instead."""
    if os.environ.get(PURE_ENV) == "1":
        return None
    try:
        return importlib.import_module("iommufd_model.hw.frame_copy")
    except ImportError:
        return None


_COPY = _frame_copy()
#: writes are copied into the frames in place (``frame_copy``) rather than rebuilt or patched
_IN_PLACE = _COPY is not None
#: a DMA read's runs are copied out of the frames by ``frame_copy`` rather than gathered as
#: frame views and joined
_COPY_OUT = _COPY is not None

#: one 4 KiB frame: 512 signed 64-bit words (an entry with bit 63 set reads negative)
Frame = vec[i64]


def new_frame(words: memoryview = _ZERO_WORDS) -> Frame:
    """A frame holding ``words`` (a ``'q'`` view of 512 words; zeros by default)."""
    return Frame(words)


def frame_bytes(frame: Frame) -> memoryview:
    """The frame's 4096 bytes as a read-only, zero-copy byte view."""
    return memoryview(frame).cast("B")


#: the walkers' index covers frames below ``WORDS_MAX_PFN`` (8 GiB of physical memory: an index
#: of at most 32 MiB); above it they use the dict alone
WORDS_MAX_PFN = 1 << 21
#: the walkers' index: ``words[pfn]`` is frame ``pfn``, or an empty vec (never written)
Words = vec[vec[i64]]
_NO_FRAME = Frame()


class Frames(dict[int, Frame]):
    """pfn -> :data:`Frame`, the dict every walker indexes, plus ``words``.

    ``words[pfn]`` (for ``pfn < len(words)``) is the frame stored under ``pfn`` (the same word
    buffer: a store through either shows in both), or an empty vec. It is one flat vec of
    frames, grown to the highest frame stored below ``WORDS_MAX_PFN``, so that a compiled
    walker finds a table with one native array load (no type check, no boxing, no key object,
    no hash probe): what is left between it and a C walk over flat memory is that load and the
    reference count of the frame. Every insertion and removal goes through item assignment,
    ``del``, :meth:`pop`, :meth:`clear` or :meth:`put_run`, which keep both in step
    (``update``/``setdefault`` would not: they are not used).
    """

    __slots__ = ("words",)

    def __init__(self) -> None:
        super().__init__()
        self.words: Words = Words()

    def _index(self, pfn: int) -> Words | None:
        """The index, grown to hold ``pfn`` (None for a pfn it does not cover)."""
        words = self.words
        if pfn < len(words):
            return words if pfn >= 0 else None
        if pfn >= WORDS_MAX_PFN:
            return None
        grow = max(pfn + 1, min(2 * len(words), WORDS_MAX_PFN)) - len(words)
        words = self.words = extend(words, [_NO_FRAME] * grow)
        return words

    def _forget(self, pfn: int) -> None:
        if 0 <= pfn < len(self.words):
            self.words[pfn] = _NO_FRAME

    def indexed(self, pfn: int) -> Frame | None:
        """The index's frame for ``pfn`` (None when it holds none: never written, or above
        WORDS_MAX_PFN); for tests."""
        if 0 <= pfn < len(self.words):
            frame = self.words[pfn]
            return frame if len(frame) else None
        return None

    def __setitem__(self, pfn: int, frame: Frame) -> None:
        super().__setitem__(pfn, frame)
        words = self._index(pfn)
        if words is not None:
            words[pfn] = frame

    def __delitem__(self, pfn: int) -> None:
        self._forget(pfn)
        super().__delitem__(pfn)

    def pop(self, pfn: int, *default: Frame | None) -> Frame | None:  # type: ignore[override]
        self._forget(pfn)
        return super().pop(pfn, *default)

    def clear(self) -> None:
        self.words = Words()
        super().clear()

    def put_run(self, pfn: int, frames: list[Frame]) -> None:
        """Store ``frames`` at ``pfn``, ``pfn + 1``, ... (the dict in bulk)."""
        end = pfn + len(frames)
        super().update(zip(range(pfn, end), frames, strict=True))
        words = self._index(end - 1)
        if words is None:  # partly above the index: one at a time
            for at, frame in zip(range(pfn, end), frames, strict=True):
                if self._index(at) is None:
                    break
                self.words[at] = frame
            return
        deque(map(words.__setitem__, range(pfn, end), frames), maxlen=0)


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

    def get_frames(self, pfns: Iterable[int]) -> None:
        """:meth:`get_frame` of each of ``pfns`` (a pin of many pages)."""
        refs = self._refs
        for pfn in pfns:
            refs[pfn] += 1

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
            frame = self._pages.get(pa >> PAGE_SHIFT)
            if frame is None:
                return bytes(n)
            return bytes(frame) if n == PAGE_SIZE else bytes(frame_bytes(frame)[off : off + n])
        # Whole frames join without an intermediate slice: one copy of every byte in all.
        pieces: list[bytes | Frame | memoryview] = []
        self._gather(pa, n, pieces)
        return b"".join(pieces)

    def read_runs(self, runs: list[tuple[int, int]]) -> bytes:
        """The bytes of every ``(pa, length)`` of ``runs``, in order (counted as one read a
        run): a DMA read's translated runs, the DMA engine's only way into memory for reads.
        Copied straight from the frames into the bytes returned, once, by ``hw/frame_copy.c``;
        in a pure build gathered as zero-copy frame views and joined once."""
        check = self._check
        for pa, n in runs:
            check(pa, n)
        self.reads += len(runs)
        if _COPY_OUT:
            assert _COPY is not None
            return _COPY.read_runs(self._pages, runs)  # type: ignore[no-any-return]
        pieces: list[bytes | Frame | memoryview] = []
        for pa, n in runs:
            self._gather(pa, n, pieces)
        return b"".join(pieces)

    def _gather(self, pa: int, n: int, out: list[bytes | Frame | memoryview]) -> None:
        get = self._pages.get
        off = pa & PAGE_MASK
        pfn = pa >> PAGE_SHIFT
        if off or n < PAGE_SIZE:  # the head, up to the first frame boundary
            chunk = min(n, PAGE_SIZE - off)
            frame = get(pfn)
            if frame is None:
                out.append(_ZERO_VIEW[off : off + chunk])
            else:
                out.append(frame_bytes(frame)[off : off + chunk])
            pfn += 1
            n -= chunk
        whole = n >> PAGE_SHIFT
        if whole:  # whole frames, looked up in C (map); never-written ones read as zeros
            frames: list[Frame | None] = list(map(get, range(pfn, pfn + whole)))
            if None in frames:
                out.extend(_ZERO_PAGE if frame is None else frame for frame in frames)
            else:
                out.extend(frames)  # type: ignore[arg-type]
            pfn += whole
            n -= whole << PAGE_SHIFT
        if n:  # the tail
            frame = get(pfn)
            out.append(_ZERO_VIEW[:n] if frame is None else frame_bytes(frame)[:n])

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (any contiguous buffer; it may alias memory) at ``pa``."""
        src = data if isinstance(data, bytes) else bytes(data)
        self.write_from(pa, src, 0, len(src))

    def write_from(self, pa: int, src: bytes, pos: int, n: int) -> None:
        """Write ``src[pos:pos + n]`` at ``pa`` (the DMA engine's form: no slice of ``src``).

        Copied into the frames in place by ``hw/frame_copy.c`` (which looks them up itself,
        and has :meth:`_materialise` make the missing ones); in a pure build whole frames are
        rebuilt from the source in C (``vec`` from a ``'q'`` view over ``map``), in batches,
        and a head or tail shorter than a frame is patched (:meth:`_patch`).
        """
        self._check(pa, n)
        self.writes += 1
        if _IN_PLACE:
            assert _COPY is not None
            _COPY.write_span(self._pages, pa, src, pos, n, self._materialise)
            return
        view = memoryview(src)
        off = pa & PAGE_MASK
        pfn = pa >> PAGE_SHIFT
        end = pos + n
        if off:  # the head, up to the first frame boundary
            head = min(n, PAGE_SIZE - off)
            self._patch(pfn, off, view[pos : pos + head])
            pos += head
            pfn += 1
        whole = (end - pos) >> PAGE_SHIFT
        if whole:
            self._rebuild(pfn, whole, view, pos)
            pfn += whole
            pos += whole << PAGE_SHIFT
        if pos < end:  # the tail
            self._patch(pfn, 0, view[pos:end])

    def _materialise(self, pfn: int) -> Frame:
        """A new zeroed frame stored for ``pfn`` (a write's first to it)."""
        frame = self._pages[pfn] = new_frame()
        return frame

    def _rebuild(self, pfn: int, count: int, view: memoryview, pos: int) -> None:
        step = WORDS_PER_FRAME
        while count:
            # Batches of frames: the frames they replace are freed before the next batch is
            # built, so the allocator reuses their memory instead of faulting in fresh pages.
            batch = min(count, _WRITE_BATCH)
            end = pos + (batch << PAGE_SHIFT)
            words = view[pos:end].cast("q")
            cuts = map(slice, range(0, batch * step, step), range(step, (batch + 1) * step, step))
            self._pages.put_run(pfn, list(map(Frame, map(words.__getitem__, cuts))))
            pfn += batch
            count -= batch
            pos = end

    def _patch(self, pfn: int, off: int, piece: memoryview) -> None:
        """Write ``piece`` (shorter than a frame) at byte ``off`` of frame ``pfn``.

        Few words: merged into 8-byte words and stored in place. More: the frame is rebuilt
        (one copy of 4 KiB beats hundreds of item stores) and replaces the old one.
        """
        pages = self._pages
        frame = pages.get(pfn)
        first, last = off >> 3, (off + len(piece) + 7) >> 3
        if frame is None or last - first > _PATCH_WORDS:
            buf = bytearray(_ZERO_PAGE if frame is None else frame)
            buf[off : off + len(piece)] = piece
            pages[pfn] = Frame(memoryview(buf).cast("q"))
            return
        lo = first << 3
        merged = bytearray(frame_bytes(frame)[lo : last << 3])
        merged[off - lo : off - lo + len(piece)] = piece
        deque(map(frame.__setitem__, range(first, last), memoryview(merged).cast("q")), maxlen=0)

    def read_u64(self, pa: int) -> int:
        """Read a naturally aligned little-endian u64 (the table walkers' primitive)."""
        if pa & 7 or pa < 0 or pa + 8 > self.size:
            raise err(errno.EFAULT, f"bad u64 read at {pa:#x}")
        self.reads += 1
        frame = self._pages.get(pa >> PAGE_SHIFT)
        if frame is None:
            return 0
        return frame[(pa & PAGE_MASK) >> 3] & U64

    def write_u64(self, pa: int, value: int) -> None:
        if pa & 7 or pa < 0 or pa + 8 > self.size:
            raise err(errno.EFAULT, f"bad u64 write at {pa:#x}")
        self.writes += 1
        pages = self._pages
        pfn = pa >> PAGE_SHIFT
        frame = pages.get(pfn)
        if frame is None:
            frame = pages[pfn] = new_frame()
        value &= U64
        frame[(pa & PAGE_MASK) >> 3] = value - (_SIGN << 1) if value & _SIGN else value

    def fill(self, pa: int, n: int, byte: int = 0) -> None:
        self.write(pa, bytes([byte]) * n)
