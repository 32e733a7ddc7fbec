"""Queued-invalidation descriptors (VT-d spec 6.5.2): types, field layouts, codec.

A descriptor is 128 bits, or 256 bits when IQA.DW = 1 (the upper 128 bits are reserved for
every type modelled here). The type is bits 3:0 plus bits 11:9 (high type bits). Each type's
layout lists its fields as ``(name, qword, shift, width)``; every other bit of qwords 0-1 is
reserved, and a set reserved bit or an unknown type makes the descriptor invalid (IQE).
"""

from __future__ import annotations

import attrs

CC = 0x1  # context-cache invalidate
IOTLB = 0x2  # IOTLB invalidate
DEV_TLB = 0x3  # device-TLB invalidate
IEC = 0x4  # interrupt entry cache invalidate
WAIT = 0x5  # invalidation wait
PIOTLB = 0x6  # PASID-based IOTLB invalidate
PC = 0x7  # PASID-cache invalidate
PDEV_TLB = 0x8  # PASID-based device-TLB invalidate
PGRP_RESP = 0x9  # page group response

# granularities (the G field, bits 5:4, except IEC: bit 4)
CC_GLOBAL, CC_DOMAIN, CC_DEVICE = 1, 2, 3
IOTLB_GLOBAL, IOTLB_DOMAIN, IOTLB_PAGE = 1, 2, 3
PIOTLB_PASID, PIOTLB_PAGE = 2, 3  # non-globals within PASID / page-selective within PASID
PC_DOMAIN, PC_PASID, PC_GLOBAL = 0, 1, 3

Field = tuple[str, int, int, int]  # name, qword, shift, width

LAYOUTS: dict[int, tuple[Field, ...]] = {
    CC: (
        ("g", 0, 4, 2),  # G: granularity
        ("did", 0, 16, 16),  # DID: domain-id
        ("sid", 0, 32, 16),  # SID: source-id
        ("fm", 0, 48, 2),  # FM: function mask
    ),
    IOTLB: (
        ("g", 0, 4, 2),  # G: granularity
        ("dw", 0, 6, 1),  # DW: drain writes
        ("dr", 0, 7, 1),  # DR: drain reads
        ("did", 0, 16, 16),  # DID: domain-id
        ("am", 1, 0, 6),  # AM: address mask (2^AM pages)
        ("ih", 1, 6, 1),  # IH: invalidation hint (leaf only)
        ("addr", 1, 12, 52),  # ADDR: page address >> 12
    ),
    DEV_TLB: (
        ("pfsid_lo", 0, 12, 4),  # PFSID 3:0: physical function source-id
        ("qdep", 0, 16, 5),  # MIP: max invalidations pending (Linux: the ATS queue depth)
        ("sid", 0, 32, 16),  # SID: source-id of the endpoint
        ("pfsid_hi", 0, 52, 12),  # PFSID 15:4
        ("size", 1, 0, 1),  # S: size (address encodes the range)
        ("addr", 1, 12, 52),  # ADDR
    ),
    IEC: (
        ("g", 0, 4, 1),  # G: 0 global, 1 index-selective
        ("im", 0, 27, 5),  # IM: index mask
        ("iidx", 0, 32, 16),  # IIDX: interrupt index
    ),
    WAIT: (
        ("iflag", 0, 4, 1),  # IF: interrupt flag (sets ICS.IWC)
        ("sw", 0, 5, 1),  # SW: status write
        ("fn", 0, 6, 1),  # FN: fence
        ("pd", 0, 7, 1),  # PD: page-request drain
        ("status_data", 0, 32, 32),  # Status Data
        ("status_addr", 1, 2, 62),  # Status Address 63:2 (dword aligned)
    ),
    PIOTLB: (
        ("g", 0, 4, 2),  # G: granularity
        ("did", 0, 16, 16),  # DID
        ("pasid", 0, 32, 20),  # PASID
        ("am", 1, 0, 6),  # AM
        ("ih", 1, 6, 1),  # IH
        ("addr", 1, 12, 52),  # ADDR
    ),
    PC: (
        ("g", 0, 4, 2),  # G: granularity
        ("did", 0, 16, 16),  # DID
        ("pasid", 0, 32, 20),  # PASID
    ),
    PDEV_TLB: (
        ("qdep", 0, 4, 5),  # MIP: max invalidations pending (Linux: the ATS queue depth)
        ("pfsid_lo", 0, 12, 4),  # PFSID 3:0
        ("sid", 0, 16, 16),  # SID: source-id
        ("pasid", 0, 32, 20),  # PASID
        ("pfsid_hi", 0, 52, 12),  # PFSID 15:4
        ("global_", 1, 0, 1),  # G: global (all PASIDs' globals)
        ("size", 1, 11, 1),  # S: size
        ("addr", 1, 12, 52),  # ADDR
    ),
    PGRP_RESP: (
        ("pasid_p", 0, 4, 1),  # PASID present in the request being answered
        ("code", 0, 12, 4),  # response code: 0 success, 1 invalid request, 0xF failure
        ("rid", 0, 16, 16),  # requester-id of the device
        ("pasid", 0, 32, 20),  # PASID of the request
        ("prgi", 1, 3, 9),  # page request group index
    ),
}

