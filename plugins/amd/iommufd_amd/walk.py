"""Hot path, compiled by mypyc: the AMD v1 host walk and the 2-D (v2 over v1) nested walk.

No classes and no framework imports, so mypyc turns it into
tight C; the same file runs uncompiled when ``IOMMUFD_MODEL_PURE=1`` (see
:mod:`iommufd_model.hw.compiled`). Memory is the ``PhysicalMemory`` page dict: a frame that
was never written reads as zero.

Every walker returns ``(status, value, shift, refs, prot)``, numbered like the framework's
``walk_x86`` so one decoder serves both: OK (value = physical address, shift = page size),
NOT_PRESENT / PERMISSION / ADDRESS_SIZE / BAD_ENTRY (value = AMD level of the faulting
table), S2_FAULT (value = guest-physical address the host table refused) and HW_ERROR
(value = the table address that lies outside memory: PAGE_TAB_HARDWARE_ERROR).

Speed: frames are the memory's ``vec[i64]`` word arrays, found through ``Frames.words``; an
entry is one native array load into an ``i64`` (mypyc). The nested walk runs its guest x86-64
walk and every host walk natively inside this module (no Python-level callbacks) when handed the
framework's ``walk_x86``; its rules are that walker's, and the tests compare both.
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


# Statuses numbered as the framework's walk_x86 (a test checks it) so that one decoder reads
# both walkers. ``Final`` lets mypyc inline every constant instead of a globals lookup.
OK: Final = 0
NOT_PRESENT: Final = 1
PERMISSION: Final = 2
ADDRESS_SIZE: Final = 3
BAD_ENTRY: Final = 4
S2_FAULT: Final = BAD_ENTRY + 1
HW_ERROR: Final = S2_FAULT + 1  # a table pointer outside memory (PAGE_TAB_HARDWARE_ERROR)

_ADDR: Final = ((1 << 52) - 1) & ~0xFFF  # OutputAddress / next table address [51:12]
_PR: Final = 1  # PR: present
_A: Final = 1 << 5  # A: accessed (set by hardware when DTE HAD[0] asks)
_D: Final = 1 << 6  # D / HD: dirty (set by hardware on writes when DTE HAD[1] asks)
_HI_RSVD: Final = 0x7F << 20  # PTE bits [58:52] (in the high half) must be zero
_HI_IR: Final = 1 << 29  # IR: read permission, PTE bit 61
_HI_IW: Final = 1 << 30  # IW: write permission, PTE bit 62
_GCR3_VALID: Final = 1  # GCR3 table entry valid bit
_X86_P: Final = 1  # x86-64 (v2) entry bits
_X86_RW: Final = 2
_X86_PS: Final = 0x80
# Roots and memory sizes up to this fit the native walks. It is the largest unboxed (short)
# int: a comparison with 1 << 62 would box both sides and call PyObject_RichCompare.
_NATIVE_MAX: Final = (1 << 62) - 1

Stage2 = Callable[[int, bool], tuple[int, int, int]]
if TYPE_CHECKING:
    X86Walker = Callable[
        [Pages, int, int, int, int, bool, Stage2 | None],
        tuple[int, int, int, int, int],
    ]
Result = tuple[int, int, int, int, int]
# A native walk's result: the public walkers' tuple as unboxed i64 fields (mypyc returns them
# without converting each to a tagged int, and a caller in this module reads them as they are).
Native = tuple[i64, i64, i64, i64, i64]


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


def walk_v1(
    pages: Pages,
    mem_size: int,
    root: int,
    mode: int,
    iova: int,
    write: bool,
    had: int,
) -> Result:
    """Walk a v1 host table of ``mode`` levels (1..6) for one access.

    PDE NextLevel 1..6 names the level of the table it points to; a smaller value than
    ``level - 1`` skips levels, whose address bits must then be zero. NextLevel 0 is a leaf
    of the current level's size; NextLevel 7 is a leaf whose size is encoded in the address
    (the lowest clear bit at or above bit 12 gives size = 2 << bit). ``had`` is DTE HAD:
    bit 0 updates A, bit 1 updates D on writes.
    """
    return _walk_v1(pages, _words(pages), _clamp(mem_size), root, mode, iova, write, had)


def _walk_v1(
    pages: Pages,
    words: Words,
    mem_size: i64,
    root: int,
    mode: int,
    iova: int,
    write: bool,
    had: int,
) -> Result:
    """:func:`walk_v1` with the memory's index and clamped size at hand (a loop of walks
    fetches them once)."""
    if mode < 1 or mode > 6:
        return BAD_ENTRY, mode, 0, 0, 0
    # A 64-bit IOVA travels as the signed i64 of the same bits (bit 63 makes it negative).
    signed: i64
    if 0 <= iova <= _NATIVE_MAX:  # short ints: compared without boxing
        signed = iova
    elif iova < 0 or iova >> 64:  # no mode reaches past 64 bits
        return ADDRESS_SIZE, mode, 0, 0, 0
    else:
        signed = iova - (1 << 64) if iova >> 63 else iova
    if not 0 <= root <= _NATIVE_MAX:  # memories are below 2**62 bytes
        if mode < 6 and signed >> (12 + 9 * mode):  # _host's check comes first
            return ADDRESS_SIZE, mode, 0, 0, 0
        return HW_ERROR, root + ((iova >> (3 + 9 * mode)) & 0x1FF) * 8, 0, 0, 0
    return _host(pages, words, mem_size, root, mode, signed, write, had)


def _v1(
    pages: Pages,
    words: Words,
    mem_size: i64,
    root: i64,
    mode: i64,
    iova: i64,
    write: bool,
    had: i64,
) -> Native:
    """:func:`walk_v1` after its argument checks, all native: ``iova`` holds the IOVA's 64
    bits (negative when bit 63 is set)."""
    refs: i64 = 0
    can_read = True
    can_write = True
    table: i64 = root
    level: i64 = mode
    while True:
        shift: i64 = 3 + 9 * level  # = 12 + 9 * (level - 1): bytes covered by one entry
        index: i64 = (iova >> shift) & 0x1FF
        if shift > 55:  # level 6 indexes IOVA bits [63:57]: not the sign copies above them
            index &= 0x7F
        slot: i64 = table + index * 8
        if slot + 8 > mem_size:
            return HW_ERROR, slot, 0, refs, 0
        refs += 1
        entry: i64 = _read(pages, words, slot)  # 0 (not present) when never written
        if not entry & _PR:
            return NOT_PRESENT, level, 0, refs, 0
        hi: i64 = (entry >> 32) & 0xFFFF_FFFF
        if hi & _HI_RSVD:
            return BAD_ENTRY, level, 0, refs, 0
        if not hi & _HI_IR:
            can_read = False
        if not hi & _HI_IW:
            can_write = False
        nl: i64 = (entry >> 9) & 7
        addr: i64 = entry & _ADDR
        if nl == 0 or nl == 7:
            size_log2: i64 = shift
            if nl == 7:
                bit: i64 = 12
                while bit < 52 and addr >> bit & 1:
                    bit += 1
                size_log2 = bit + 1
                # A NextLevel-7 leaf is bigger than this level's entry, smaller than its table.
                if size_log2 <= shift or size_log2 >= shift + 9:
                    return BAD_ENTRY, level, 0, refs, 0
            prot = (1 if can_read else 0) | (2 if can_write else 0)
            if not (can_write if write else can_read):
                return PERMISSION, level, 0, refs, prot
            if had:
                # A and D live in the entry's low byte.
                new: i64 = entry | (_A if had & 1 else 0) | (_D | _A if write and had & 2 else 0)
                if new != entry:
                    _view(pages, words, slot >> 12)[(slot & 0xFFF) >> 3] = new
            mask: i64 = _mask(size_log2)
            return OK, (addr & ~mask) | (iova & mask), size_log2, refs, prot
        if nl >= level:
            return BAD_ENTRY, level, 0, refs, 0
        # Skipped levels: their IOVA bits must be zero.
        if nl < level - 1 and iova & _mask(shift) & ~_mask(12 + 9 * nl):
            return NOT_PRESENT, level, 0, refs, 0
        table = addr
        level = nl


def _mask(bits: i64) -> i64:
    """``(1 << bits) - 1`` for 0 <= bits <= 62. Built from ``_NATIVE_MAX``, a short int that
    mypyc inlines as a C literal: ``1 << bits`` on native ints shifts a 32-bit C literal
    (wrong from bit 31 up), and a wider literal is a boxed constant converted at every call."""
    return _NATIVE_MAX >> (62 - bits)


def walk_nested(
    pages: Pages,
    mem_size: int,
    host_root: int,
    host_mode: int,
    had: int,
    gcr3_root: int,
    glx: int,
    guest_levels: int,
    pasid: int,
    iova: int,
    write: bool,
    x86: X86Walker,
) -> Result:
    """GCR3[pasid] then the guest x86-64 table, every guest pointer through the host table.

    ``host_mode`` 0 means no host stage: the GCR3 table and guest tables are system-physical
    (a v2-only DTE). ``x86`` is the framework's ``walk_x86`` (compiled or pure, as chosen by
    the caller), whose rules this module runs natively; any other walker is called, with
    each of its table pointers and its final output going through the host table.
    """
    if (
        getattr(x86, "__name__", "") != "walk_x86"
        or not 1 <= guest_levels <= 5
        or not 0 <= host_root <= _NATIVE_MAX
        or not 0 <= gcr3_root <= _NATIVE_MAX
        # mypyc unboxes an int meeting an i64 operand: a guest's canonical high IOVA (bit 63
        # set) or an out-of-range PASID would raise instead of faulting, so those go the
        # generic way.
        or not 0 <= iova <= _NATIVE_MAX
        or not 0 <= pasid <= _NATIVE_MAX
    ):
        return _nested_with(
            pages,
            mem_size,
            host_root,
            host_mode,
            had,
            gcr3_root,
            glx,
            guest_levels,
            pasid,
            iova,
            write,
            x86,
        )
    return _nested(
        pages,
        _words(pages),
        _clamp(mem_size),
        host_root,
        host_mode,
        had,
        gcr3_root,
        glx,
        guest_levels,
        pasid,
        iova,
        write,
    )


def _nested(
    pages: Pages,
    words: Words,
    size: i64,
    host_root: i64,
    host_mode: i64,
    had: i64,
    gcr3_root: i64,
    glx: i64,
    guest_levels: i64,
    pasid: int,
    iova: int,
    write: bool,
) -> Native:
    """:func:`walk_nested`'s native walk (its walker is the framework's ``walk_x86``), with
    the memory's index and clamped size at hand (a loop of walks fetches them once)."""
    # Shift counts as ints: ``int >> i64`` would convert the int (which may be any IOVA or
    # PASID a device sends) to i64 first.
    pasid_bits: int = 9 * (glx + 1)
    if pasid >> pasid_bits:
        return NOT_PRESENT, 0, 0, 0, 0
    nested = host_mode != 0
    # The GCR3 table: GLX + 1 levels, level n indexed by PASID bits [9n+8:9n].
    refs: i64 = 0
    table: i64 = gcr3_root
    level: i64 = glx
    while level >= 0:
        index: i64 = (pasid >> (9 * level)) & 0x1FF
        gpa: i64 = table + index * 8
        spa: i64 = gpa
        if nested:
            st, val, _s, r, _p = _host(pages, words, size, host_root, host_mode, gpa, False, had)
            refs += r
            if st != OK:
                if st == HW_ERROR:
                    return HW_ERROR, val, 0, refs, 0
                return S2_FAULT, gpa, 0, refs, 0
            spa = val
        if spa + 8 > size:
            return HW_ERROR, spa, 0, refs, 0
        value = _read(pages, words, spa)
        refs += 1
        if not value & _GCR3_VALID:
            return NOT_PRESENT, 0, 0, refs, 0
        table = value & _ADDR
        level -= 1
    if not nested and table + 8 > size:
        return HW_ERROR, table, 0, refs, 0
    iova_bits: int = 12 + 9 * guest_levels
    if iova >> iova_bits:
        return ADDRESS_SIZE, guest_levels - 1, 0, refs, 0
    st, val, shift, r, prot = _guest(
        pages,
        words,
        size,
        host_root,
        host_mode if nested else 0,
        had,
        table,
        iova,
        guest_levels,
        write,
    )
    return st, val, shift, refs + r, prot


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


