"""Page request descriptors (VT-d spec: the page request queue) and their codec.

A device with PRI sends a PCIe Page Request message; the remapping hardware writes it to the
page request queue (PQA) as a 256-bit descriptor at PQT. The layout is the one Linux 7.2's
``struct page_req_dsc`` (prq.c) reads: qword 0 holds the type, PASID present, requester-id,
PASID, execute and privileged-mode requested; qword 1 read/write requested, LPIG (last page
in group), the page request group index and the page address; qwords 2-3 the device's
private data.
"""

from __future__ import annotations

import attrs

ENTRY_SIZE = 32  # bytes per page request descriptor
TYPE_PAGE_REQUEST = 0x1  # spec: page request descriptor (the model never writes another type)
PRQ_ORDER = 4  # Linux: 2^4 pages of queue (PRQ_SIZE 64 KiB, 2048 descriptors)
PQS_MASK = 0x7  # PQA bits 2:0: queue size, 2^PQS 4 KiB pages
PQ_OFFSET_MASK = 0x7FFE0  # PQH/PQT bits 18:5: byte offset of a descriptor


@attrs.frozen
class PageRequest:
    """One page request as the hardware queues it."""

    rid: int
    addr: int  # page address (bits 63:12 kept)
    pasid: int | None = None  # None: request without PASID
    read: bool = True
    write: bool = False
    exe: bool = False
    priv: bool = False  # privileged-mode requested
    lpig: bool = True  # last page in group
    prgi: int = 0  # page request group index (9 bits)
    private: tuple[int, int] = (0, 0)  # qwords 2 and 3, passed through

    def encode(self) -> bytes:
        q0 = (
            TYPE_PAGE_REQUEST
            | int(self.pasid is not None) << 8
            | (self.rid & 0xFFFF) << 16
            | ((self.pasid or 0) & 0xFFFFF) << 32
            | int(self.exe) << 52
            | int(self.priv) << 53
        )
        q1 = (
            int(self.read)
            | int(self.write) << 1
            | int(self.lpig) << 2
            | (self.prgi & 0x1FF) << 3
            | (self.addr & ~0xFFF & ((1 << 64) - 1))
        )
        qs = (q0, q1, *self.private)
        return b"".join(q.to_bytes(8, "little") for q in qs)

    @classmethod
    def decode(cls, raw: bytes) -> PageRequest:
        q0, q1, q2, q3 = (int.from_bytes(raw[i : i + 8], "little") for i in range(0, 32, 8))
        return cls(
            rid=(q0 >> 16) & 0xFFFF,
            addr=q1 & ~0xFFF,
            pasid=(q0 >> 32) & 0xFFFFF if q0 >> 8 & 1 else None,
            read=bool(q1 & 1),
            write=bool(q1 >> 1 & 1),
            exe=bool(q0 >> 52 & 1),
            priv=bool(q0 >> 53 & 1),
            lpig=bool(q1 >> 2 & 1),
            prgi=(q1 >> 3) & 0x1FF,
            private=(q2, q3),
        )


@attrs.frozen
class PageGroupResponse:
    """What the device received: a page group response (descriptor type 0x9) the hardware
    forwarded, or the one it generated itself for a request it could not queue."""

    rid: int
    pasid: int | None
    prgi: int
    code: int  # 0 success, 1 invalid request, 0xF response failure
    by_hardware: bool = False
