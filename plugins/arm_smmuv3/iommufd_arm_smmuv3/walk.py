"""Compiled hot path: VMSAv8-64 translation-table walks with the 4, 16 or 64 KiB granule.

Free of classes and framework imports so that mypyc turns it into tight C; ``setup.py`` compiles
it and :func:`iommufd_model.hw.compiled.load_walker` picks the build (or this source).

Levels are numbered as the Arm ARM does: with the 4 KiB granule level 0 resolves VA bits 47:39,
level 3 bits 20:12; a granule of ``1 << g`` bytes resolves ``g - 3`` bits a level (11 for
16 KiB, 13 for 64 KiB), level 3 always holding pages of the granule's size. A walk starts at the
level that the input size (``64 - TxSZ``, stage 2 also SL0) selects; the start-level table may be
shorter than a granule (stage 1) or several concatenated tables (stage 2). Blocks stand at level
1 or 2 with 4 KiB, level 2 with 16 KiB, level 2 (and level 1 with a 52-bit output size: the
4 TiB block of FEAT_LPA) with 64 KiB; a block elsewhere is a translation fault (no FEAT_LPA2 in
the model, as io-pgtable-arm in Linux 7.2 writes none). Descriptor bits (Arm ARM D8.3): bit 0
valid, bit 1 table (levels 0-2) or page (level 3), output address 47:g (with 64 KiB, PA[51:48]
in bits 15:12), AF bit 10; stage 1 AP[2:1] bits 7:6 (AP[1] = unprivileged
access, AP[2] = read-only) and the table attributes APTable bits 62:61; stage 2 S2AP bits 7:6
(bit 6 read, bit 7 write).

Frames are the memory's ``vec[i64]`` word arrays: a descriptor is one native array load under
mypyc (read as unsigned: bit 63 is a real attribute bit at stage 1).

Every function returns a tuple whose first element is ``OK`` or the SMMU event number of the
fault (F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, F_PERMISSION, F_WALK_EABT).

HTTU in a nested walk (SMMUv3 IHI 0070, HTTU with stage 2): a hardware update of a stage-1
descriptor (AF set by CD.HA, AP[2] cleared by CD.HD) is a write to the descriptor's IPA, so
stage 2 must allow the write; a stage-2 leaf without S2AP write refuses it with a stage-2
permission fault of CLASS TT whose TT_RnW says write, and nothing is written. The read of the
same descriptor went through that very stage-2 leaf, so its S2AP decides: the model has no
stage-2 HTTU (STE.S2HA/S2HD, which Linux 7.2 never sets), so the write's stage-2 walk would
read the same descriptors and change nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from librt.vecs import vec
from mypy_extensions import i64  # a native int under mypyc; a subclass of ``int`` otherwise

if TYPE_CHECKING:  # under mypyc ``vec[i64]`` is no runtime expression outside functions
    Frame = vec[i64]  # memory.Frame: 512 signed 64-bit words
    Pages = dict[int, Frame]
    Words = vec[vec[i64]]  # memory.Words: frame pfn at index pfn (empty: never written)


OK: Final = 0
F_WALK_EABT: Final = 0x0B
F_TRANSLATION: Final = 0x10
F_ADDR_SIZE: Final = 0x11
F_ACCESS: Final = 0x12
F_PERMISSION: Final = 0x13

# The CLASS field of a fault record: what the SMMU was doing when stage 2 refused an address.
CLASS_CD: Final = 0  # fetching a context descriptor
CLASS_TT: Final = 1  # fetching a stage-1 translation table descriptor
CLASS_IN: Final = 2  # translating the input address (the final stage-1 output)

DESC_VALID: Final = 1 << 0
DESC_TABLE: Final = 1 << 1  # with VALID: table (levels 0-2) or page (level 3); clear: block
DESC_AF: Final = 1 << 10
DESC_OA: Final = ((1 << 48) - 1) & ~0xFFF  # output / next-level table address, bits 47:12
S1_AP_UNPRIV: Final = 1 << 6  # AP[1]: EL0 (unprivileged) access allowed
S1_AP_RDONLY: Final = 1 << 7  # AP[2]: read-only
S1_DBM: Final = 1 << 51  # dirty bit modifier: with CD.HD a write clears AP[2] (dirty)
S1_APTABLE_NOUNPRIV: Final = 1 << 61  # APTable[0]: no unprivileged access below this table
S1_APTABLE_RDONLY: Final = 1 << 62  # APTable[1]: read-only below this table
S2AP_READ: Final = 1 << 6
S2AP_WRITE: Final = 1 << 7

PROT_R: Final = 1
PROT_W: Final = 2
# Memory sizes are clamped to the largest unboxed (short) int: comparisons with 1 << 62 would
# box both sides.
_NATIVE_MAX: Final = (1 << 62) - 1
# Input sizes above 52 bits are not architectural (the smallest TxSZ): such a walk faults, as
# does one above 48 bits with a 4 or 16 KiB granule (52-bit inputs need 64 KiB without LPA2).
_MAX_IA: Final = 52
_MAX_IA_SMALL: Final = 48
_OA_64K: Final = ((1 << 48) - 1) & ~0xFFFF  # bits 47:16 of a 64 KiB descriptor's address

# The native walks' results: the public tuples as unboxed i64 fields (mypyc returns them without
# converting each to a tagged int, and a caller in this module reads them as they are).
Native6 = tuple[i64, i64, i64, i64, i64, i64]
Native10 = tuple[i64, i64, i64, i64, i64, i64, i64, i64, i64, i64]


def _words(pages: Pages) -> Words:
    """The index beside ``pages`` (``Frames.words``), or an empty one for a plain dict."""
    words: Words | None = getattr(pages, "words", None)
    return vec[vec[i64]]() if words is None else words


def _desc(pages: Pages, words: Words, slot: i64) -> i64:
    """The 64-bit descriptor at 8-aligned ``slot`` (signed; 0 in a frame never written)."""
    pfn: i64 = slot >> 12
    if 0 <= pfn < len(words):
        # One expression each, with the index a plain local: mypyc then borrows the frame
        # (a reference count taken and dropped per entry was half of a hot walk's time).
        at: i64 = (slot & 0xFFF) >> 3
        if at >= len(words[pfn]):  # never written (an empty frame); mypyc's own check then folds
            return 0  # never written
        word: i64 = words[pfn][at]
        return word
    return _in_dict(pages, slot)


def _in_dict(pages: Pages, slot: i64) -> i64:
    """:func:`_desc` for a frame outside the index (a plain dict, or above the index): kept out of
    line so that the C compiler inlines the index path."""
    pfn: i64 = slot >> 12
    got = pages.get(pfn)
    if got is None:
        return 0
    found: i64 = got[(slot & 0xFFF) >> 3]
    return found


def _store(pages: Pages, words: Words, slot: i64, value: i64) -> None:
    """A hardware update of the descriptor at ``slot`` (AF set, or AP[2] cleared by HD); the
    walk has just read it, so its frame exists."""
    pfn: i64 = slot >> 12
    at: i64 = (slot & 0xFFF) >> 3
    if 0 <= pfn < len(words):
        words[pfn][at] = value
        return
    got = pages.get(pfn)
    if got is not None:
        got[at] = value


def _mask(bits: i64) -> i64:
    """``(1 << bits) - 1`` for 0 <= bits <= 62. Built from ``_NATIVE_MAX``, a short int that
    mypyc inlines as a C literal: ``1 << bits`` on native ints shifts a 32-bit C literal
    (wrong from bit 31 up), and a wider literal (``(1 << 63) - 1``) is a boxed constant that
    every call converts again."""
    return _NATIVE_MAX >> (62 - bits)


def walk_s2(
    pages: Pages,
    mem_size: int,
    ttb: int,
    ipa: int,
    ia_bits: int,
    start_level: int,
    oa_bits: int,
    write: bool,
    affd: bool,
    granule: int = 12,
) -> tuple[int, int, int, int, int, int]:
    """Stage-2 walk of ``ipa``: ``(status, value, shift, refs, prot, level)``.

    ``granule`` is log2 of the translation granule (STE.S2TG: 12, 14 or 16), ``start_level``
    the architectural level SL0 selects with it. OK: ``value`` is the physical address;
    F_WALK_EABT: the descriptor address that could not be fetched; other faults: 0. ``prot``
    is the S2AP of the leaf, also on a permission fault.
    """
    if _too_wide(ia_bits, granule) or ipa >> ia_bits or not 0 <= start_level <= 3:
        return F_TRANSLATION, 0, 0, 0, 0, start_level
    return _s2(
        pages,
        _words(pages),
        _clamp(mem_size),
        ttb,
        ipa,
        ia_bits,
        start_level,
        oa_bits,
        write,
        affd,
        granule,
    )


def _too_wide(ia_bits: int, granule: int) -> bool:
    """An input size no walk with this granule resolves (or a granule that is none)."""
    if granule != 12 and granule != 14 and granule != 16:
        return True
    return ia_bits > (_MAX_IA if granule == 16 else _MAX_IA_SMALL) or ia_bits <= granule


def _granule(granule: i64, oa_bits: i64) -> tuple[i64, i64, i64, i64]:
    """A walk's constants for a 16 or 64 KiB granule: bits a level, the address bits of a
    descriptor, the lowest block level, the index mask below the start level."""
    stride: i64 = granule - 3
    return stride, _oa_mask(granule), _min_block(granule, oa_bits), _mask(stride)


def _oa_mask(granule: i64) -> i64:
    """The descriptor bits of an output or table address with this granule (below 48)."""
    if granule == 16:
        return _OA_64K
    return DESC_OA & ~_mask(granule)


def _min_block(granule: i64, oa_bits: i64) -> i64:
    """The lowest level a block may stand at (Arm ARM D8.3, without FEAT_LPA2)."""
    if granule == 12:
        return 1
    if granule == 16 and oa_bits > 48:
        return 1  # FEAT_LPA: 4 TiB blocks at level 1
    return 2


def _clamp(mem_size: int) -> i64:
    """Memory sizes fit the native walk (every address a walk reads lies below them)."""
    return mem_size if mem_size <= _NATIVE_MAX else _NATIVE_MAX


def _s2(
    pages: Pages,
    words: Words,
    mem_size: i64,
    ttb: i64,
    ipa: i64,
    ia_bits: i64,
    start_level: i64,
    oa_bits: i64,
    write: bool,
    affd: bool,
    granule: i64,
) -> Native6:
    """:func:`walk_s2` on native ints, ``ipa`` already inside the input size."""
    refs: i64 = 0
    table: i64 = ttb
    level: i64 = start_level
    stride: i64 = 9  # the 4 KiB granule's constants, as literals: its walks call nothing
    oa_mask: i64 = DESC_OA
    min_block: i64 = 1
    low_mask: i64 = 0x1FF
    if granule != 12:
        stride, oa_mask, min_block, low_mask = _granule(granule, oa_bits)
    # the start level's index bits (a short table, or concatenated ones), then a granule's
    shift: i64 = granule + stride * (3 - start_level)
    index_mask: i64 = _mask(ia_bits - shift)
    while True:
        slot: i64 = table + ((ipa >> shift) & index_mask) * 8
        if slot + 8 > mem_size or slot < 0:
            return F_WALK_EABT, slot, 0, refs, 0, level
        desc = _desc(pages, words, slot)
        refs += 1
        if not desc & DESC_VALID:
            return F_TRANSLATION, 0, 0, refs, 0, level
        addr: i64 = desc & oa_mask
        if granule == 16:
            addr |= (desc >> 12 & 0xF) << 48  # PA[51:48] in bits 15:12
        if level < 3 and desc & DESC_TABLE:
            table = addr
            if table >> oa_bits:
                return F_ADDR_SIZE, 0, 0, refs, 0, level
            level += 1
            index_mask = low_mask
            shift -= stride
            continue
        if (level == 3 and not desc & DESC_TABLE) or level < min_block:
            # Page encoding 0b01 at level 3 is reserved; no block at this level and granule.
            return F_TRANSLATION, 0, 0, refs, 0, level
        mask = _mask(shift)
        out: i64 = addr & ~mask
        if out >> oa_bits:
            return F_ADDR_SIZE, 0, 0, refs, 0, level
        if not desc & DESC_AF and not affd:
            return F_ACCESS, 0, 0, refs, 0, level
        prot: i64 = (PROT_R if desc & S2AP_READ else 0) | (PROT_W if desc & S2AP_WRITE else 0)
        if not prot & (PROT_W if write else PROT_R):
            return F_PERMISSION, 0, 0, refs, prot, level
        return OK, out | (ipa & mask), shift, refs, prot, level


def walk_s1(
    pages: Pages,
    mem_size: int,
    ttb: int,
    va: int,
    ia_bits: int,
    oa_bits: int,
    write: bool,
    affd: bool,
    ha: bool,
    nested: bool,
    s2_ttb: int,
    s2_ia_bits: int,
    s2_start: int,
    s2_oa_bits: int,
    s2_affd: bool,
    hd: bool = False,
    granule: int = 12,
    s2_granule: int = 12,
) -> tuple[int, int, int, int, int, int, int, int, int, int]:
    """Stage-1 walk of ``va``, with every table access and the output translated by stage 2
    when ``nested``: ``(status, value, shift, refs, prot, level, s2, ipa, cls, tt_write)``.

    With ``hd`` (CD.HD, hardware dirty state), a write to a leaf that is writable-clean
    (DBM set, AP[2] set) clears AP[2] in memory, marking it dirty, and is allowed.

    ``value`` is the physical address (OK) or the unfetchable descriptor address (F_WALK_EABT).
    A stage-2 fault reports ``s2 = 1``, the refused ``ipa`` and ``cls`` (CLASS_TT / CLASS_IN);
    ``tt_write`` is 1 when stage 2 refused a hardware update of a stage-1 descriptor (CLASS_TT
    with TT_RnW = 0, a write), else 0 (a descriptor read: TT_RnW = 1).
    ``refs`` counts every descriptor read of both stages. ``granule`` / ``s2_granule``: log2 of
    the translation granules (CD.TG0, STE.S2TG: 12, 14 or 16).
    """
    if (
        _too_wide(ia_bits, granule)
        or (nested and (_too_wide(s2_ia_bits, s2_granule) or not 0 <= s2_start <= 3))
        or va >> ia_bits
    ):
        level = _start(ia_bits, granule) if granule in (12, 14, 16) else 0
        return F_TRANSLATION, 0, 0, 0, 0, level, 0, 0, CLASS_IN, 0
    return _s1(
        pages,
        _words(pages),
        _clamp(mem_size),
        ttb,
        va,
        ia_bits,
        oa_bits,
        write,
        affd,
        ha,
        nested,
        s2_ttb,
        s2_ia_bits,
        s2_start,
        s2_oa_bits,
        s2_affd,
        hd,
        granule,
        s2_granule,
    )


def _start(ia_bits: i64, granule: i64) -> i64:
    """The stage-1 start level of an input size: as few levels as resolve it (4 KiB: 48 bits
    level 0, 39 bits level 1; 64 KiB: 48 or 52 bits level 1)."""
    stride: i64 = granule - 3
    return 4 - (ia_bits - granule + stride - 1) // stride


def _s1(
    pages: Pages,
    words: Words,
    mem_size: i64,
    ttb: i64,
    va: i64,
    ia_bits: i64,
    oa_bits: i64,
    write: bool,
    affd: bool,
    ha: bool,
    nested: bool,
    s2_ttb: i64,
    s2_ia_bits: i64,
    s2_start: i64,
    s2_oa_bits: i64,
    s2_affd: bool,
    hd: bool,
    granule: i64,
    s2_granule: i64,
) -> Native10:
    """:func:`walk_s1` on native ints, ``va`` already inside the input size."""
    start: i64 = _start(ia_bits, granule)
    refs: i64 = 0
    # The stage-2 translation of the descriptor last read: its IPA, S2AP and level (without
    # stage 2 nothing refuses an update).
    slot_ipa: i64 = 0
    slot_prot: i64 = PROT_R | PROT_W
    slot_lvl: i64 = 0
    table: i64 = ttb
    level: i64 = start
    unpriv = True
    rdonly = False
    stride: i64 = 9  # the 4 KiB granule's constants, as literals: its walks call nothing
    oa_mask: i64 = DESC_OA
    min_block: i64 = 1
    low_mask: i64 = 0x1FF
    if granule != 12:
        stride, oa_mask, min_block, low_mask = _granule(granule, oa_bits)
    shift: i64 = granule + stride * (3 - start)
    index_mask: i64 = _mask(ia_bits - shift)
    while True:
        slot: i64 = table + ((va >> shift) & index_mask) * 8
        if nested:
            if slot >> s2_ia_bits:
                return F_TRANSLATION, 0, 0, refs, 0, s2_start, 1, slot, CLASS_TT, 0
            slot_ipa = slot
            st, slot_pa, _s, r2, slot_prot, slot_lvl = _s2(
                pages,
                words,
                mem_size,
                s2_ttb,
                slot,
                s2_ia_bits,
                s2_start,
                s2_oa_bits,
                False,
                s2_affd,
                s2_granule,
            )
            refs += r2
            if st != OK:
                return st, slot_pa, 0, refs, 0, slot_lvl, 1, slot, CLASS_TT, 0
            slot = slot_pa
        if slot + 8 > mem_size or slot < 0:
            return F_WALK_EABT, slot, 0, refs, 0, level, 0, 0, CLASS_TT, 0
        desc = _desc(pages, words, slot)
        refs += 1
        if not desc & DESC_VALID:
            return F_TRANSLATION, 0, 0, refs, 0, level, 0, 0, CLASS_IN, 0
        addr: i64 = desc & oa_mask
        if granule == 16:
            addr |= (desc >> 12 & 0xF) << 48  # PA[51:48] in bits 15:12
        if level < 3 and desc & DESC_TABLE:
            table = addr
            if table >> oa_bits:
                return F_ADDR_SIZE, 0, 0, refs, 0, level, 0, 0, CLASS_IN, 0
            if desc & S1_APTABLE_NOUNPRIV:
                unpriv = False
            if desc >> 62 & 1:  # S1_APTABLE_RDONLY (1 << 62 is no C literal for mypyc)
                rdonly = True
            level += 1
            index_mask = low_mask
            shift -= stride
            continue
        if (level == 3 and not desc & DESC_TABLE) or level < min_block:
            return F_TRANSLATION, 0, 0, refs, 0, level, 0, 0, CLASS_IN, 0
        mask = _mask(shift)
        out: i64 = addr & ~mask
        if out >> oa_bits:
            return F_ADDR_SIZE, 0, 0, refs, 0, level, 0, 0, CLASS_IN, 0
        if not desc & DESC_AF:
            if ha:
                if not slot_prot & PROT_W:  # stage 2 refuses the update: nothing written
                    return F_PERMISSION, 0, 0, refs, 0, slot_lvl, 1, slot_ipa, CLASS_TT, 1
                desc |= DESC_AF
                _store(pages, words, slot, desc)
            elif not affd:
                return F_ACCESS, 0, 0, refs, 0, level, 0, 0, CLASS_IN, 0
        # Device DMA is an unprivileged access: it needs AP[1] all the way down.
        prot: i64 = 0
        if unpriv and desc & S1_AP_UNPRIV:
            prot = PROT_R if rdonly or desc & S1_AP_RDONLY else PROT_R | PROT_W
            if write and hd and not rdonly and desc & S1_DBM and desc & S1_AP_RDONLY:
                if not slot_prot & PROT_W:  # as for AF: stage 2 refuses, nothing written
                    return F_PERMISSION, 0, 0, refs, 0, slot_lvl, 1, slot_ipa, CLASS_TT, 1
                _store(pages, words, slot, desc & ~S1_AP_RDONLY)  # writable-clean -> dirty
                prot = PROT_R | PROT_W
        if not prot & (PROT_W if write else PROT_R):
            return F_PERMISSION, 0, 0, refs, prot, level, 0, 0, CLASS_IN, 0
        ipa: i64 = out | (va & mask)
        if not nested:
            return OK, ipa, shift, refs, prot, level, 0, 0, CLASS_IN, 0
        if ipa >> s2_ia_bits:
            return F_TRANSLATION, 0, 0, refs, 0, s2_start, 1, ipa, CLASS_IN, 0
        st, pa, shift2, r2, prot2, lvl2 = _s2(
            pages,
            words,
            mem_size,
            s2_ttb,
            ipa,
            s2_ia_bits,
            s2_start,
            s2_oa_bits,
            write,
            s2_affd,
            s2_granule,
        )
        refs += r2
        if st != OK:
            return st, pa, 0, refs, prot & prot2, lvl2, 1, ipa, CLASS_IN, 0
        # A combined TLB entry covers the smaller of the two pages.
        combined: i64 = shift2
        if shift < combined:
            combined = shift
        return OK, pa, combined, refs, prot & prot2, level, 0, 0, CLASS_IN, 0


def bench_s1(
    pages: Pages, mem_size: int, ttb: int, vas: vec[i64], ia_bits: int, rounds: int
) -> int:
    """Benchmark driver: ``rounds`` passes of stage-1 read walks over ``vas`` in this module's
    own loop (compiled, like a C reference's); returns how many succeeded."""
    return _bench(pages, mem_size, ttb, vas, ia_bits, rounds, False, 0)


def bench_nested(
    pages: Pages,
    mem_size: int,
    ttb: int,
    s2_ttb: int,
    vas: vec[i64],
    ia_bits: int,
    rounds: int,
) -> int:
    """Benchmark driver: :func:`bench_s1` for nested walks (stage 2 at level 0, 48 bits)."""
    return _bench(pages, mem_size, ttb, vas, ia_bits, rounds, True, s2_ttb)


def _bench(
    pages: Pages,
    mem_size: int,
    ttb: i64,
    vas: vec[i64],
    ia_bits: i64,
    rounds: i64,
    nested: bool,
    s2_ttb: i64,
) -> int:
    """The drivers' loop: :func:`walk_s1`'s read walks (48-bit output and stage-2 sizes), the
    memory's index and size found once, as the C reference finds its memory."""
    words = _words(pages)
    size = _clamp(mem_size)
    ok: i64 = 0
    if ia_bits > _MAX_IA:  # walk_s1's own check: every walk faults
        return 0
    for _ in range(rounds):
        for va in vas:
            if va >> ia_bits:  # walk_s1's own check of the input size
                continue
            res = _s1(
                pages,
                words,
                size,
                ttb,
                va,
                ia_bits,
                48,
                False,
                False,
                False,
                nested,
                s2_ttb,
                48,
                0,
                48,
                False,
                False,
                12,
                12,
            )
            if res[0] == OK:
                ok += 1
    return ok


# -- bound entries: the translate front's miss walks (hw/xlate.py ``Walk``) -----------------
# One signature for every walker, ``(iova, write, ctx)`` with the stream's table fields in
# ``ctx``: the front calls them from compiled code with three arguments (no Python binder),
# and the tuple is unpacked here natively.


def walk_s1_bound(
    va: int,
    write: bool,
    ctx: tuple[
        Pages, int, int, int, int, bool, bool, bool, int, int, int, int, bool, bool, int, int
    ],
) -> tuple[int, int, int, int, int, int, int, int, int, int]:
    """``walk_s1`` with ``ctx = (pages, mem_size, ttb, ia_bits, oa_bits, affd, ha, nested,
    s2_ttb, s2_ia_bits, s2_start, s2_oa_bits, s2_affd, hd, granule, s2_granule)``."""
    (pages, mem_size, ttb, ia, oa, affd, ha, nested, s2_ttb, s2_ia, s2_start, s2_oa, s2_affd,
     hd, g, s2_g) = ctx  # fmt: skip
    return walk_s1(pages, mem_size, ttb, va, ia, oa, write, affd, ha, nested, s2_ttb, s2_ia,
                   s2_start, s2_oa, s2_affd, hd, g, s2_g)  # fmt: skip


def walk_s2_bound(
    ipa: int, write: bool, ctx: tuple[Pages, int, int, int, int, int, bool, int]
) -> tuple[int, int, int, int, int, int]:
    """``walk_s2`` with ``ctx = (pages, mem_size, ttb, ia_bits, start_level, oa_bits, affd,
    granule)``."""
    pages, mem_size, ttb, ia_bits, start_level, oa_bits, affd, granule = ctx
    return walk_s2(pages, mem_size, ttb, ipa, ia_bits, start_level, oa_bits, write, affd, granule)