def _host(
    pages: Pages,
    words: Words,
    mem_size: i64,
    root: i64,
    mode: i64,
    gpa: i64,
    write: bool,
    had: i64,
) -> Native:
    """:func:`walk_v1` on native ints (``gpa`` holds the address's 64 bits, negative when bit
    63 is set): its checks of the mode and the address's size, then the walk. Also each host
    translation of a nested walk's guest-physical address."""
    if mode < 1 or mode > 6:
        return BAD_ENTRY, mode, 0, 0, 0
    top: i64 = 12 + 9 * mode
    if top < 64 and gpa >> top:
        return ADDRESS_SIZE, mode, 0, 0, 0
    return _v1(pages, words, mem_size, root, mode, gpa, write, had)


def _guest(
    pages: Pages,
    words: Words,
    mem_size: i64,
    host_root: i64,
    host_mode: i64,
    had: i64,
    root: i64,
    iova: i64,
    levels: i64,
    write: bool,
) -> Native:
    """The framework's ``walk_x86`` with its stage 2 being the host table (``host_mode`` > 0)
    or none; a refused guest-physical address reports S2_FAULT, or HW_ERROR with the table
    address when the host walk hit one outside memory."""
    refs: i64 = 0
    prot: i64 = 3
    table: i64 = root
    level: i64 = levels - 1
    nested = host_mode != 0
    while level >= 0:
        shift: i64 = 12 + 9 * level
        slot: i64 = table + ((iova >> shift) & 0x1FF) * 8
        if nested:
            st, val, _s, r, _p = _host(
                pages, words, mem_size, host_root, host_mode, slot, False, had
            )
            refs += r
            if st != OK:
                return (
                    (HW_ERROR, val, 0, refs, 0) if st == HW_ERROR else (S2_FAULT, slot, 0, refs, 0)
                )
            slot = val
        if slot + 8 > mem_size:
            return BAD_ENTRY, level, 0, refs, 0
        entry: i64 = _read(pages, words, slot)
        refs += 1
        if not entry & _X86_P:
            return NOT_PRESENT, level, 0, refs, 0
        if not entry & _X86_RW:
            prot &= 1
        if level == 0 or (entry & _X86_PS and level <= 2):
            mask: i64 = _mask(shift)
            out: i64 = (entry & _ADDR & ~mask) | (iova & mask)
            if write and not prot & 2:
                return PERMISSION, level, 0, refs, prot
            if nested:
                st, val, _s, r, _p = _host(
                    pages, words, mem_size, host_root, host_mode, out, write, had
                )
                refs += r
                if st != OK:
                    return (
                        (HW_ERROR, val, 0, refs, 0)
                        if st == HW_ERROR
                        else (S2_FAULT, out, 0, refs, 0)
                    )
                # The combined page is limited by the host page: report 4 KiB granules.
                return OK, val, 12, refs, prot
            return OK, out, shift, refs, prot
        if entry & _X86_PS:
            return BAD_ENTRY, level, 0, refs, 0
        table = entry & _ADDR
        level -= 1
    return BAD_ENTRY, 0, 0, refs, 0


