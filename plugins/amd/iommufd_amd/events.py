"""Event log entries (spec "Event Log"; kernel EVENT_TYPE_* / EVENT_* and iommu_print_event()).

An entry is 128 bits, four little-endian u32 words:
word 0: DeviceID[15:0], PASID[19:16] at [19:16] (EVENT_DOMID_MASK_HI);
word 1: PASID[15:0] or DomainID[15:0] (EVENT_DOMID_MASK_LO), Flags[27:16], EventCode[31:28];
words 2-3: Address[63:0] (the faulting IOVA, the DTE / table / command address).

INVALID_PPR_REQUEST (0x9) lays its first 64 bits out as a PPR log entry, as Linux 7.2's
iommu_print_event() decodes it with the PPR_* macros: PASID[15:0] at word 0 [31:16], the
request's tag at word 1 [9:0], PASID[19:16] at word 1 [13:10]; Flags and EventCode as above.
"""

from __future__ import annotations

import struct

import attrs

ILLEGAL_DEV_TABLE_ENTRY = 0x1  # EVENT_TYPE_ILL_DEV
IO_PAGE_FAULT = 0x2  # EVENT_TYPE_IO_FAULT
DEV_TAB_HARDWARE_ERROR = 0x3  # EVENT_TYPE_DEV_TAB_ERR
PAGE_TAB_HARDWARE_ERROR = 0x4  # EVENT_TYPE_PAGE_TAB_ERR
ILLEGAL_COMMAND_ERROR = 0x5  # EVENT_TYPE_ILL_CMD
COMMAND_HARDWARE_ERROR = 0x6  # EVENT_TYPE_CMD_HARD_ERR
IOTLB_INV_TIMEOUT = 0x7  # EVENT_TYPE_IOTLB_INV_TO
INVALID_DEVICE_REQUEST = 0x8  # EVENT_TYPE_INV_DEV_REQ
INVALID_PPR_REQUEST = 0x9  # EVENT_TYPE_INV_PPR_REQ
# HW-vIOMMU (AMD's tree amd_iommu_types.h EVENT_TYPE_GUEST_EVENT_FAULT / EVENT_TYPE_VIOMMU_HW_ERR):
# a guest event could not be written to the guest's log; the PAS could not be reached.
GUEST_EVENT_FAULT = 0xB
VIOMMU_HW_ERROR = 0xC

NAMES = {
    ILLEGAL_DEV_TABLE_ENTRY: "ILLEGAL_DEV_TABLE_ENTRY",
    IO_PAGE_FAULT: "IO_PAGE_FAULT",
    DEV_TAB_HARDWARE_ERROR: "DEV_TAB_HARDWARE_ERROR",
    PAGE_TAB_HARDWARE_ERROR: "PAGE_TAB_HARDWARE_ERROR",
    ILLEGAL_COMMAND_ERROR: "ILLEGAL_COMMAND_ERROR",
    COMMAND_HARDWARE_ERROR: "COMMAND_HARDWARE_ERROR",
    IOTLB_INV_TIMEOUT: "IOTLB_INV_TIMEOUT",
    INVALID_DEVICE_REQUEST: "INVALID_DEVICE_REQUEST",
    INVALID_PPR_REQUEST: "INVALID_PPR_REQUEST",
    GUEST_EVENT_FAULT: "GUEST_EVENT_FAULT",
    VIOMMU_HW_ERROR: "VIOMMU_HW_ERROR",
}

# Flags[11:0] (word 1 [27:16]) of IO_PAGE_FAULT and friends
F_GN = 0x001  # GN: PASID field valid (guest request)
F_NX = 0x002  # NX: execute access
F_US = 0x004  # US: user access
F_I = 0x008  # I: interrupt request (EVENT_FLAG_I)
F_PR = 0x010  # PR: the page was present (permission fault)
F_RW = 0x020  # RW: write access (EVENT_FLAG_RW)
F_PE = 0x040  # PE: permission violation
F_RZ = 0x080  # RZ: reserved bit / illegal level encoding in a table entry
F_TR = 0x100  # TR: translation request (ATS)
TYPE_SHIFT = 9  # hardware-error events: Type[10:9] of the failing access
HWERR_TYPE_READ = 1  # "master abort" style read of a table or buffer

EVENT_SIZE = 16
_W = struct.Struct("<4I")


@attrs.frozen
class Event:
    code: int
    devid: int = 0
    tag: int = 0  # PASID (GN=1) or DomainID (GN=0); the full 20-bit PASID when GN
    flags: int = 0
    address: int = 0
    #: INVALID_PPR_REQUEST only: the refused request's PPR tag (group index, last bit 9).
    ppr_tag: int = 0

    @property
    def name(self) -> str:
        return NAMES.get(self.code, f"EVENT_{self.code:#x}")

    @property
    def write(self) -> bool:
        return bool(self.flags & F_RW)

    def to_bytes(self) -> bytes:
        if self.code == INVALID_PPR_REQUEST:
            w0 = (self.devid & 0xFFFF) | (self.tag & 0xFFFF) << 16
            w1 = (self.ppr_tag & 0x3FF) | ((self.tag >> 16) & 0xF) << 10
        else:
            w0 = (self.devid & 0xFFFF) | (self.tag & 0xF0000)
            w1 = self.tag & 0xFFFF
        w1 |= (self.flags & 0xFFF) << 16 | (self.code & 0xF) << 28
        return _W.pack(w0, w1, self.address & 0xFFFF_FFFF, (self.address >> 32) & 0xFFFF_FFFF)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Event:
        w0, w1, w2, w3 = _W.unpack(raw)
        if w1 >> 28 == INVALID_PPR_REQUEST:
            return cls(
                code=INVALID_PPR_REQUEST,
                devid=w0 & 0xFFFF,
                tag=((w1 >> 10) & 0xF) << 16 | w0 >> 16,
                flags=(w1 >> 16) & 0xFFF,
                address=(w3 << 32) | w2,
                ppr_tag=w1 & 0x3FF,
            )
        return cls(
            code=w1 >> 28,
            devid=w0 & 0xFFFF,
            tag=(w0 & 0xF0000) | (w1 & 0xFFFF),
            flags=(w1 >> 16) & 0xFFF,
            address=(w3 << 32) | w2,
        )