# Page group response codes (PCI PRG response; Linux QI_RESP_*).
RESP_SUCCESS, RESP_INVALID, RESP_FAILURE = 0x0, 0x1, 0xF

VALID_G: dict[int, frozenset[int]] = {
    CC: frozenset({CC_GLOBAL, CC_DOMAIN, CC_DEVICE}),
    IOTLB: frozenset({IOTLB_GLOBAL, IOTLB_DOMAIN, IOTLB_PAGE}),
    PIOTLB: frozenset({PIOTLB_PASID, PIOTLB_PAGE}),
    PC: frozenset({PC_DOMAIN, PC_PASID, PC_GLOBAL}),
}

_U64 = (1 << 64) - 1


def _used_masks(fields: tuple[Field, ...]) -> tuple[int, int]:
    used = [0xF, 0]  # the low type bits of qword 0
    for _name, qword, shift, width in fields:
        used[qword] |= ((1 << width) - 1) << shift
    return used[0], used[1]


RSVD: dict[int, tuple[int, int]] = {
    t: (_U64 & ~u0, _U64 & ~u1) for t, (u0, u1) in ((t, _used_masks(f)) for t, f in LAYOUTS.items())
}


class InvalidDescriptor(Exception):
    """Hardware would set FSTS.IQE and stop at this descriptor."""


@attrs.frozen
class Descriptor:
    """One decoded descriptor: ``type`` plus the named fields of its layout."""

    type: int
    fields: dict[str, int] = attrs.field(factory=dict, hash=False)

    def __getitem__(self, name: str) -> int:
        return self.fields.get(name, 0)

    def encode(self, width: int = 128) -> bytes:
        q = [self.type & 0xF | (self.type >> 4) << 9, 0]
        for name, qword, shift, size in LAYOUTS.get(self.type, ()):
            q[qword] |= (self.fields.get(name, 0) & ((1 << size) - 1)) << shift
        raw = q[0].to_bytes(8, "little") + q[1].to_bytes(8, "little")
        return raw + bytes(16) if width == 256 else raw


def make(type_: int, **fields: int) -> Descriptor:
    """Build a descriptor; unknown field names are a programming error."""
    names = {f[0] for f in LAYOUTS[type_]}
    unknown = set(fields) - names
    if unknown:
        raise ValueError(f"descriptor type {type_:#x} has no field(s) {sorted(unknown)}")
    return Descriptor(type_, dict(fields))


def decode(raw: bytes) -> Descriptor:
    """Decode 16 or 32 bytes, or raise :class:`InvalidDescriptor`."""
    q0 = int.from_bytes(raw[0:8], "little")
    q1 = int.from_bytes(raw[8:16], "little")
    type_ = (q0 & 0xF) | ((q0 >> 9) & 7) << 4
    layout = LAYOUTS.get(type_)
    if layout is None:
        raise InvalidDescriptor(f"unknown descriptor type {type_:#x}")
    r0, r1 = RSVD[type_]
    if q0 & r0 or q1 & r1 or any(raw[16:]):
        raise InvalidDescriptor(f"reserved bits set in a type {type_:#x} descriptor")
    qs = (q0, q1)
    fields = {name: (qs[qw] >> shift) & ((1 << size) - 1) for name, qw, shift, size in layout}
    valid = VALID_G.get(type_)
    if valid is not None and fields["g"] not in valid:
        raise InvalidDescriptor(f"reserved granularity {fields['g']} in type {type_:#x}")
    return Descriptor(type_, fields)


# Widest address mask (AM) an invalidation can carry: MAX_AGAW_PFN_WIDTH in the kernel.
MAX_AGAW_PFN_WIDTH = 52


def psi_aligned(start: int, end: int) -> tuple[int, int]:
    """calculate_psi_aligned_address() (Linux 7.2 cache.c): ``(addr, order)`` of the smallest
    naturally aligned 2^order-page block holding ``[start, end]``; order
    :data:`MAX_AGAW_PFN_WIDTH` (address 0) when it would span the whole 64-bit space."""
    start &= ~0xFFF & _U64
    size_lg2 = (start ^ end).bit_length()
    if size_lg2 <= 12:
        return start, 0
    if size_lg2 >= 64:
        return 0, MAX_AGAW_PFN_WIDTH
    return start & ~((1 << size_lg2) - 1), size_lg2 - 12


def devtlb_range(addr: int, order: int) -> tuple[int, int]:
    """The ADDR and S fields of a device-TLB descriptor for 2^order pages at ``addr`` (PCIe
    ATS range encoding, as qi_desc_dev_iotlb{,_pasid}() build it): with S = 1 the lowest 0
    bit of ADDR above bit 11 gives the size; ``order`` 52 (the whole space) is
    0x7FFFF_FFFF_FFFF. Returns ``(addr >> 12, size)``."""
    if not order:
        return (addr & _U64) >> 12, 0
    field = (addr | ((1 << (11 + order)) - 1)) & _U64 & ~0xFFF  # bits 12..order+10 set
    return field >> 12, 1