def _nested_with(
    pages: Pages,
    mem_size: int,
    host_root: int,
    host_mode: int,
    had: int,
    gcr3_root: int,
    glx: int,
    guest_levels: int,
    pasid: int,
    iova: int,
    write: bool,
    x86: X86Walker,
) -> Result:
    """:func:`walk_nested` for a guest walker other than the framework's: it is called with a
    stage-2 callback (the host walk)."""
    err = [OK, 0]

    def s2(gpa: int, w: bool) -> tuple[int, int, int]:
        st, val, _shift, r, _prot = walk_v1(pages, mem_size, host_root, host_mode, gpa, w, had)
        if st != OK:
            err[0] = st
            err[1] = val if st == HW_ERROR else gpa
        return st, val, r

    nested = host_mode != 0
    words = _words(pages)

    def read_gpa(gpa: int) -> tuple[int, int, int]:
        """One u64 at a guest-physical address: ``(status, value or address, refs)``."""
        spa = gpa
        cost = 0
        if nested:
            st2, spa, cost = s2(gpa, False)
            if st2 != OK:
                return (HW_ERROR, err[1], cost) if err[0] == HW_ERROR else (S2_FAULT, gpa, cost)
        if spa + 8 > mem_size:
            return HW_ERROR, spa, cost
        return OK, _read(pages, words, spa), cost + 1

    if pasid >> (9 * (glx + 1)):
        return NOT_PRESENT, 0, 0, 0, 0
    refs = 0
    table = gcr3_root
    for level in range(glx, -1, -1):
        st, value, cost = read_gpa(table + ((pasid >> (9 * level)) & 0x1FF) * 8)
        refs += cost
        if st != OK:
            return st, value, 0, refs, 0
        if not value & _GCR3_VALID:
            return NOT_PRESENT, 0, 0, refs, 0
        table = value & _ADDR
    if not nested and table + 8 > mem_size:
        return HW_ERROR, table, 0, refs, 0
    stage2: Stage2 | None = s2 if nested else None
    st, val, shift, r, prot = x86(pages, mem_size, table, iova, guest_levels, write, stage2)
    refs += r
    if st == S2_FAULT and err[0] == HW_ERROR:
        return HW_ERROR, err[1], 0, refs, 0
    return st, val, shift, refs, prot


