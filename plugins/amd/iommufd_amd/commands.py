"""Command buffer entries (spec "Commands"; kernel ``struct iommu_cmd``, CMD_*, build_*()).

A command is 128 bits, four little-endian u32 words; the opcode is word 1 bits [31:28].
Builders produce what the Linux driver queues; :func:`decode` is the hardware's parser and
returns ``None`` for anything the spec calls illegal (unknown opcode, reserved bits set),
which makes the command processor log ILLEGAL_COMMAND_ERROR and stop.
"""

from __future__ import annotations

import struct

import attrs

COMPLETION_WAIT = 0x01  # CMD_COMPL_WAIT
INVALIDATE_DEVTAB_ENTRY = 0x02  # CMD_INV_DEV_ENTRY
INVALIDATE_IOMMU_PAGES = 0x03  # CMD_INV_IOMMU_PAGES
INVALIDATE_IOTLB_PAGES = 0x04  # CMD_INV_IOTLB_PAGES
INVALIDATE_INTERRUPT_TABLE = 0x05  # CMD_INV_IRT
PREFETCH_IOMMU_PAGES = 0x06  # PREFETCH_IOMMU_PAGES
COMPLETE_PPR_REQUEST = 0x07  # CMD_COMPLETE_PPR
INVALIDATE_IOMMU_ALL = 0x08  # CMD_INV_ALL
INSERT_GUEST_EVENT = 0x09  # HW-vIOMMU (AMD tree amd_iommu_types.h; GuestID in word 1 [15:0])
RESET_VMMIO = 0x0A  # HW-vIOMMU CMD_RESET_VMMIO (AMD tree: build_reset_vmmio())

CMD_SIZE = 16
OPCODE_SHIFT = 28  # word 1 [31:28] (CMD_SET_TYPE)

# COMPLETION_WAIT word 0
CW_S = 1 << 0  # S: store StoreData at StoreAddr (CMD_COMPL_WAIT_STORE_MASK)
CW_I = 1 << 1  # I: raise the completion-wait interrupt (CMD_COMPL_WAIT_INT_MASK)
CW_F = 1 << 2  # F: flush queue (wait for all prior commands' side effects)
# INVALIDATE_IOMMU_PAGES / INVALIDATE_IOTLB_PAGES / PREFETCH word 2
INV_S = 1 << 0  # S: range encoded in the address (CMD_INV_IOMMU_PAGES_SIZE_MASK)
INV_PDE = 1 << 1  # PDE: also page-directory cache entries (CMD_INV_IOMMU_PAGES_PDE_MASK)
INV_GN = 1 << 2  # GN: guest (PASID-tagged) translations (CMD_INV_IOMMU_PAGES_GN_MASK)
PF_INVAL = 1 << 4  # PREFETCH Inval: invalidate before prefetching
ALL_PAGES_ADDRESS = 0x7FFF_FFFF_FFFF_F000  # CMD_INV_IOMMU_ALL_PAGES_ADDRESS & PAGE_MASK
PPR_STATUS_SHIFT = 12  # COMPLETE_PPR_REQUEST word 3 Status[15:12]
PPR_TAG_MASK = 0x1FF  # CompletionTag[8:0]
RV_ALL = 1 << 28  # RESET_VMMIO word 0: All (every virtualised register of the guest)
RV_VCMD = 1 << 31  # RESET_VMMIO word 0: VCmd (the guest command processor too)

_W = struct.Struct("<4I")


@attrs.frozen
class Command:
    """A decoded command; fields that a given opcode lacks stay 0."""

    opcode: int
    devid: int = 0
    domid: int = 0
    pasid: int = 0
    address: int = 0  # StoreAddr (COMPLETION_WAIT) or the page address, flag bits stripped
    data: int = 0  # COMPLETION_WAIT StoreData
    s: bool = False  # CW: store; invalidations: size bit
    i: bool = False  # COMPLETION_WAIT interrupt
    f: bool = False  # COMPLETION_WAIT flush
    pde: bool = False
    gn: bool = False
    inval: bool = False  # PREFETCH
    count: int = 0  # PREFETCH PFCount / INVALIDATE_IOTLB_PAGES MaxPend
    tag: int = 0  # COMPLETE_PPR_REQUEST CompletionTag
    status: int = 0  # COMPLETE_PPR_REQUEST Status
    guest_id: int = 0  # INSERT_GUEST_EVENT / RESET_VMMIO GuestID
    all: bool = False  # RESET_VMMIO All
    vcmd: bool = False  # RESET_VMMIO VCmd


