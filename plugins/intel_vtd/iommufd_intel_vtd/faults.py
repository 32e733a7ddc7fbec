"""DMA-remapping fault reasons (VT-d spec 7.1.3) and the fault record the hardware keeps.

Scalable-mode lookups use the legacy codes where the condition is the same (address width,
read/write permission) and the scalable-mode codes for the root, context, PASID-directory,
PASID-table and first/second-stage conditions. The PASID codes (0x50/0x51/0x58/0x59/0x5B)
and the non-canonical code (0x80) match QEMU's emulation; the other scalable-mode codes are
the model's reading of the spec table and are named so that a correction is one line.
"""

from __future__ import annotations

import attrs

from iommufd_intel_vtd import regs as R

# Legacy (also used in scalable mode for the same condition).
FR_ADDR_BEYOND_MGAW = 0x04  # input address above the address width
FR_WRITE = 0x05  # write to a page without write permission
FR_READ = 0x06  # read of a page without read permission
# Scalable mode: root table (SRT), context table (SCT).
FR_SM_RTADDR_TTM = 0x31  # RTADDR.TTM programmed to a reserved / unmodelled mode
FR_SM_ROOT_ACCESS = 0x38  # root-entry fetch failed
FR_SM_ROOT_NOT_PRESENT = 0x39  # UP/LP of the root entry is 0
FR_SM_ROOT_RSVD = 0x3A  # reserved bit set in a present root entry
FR_SM_CTX_ACCESS = 0x40  # context-entry fetch failed
FR_SM_CTX_NOT_PRESENT = 0x41  # P of the scalable-mode context entry is 0
FR_SM_CTX_RSVD = 0x42  # reserved bit set in a present context entry
# PASID directory (SPD) and PASID table (SPT).
FR_PASID_DIR_ACCESS = 0x50  # PASID-directory entry fetch failed
FR_PASID_DIR_NOT_PRESENT = 0x51  # P of the PASID-directory entry is 0 (or PASID beyond PDTS)
FR_PASID_TABLE_ACCESS = 0x58  # PASID-table entry fetch failed
FR_PASID_NOT_PRESENT = 0x59  # P of the PASID-table entry is 0
FR_PASID_ENTRY_INVALID = 0x5B  # reserved PGTT / AW / bits in a present PASID entry
# First stage (SFS), second stage (SSS), general (SGN).
FR_FS_ACCESS = 0x70  # first-stage paging entry fetch failed
FR_FS_NOT_PRESENT = 0x71  # P of a first-stage paging entry is 0
FR_FS_RSVD = 0x72  # reserved bit (e.g. PS at PML4) in a first-stage entry
FR_SS_ACCESS = 0x78  # second-stage paging entry fetch failed
FR_SS_NOT_PRESENT = 0x79  # R and W of a second-stage paging entry are 0
FR_SS_RSVD = 0x7A  # reserved bit (e.g. PS where large pages are not supported)
FR_FS_NON_CANONICAL = 0x80  # first-stage input address not canonical / above FSPM width

REASON_TEXT = {
    FR_ADDR_BEYOND_MGAW: "input address above the address width",
    FR_WRITE: "write permission denied",
    FR_READ: "read permission denied",
    FR_SM_RTADDR_TTM: "RTADDR.TTM is not scalable mode",
    FR_SM_ROOT_ACCESS: "root entry fetch failed",
    FR_SM_ROOT_NOT_PRESENT: "root entry not present",
    FR_SM_ROOT_RSVD: "root entry reserved bit set",
    FR_SM_CTX_ACCESS: "context entry fetch failed",
    FR_SM_CTX_NOT_PRESENT: "context entry not present",
    FR_SM_CTX_RSVD: "context entry reserved bit set",
    FR_PASID_DIR_ACCESS: "PASID directory entry fetch failed",
    FR_PASID_DIR_NOT_PRESENT: "PASID directory entry not present",
    FR_PASID_TABLE_ACCESS: "PASID table entry fetch failed",
    FR_PASID_NOT_PRESENT: "PASID entry not present",
    FR_PASID_ENTRY_INVALID: "PASID entry invalid",
    FR_FS_ACCESS: "first-stage entry fetch failed",
    FR_FS_NOT_PRESENT: "first-stage entry not present",
    FR_FS_RSVD: "first-stage entry reserved bit set",
    FR_SS_ACCESS: "second-stage entry fetch failed",
    FR_SS_NOT_PRESENT: "second-stage entry not present",
    FR_SS_RSVD: "second-stage entry reserved bit set",
    FR_FS_NON_CANONICAL: "first-stage address not canonical",
}


class TableFault(Exception):
    """A structure lookup (root / context / PASID) failed with a spec fault reason."""

    def __init__(self, reason: int, fpd: bool = False) -> None:
        super().__init__(f"fault reason {reason:#x}: {REASON_TEXT.get(reason, '?')}")
        self.reason = reason
        self.fpd = fpd  # fault processing disabled by the entry that was reached


@attrs.frozen
class FaultRecord:
    """One primary fault record as the fault recording registers hold it."""

    sid: int  # requester source-id (RID)
    addr: int  # faulting page address (FI)
    reason: int  # FR
    write: bool  # T = 0
    pasid: int | None  # PP / PV

    def encode(self) -> tuple[int, int]:
        """``(lo, hi)`` qwords of the FRCD register with F set."""
        hi = (self.sid & R.FRCD_HI_SID_MASK) | self.reason << R.FRCD_HI_FR_SHIFT | R.FRCD_HI_F
        if not self.write:
            hi |= R.FRCD_HI_T
        if self.pasid is not None:
            hi |= R.FRCD_HI_PP | (self.pasid & 0xFFFFF) << R.FRCD_HI_PV_SHIFT
        return self.addr & ~0xFFF, hi

    @classmethod
    def decode(cls, lo: int, hi: int) -> FaultRecord:
        pasid = (hi >> R.FRCD_HI_PV_SHIFT) & 0xFFFFF if hi & R.FRCD_HI_PP else None
        return cls(
            sid=hi & R.FRCD_HI_SID_MASK,
            addr=lo & ~0xFFF,
            reason=(hi >> R.FRCD_HI_FR_SHIFT) & 0xFF,
            write=not hi & R.FRCD_HI_T,
            pasid=pasid,
        )