#: walk_run fills the IOTLB after this many walks at the latest: the entries it holds back are
#: new objects the cyclic GC counts, and its evictions free as many (a whole burst held back
#: made the collector run dozens of times per burst)
_FILL_BATCH: Final = 128


def walk_run(
    tables: dict[int, dict[object, dict[int, object]]],
    tag: object,
    iova: int,
    end: int,
    write: bool,
    dte_prot: int,
    pages: Pages,
    mem_size: int,
    root: int,
    mode: int,
    had: int,
    fill: Callable[[list[tuple[int, object, int]], list[object]], None],
    entry: Callable[[tuple[int, int, int, int]], object],
    runs: list[tuple[int, int]],
) -> tuple[int, int, int]:
    """The host (v1) table walks of a burst, for pages the IOTLB holds nothing for: what
    ``AmdIommu.lookup`` does on such a miss when the walk succeeds (permission intersected
    with the DTE's ``dte_prot``, the page inside memory), including the IOTLB fill: the
    entries (``entry((pa, shift, perm, refs))``) and their keys ``(shift, tag, page)`` go to
    ``fill(keys, entries)`` (``tlb_run.fill``), in order, whenever the walks stop (``tables``
    being the IOTLB's ``shift -> tag -> page`` dicts). Stops before a page that has any IOTLB
    entry or whose walk would fault, so that ``translate()`` handles it (a failed walk writes
    nothing; a successful one sets A/D bits, which ``translate()`` sets again, to the same
    values). Appends ``(pa, length)`` runs to ``runs`` (a page continues the last run when
    the physical address does); returns ``(walks, refs, stop)``.

    The fills wait until the walks stop because they change nothing a walk reads: a pending
    entry covers a page behind the burst, and the evictions it will cause only remove
    entries. A page found cached may be one of those evictions, so the fills run first and
    the page is looked up again."""
    words = _words(pages)
    size = _clamp(mem_size)
    need = 2 if write else 1
    walks = 0
    refs_all = 0
    keys: list[tuple[int, object, int]] = []
    entries: list[object] = []
    run_pa: i64 = -1
    run_len: i64 = 0
    if runs:
        run_pa, run_len = runs.pop()
    # The tag's pages per page size: nothing changes them until the fills run.
    cached = [(shift, by_tag[tag]) for shift, by_tag in tables.items() if tag in by_tag]
    while iova < end:
        hit = False
        for shift, held in cached:
            if (iova >> shift) in held:
                hit = True
                break
        if hit:
            if not keys:
                break  # lookup() would find it: not a plain miss
            fill(keys, entries)  # its evictions may have dropped this page's entry
            keys.clear()
            entries.clear()
            cached = [(shift, by_tag[tag]) for shift, by_tag in tables.items() if tag in by_tag]
            continue
        st, pa, shift, refs, prot = _walk_v1(pages, words, size, root, mode, iova, write, had)
        if st != OK:
            break
        prot &= dte_prot
        if not prot & need or pa >= mem_size:
            break
        if not had & 2 or write:
            prot |= 4  # the leaf's D bit is set (or D is not tracked): hw._DIRTY_DONE
        mask = _mask(shift)
        keys.append((shift, tag, iova >> shift))
        entries.append(entry((pa & ~mask, shift, prot, refs)))
        if len(keys) == _FILL_BATCH:
            fill(keys, entries)
            keys.clear()
            entries.clear()
            cached = [(shift, by_tag[tag]) for shift, by_tag in tables.items() if tag in by_tag]
        walks += 1
        refs_all += refs
        run: i64 = (1 << shift) - (pa & mask)
        if run > mem_size - pa:
            run = mem_size - pa
        if run > end - iova:
            run = end - iova
        if run_len and run_pa + run_len == pa:  # physically contiguous: one run
            run_len += run
        else:
            if run_len:
                runs.append((run_pa, run_len))
            run_pa = pa
            run_len = run
        iova += run
    if keys:
        fill(keys, entries)
    if run_len:
        runs.append((run_pa, run_len))
    return walks, refs_all, iova