def _pack(w0: int, w1: int, w2: int, w3: int, opcode: int) -> bytes:
    return _W.pack(w0 & 0xFFFF_FFFF, (w1 & 0x0FFF_FFFF) | opcode << OPCODE_SHIFT, w2, w3)


# -- builders (the driver side, as build_*() in iommu.c) -----------------------------------
def completion_wait(
    store_addr: int, data: int, *, store: bool = True, interrupt: bool = False
) -> bytes:
    """COMPLETION_WAIT: StoreAddr[51:3] in words 0-1, StoreData in words 2-3."""
    flags = (CW_S if store else 0) | (CW_I if interrupt else 0)
    w0 = (store_addr & 0xFFFF_FFF8) | flags
    w1 = (store_addr >> 32) & 0xFFFFF
    return _pack(w0, w1, data & 0xFFFF_FFFF, (data >> 32) & 0xFFFF_FFFF, COMPLETION_WAIT)


def inv_devtab_entry(devid: int) -> bytes:
    return _pack(devid & 0xFFFF, 0, 0, 0, INVALIDATE_DEVTAB_ENTRY)


def inv_address(address: int, size: int) -> int:
    """The address field of a range invalidation, S bit included (kernel build_inv_address).

    One page: the page address, S=0. Otherwise set every bit below the highest bit in which
    first and last byte differ, so the lowest clear bit (at or above 12) gives the naturally
    aligned power-of-two range that covers both; beyond 52 bits: everything.
    """
    first_page = address >> 12
    last_page = (address + size - 1) >> 12
    if first_page == last_page:
        return address & ~0xFFF
    end = address + size - 1
    msb_diff = (end ^ address).bit_length() - 1
    if msb_diff > 51:
        address = ALL_PAGES_ADDRESS
    else:
        address |= (1 << msb_diff) - 1
    return (address & ~0xFFF) | INV_S


def inv_iommu_pages(
    domid: int, address: int, size: int, *, pasid: int = 0, pde: bool = True, gn: bool = False
) -> bytes:
    """INVALIDATE_IOMMU_PAGES: PASID[19:0] word 0, DomainID word 1, address + S/PDE/GN."""
    addr = inv_address(address, size) | (INV_PDE if pde else 0) | (INV_GN if gn else 0)
    w0 = pasid & 0xFFFFF if gn else 0
    return _pack(w0, domid & 0xFFFF, addr & 0xFFFF_FFFF, addr >> 32, INVALIDATE_IOMMU_PAGES)


def inv_iommu_all_pages(domid: int, *, pasid: int = 0, gn: bool = False) -> bytes:
    """INVALIDATE_IOMMU_PAGES with the all-pages encoding (amd_iommu_flush_tlb_domid)."""
    return inv_iommu_pages(domid, 0, 1 << 64, pasid=pasid, gn=gn)


def inv_iotlb_pages(
    devid: int, address: int, size: int, *, qdep: int = 0, pasid: int = 0, gn: bool = False
) -> bytes:
    """INVALIDATE_IOTLB_PAGES (device TLB via ATS): as the kernel's build_inv_iotlb_pages.

    Word 0: DeviceID[15:0], PASID[15:8] at [23:16], MaxPend[31:24]; word 1: QueueID[15:0]
    (the DeviceID again), PASID[7:0] at [23:16], PASID[19:16] at [27:24].
    """
    addr = inv_address(address, size) | (INV_GN if gn else 0)
    w0 = (devid & 0xFFFF) | (qdep & 0xFF) << 24
    w1 = devid & 0xFFFF
    if gn:
        w0 |= ((pasid >> 8) & 0xFF) << 16
        w1 |= (pasid & 0xFF) << 16 | ((pasid >> 16) & 0xF) << 24
    return _pack(w0, w1, addr & 0xFFFF_FFFF, addr >> 32, INVALIDATE_IOTLB_PAGES)


