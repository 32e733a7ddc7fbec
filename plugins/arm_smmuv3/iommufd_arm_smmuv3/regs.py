"""SMMUv3 page-0 registers at the architecture's offsets (IHI 0070, chapter 6), with side effects.

The register file is the framework's :class:`~iommufd_model.hw.regs.Mmio`; the hardware model
supplies the write handlers (:class:`RegisterSide`): CR0 is acknowledged in CR0ACK, a write to
CMDQ_PROD makes the SMMU consume commands, GERRORN acknowledges global errors, GBPA updates
complete at once.
"""

from __future__ import annotations

from typing import Protocol

from iommufd_model.hw.bits import bit, mask, put
from iommufd_model.hw.regs import Mmio

# -- offsets ------------------------------------------------------------------------------
IDR0 = 0x00
IDR1 = 0x04
IDR2 = 0x08
IDR3 = 0x0C
IDR4 = 0x10
IDR5 = 0x14
IIDR = 0x18
AIDR = 0x1C
CR0 = 0x20
CR0ACK = 0x24
CR1 = 0x28
CR2 = 0x2C
STATUSR = 0x40
GBPA = 0x44
IRQ_CTRL = 0x50
IRQ_CTRLACK = 0x54
GERROR = 0x60
GERRORN = 0x64
GERROR_IRQ_CFG0 = 0x68
STRTAB_BASE = 0x80
STRTAB_BASE_CFG = 0x88
CMDQ_BASE = 0x90
CMDQ_PROD = 0x98
CMDQ_CONS = 0x9C
EVENTQ_BASE = 0xA0
EVENTQ_PROD = 0xA8
EVENTQ_CONS = 0xAC
EVENTQ_IRQ_CFG0 = 0xB0
EVENTQ_IRQ_CFG1 = 0xB8
EVENTQ_IRQ_CFG2 = 0xBC
PRIQ_BASE = 0xC0  # the PRI queue (PROD/CONS on page 0 in this model, as the EVENTQ's)
PRIQ_PROD = 0xC8
PRIQ_CONS = 0xCC

# -- IDR0 ---------------------------------------------------------------------------------
IDR0_S2P = bit(0)  # stage-2 translation supported
IDR0_S1P = bit(1)  # stage-1 translation supported
IDR0_TTF_AARCH64 = put(2, 3, 2)  # TTF: AArch64 translation tables only
IDR0_COHACC = bit(4)  # coherent access to tables and queues
IDR0_HTTU_ACCESS = put(1, 7, 6)  # HTTU: hardware access-flag update
IDR0_HTTU_ACCESS_DIRTY = put(2, 7, 6)  # ... and dirty-state update (DBM)
IDR0_HTTU_SHIFT = 6
IDR0_HYP = bit(9)  # hypervisor stage 1 (EL2 StreamWorld, TLBI_EL2_*)
IDR0_ATS = bit(10)
IDR0_ASID16 = bit(12)
IDR0_MSI = bit(13)
IDR0_SEV = bit(14)
IDR0_VMID16 = bit(18)
IDR0_PRI = bit(16)  # page request interface: a PRI queue
IDR0_CD2L = bit(19)  # 2-level CD tables
IDR0_TTENDIAN_LE = put(2, 22, 21)  # little-endian tables only
IDR0_STALL_MODEL_SHIFT = 24  # bits 25:24
STALL_MODEL_STALL = 0  # stalling supported, per stream (CD.S / STE.S2S; STE.S1STALLD forbids)
STALL_MODEL_NONE = 1  # stalling not supported
STALL_MODEL_FORCE = 2  # faults always stall (CD.S / STE.S2S = 1)
IDR0_STALL_NONE = put(STALL_MODEL_NONE, 25, 24)
IDR0_STALL_FORCE = put(STALL_MODEL_FORCE, 25, 24)
IDR0_ST_LVL_2LVL = put(1, 28, 27)  # linear and 2-level stream tables

