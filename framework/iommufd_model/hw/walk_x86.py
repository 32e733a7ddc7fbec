"""Compiled hot path: the x86-64 first-stage walk (AMD v2 guest tables, VT-d first stage).

Kept free of classes and imports from the framework so mypyc compiles it to tight C; the
semantics equal ``radix.walk`` with ``x86_64.X86_64Format`` (tests compare them). A nested walk
passes ``s2``: each table pointer and the final output are guest-physical addresses that
``s2(gpa, write)`` turns into ``(status, pa, refs)``; status 0 means success.

Result tuple: ``(status, value, shift, refs, prot)``. status OK: value is the physical address;
NOT_PRESENT / PERMISSION / ADDRESS_SIZE / BAD_ENTRY: value is the faulting level;
S2_FAULT: value is the guest-physical address stage 2 refused.

Speed (see ``benchmarks/``): ``pages`` is the memory's ``Frames`` dict of ``vec[i64]`` frames,
found through its flat ``pages.words`` index; an entry is two native array loads. Entries
and addresses are native ``i64`` in the compiled build (an entry's bit 63 makes it negative;
every test masks it off, so the pure build, where the same values are Python ints, computes the
same results). A plain ``dict`` of frames works too (looked up per table).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from librt.vecs import vec
from mypy_extensions import i64  # a native int under mypyc; a subclass of ``int`` otherwise

if TYPE_CHECKING:  # under mypyc ``vec[i64]`` is no runtime expression outside functions
    Frame = vec[i64]  # memory.Frame: 512 signed 64-bit words
    Pages = dict[int, Frame]
    Words = vec[vec[i64]]  # memory.Words: frame pfn at index pfn (empty: never written)


OK: Final = 0
NOT_PRESENT: Final = 1
PERMISSION: Final = 2
ADDRESS_SIZE: Final = 3
BAD_ENTRY: Final = 4
S2_FAULT: Final = 5

_ADDR: Final = ((1 << 52) - 1) & ~0xFFF
_P: Final = 1
_RW: Final = 2
_PS: Final = 0x80
# Roots and memory sizes up to this fit the native walks. It is the largest unboxed (short)
# int: a comparison with 1 << 62 would box both sides and call PyObject_RichCompare.
_NATIVE_MAX: Final = (1 << 62) - 1

Stage2 = Callable[[int, bool], tuple[int, int, int]]
# A native walk's result: the public walkers' tuple as unboxed i64 fields (mypyc returns them
# without converting each to a tagged int, and a caller in this module reads them as they are).
Native = tuple[i64, i64, i64, i64, i64]


def _words(pages: Pages) -> Words:
    """The index beside ``pages`` (``Frames.words``), or an empty one for a plain dict."""
    words: Words | None = getattr(pages, "words", None)
    return vec[vec[i64]]() if words is None else words


def _in_dict(pages: Pages, pfn: i64) -> Frame:
    """Frame ``pfn`` from the dict (a plain dict, or a frame above the index), or an empty vec:
    kept out of line so that the C compiler inlines the index path."""
    got = pages.get(pfn)
    if got is not None:
        return got
    return vec[i64]()


def words_of(pages: Pages) -> Words:
    return _words(pages)


def entry_at(pages: Pages, words: Words, pa: i64) -> i64:
    """The signed u64 at 8-aligned ``pa`` (0 for a never-written frame)."""
    pfn: i64 = pa >> 12
    if 0 <= pfn < len(words):
        # One expression each, with the index a plain local: mypyc then borrows the frame
        # (a reference count taken and dropped per entry was half of a hot walk's time).
        at: i64 = (pa & 0xFFF) >> 3
        if at >= len(words[pfn]):  # never written (an empty frame); mypyc's own check then folds
            return 0
        value: i64 = words[pfn][at]
        return value
    view = _in_dict(pages, pfn)
    if len(view) == 0:
        return 0
    found: i64 = view[(pa & 0xFFF) >> 3]
    return found


def read_u64(pages: Pages, pa: int) -> int:
    return entry_at(pages, words_of(pages), pa) & 0xFFFF_FFFF_FFFF_FFFF


def walk_x86(
    pages: Pages,
    mem_size: int,
    root: int,
    iova: int,
    levels: int,
    write: bool,
    s2: Stage2 | None,
) -> tuple[int, int, int, int, int]:
    if iova >> (12 + 9 * levels):
        return ADDRESS_SIZE, levels - 1, 0, 0, 0
    words = words_of(pages)
    if s2 is None and 0 < levels <= 5 and 0 <= root <= _NATIVE_MAX and mem_size <= _NATIVE_MAX:
        return walk_x86_1d(pages, words, mem_size, root, iova, levels, write)
    refs = 0
    prot = 3
    table = root
    level = levels - 1
    while level >= 0:
        shift = 12 + 9 * level
        slot = table + ((iova >> shift) & 0x1FF) * 8
        if s2 is not None:
            st, slot_pa, r2 = s2(slot, False)
            refs += r2
            if st != OK:
                return S2_FAULT, slot, 0, refs, 0
            slot = slot_pa
        if slot + 8 > mem_size:
            return BAD_ENTRY, level, 0, refs, 0
        entry: int = entry_at(pages, words, slot)
        refs += 1
        if not entry & _P:
            return NOT_PRESENT, level, 0, refs, 0
        if not entry & _RW:
            prot &= 1
        if level == 0 or (entry & _PS and level <= 2):
            out = (entry & _ADDR & ~((1 << shift) - 1)) | (iova & ((1 << shift) - 1))
            if write and not prot & 2:
                return PERMISSION, level, 0, refs, prot
            if s2 is not None:
                st, out_pa, r2 = s2(out, write)
                refs += r2
                if st != OK:
                    return S2_FAULT, out, 0, refs, 0
                # The combined page is limited by the stage-2 page: report 4 KiB granules.
                return OK, out_pa, 12, refs, prot
            return OK, out, shift, refs, prot
        if entry & _PS:
            return BAD_ENTRY, level, 0, refs, 0
        table = entry & _ADDR
        level -= 1
    return BAD_ENTRY, 0, 0, refs, 0


def walk_x86_1d(
    pages: Pages,
    words: Words,
    mem_size: i64,
    root: i64,
    iova: i64,
    levels: i64,
    write: bool,
) -> Native:
    """The single-stage walk, all native ints; ``iova`` already fits ``levels``."""
    refs: i64 = 0
    prot: i64 = 3
    table: i64 = root
    level: i64 = levels - 1
    while level >= 0:
        shift: i64 = 12 + 9 * level
        slot: i64 = table + ((iova >> shift) & 0x1FF) * 8
        if slot + 8 > mem_size:
            return BAD_ENTRY, level, 0, refs, 0
        entry: i64 = entry_at(pages, words, slot)  # 0 (not present) when never written
        refs += 1
        if not entry & _P:
            return NOT_PRESENT, level, 0, refs, 0
        if not entry & _RW:
            prot &= 1
        if level == 0 or (entry & _PS and level <= 2):
            # ``(1 << shift) - 1``: mypyc would shift a 32-bit C literal (wrong from bit 31),
            # and a literal above the short ints is a boxed constant converted at every use.
            mask: i64 = _NATIVE_MAX >> (62 - shift)
            if write and not prot & 2:
                return PERMISSION, level, 0, refs, prot
            return OK, (entry & _ADDR & ~mask) | (iova & mask), shift, refs, prot
        if entry & _PS:
            return BAD_ENTRY, level, 0, refs, 0
        table = entry & _ADDR
        level -= 1
    return BAD_ENTRY, 0, 0, refs, 0


def walk_many(
    pages: Pages,
    mem_size: int,
    root: int,
    iovas: vec[i64],
    levels: int,
    rounds: int,
) -> int:
    """Benchmark driver: ``rounds`` passes of single-stage read walks over ``iovas``, in the
    compiled loop (as the C reference runs its own); returns the number of successful walks."""
    words = words_of(pages)  # found once, as the C reference finds its memory
    if not (0 < levels <= 5 and 0 <= root <= _NATIVE_MAX and mem_size <= _NATIVE_MAX):
        ok = 0
        for _ in range(rounds):
            for iova in iovas:
                ok += walk_x86(pages, mem_size, root, iova, levels, False, None)[0] == OK
        return ok
    return _walk_many(pages, words, mem_size, root, iovas, levels, rounds)


def _walk_many(
    pages: Pages, words: Words, size: i64, root: i64, iovas: vec[i64], levels: i64, rounds: i64
) -> int:
    """:func:`walk_many` on native ints: :func:`walk_x86`'s own checks, then its native walk."""
    top: i64 = 12 + 9 * levels
    ok: i64 = 0
    for _ in range(rounds):
        for iova in iovas:
            if iova >> top:  # walk_x86: ADDRESS_SIZE
                continue
            if walk_x86_1d(pages, words, size, root, iova, levels, False)[0] == OK:
                ok += 1
    return ok