def inv_interrupt_table(devid: int) -> bytes:
    return _pack(devid & 0xFFFF, 0, 0, 0, INVALIDATE_INTERRUPT_TABLE)


def prefetch_iommu_pages(
    devid: int,
    address: int,
    *,
    pasid: int = 0,
    count: int = 1,
    gn: bool = False,
    inval: bool = False,
) -> bytes:
    """PREFETCH_IOMMU_PAGES: DeviceID, PFCount[31:24]; PASID word 1; address, S/GN/Inval."""
    w2 = (address & 0xFFFF_F000) | (INV_GN if gn else 0) | (PF_INVAL if inval else 0)
    return _pack(
        (devid & 0xFFFF) | (count & 0xFF) << 24,
        pasid & 0xFFFFF,
        w2,
        (address >> 32) & 0xFFFF_FFFF,
        PREFETCH_IOMMU_PAGES,
    )


def complete_ppr(devid: int, pasid: int, status: int, tag: int, *, gn: bool = False) -> bytes:
    """COMPLETE_PPR_REQUEST (build_complete_ppr): DeviceID, PASID, GN, Status and tag."""
    w3 = (tag & PPR_TAG_MASK) | (status & 0xF) << PPR_STATUS_SHIFT
    return _pack(
        devid & 0xFFFF, pasid & 0xFFFFF if gn else 0, INV_GN if gn else 0, w3, COMPLETE_PPR_REQUEST
    )


def inv_all() -> bytes:
    return _pack(0, 0, 0, 0, INVALIDATE_IOMMU_ALL)


def reset_vmmio(guest_id: int, *, vcmd: bool = True, all_regs: bool = True) -> bytes:
    """RESET_VMMIO: GuestID[15:0], All[28], VCmd[31] in word 0 (AMD tree build_reset_vmmio();
    ``iommu_reset_vmmio()`` sets both)."""
    w0 = (guest_id & 0xFFFF) | (RV_ALL if all_regs else 0) | (RV_VCMD if vcmd else 0)
    return _pack(w0, 0, 0, 0, RESET_VMMIO)


def insert_guest_event(guest_id: int) -> bytes:
    """INSERT_GUEST_EVENT: GuestID in word 1 [15:0] (the command layout of AMD's tree)."""
    return _pack(0, guest_id & 0xFFFF, 0, 0, INSERT_GUEST_EVENT)


# -- the hardware's parser --------------------------------------------------------------------
# Per opcode: reserved-bit masks of words 0..3 (set bits there make the command illegal).
_RESERVED: dict[int, tuple[int, int, int, int]] = {
    COMPLETION_WAIT: (0, 0x0FF0_0000, 0, 0),
    INVALIDATE_DEVTAB_ENTRY: (0xFFFF_0000, 0x0FFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF),
    INVALIDATE_IOMMU_PAGES: (0xFFF0_0000, 0x0FFF_0000, 0x0000_0FF8, 0),
    INVALIDATE_IOTLB_PAGES: (0, 0, 0x0000_0FFA, 0),
    INVALIDATE_INTERRUPT_TABLE: (0xFFFF_0000, 0x0FFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF),
    PREFETCH_IOMMU_PAGES: (0x00FF_0000, 0x0FF0_0000, 0x0000_0FEA, 0),
    COMPLETE_PPR_REQUEST: (0xFFFF_0000, 0x0FF0_0000, 0xFFFF_FFFB, 0xFFFF_0E00),
    INVALIDATE_IOMMU_ALL: (0xFFFF_FFFF, 0x0FFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF),
    INSERT_GUEST_EVENT: (0xFFFF_FFFF, 0x0FFF_0000, 0xFFFF_FFFF, 0xFFFF_FFFF),
    RESET_VMMIO: (0x6FFF_0000, 0x0FFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF),
}


def opcode_of(raw: bytes) -> int:
    return int(_W.unpack(raw)[1]) >> OPCODE_SHIFT


