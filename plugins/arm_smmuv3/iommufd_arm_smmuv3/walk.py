"""Compiled hot path: VMSAv8-64 translation-table walks with the 4 KiB granule.

Free of classes and framework imports so that mypyc turns it into tight C; ``setup.py`` compiles
it and :func:`iommufd_model.hw.compiled.load_walker` picks the build (or this source).

Levels are numbered as the Arm ARM does: level 0 resolves VA bits 47:39, level 3 bits 20:12.
A walk starts at the level that the input size (``64 - TxSZ``, stage 2 also SL0) selects; the
start-level table may be shorter than 512 entries (stage 1) or several concatenated tables
(stage 2). Descriptor bits (Arm ARM D8.3): bit 0 valid, bit 1 table (levels 0-2) or page
(level 3), output address 47:12, AF bit 10; stage 1 AP[2:1] bits 7:6 (AP[1] = unprivileged
access, AP[2] = read-only) and the table attributes APTable bits 62:61; stage 2 S2AP bits 7:6
(bit 6 read, bit 7 write).

Frames are the memory's ``vec[i64]`` word arrays: a descriptor is one native array load under
mypyc (read as unsigned: bit 63 is a real attribute bit at stage 1).

Every function returns a tuple whose first element is ``OK`` or the SMMU event number of the
fault (F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, F_PERMISSION, F_WALK_EABT).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: under mypyc ``i64`` is a native int, not a class to index
    from librt.vecs import vec
    from mypy_extensions import i64

    Frame = vec[i64]  # memory.Frame: 512 signed 64-bit words
    Pages = dict[int, Frame]
    Words = list[list[Frame | None] | None]



OK = 0
F_WALK_EABT = 0x0B
F_TRANSLATION = 0x10
F_ADDR_SIZE = 0x11
F_ACCESS = 0x12
F_PERMISSION = 0x13

# The CLASS field of a fault record: what the SMMU was doing when stage 2 refused an address.
CLASS_CD = 0  # fetching a context descriptor
CLASS_TT = 1  # fetching a stage-1 translation table descriptor
CLASS_IN = 2  # translating the input address (the final stage-1 output)

DESC_VALID = 1 << 0
DESC_TABLE = 1 << 1  # with VALID: table (levels 0-2) or page (level 3); clear: block
DESC_AF = 1 << 10
DESC_OA = ((1 << 48) - 1) & ~0xFFF  # output / next-level table address, bits 47:12
S1_AP_UNPRIV = 1 << 6  # AP[1]: EL0 (unprivileged) access allowed
S1_AP_RDONLY = 1 << 7  # AP[2]: read-only
S1_APTABLE_NOUNPRIV = 1 << 61  # APTable[0]: no unprivileged access below this table
S1_APTABLE_RDONLY = 1 << 62  # APTable[1]: read-only below this table
S2AP_READ = 1 << 6
S2AP_WRITE = 1 << 7

PROT_R = 1
PROT_W = 2


def set_af(pages: Pages, pa: int, desc: int) -> None:
    """Hardware access-flag update (CD.HA / STE.S2HA): write the descriptor back with AF."""
    page = pages.get(pa >> 12)
    if page is not None:
        value = desc | DESC_AF
        page[(pa & 0xFFF) >> 3] = value - (1 << 64) if value >> 63 else value


def _desc(pages: Pages, slot: int) -> int:
    """The 64-bit descriptor at 8-aligned ``slot``, unsigned (0 in a frame never written)."""
    page = pages.get(slot >> 12)
    if page is None:
        return 0
    word: int = page[(slot & 0xFFF) >> 3]
    return word + (1 << 64) if word < 0 else word


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
) -> tuple[int, int, int, int, int, int]:
    """Stage-2 walk of ``ipa``: ``(status, value, shift, refs, prot, level)``.

    OK: ``value`` is the physical address; F_WALK_EABT: the descriptor address that could not
    be fetched; other faults: 0. ``prot`` is the S2AP of the leaf, also on a permission fault.
    """
    if ipa >> ia_bits:
        return F_TRANSLATION, 0, 0, 0, 0, start_level
    refs = 0
    table = ttb
    level = start_level
    while True:
        shift = 12 + 9 * (3 - level)
        bits = ia_bits - shift if level == start_level else 9
        slot = table + ((ipa >> shift) & ((1 << bits) - 1)) * 8
        if slot + 8 > mem_size:
            return F_WALK_EABT, slot, 0, refs, 0, level
        desc = _desc(pages, slot)
        refs += 1
        if not desc & DESC_VALID:
            return F_TRANSLATION, 0, 0, refs, 0, level
        if level < 3 and desc & DESC_TABLE:
            table = desc & DESC_OA
            if table >> oa_bits:
                return F_ADDR_SIZE, 0, 0, refs, 0, level
            level += 1
            continue
        if (level == 3 and not desc & DESC_TABLE) or level == 0:
            # Page encoding 0b01 at level 3 is reserved; level 0 blocks need 52-bit OAs.
            return F_TRANSLATION, 0, 0, refs, 0, level
        out = desc & DESC_OA & ~((1 << shift) - 1)
        if out >> oa_bits:
            return F_ADDR_SIZE, 0, 0, refs, 0, level
        if not desc & DESC_AF and not affd:
            return F_ACCESS, 0, 0, refs, 0, level
        prot = (PROT_R if desc & S2AP_READ else 0) | (PROT_W if desc & S2AP_WRITE else 0)
        if not prot & (PROT_W if write else PROT_R):
            return F_PERMISSION, 0, 0, refs, prot, level
        return OK, out | (ipa & ((1 << shift) - 1)), shift, refs, prot, level


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
) -> tuple[int, int, int, int, int, int, int, int, int]:
    """Stage-1 walk of ``va``, with every table access and the output translated by stage 2
    when ``nested``: ``(status, value, shift, refs, prot, level, s2, ipa, cls)``.

    ``value`` is the physical address (OK) or the unfetchable descriptor address (F_WALK_EABT).
    A stage-2 fault reports ``s2 = 1``, the refused ``ipa`` and ``cls`` (CLASS_TT / CLASS_IN).
    ``refs`` counts every descriptor read of both stages.
    """
    start = 4 - (ia_bits - 12 + 8) // 9
    if va >> ia_bits:
        return F_TRANSLATION, 0, 0, 0, 0, start, 0, 0, CLASS_IN
    refs = 0
    table = ttb
    level = start
    unpriv = True
    rdonly = False
    while True:
        shift = 12 + 9 * (3 - level)
        bits = ia_bits - shift if level == start else 9
        slot = table + ((va >> shift) & ((1 << bits) - 1)) * 8
        if nested:
            st, slot_pa, _s, r2, _p, lvl2 = walk_s2(
                pages, mem_size, s2_ttb, slot, s2_ia_bits, s2_start, s2_oa_bits, False, s2_affd
            )
            refs += r2
            if st != OK:
                return st, slot_pa, 0, refs, 0, lvl2, 1, slot, CLASS_TT
            slot = slot_pa
        if slot + 8 > mem_size:
            return F_WALK_EABT, slot, 0, refs, 0, level, 0, 0, CLASS_TT
        desc = _desc(pages, slot)
        refs += 1
        if not desc & DESC_VALID:
            return F_TRANSLATION, 0, 0, refs, 0, level, 0, 0, CLASS_IN
        if level < 3 and desc & DESC_TABLE:
            table = desc & DESC_OA
            if table >> oa_bits:
                return F_ADDR_SIZE, 0, 0, refs, 0, level, 0, 0, CLASS_IN
            if desc & S1_APTABLE_NOUNPRIV:
                unpriv = False
            if desc & S1_APTABLE_RDONLY:
                rdonly = True
            level += 1
            continue
        if (level == 3 and not desc & DESC_TABLE) or level == 0:
            return F_TRANSLATION, 0, 0, refs, 0, level, 0, 0, CLASS_IN
        out = desc & DESC_OA & ~((1 << shift) - 1)
        if out >> oa_bits:
            return F_ADDR_SIZE, 0, 0, refs, 0, level, 0, 0, CLASS_IN
        if not desc & DESC_AF:
            if ha:
                set_af(pages, slot, desc)
            elif not affd:
                return F_ACCESS, 0, 0, refs, 0, level, 0, 0, CLASS_IN
        # Device DMA is an unprivileged access: it needs AP[1] all the way down.
        prot = 0
        if unpriv and desc & S1_AP_UNPRIV:
            prot = PROT_R if rdonly or desc & S1_AP_RDONLY else PROT_R | PROT_W
        if not prot & (PROT_W if write else PROT_R):
            return F_PERMISSION, 0, 0, refs, prot, level, 0, 0, CLASS_IN
        ipa = out | (va & ((1 << shift) - 1))
        if not nested:
            return OK, ipa, shift, refs, prot, level, 0, 0, CLASS_IN
        st, pa, shift2, r2, prot2, lvl2 = walk_s2(
            pages, mem_size, s2_ttb, ipa, s2_ia_bits, s2_start, s2_oa_bits, write, s2_affd
        )
        refs += r2
        if st != OK:
            return st, pa, 0, refs, prot & prot2, lvl2, 1, ipa, CLASS_IN
        # A combined TLB entry covers the smaller of the two pages.
        return OK, pa, min(shift, shift2), refs, prot & prot2, level, 0, 0, CLASS_IN
