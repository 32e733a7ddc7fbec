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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

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

Stage2 = Callable[[int, bool], tuple[int, int, int]]
X86Walker = Callable[
    [dict[int, bytearray], int, int, int, int, bool, Stage2 | None],
    tuple[int, int, int, int, int],
]


def walk_v1(
    pages: dict[int, bytearray],
    mem_size: int,
    root: int,
    mode: int,
    iova: int,
    write: bool,
    had: int,
) -> tuple[int, int, int, int, int]:
    """Walk a v1 host table of ``mode`` levels (1..6) for one access.

    PDE NextLevel 1..6 names the level of the table it points to; a smaller value than
    ``level - 1`` skips levels, whose address bits must then be zero. NextLevel 0 is a leaf
    of the current level's size; NextLevel 7 is a leaf whose size is encoded in the address
    (the lowest clear bit at or above bit 12 gives size = 2 << bit). ``had`` is DTE HAD:
    bit 0 updates A, bit 1 updates D on writes.

    Entries are read as two 32-bit halves byte by byte: every value stays a small int, which
    mypyc keeps unboxed (a whole entry with IW, bit 62, would be a boxed long).
    """
    if mode < 1 or mode > 6:
        return BAD_ENTRY, mode, 0, 0, 0
    top = 12 + 9 * mode
    if top < 64 and iova >> top:
        return ADDRESS_SIZE, mode, 0, 0, 0
    refs = 0
    can_read = True
    can_write = True
    table = root
    level = mode
    while True:
        shift = 3 + 9 * level  # = 12 + 9 * (level - 1): bytes covered by one entry
        slot = table + ((iova >> shift) & 0x1FF) * 8
        if slot + 8 > mem_size:
            return HW_ERROR, slot, 0, refs, 0
        refs += 1
        page = pages.get(slot >> 12)
        if page is None:
            return NOT_PRESENT, level, 0, refs, 0
        off = slot & 0xFFF
        lo = page[off] | page[off + 1] << 8 | page[off + 2] << 16 | page[off + 3] << 24
        if not lo & _PR:
            return NOT_PRESENT, level, 0, refs, 0
        hi = page[off + 4] | page[off + 5] << 8 | page[off + 6] << 16 | page[off + 7] << 24
        if hi & _HI_RSVD:
            return BAD_ENTRY, level, 0, refs, 0
        if not hi & _HI_IR:
            can_read = False
        if not hi & _HI_IW:
            can_write = False
        nl = (lo >> 9) & 7
        addr = (hi & 0xFFFFF) << 32 | (lo & 0xFFFF_F000)
        if nl == 0 or nl == 7:
            size_log2 = shift
            if nl == 7:
                bit = 12
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
                low = page[off]
                new = low | (_A if had & 1 else 0) | (_D | _A if write and had & 2 else 0)
                if new != low:
                    page[off] = new
            mask = (1 << size_log2) - 1
            return OK, (addr & ~mask) | (iova & mask), size_log2, refs, prot
        if nl >= level:
            return BAD_ENTRY, level, 0, refs, 0
        if nl < level - 1:
            skipped = ((1 << shift) - 1) & ~((1 << (12 + 9 * nl)) - 1)
            if iova & skipped:
                return NOT_PRESENT, level, 0, refs, 0
        table = addr
        level = nl


def walk_nested(
    pages: dict[int, bytearray],
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
) -> tuple[int, int, int, int, int]:
    """GCR3[pasid] then the guest x86-64 table, every guest pointer through the host table.

    ``host_mode`` 0 means no host stage: the GCR3 table and guest tables are system-physical
    (a v2-only DTE). ``x86`` is the framework's ``walk_x86`` (compiled or pure, as chosen by
    the caller); each of its table pointers and its final output go through ``s2``.
    """
    err = [OK, 0]

    def s2(gpa: int, w: bool) -> tuple[int, int, int]:
        st, val, _shift, r, _prot = walk_v1(pages, mem_size, host_root, host_mode, gpa, w, had)
        if st != OK:
            err[0] = st
            err[1] = val if st == HW_ERROR else gpa
        return st, val, r

    nested = host_mode != 0

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
        page = pages.get(spa >> 12)
        off = spa & 0xFFF
        return OK, 0 if page is None else int.from_bytes(page[off : off + 8], "little"), cost + 1

    if pasid >> (9 * (glx + 1)):
        return NOT_PRESENT, 0, 0, 0, 0
    # The GCR3 table: GLX + 1 levels, level n indexed by PASID bits [9n+8:9n].
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