def bench_v1(
    pages: Pages,
    mem_size: int,
    root: int,
    mode: int,
    iovas: vec[i64],
    rounds: int,
) -> int:
    """Benchmark driver: ``rounds`` passes of v1 read walks over ``iovas`` in this module's own
    loop (compiled, like the C reference's, which also finds its memory once); returns how
    many succeeded."""
    if not 0 <= root <= _NATIVE_MAX or not 1 <= mode <= 6:
        return 0  # walk_v1: every walk faults (HW_ERROR, BAD_ENTRY)
    return _bench_v1(pages, _words(pages), _clamp(mem_size), root, mode, iovas, rounds)


def _bench_v1(
    pages: Pages, words: Words, size: i64, root: i64, mode: i64, iovas: vec[i64], rounds: i64
) -> int:
    """:func:`bench_v1` on native ints: each walk is :func:`walk_v1`'s native part (its checks
    of the mode and the IOVA's size, then the walk)."""
    ok: i64 = 0
    for _ in range(rounds):
        for iova in iovas:
            if _host(pages, words, size, root, mode, iova, False, 0)[0] == OK:
                ok += 1
    return ok


def bench_nested(
    pages: Pages,
    mem_size: int,
    host_root: int,
    host_mode: int,
    gcr3_root: int,
    guest_levels: int,
    gvas: vec[i64],
    rounds: int,
    x86: X86Walker,
) -> int:
    """Benchmark driver: :func:`walk_nested` (PASID 0, one-level GCR3) in this module's loop."""
    words = _words(pages)  # found once, as the C reference finds its memory
    size = _clamp(mem_size)
    native = (  # walk_nested's own choice
        getattr(x86, "__name__", "") == "walk_x86"
        and 1 <= guest_levels <= 5
        and 0 <= host_root <= _NATIVE_MAX
        and 0 <= gcr3_root <= _NATIVE_MAX
    )
    ok = 0
    for _ in range(rounds):
        for gva in gvas:
            if native:
                res = _nested(
                    pages,
                    words,
                    size,
                    host_root,
                    host_mode,
                    0,
                    gcr3_root,
                    0,
                    guest_levels,
                    0,
                    gva,
                    False,
                )
            else:
                res = walk_nested(
                    pages,
                    mem_size,
                    host_root,
                    host_mode,
                    0,
                    gcr3_root,
                    0,
                    guest_levels,
                    0,
                    gva,
                    False,
                    x86,
                )
            if res[0] == OK:
                ok += 1
    return ok


# -- bound entries: the translate front's miss walks (hw/xlate.py ``Walk``) -----------------
# One signature for every walker, ``(iova, write, ctx)`` with the stream's table fields in
# ``ctx``: the front calls them from compiled code with three arguments (no Python binder),
# and the tuple is unpacked here natively.


def walk_v1_bound(iova: int, write: bool, ctx: tuple[Pages, int, int, int, int]) -> Result:
    """``walk_v1`` with ``ctx = (pages, mem_size, root, mode, had)``."""
    pages, mem_size, root, mode, had = ctx
    return walk_v1(pages, mem_size, root, mode, iova, write, had)


def walk_nested_bound(
    iova: int,
    write: bool,
    ctx: tuple[Pages, int, int, int, int, int, int, int, int, X86Walker],
) -> Result:
    """``walk_nested`` with ``ctx = (pages, mem_size, host_root, host_mode, had, gcr3_root,
    glx, guest_levels, pasid, x86)``."""
    pages, mem_size, host_root, host_mode, had, gcr3, glx, levels, pasid, x86 = ctx
    return walk_nested(
        pages, mem_size, host_root, host_mode, had, gcr3, glx, levels, pasid, iova, write, x86
    )
