"""Compiled hot path: the VT-d first-stage, second-stage and nested (first over second) walks.

Plain typed functions over the memory's page dict, free of framework imports, so that mypyc
turns them into C without the framework on its path. The first stage follows the VT-d
spec's first-stage rules (x86-64 paging as remapping hardware applies it): the input must be
canonical for the paging mode (the upper half is walked like the lower one), a user request
needs U/S = 1 at every level (checked at the leaf, as x86 combines the rights), PS at the
PDPE is a 1 GiB leaf only when CAP.FL1GP says so (reserved otherwise), PS above it is
reserved. The nested walk runs the same rules natively,
every first-stage table pointer and the final output address translated (and counted)
through :func:`walk_ss`; another first-stage walker passed in (the framework's
``walk_x86``, a test double) is called with a stage-2 callback instead and applies its own
rules.

Results use the framework walker's convention ``(status, value, shift, refs, prot)``; the
extra status :data:`ACCESS` means an entry lay outside physical memory.

Speed: frames are the memory's ``vec[i64]`` word arrays, found through ``Frames.words``; an
entry is one native array load into an ``i64`` (mypyc), and an A/D update is one word store.
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


# The framework walker's status codes (walk_x86.OK ... S2_FAULT), plus ACCESS.
OK: Final = 0
NOT_PRESENT: Final = 1
PERMISSION: Final = 2
ADDRESS_SIZE: Final = 3
BAD_ENTRY: Final = 4
S2_FAULT: Final = 5
ACCESS: Final = 6
USER: Final = 7  # a user request met a first-stage entry with U/S = 0

Stage2 = Callable[[int, bool], tuple[int, int, int]]
if TYPE_CHECKING:
    FirstStage = Callable[
        [Pages, int, int, int, int, bool, Stage2 | None],
        tuple[int, int, int, int, int],
    ]
Result = tuple[int, int, int, int, int]
# A native walk's result: the public walkers' tuple as unboxed i64 fields (mypyc returns them
# without converting each to a tagged int, and a caller in this module reads them as they are).
Native = tuple[i64, i64, i64, i64, i64]
Native6 = tuple[i64, i64, i64, i64, i64, i64]  # the nested walk's, with the stage-2 status

_ADDR: Final = ((1 << 52) - 1) & ~0xFFF
_RW: Final = 3
_PS: Final = 0x80
_A: Final = 0x100
_D: Final = 0x200
_FS_P: Final = 1  # first-stage (x86-64) entry bits
_FS_RW: Final = 2
_FS_US: Final = 4
# Roots and memory sizes up to this fit the native walks. It is the largest unboxed (short)
# int: a comparison with 1 << 62 would box both sides and call PyObject_RichCompare.
_NATIVE_MAX: Final = (1 << 62) - 1


def _words(pages: Pages) -> Words:
    """The index beside ``pages`` (``Frames.words``), or an empty one for a plain dict."""
    words: Words | None = getattr(pages, "words", None)
    return vec[vec[i64]]() if words is None else words


def _clamp(mem_size: int) -> i64:
    """``min(mem_size, _NATIVE_MAX)`` natively (the builtin boxes both and compares them)."""
    return mem_size if mem_size <= _NATIVE_MAX else _NATIVE_MAX


def _view(pages: Pages, words: Words, pfn: i64) -> Frame:
    """Frame ``pfn``, or an empty vec for a frame never written (the index first, then the
    dict). Never None: an optional ``vec`` is boxed on return, a plain one travels unboxed."""
    if 0 <= pfn < len(words):
        return words[pfn]  # an empty vec when never written
    return _in_dict(pages, pfn)


def _in_dict(pages: Pages, pfn: i64) -> Frame:
    """:func:`_view` for a frame outside the index (a plain dict, or above the index): kept out of
    line so that the C compiler inlines the index path."""
    got = pages.get(pfn)
    if got is not None:
        return got
    return vec[i64]()


def _read(pages: Pages, words: Words, pa: i64) -> i64:
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


def _mask(bits: i64) -> i64:
    """``(1 << bits) - 1`` for 0 <= bits <= 62. Built from ``_NATIVE_MAX``, a short int that
    mypyc inlines as a C literal: ``1 << bits`` on native ints shifts a 32-bit C literal
    (wrong from bit 31 up), and a wider literal is a boxed constant converted at every call."""
    return _NATIVE_MAX >> (62 - bits)


def walk_ss(
    pages: Pages,
    mem_size: int,
    root: int,
    addr: int,
    levels: int,
    write: bool,
    large_mask: int,
    set_ad: bool,
) -> Result:
    """Second-stage walk of ``addr``; ``large_mask`` bit n allows a leaf at level n.

    With ``set_ad`` (PASID entry SSADE) the walk sets A in every entry it uses and D in the
    leaf of a write, as the hardware does. A second stage has 3 to 5 levels (SAGAW; the
    PASID-entry check refuses another AW before any walk): other depths, which no table
    format has, fault BAD_ENTRY without a reference (the model's rule).
    """
    if not 0 < levels <= 5:
        return BAD_ENTRY, 0, 0, 0, 0
    if addr >> (12 + 9 * levels):
        return ADDRESS_SIZE, levels - 1, 0, 0, 0
    if not 0 <= root <= _NATIVE_MAX:  # the top table lies outside memory
        return ACCESS, levels - 1, 0, 0, 0
    return _ss(
        pages, _words(pages), _clamp(mem_size), root, addr, levels, write, large_mask, set_ad
    )


def _ss(
    pages: Pages,
    words: Words,
    mem_size: i64,
    root: i64,
    addr: i64,
    levels: i64,
    write: bool,
    large_mask: i64,
    set_ad: bool,
) -> Native:
    """:func:`walk_ss` after its checks, on native ints (``addr`` fits ``levels``)."""
    allowed: i64 = _RW
    table: i64 = root
    refs: i64 = 0
    level: i64 = levels - 1
    while level >= 0:
        shift: i64 = 12 + 9 * level
        slot: i64 = table + (((addr >> shift) & 0x1FF) << 3)
        if slot + 8 > mem_size:
            return ACCESS, level, 0, refs, 0
        entry: i64 = _read(pages, words, slot)
        refs += 1
        rw: i64 = entry & _RW
        if rw == 0:
            return NOT_PRESENT, level, 0, refs, 0
        allowed &= rw
        leaf = level == 0
        if entry & _PS and level > 0:
            if not large_mask >> level & 1:
                return BAD_ENTRY, level, 0, refs, 0
            leaf = True
        if leaf:
            need = 2 if write else 1
            if not allowed & need:
                return PERMISSION, level, 0, refs, allowed
            if set_ad:  # the entry is present: its frame exists
                want: i64 = entry | _A | (_D if write else 0)
                if want != entry:
                    _view(pages, words, slot >> 12)[(slot & 0xFFF) >> 3] = want
            offset_mask = _mask(shift)
            return OK, (entry & _ADDR & ~offset_mask) | (addr & offset_mask), shift, refs, allowed
        if set_ad and not entry & _A:
            _view(pages, words, slot >> 12)[(slot & 0xFFF) >> 3] = entry | _A
        table = entry & _ADDR
        level -= 1
    return BAD_ENTRY, 0, 0, refs, 0


def canonical_low(iova: int, levels: int) -> int:
    """The walked part of a first-stage input: ``iova`` without its sign-extension bits, or
    -1 when ``iova`` is not canonical for ``levels`` (bits 63:47, or 63:56, not all equal) or
    is no 64-bit address, or ``levels`` is no paging mode (1 to 5 levels)."""
    if not 0 < levels <= 5 or iova < 0 or iova >> 64:
        return -1
    if iova > _NATIVE_MAX:  # bit 63 (or 62) set: the signed i64 of the same bits
        return _canonical(iova - (1 << 64) if iova >> 63 else iova, levels)
    return _canonical(iova, levels)


def _canonical(iova: i64, levels: i64) -> i64:
    """:func:`canonical_low` of a 64-bit input held as a signed i64 (bit 63 makes it
    negative): the bits above the walked ones must all copy its top walked bit."""
    top: i64 = 11 + 9 * levels  # 47 for 4-level, 56 for 5-level paging
    high: i64 = iova >> top  # arithmetic: 0 or -1 when canonical
    if high != 0 and high != -1:
        return -1
    return iova & _mask(top + 1)


def walk_fs(
    pages: Pages,
    mem_size: int,
    root: int,
    iova: int,
    levels: int,
    write: bool,
    fl1gp: bool,
    user: bool,
) -> Result:
    """First-stage walk of ``iova`` (``levels`` 4 or 5); the framework walker's results."""
    low = canonical_low(iova, levels)
    if low < 0 or not 0 < levels <= 5:
        return ADDRESS_SIZE, levels - 1, 0, 0, 0
    if not 0 <= root <= _NATIVE_MAX or root >= mem_size:
        return ACCESS, levels - 1, 0, 0, 0  # the root table is outside memory
    return _fs(pages, _words(pages), _clamp(mem_size), root, low, levels, write, fl1gp, user)


def _fs(
    pages: Pages,
    words: Words,
    mem_size: i64,
    root: i64,
    iova: i64,
    levels: i64,
    write: bool,
    fl1gp: bool,
    user: bool,
) -> Native:
    """:func:`walk_fs` on native ints after the canonical check."""
    refs: i64 = 0
    prot: i64 = 3
    table: i64 = root
    level: i64 = levels - 1
    top_leaf: i64 = 2 if fl1gp else 1
    us: i64 = _FS_US
    while level >= 0:
        shift: i64 = 12 + 9 * level
        slot: i64 = table + ((iova >> shift) & 0x1FF) * 8
        if slot + 8 > mem_size:
            return ACCESS, level, 0, refs, 0
        entry: i64 = _read(pages, words, slot)
        refs += 1
        if not entry & _FS_P:
            return NOT_PRESENT, level, 0, refs, 0
        if level > top_leaf and entry & _PS:  # PS at level 0 is PAT, not a size
            return BAD_ENTRY, level, 0, refs, 0
        us &= entry
        if not entry & _FS_RW:
            prot &= 1
        if level == 0 or entry & _PS:
            if user and not us:
                return USER, level, 0, refs, 0
            if write and not prot & 2:
                return PERMISSION, level, 0, refs, prot
            mask: i64 = _mask(shift)
            return OK, (entry & _ADDR & ~mask) | (iova & mask), shift, refs, prot
        table = entry & _ADDR
        level -= 1
    return BAD_ENTRY, 0, 0, refs, 0


def walk_nested(
    walk_fs: FirstStage,
    pages: Pages,
    mem_size: int,
    fs_root: int,
    iova: int,
    fs_levels: int,
    write: bool,
    ss_root: int,
    ss_levels: int,
    large_mask: int,
    set_ad: bool,
    fl1gp: bool = True,
    user: bool = False,
) -> tuple[int, int, int, int, int, int]:
    """``walk_fs`` (the x86-64 walker) with table pointers and output guest-physical.

    Returns ``(status, value, shift, refs, prot, s2_status)``: on ``S2_FAULT`` ``value`` is
    the guest-physical address the second stage refused and ``s2_status`` says why. ``prot``
    is the intersection of both stages' permissions for the page found. ``fl1gp`` and
    ``user`` apply the first-stage rules of :func:`walk_fs` (the native walk only).
    """
    low = canonical_low(iova, fs_levels)
    if not _native_nested(walk_fs, fs_levels, ss_levels, fs_root, ss_root):
        return _nested_with(
            walk_fs,
            pages,
            mem_size,
            fs_root,
            iova if low < 0 else low,
            fs_levels,
            write,
            ss_root,
            ss_levels,
            large_mask,
            set_ad,
        )
    if low < 0:
        return ADDRESS_SIZE, fs_levels - 1, 0, 0, 0, OK
    return _nested(
        pages,
        _words(pages),
        _clamp(mem_size),
        fs_root,
        low,
        fs_levels,
        write,
        ss_root,
        ss_levels,
        large_mask,
        set_ad,
        fl1gp,
        user,
    )


def _nested(
    pages: Pages,
    words: Words,
    mem_size: i64,
    fs_root: i64,
    iova: i64,
    fs_levels: i64,
    write: bool,
    ss_root: i64,
    ss_levels: i64,
    large_mask: int,
    set_ad: bool,
    fl1gp: bool,
    user: bool,
) -> Native6:
    """:func:`walk_fs`'s rules with :func:`walk_ss` as stage 2, natively."""
    refs: i64 = 0
    prot: i64 = 3
    table: i64 = fs_root
    level: i64 = fs_levels - 1
    ss_top: i64 = 12 + 9 * ss_levels
    top_leaf: i64 = 2 if fl1gp else 1
    us: i64 = _FS_US
    while level >= 0:
        shift: i64 = 12 + 9 * level
        gpa: i64 = table + ((iova >> shift) & 0x1FF) * 8
        if gpa >> ss_top:
            return S2_FAULT, gpa, 0, refs, 0, ADDRESS_SIZE
        st, slot, _s, r, _p = _ss(
            pages, words, mem_size, ss_root, gpa, ss_levels, False, large_mask, set_ad
        )
        refs += r
        if st != OK:
            return S2_FAULT, gpa, 0, refs, 0, st
        if slot + 8 > mem_size:
            return BAD_ENTRY, level, 0, refs, 0, OK
        entry: i64 = _read(pages, words, slot)
        refs += 1
        if not entry & _FS_P:
            return NOT_PRESENT, level, 0, refs, 0, OK
        if level > top_leaf and entry & _PS:
            return BAD_ENTRY, level, 0, refs, 0, OK
        us &= entry
        if not entry & _FS_RW:
            prot &= 1
        if level == 0 or entry & _PS:
            mask = _mask(shift)
            out: i64 = (entry & _ADDR & ~mask) | (iova & mask)
            if user and not us:
                return USER, level, 0, refs, 0, OK
            if write and not prot & 2:
                return PERMISSION, level, 0, refs, prot, OK
            if out >> ss_top:
                return S2_FAULT, out, 0, refs, 0, ADDRESS_SIZE
            st, pa, _s, r, s2prot = _ss(
                pages, words, mem_size, ss_root, out, ss_levels, write, large_mask, set_ad
            )
            refs += r
            if st != OK:
                return S2_FAULT, out, 0, refs, 0, st
            # The combined page is limited by the stage-2 page: report 4 KiB granules.
            return OK, pa, 12, refs, prot & s2prot, OK
        table = entry & _ADDR
        level -= 1
    return BAD_ENTRY, 0, 0, refs, 0, OK


def _nested_with(
    walk_fs: FirstStage,
    pages: Pages,
    mem_size: int,
    fs_root: int,
    iova: int,
    fs_levels: int,
    write: bool,
    ss_root: int,
    ss_levels: int,
    large_mask: int,
    set_ad: bool,
) -> tuple[int, int, int, int, int, int]:
    """:func:`walk_nested` through any first-stage walker, with a stage-2 callback."""
    last = [OK, _RW]

    def s2(gpa: int, w: bool) -> tuple[int, int, int]:
        st, pa, _shift, refs, prot = walk_ss(
            pages, mem_size, ss_root, gpa, ss_levels, w, large_mask, set_ad
        )
        last[0] = st
        last[1] = prot
        return st, pa, refs

    st, value, shift, refs, prot = walk_fs(pages, mem_size, fs_root, iova, fs_levels, write, s2)
    if st == OK:
        prot &= last[1]
    return st, value, shift, refs, prot, last[0]


def bench_ss(
    pages: Pages,
    mem_size: int,
    root: int,
    addrs: vec[i64],
    levels: int,
    rounds: int,
) -> int:
    """Benchmark driver: ``rounds`` passes of second-stage read walks in this module's own
    loop (compiled, like the C reference's); returns how many succeeded."""
    if not (0 < levels <= 5 and 0 <= root <= _NATIVE_MAX):
        return 0  # walk_ss: every walk faults (BAD_ENTRY, ACCESS)
    return _bench_ss(pages, _words(pages), _clamp(mem_size), root, addrs, levels, rounds)


def _bench_ss(
    pages: Pages, words: Words, size: i64, root: i64, addrs: vec[i64], levels: i64, rounds: i64
) -> int:
    """:func:`bench_ss` on native ints: :func:`walk_ss`'s own check, then its native walk, the
    memory's index and size found once (as the C reference finds its memory)."""
    top: i64 = 12 + 9 * levels
    ok: i64 = 0
    for _ in range(rounds):
        for addr in addrs:
            if addr >> top:  # walk_ss: ADDRESS_SIZE
                continue
            if _ss(pages, words, size, root, addr, levels, False, 0, False)[0] == OK:
                ok += 1
    return ok


def _native_nested(
    walk_fs: FirstStage, fs_levels: int, ss_levels: int, fs_root: int, ss_root: int
) -> bool:
    """Whether :func:`walk_nested` runs its native walk: the first stage is the framework's
    x86-64 walker and the levels and roots fit native ints."""
    return (
        getattr(walk_fs, "__name__", "") == "walk_x86"
        and 0 < fs_levels <= 5
        and 0 < ss_levels <= 5
        and 0 <= fs_root <= _NATIVE_MAX
        and 0 <= ss_root <= _NATIVE_MAX
    )


def bench_nested(
    walk_fs: FirstStage,
    pages: Pages,
    mem_size: int,
    fs_root: int,
    iovas: vec[i64],
    fs_levels: int,
    ss_root: int,
    ss_levels: int,
    rounds: int,
) -> int:
    """Benchmark driver: :func:`walk_nested` read walks in this module's own loop."""
    ok = 0
    if not _native_nested(walk_fs, fs_levels, ss_levels, fs_root, ss_root):
        for _ in range(rounds):
            for iova in iovas:
                res = walk_nested(
                    walk_fs,
                    pages,
                    mem_size,
                    fs_root,
                    iova,
                    fs_levels,
                    False,
                    ss_root,
                    ss_levels,
                    0,
                    False,
                )
                if res[0] == OK:
                    ok += 1
        return ok
    words = _words(pages)  # found once, as the C reference finds its memory
    size = _clamp(mem_size)
    return _bench_nested(pages, words, size, fs_root, iovas, fs_levels, ss_root, ss_levels, rounds)


def _bench_nested(
    pages: Pages,
    words: Words,
    size: i64,
    fs_root: i64,
    iovas: vec[i64],
    fs_levels: i64,
    ss_root: i64,
    ss_levels: i64,
    rounds: i64,
) -> int:
    """:func:`bench_nested` on native ints: :func:`walk_nested`'s canonical check, then its
    native walk."""
    ok: i64 = 0
    for _ in range(rounds):
        for iova in iovas:
            low = _canonical(iova, fs_levels)
            if low < 0:  # walk_nested: ADDRESS_SIZE
                continue
            res = _nested(
                pages,
                words,
                size,
                fs_root,
                low,
                fs_levels,
                False,
                ss_root,
                ss_levels,
                0,
                False,
                True,
                False,
            )
            if res[0] == OK:
                ok += 1
    return ok


# -- bound entries: the translate front's miss walks (hw/xlate.py ``Walk``) -----------------
# One signature for every walker, ``(iova, write, ctx)`` with the stream's table fields in
# ``ctx``: the front calls them from compiled code with three arguments (no Python binder),
# and the tuple is unpacked here natively.


def walk_fs_bound(iova: int, write: bool, ctx: tuple[Pages, int, int, int, bool, bool]) -> Result:
    """``walk_fs`` with ``ctx = (pages, mem_size, root, levels, fl1gp, user)``."""
    pages, mem_size, root, levels, fl1gp, user = ctx
    return walk_fs(pages, mem_size, root, iova, levels, write, fl1gp, user)


def walk_ss_bound(iova: int, write: bool, ctx: tuple[Pages, int, int, int, int, bool]) -> Result:
    """``walk_ss`` with ``ctx = (pages, mem_size, root, levels, large_mask, set_ad)``."""
    pages, mem_size, root, levels, large_mask, set_ad = ctx
    return walk_ss(pages, mem_size, root, iova, levels, write, large_mask, set_ad)


def walk_nested_bound(
    iova: int,
    write: bool,
    ctx: tuple[FirstStage, Pages, int, int, int, int, int, int, bool, bool, bool],
) -> tuple[int, int, int, int, int, int]:
    """``walk_nested`` with ``ctx = (walk_fs, pages, mem_size, fs_root, fs_levels, ss_root,
    ss_levels, large_mask, set_ad, fl1gp, user)``."""
    first, pages, mem_size, fs_root, fs_levels, ss_root, ss_levels, large, set_ad, fl1gp, user = ctx
    return walk_nested(
        first,
        pages,
        mem_size,
        fs_root,
        iova,
        fs_levels,
        write,
        ss_root,
        ss_levels,
        large,
        set_ad,
        fl1gp,
        user,
    )