# -- IDR1 / IDR3 / IDR5 -----------------------------------------------------------------------
IDR1_SIDSIZE_SHIFT = 0  # bits 5:0
IDR1_SSIDSIZE_SHIFT = 6  # bits 10:6
IDR1_PRIQS_SHIFT = 11  # bits 15:11: log2 of the largest PRI queue
IDR1_EVTQS_SHIFT = 16  # bits 20:16: log2 of the largest event queue
IDR1_CMDQS_SHIFT = 21  # bits 25:21: log2 of the largest command queue
IDR1_ATTR_TYPES_OVR = bit(27)  # STE.SHCFG/MTCFG/ALLOCCFG overrides implemented
IDR3_FWB = bit(8)  # stage-2 forced write-back (STE.S2FWB)
IDR3_RIL = bit(10)  # range invalidation (TLBI NUM/SCALE/TG)
IDR5_OAS_48 = 5  # OAS bits 2:0: 48-bit physical addresses
IDR5_OAS_52 = 6  # 52-bit physical addresses
IDR5_GRAN4K = bit(4)
IDR5_GRAN16K = bit(5)
IDR5_GRAN64K = bit(6)
IDR5_VAX_52 = put(1, 11, 10)  # VAX: 52-bit virtual addresses (with the 64 KiB granule)
#: IDR5's granule bit of each granule (log2 of its size)
IDR5_GRAN = {12: IDR5_GRAN4K, 14: IDR5_GRAN16K, 16: IDR5_GRAN64K}

# -- control ------------------------------------------------------------------------------
CR0_SMMUEN = bit(0)
CR0_PRIQEN = bit(1)
CR0_EVTQEN = bit(2)
CR0_CMDQEN = bit(3)
CR0_ATSCHK = bit(4)
CR0_VMW = bit(6)
CR0_WRITABLE = CR0_SMMUEN | CR0_PRIQEN | CR0_EVTQEN | CR0_CMDQEN | CR0_ATSCHK | CR0_VMW
CR2_E2H = bit(0)
CR2_RECINVSID = bit(1)  # record C_BAD_STREAMID for invalid StreamIDs
CR2_PTM = bit(2)  # private TLB maintenance: broadcast TLBIs ignored
GBPA_ABORT = bit(20)
GBPA_UPDATE = bit(31)
IRQ_CTRL_GERROR_IRQEN = bit(0)
IRQ_CTRL_PRIQ_IRQEN = bit(1)
IRQ_CTRL_EVTQ_IRQEN = bit(2)

# -- global errors (toggle bits: active while GERROR differs from GERRORN) --------------------
GERROR_CMDQ_ERR = bit(0)
GERROR_EVTQ_ABT_ERR = bit(2)
GERROR_MSI_CMDQ_ABT_ERR = bit(4)
GERROR_ERR_MASK = 0x1FD

# -- tables and queues ------------------------------------------------------------------------
STRTAB_BASE_RA = bit(62)
STRTAB_BASE_ADDR = mask(51, 6)
STRTAB_CFG_FMT_LINEAR = 0  # STRTAB_BASE_CFG.FMT, bits 17:16
STRTAB_CFG_FMT_2LVL = 1
Q_BASE_RA = bit(62)  # RA / WA: read- or write-allocate hint
Q_BASE_ADDR = mask(51, 5)
Q_BASE_LOG2SIZE = mask(4, 0)
Q_OVERFLOW = bit(31)  # EVENTQ_PROD.OVFLG / EVENTQ_CONS.OVACKFLG
CMDQ_CONS_ERR_SHIFT = 24  # CMDQ_CONS.ERR, bits 30:24
CMDQ_CONS_ERR = mask(30, 24)
CERROR_NONE = 0
CERROR_ILL = 1
CERROR_ABT = 2
CERROR_ATC_INV_SYNC = 3


class RegisterSide(Protocol):
    """What the hardware does when software writes a register."""

    def cr0_written(self, old: int, new: int) -> None: ...
    def cmdq_prod_written(self, old: int, new: int) -> None: ...
    def gerrorn_written(self, old: int, new: int) -> None: ...
    def gbpa_written(self, old: int, new: int) -> None: ...
    def irq_ctrl_written(self, old: int, new: int) -> None: ...


