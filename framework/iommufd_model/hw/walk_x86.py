"""Compiled hot path: the x86-64 first-stage walk (AMD v2 guest tables, VT-d first stage).

Kept free of classes and imports from the framework so mypyc compiles it to tight C; the
semantics equal ``radix.walk`` with ``x86_64.X86_64Format`` (tests compare them). A nested walk
passes ``s2``: each table pointer and the final output are guest-physical addresses that
``s2(gpa, write)`` turns into ``(status, pa, refs)``; status 0 means success.

Result tuple: ``(status, value, shift, refs, prot)``. status OK: value is the physical address;
NOT_PRESENT / PERMISSION / ADDRESS_SIZE / BAD_ENTRY: value is the faulting level;
S2_FAULT: value is the guest-physical address stage 2 refused.
"""

from __future__ import annotations

from collections.abc import Callable

OK = 0
NOT_PRESENT = 1
PERMISSION = 2
ADDRESS_SIZE = 3
BAD_ENTRY = 4
S2_FAULT = 5

_ADDR = ((1 << 52) - 1) & ~0xFFF
_P = 1
_RW = 2
_PS = 0x80

Stage2 = Callable[[int, bool], tuple[int, int, int]]


def read_u64(pages: dict[int, bytearray], pa: int) -> int:
    page = pages.get(pa >> 12)
    if page is None:
        return 0
    off = pa & 0xFFF
    return int.from_bytes(page[off : off + 8], "little")


def walk_x86(
    pages: dict[int, bytearray],
    mem_size: int,
    root: int,
    iova: int,
    levels: int,
    write: bool,
    s2: Stage2 | None,
) -> tuple[int, int, int, int, int]:
    va_bits = 12 + 9 * levels
    if iova >> va_bits:
        return ADDRESS_SIZE, levels - 1, 0, 0, 0
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
        entry = read_u64(pages, slot)
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