def decode(raw: bytes) -> Command | None:
    """Parse one 16-byte command; ``None`` when it is illegal."""
    w0, w1, w2, w3 = _W.unpack(raw)
    op = w1 >> OPCODE_SHIFT
    rsvd = _RESERVED.get(op)
    if rsvd is None or w0 & rsvd[0] or w1 & rsvd[1] or w2 & rsvd[2] or w3 & rsvd[3]:
        return None
    addr = ((w3 << 32) | w2) & ~0xFFF
    if op == COMPLETION_WAIT:
        return Command(
            op,
            address=((w1 & 0xFFFFF) << 32) | (w0 & 0xFFFF_FFF8),
            data=(w3 << 32) | w2,
            s=bool(w0 & CW_S),
            i=bool(w0 & CW_I),
            f=bool(w0 & CW_F),
        )
    if op in (INVALIDATE_DEVTAB_ENTRY, INVALIDATE_INTERRUPT_TABLE):
        return Command(op, devid=w0 & 0xFFFF)
    if op == INVALIDATE_IOMMU_PAGES:
        return Command(
            op,
            domid=w1 & 0xFFFF,
            pasid=w0 & 0xFFFFF,
            address=addr,
            s=bool(w2 & INV_S),
            pde=bool(w2 & INV_PDE),
            gn=bool(w2 & INV_GN),
        )
    if op == INVALIDATE_IOTLB_PAGES:
        pasid = ((w1 >> 24) & 0xF) << 16 | ((w0 >> 16) & 0xFF) << 8 | (w1 >> 16) & 0xFF
        return Command(
            op,
            devid=w0 & 0xFFFF,
            pasid=pasid,
            address=addr,
            s=bool(w2 & INV_S),
            gn=bool(w2 & INV_GN),
            count=w0 >> 24,
        )
    if op == PREFETCH_IOMMU_PAGES:
        return Command(
            op,
            devid=w0 & 0xFFFF,
            pasid=w1 & 0xFFFFF,
            address=addr,
            s=bool(w2 & INV_S),
            gn=bool(w2 & INV_GN),
            inval=bool(w2 & PF_INVAL),
            count=w0 >> 24,
        )
    if op == COMPLETE_PPR_REQUEST:
        return Command(
            op,
            devid=w0 & 0xFFFF,
            pasid=w1 & 0xFFFFF,
            gn=bool(w2 & INV_GN),
            tag=w3 & PPR_TAG_MASK,
            status=(w3 >> PPR_STATUS_SHIFT) & 0xF,
        )
    if op == INSERT_GUEST_EVENT:
        return Command(op, guest_id=w1 & 0xFFFF)
    if op == RESET_VMMIO:
        return Command(op, guest_id=w0 & 0xFFFF, all=bool(w0 & RV_ALL), vcmd=bool(w0 & RV_VCMD))
    return Command(op)


def decode_range(address: int, s: bool) -> tuple[int, int]:
    """``(first, last)`` bytes an invalidation covers: one page, or the S-bit encoded range."""
    if not s:
        return address, address + 0xFFF
    bit = 12
    while bit < 64 and address >> bit & 1:
        bit += 1
    size_log2 = bit + 1
    if size_log2 >= 64:
        return 0, (1 << 64) - 1
    first = address & ~((1 << size_log2) - 1)
    return first, first + (1 << size_log2) - 1


# -- ID rewriting (what the HW-vIOMMU does through its mapping tables) ---------------------------
def with_domid(raw: bytes, domid: int) -> bytes:
    """INVALIDATE_IOMMU_PAGES ``raw`` with its DomainID (word 1 [15:0]) replaced."""
    w0, w1, w2, w3 = _W.unpack(raw)
    return _W.pack(w0, (w1 & ~0xFFFF) | (domid & 0xFFFF), w2, w3)


def with_devid(raw: bytes, devid: int) -> bytes:
    """A DeviceID command with its DeviceID replaced (word 0 [15:0]; for
    INVALIDATE_IOTLB_PAGES also the QueueID, word 1 [15:0])."""
    w0, w1, w2, w3 = _W.unpack(raw)
    w0 = (w0 & ~0xFFFF) | (devid & 0xFFFF)
    if w1 >> OPCODE_SHIFT == INVALIDATE_IOTLB_PAGES:
        w1 = (w1 & ~0xFFFF) | (devid & 0xFFFF)
    return _W.pack(w0, w1, w2, w3)