def build(hw: RegisterSide, name: str, ids: dict[str, int]) -> Mmio:
    """The page-0 register file, ID registers from ``ids`` (IDR0..IDR5, IIDR, AIDR)."""
    mmio = Mmio(name)
    for reg_name, off in (
        ("IDR0", IDR0),
        ("IDR1", IDR1),
        ("IDR2", IDR2),
        ("IDR3", IDR3),
        ("IDR4", IDR4),
        ("IDR5", IDR5),
        ("IIDR", IIDR),
        ("AIDR", AIDR),
    ):
        mmio.define(reg_name, off, width=4, reset=ids.get(reg_name, 0), writable=0)
    mmio.define("CR0", CR0, width=4, writable=CR0_WRITABLE, on_write=hw.cr0_written)
    mmio.define("CR0ACK", CR0ACK, width=4, writable=0)
    mmio.define("CR1", CR1, width=4, writable=mask(11, 0))
    mmio.define("CR2", CR2, width=4, writable=mask(2, 0))
    mmio.define("STATUSR", STATUSR, width=4, writable=0)
    mmio.define("GBPA", GBPA, width=4, writable=GBPA_UPDATE | mask(20, 0), on_write=hw.gbpa_written)
    mmio.define("IRQ_CTRL", IRQ_CTRL, width=4, writable=mask(2, 0), on_write=hw.irq_ctrl_written)
    mmio.define("IRQ_CTRLACK", IRQ_CTRLACK, width=4, writable=0)
    mmio.define("GERROR", GERROR, width=4, writable=0)
    mmio.define("GERRORN", GERRORN, width=4, writable=GERROR_ERR_MASK, on_write=hw.gerrorn_written)
    mmio.define("GERROR_IRQ_CFG0", GERROR_IRQ_CFG0, writable=mask(51, 2))
    mmio.define("STRTAB_BASE", STRTAB_BASE, writable=STRTAB_BASE_RA | STRTAB_BASE_ADDR)
    mmio.define("STRTAB_BASE_CFG", STRTAB_BASE_CFG, width=4, writable=mask(17, 16) | mask(10, 0))
    mmio.define("CMDQ_BASE", CMDQ_BASE, writable=Q_BASE_RA | Q_BASE_ADDR | Q_BASE_LOG2SIZE)
    mmio.define(
        "CMDQ_PROD", CMDQ_PROD, width=4, writable=mask(19, 0), on_write=hw.cmdq_prod_written
    )
    mmio.define("CMDQ_CONS", CMDQ_CONS, width=4, writable=mask(19, 0))
    mmio.define("EVENTQ_BASE", EVENTQ_BASE, writable=Q_BASE_RA | Q_BASE_ADDR | Q_BASE_LOG2SIZE)
    mmio.define("EVENTQ_PROD", EVENTQ_PROD, width=4, writable=mask(19, 0))
    mmio.define("EVENTQ_CONS", EVENTQ_CONS, width=4, writable=Q_OVERFLOW | mask(19, 0))
    mmio.define("EVENTQ_IRQ_CFG0", EVENTQ_IRQ_CFG0, writable=mask(51, 2))
    mmio.define("EVENTQ_IRQ_CFG1", EVENTQ_IRQ_CFG1, width=4)
    mmio.define("EVENTQ_IRQ_CFG2", EVENTQ_IRQ_CFG2, width=4, writable=mask(5, 0))
    mmio.define("PRIQ_BASE", PRIQ_BASE, writable=Q_BASE_RA | Q_BASE_ADDR | Q_BASE_LOG2SIZE)
    mmio.define("PRIQ_PROD", PRIQ_PROD, width=4, writable=mask(19, 0))
    mmio.define("PRIQ_CONS", PRIQ_CONS, width=4, writable=Q_OVERFLOW | mask(19, 0))
    return mmio


def idr0_httu(*, access: bool, dirty: bool) -> int:
    """IDR0.HTTU of an SMMU that updates the access flag (1) and also the dirty state (2);
    dirty-state update implies access-flag update (IHI 0070: HTTU 0b10)."""
    return IDR0_HTTU_ACCESS_DIRTY if dirty else IDR0_HTTU_ACCESS if access else 0


def dbm_capable(idr0: int) -> bool:
    """Linux 7.2 ``arm_smmu_dbm_capable()``: ARM_SMMU_FEAT_HD (``arm_smmu_get_httu()``: HTTU
    0b10 or above) and ARM_SMMU_FEAT_COHERENCY (IDR0.COHACC). Everything that declares dirty
    tracking follows it: IOMMU_CAP_DIRTY_TRACKING (hw_info, the core's DIRTY_TRACKING alloc
    check) and the matrix's option sets (``option_sets.py``)."""
    return (idr0 >> IDR0_HTTU_SHIFT) & 3 >= 2 and bool(idr0 & IDR0_COHACC)
