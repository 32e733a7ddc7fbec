"""DMA-remapping fault reasons (VT-d spec 7.1.3) and the fault record the hardware keeps.

The hardware runs in scalable mode only, so every reason is a scalable-mode code (0x30 and
up); the numbering is the one Linux 7.2 decodes in ``dma_remap_sm_fault_reasons``
(drivers/iommu/intel/dmar.c), which follows the spec's table: root (SRT 0x38-0x3A), context
(SCT 0x40-0x48), PASID directory (SPD 0x50-0x52), PASID table (SPT 0x58-0x5D), first stage
(SFS 0x70-0x77), second stage (SSS 0x78-0x7C) and general (SGN 0x80-0x87).
Which condition the model maps to which code where the spec allows several is the model's
own reading and is noted beside the constant.
"""

from __future__ import annotations

import attrs

from iommufd_intel_vtd import regs as R

# Root table.
FR_SM_RTADDR_TTM = 0x31  # TTM 0 (legacy) for a request the model only translates in scalable mode
FR_SM_PRQ_TTM = 0x32  # TTM 0 for a page group request
FR_SM_ROOT_ACCESS = 0x38  # root-entry fetch failed
FR_SM_ROOT_NOT_PRESENT = 0x39  # UP/LP of the root entry is 0
FR_SM_ROOT_RSVD = 0x3A  # reserved bit set in a present root entry
# Context table.
FR_SM_CTX_ACCESS = 0x40  # context-entry fetch failed
FR_SM_CTX_NOT_PRESENT = 0x41  # P of the scalable-mode context entry is 0
FR_SM_CTX_RSVD = 0x42  # reserved bit set in a present context entry
FR_SM_CTX_PASIDE = 0x45  # request with PASID while the context entry's PASIDE is 0
FR_SM_CTX_PASID_TOO_LARGE = 0x46  # PASID beyond the directory the context entry's PDTS sizes
FR_SM_CTX_PRE = 0x47  # page request while the context entry's PRE is 0
# PASID directory.
FR_PASID_DIR_ACCESS = 0x50  # PASID-directory entry fetch failed
FR_PASID_DIR_NOT_PRESENT = 0x51  # P of the PASID-directory entry is 0
FR_PASID_DIR_RSVD = 0x52  # reserved bit (11:2) set in a present PASID-directory entry
# PASID table.
FR_PASID_TABLE_ACCESS = 0x58  # PASID-table entry fetch failed
FR_PASID_NOT_PRESENT = 0x59  # P of the PASID-table entry is 0
FR_PASID_ENTRY_RSVD = 0x5A  # reserved bit set in a present PASID-table entry
FR_PASID_ENTRY_INVALID = 0x5B  # reserved PGTT, an AW or FSPM the hardware lacks
# First stage.
FR_FS_ACCESS = 0x70  # first-stage paging entry fetch failed
FR_FS_NOT_PRESENT = 0x71  # P of a first-stage paging entry is 0
FR_FS_RSVD = 0x72  # reserved bit (PS at PML4/PML5, PS at PDPE without FL1GP) set
FR_FS_NESTED_BEYOND_AW = 0x74  # nested: a first-stage pointer/output beyond the 2nd-stage AW
# Second stage.
FR_SS_ACCESS = 0x78  # second-stage paging entry fetch failed
FR_SS_NOT_PRESENT = 0x79  # R and W of a second-stage paging entry are 0
FR_SS_RSVD = 0x7A  # reserved bit (e.g. PS where SLLPS has no such size)
# General.
FR_FS_NON_CANONICAL = 0x80  # first-stage input address not canonical for FSPM
FR_FS_USER = 0x81  # user request through a first-stage entry with U/S = 0
FR_ADDR_BEYOND_AW = 0x83  # input address beyond the address width (2nd-stage AW, PT: memory)
FR_WRITE = 0x85  # no write permission for a write request
FR_READ = 0x86  # no read permission for a read request

REASON_TEXT = {
    FR_SM_RTADDR_TTM: "TTM 0 for a request in scalable-mode-only hardware",
    FR_SM_PRQ_TTM: "TTM 0 for a page group request",
    FR_SM_ROOT_ACCESS: "root entry fetch failed",
    FR_SM_ROOT_NOT_PRESENT: "root entry not present",
    FR_SM_ROOT_RSVD: "root entry reserved bit set",
    FR_SM_CTX_ACCESS: "context entry fetch failed",
    FR_SM_CTX_NOT_PRESENT: "context entry not present",
    FR_SM_CTX_RSVD: "context entry reserved bit set",
    FR_SM_CTX_PASIDE: "request with PASID, context entry PASIDE is 0",
    FR_SM_CTX_PASID_TOO_LARGE: "PASID beyond the context entry's PASID directory",
    FR_SM_CTX_PRE: "page request, context entry PRE is 0",
    FR_PASID_DIR_ACCESS: "PASID directory entry fetch failed",
    FR_PASID_DIR_NOT_PRESENT: "PASID directory entry not present",
    FR_PASID_DIR_RSVD: "PASID directory entry reserved bit set",
    FR_PASID_TABLE_ACCESS: "PASID table entry fetch failed",
    FR_PASID_NOT_PRESENT: "PASID entry not present",
    FR_PASID_ENTRY_RSVD: "PASID entry reserved bit set",
    FR_PASID_ENTRY_INVALID: "PASID entry invalid",
    FR_FS_ACCESS: "first-stage entry fetch failed",
    FR_FS_NOT_PRESENT: "first-stage entry not present",
    FR_FS_RSVD: "first-stage entry reserved bit set",
    FR_FS_NESTED_BEYOND_AW: "first-stage address beyond the second-stage width (nested)",
    FR_SS_ACCESS: "second-stage entry fetch failed",
    FR_SS_NOT_PRESENT: "second-stage entry not present",
    FR_SS_RSVD: "second-stage entry reserved bit set",
    FR_FS_NON_CANONICAL: "first-stage address not canonical",
    FR_FS_USER: "user request, first-stage U/S is 0",
    FR_ADDR_BEYOND_AW: "input address beyond the address width",
    FR_WRITE: "write permission denied",
    FR_READ: "read permission denied",
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
