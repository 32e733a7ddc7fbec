"""Compiled hot path: the VT-d second-stage walk and the nested (first over second) walk.

Plain typed functions over the memory's page dict, free of framework imports, so that mypyc
turns them into C without the framework on its path. The first stage is the framework's
x86-64 walker (``iommufd_model.hw.walk_x86.walk_x86``), passed in by the caller; the nested
walk hands it a stage-2 callback that runs :func:`walk_ss`, so every first-stage table pointer
and the final output address are translated (and counted) through the second stage.

Results use the framework walker's convention ``(status, value, shift, refs, prot)``; the
extra status :data:`ACCESS` means an entry lay outside physical memory.
"""

from __future__ import annotations

from collections.abc import Callable

# The framework walker's status codes (walk_x86.OK ... S2_FAULT), plus ACCESS.
OK, NOT_PRESENT, PERMISSION, ADDRESS_SIZE, BAD_ENTRY, S2_FAULT = range(6)
ACCESS = 6

Stage2 = Callable[[int, bool], tuple[int, int, int]]
FirstStage = Callable[
    [dict[int, bytearray], int, int, int, int, bool, Stage2 | None],
    tuple[int, int, int, int, int],
]

_ADDR = ((1 << 52) - 1) & ~0xFFF
_RW = 3
_PS = 0x80
_A = 0x100
_D = 0x200


def _set_bits(pages: dict[int, bytearray], pa: int, entry: int) -> None:
    """Hardware's atomic update of an entry (A/D bits); the frame exists: it held the entry."""
    page = pages[pa >> 12]
    off = pa & 0xFFF
    page[off : off + 8] = entry.to_bytes(8, "little")


def walk_ss(
    pages: dict[int, bytearray],
    mem_size: int,
    root: int,
    addr: int,
    levels: int,
    write: bool,
    large_mask: int,
    set_ad: bool,
) -> tuple[int, int, int, int, int]:
    """Second-stage walk of ``addr``; ``large_mask`` bit n allows a leaf at level n.

    With ``set_ad`` (PASID entry SSADE) the walk sets A in every entry it uses and D in the
    leaf of a write, as the hardware does.
    """
    if addr >> (12 + 9 * levels):
        return ADDRESS_SIZE, levels - 1, 0, 0, 0
    allowed = _RW
    table = root
    refs = 0
    for level in range(levels - 1, -1, -1):
        shift = 12 + 9 * level
        slot = table + (((addr >> shift) & 0x1FF) << 3)
        if slot + 8 > mem_size:
            return ACCESS, level, 0, refs, 0
        page = pages.get(slot >> 12)
        off = slot & 0xFFF
        entry = 0 if page is None else int.from_bytes(page[off : off + 8], "little")
        refs += 1
        rw = entry & _RW
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
            if set_ad:
                want = entry | _A | (_D if write else 0)
                if want != entry:
                    _set_bits(pages, slot, want)
            offset_mask = (1 << shift) - 1
            return OK, (entry & _ADDR & ~offset_mask) | (addr & offset_mask), shift, refs, allowed
        if set_ad and not entry & _A:
            _set_bits(pages, slot, entry | _A)
        table = entry & _ADDR
    return BAD_ENTRY, 0, 0, refs, 0


def walk_nested(
    walk_fs: FirstStage,
    pages: dict[int, bytearray],
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
    """``walk_fs`` (the x86-64 walker) with table pointers and output guest-physical.

    Returns ``(status, value, shift, refs, prot, s2_status)``: on ``S2_FAULT`` ``value`` is
    the guest-physical address the second stage refused and ``s2_status`` says why. ``prot``
    is the intersection of both stages' permissions for the page found.
    """
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
