"""Peripheral page requests (PPR): the 16-byte PPR log entry as the AMD IOMMU writes it and the
Linux 7.2 driver decodes it (amd_iommu_types.h ``PPR_*``), the hardware's side of a device's
PCIe Page Request, and the driver's PPR log handler (ppr.c ``amd_iommu_poll_ppr_log`` /
``iommu_call_iopf_notifier``).

Through iommufd on Linux 7.2 no request reaches a fault queue: the driver aborts requests
without a PASID (PASID 0) or with GN=0, and the fault framework looks for a handler on the
request's PASID, where iommufd can attach nothing on AMD (no ``set_dev_pasid`` on paging
domains, no ``user_pasid_table``), so ``iopf_error_response()`` answers it INVALID.
"""

from __future__ import annotations

import struct

import attrs

from iommufd_model.hw.pci import PageRequest

PPR_REQ_FAULT = 0x1  # PPR_REQ_FAULT: the only request type the driver handles
PPR_FLAG_EXEC = 0x002
PPR_FLAG_READ = 0x004
PPR_FLAG_WRITE = 0x020
PPR_FLAG_US = 0x040  # user (else supervisor)
PPR_FLAG_RVSD = 0x080  # reserved bit set
PPR_FLAG_GN = 0x100  # PASID valid
TAG_LAST = 0x200  # tag bit 9: last request of the group (IOMMU_FAULT_PAGE_REQUEST_LAST_PAGE)
# enum iommu_page_response_code (include/linux/iommu.h)
RESP_SUCCESS, RESP_INVALID, RESP_FAILURE = 0, 1, 2
_Q = struct.Struct("<2Q")


@attrs.frozen
class PprEntry:
    """One PPR log entry: DeviceID [15:0], PASID[15:0] at [31:16], tag [41:32] (group index
    [40:32], last bit 41), PASID[19:16] at [45:42], flags [59:48], type [63:60]; the address
    in the second quadword."""

    devid: int
    pasid: int
    tag: int
    flags: int
    address: int
    req_type: int = PPR_REQ_FAULT

    def to_bytes(self) -> bytes:
        w0 = (
            (self.devid & 0xFFFF)
            | (self.pasid & 0xFFFF) << 16
            | (self.tag & 0x3FF) << 32
            | ((self.pasid >> 16) & 0xF) << 42
            | (self.flags & 0xFFF) << 48
            | (self.req_type & 0xF) << 60
        )
        return _Q.pack(w0, self.address & (2**64 - 1))

    @classmethod
    def from_bytes(cls, raw: bytes) -> PprEntry:
        w0, w1 = _Q.unpack(raw)
        return cls(
            devid=w0 & 0xFFFF,
            pasid=((w0 >> 42) & 0xF) << 16 | (w0 >> 16) & 0xFFFF,
            tag=(w0 >> 32) & 0x3FF,
            flags=(w0 >> 48) & 0xFFF,
            address=w1,
            req_type=(w0 >> 60) & 0xF,
        )


def request_flags(req: PageRequest) -> int:
    """The PPR flags a PCIe page request carries: GN when it has a PASID, US for a
    user-mode (not privileged) request."""
    return (
        (PPR_FLAG_GN if req.pasid is not None else 0)
        | (PPR_FLAG_READ if req.read else 0)
        | (PPR_FLAG_WRITE if req.write else 0)
        | (PPR_FLAG_EXEC if req.exe else 0)
        | (0 if req.priv else PPR_FLAG_US)
    )
