"""VT-d remapping-hardware registers (VT-d spec chapter 11): offsets, CAP/ECAP fields, bits.

Only the fields the model implements are named. The register file itself is the framework's
``regs.Mmio``; :func:`define_registers` lays the VT-d registers out at their offsets and wires
the writes that have side effects (GCMD, CCMD, IQT, FSTS, the fault recording registers) to
the hardware model.
"""

from __future__ import annotations

from collections.abc import Callable

from iommufd_model.hw.regs import Mmio

# -- offsets (spec 11.4) ---------------------------------------------------------------------
VER = 0x00  # Version Register
CAP = 0x08  # Capability Register
ECAP = 0x10  # Extended Capability Register
GCMD = 0x18  # Global Command Register (32-bit)
GSTS = 0x1C  # Global Status Register (32-bit)
RTADDR = 0x20  # Root Table Address Register
CCMD = 0x28  # Context Command Register
FSTS = 0x34  # Fault Status Register (32-bit)
FECTL = 0x38  # Fault Event Control Register (32-bit)
FEDATA = 0x3C  # Fault Event Data Register (32-bit)
FEADDR = 0x40  # Fault Event Address Register (32-bit)
FEUADDR = 0x44  # Fault Event Upper Address Register (32-bit)
IQH = 0x80  # Invalidation Queue Head
IQT = 0x88  # Invalidation Queue Tail
IQA = 0x90  # Invalidation Queue Address
ICS = 0x9C  # Invalidation Completion Status (32-bit)
IECTL = 0xA0  # Invalidation Completion Event Control (32-bit)
PQH = 0xC0  # Page Request Queue Head
PQT = 0xC8  # Page Request Queue Tail
PQA = 0xD0  # Page Request Queue Address
PRS_REG = 0xDC  # Page Request Status (32-bit)
FRCD_OFFSET = 0x200  # where the model puts the fault recording registers (CAP.FRO * 16)

VERSION = 0x60  # major 6, minor 0 (scalable mode hardware)

# -- CAP fields (spec 11.4.2) ----------------------------------------------------------------
CAP_ND_SHIFT = 0  # ND: number of domains supported, 2^(4 + 2*ND)
CAP_CM = 1 << 7  # CM: caching mode (not-present entries may be cached)
CAP_SAGAW_SHIFT = 8  # SAGAW 12:8: bit1 39-bit/3-level, bit2 48-bit/4-level, bit3 57-bit/5-level
CAP_MGAW_SHIFT = 16  # MGAW 21:16: maximum guest address width - 1
CAP_FRO_SHIFT = 24  # FRO 33:24: fault recording register offset, in 16-byte units
CAP_SLLPS_SHIFT = 34  # SLLPS 37:34: second-stage large pages, bit0 2 MiB, bit1 1 GiB
CAP_PSI = 1 << 39  # PSI: page-selective invalidation
CAP_NFR_SHIFT = 40  # NFR 47:40: number of fault recording registers - 1
CAP_MAMV_SHIFT = 48  # MAMV 53:48: maximum address mask value for PSI
CAP_DWD = 1 << 54  # DWD: write draining
CAP_DRD = 1 << 55  # DRD: read draining
CAP_FL1GP = 1 << 56  # FL1GP: first-stage 1 GiB pages
CAP_FL5LP = 1 << 60  # FL5LP: first-stage 5-level paging

# -- ECAP fields (spec 11.4.3) ---------------------------------------------------------------
ECAP_C = 1 << 0  # C: page-walk coherency
ECAP_QI = 1 << 1  # QI: queued invalidation
ECAP_DT = 1 << 2  # DT: device-TLB (ATS)
ECAP_IR = 1 << 3  # IR: interrupt remapping
ECAP_PT = 1 << 6  # PT: pass-through
ECAP_SC = 1 << 7  # SC: snoop control
ECAP_IRO_SHIFT = 8  # IRO 17:8: IOTLB register offset, in 16-byte units
ECAP_NEST = 1 << 26  # NEST: nested translation
ECAP_PRS = 1 << 29  # PRS: page requests
ECAP_ERS = 1 << 30  # ERS: execute requests
ECAP_SRS = 1 << 31  # SRS: supervisor requests
ECAP_EAFS = 1 << 34  # EAFS: extended accessed flag
ECAP_PDS = 1 << 42  # PDS: page-request drain support
ECAP_PSS_SHIFT = 35  # PSS 39:35: PASID size supported - 1 (bits)
ECAP_PASID = 1 << 40  # PASID: process address space IDs
ECAP_SMTS = 1 << 43  # SMTS: scalable mode translation
ECAP_SLADS = 1 << 45  # SLADS/SSADS: second-stage accessed/dirty bits
ECAP_SLTS = 1 << 46  # SLTS/SSTS: second-stage translation in scalable mode
ECAP_FLTS = 1 << 47  # FLTS/FSTS: first-stage translation in scalable mode
ECAP_SMPWCS = 1 << 48  # SMPWCS: scalable-mode page-walk coherency

# -- GCMD / GSTS (spec 11.4.4, 11.4.5): the same bit positions ------------------------------
GCMD_TE = 1 << 31  # TE: translation enable            / GSTS.TES
GCMD_SRTP = 1 << 30  # SRTP: set root table pointer    / GSTS.RTPS
GCMD_WBF = 1 << 27  # WBF: write buffer flush          / GSTS.WBFS
GCMD_QIE = 1 << 26  # QIE: queued invalidation enable  / GSTS.QIES
GCMD_IRE = 1 << 25  # IRE: interrupt remapping enable  / GSTS.IRES
GCMD_SIRTP = 1 << 24  # SIRTP: set IRT pointer          / GSTS.IRTPS
GCMD_CFI = 1 << 23  # CFI: compatibility format interrupts / GSTS.CFIS
GSTS_TES = GCMD_TE
GSTS_RTPS = GCMD_SRTP
GSTS_QIES = GCMD_QIE
#: commands that are levels (their status follows the command bit); the rest are one-shot
GCMD_PERSISTENT = GCMD_TE | GCMD_QIE | GCMD_IRE | GCMD_CFI

# -- RTADDR (spec 11.4.6) --------------------------------------------------------------------
RTADDR_RTA_MASK = ~0xFFF & ((1 << 64) - 1)  # RTA 63:12: root table address
RTADDR_TTM_SHIFT = 10  # TTM 11:10: 00 legacy, 01 scalable, 10 reserved, 11 abort-DMA mode
TTM_LEGACY = 0
TTM_SCALABLE = 1
TTM_ABORT = 3

# -- CCMD (spec 11.4.7) ----------------------------------------------------------------------
CCMD_ICC = 1 << 63  # ICC: invalidate context-cache (cleared by hardware when done)
CCMD_CIRG_SHIFT = 61  # CIRG 62:61: 01 global, 10 domain, 11 device
CCMD_CAIG_SHIFT = 59  # CAIG 60:59: actual granularity performed
CCMD_FM_SHIFT = 32  # FM 33:32: function mask
CCMD_SID_SHIFT = 16  # SID 31:16: source-id
CCMD_DID_MASK = 0xFFFF  # DID 15:0

# -- FSTS (spec 11.4.9) ----------------------------------------------------------------------
FSTS_PFO = 1 << 0  # PFO: primary fault overflow (RW1C)
FSTS_PPF = 1 << 1  # PPF: primary pending fault (RO: some FRCD has F set)
FSTS_IQE = 1 << 4  # IQE: invalidation queue error (RW1C)
FSTS_ICE = 1 << 5  # ICE: invalidation completion error (RW1C)
FSTS_ITE = 1 << 6  # ITE: invalidation time-out error (RW1C)
FSTS_PRO = 1 << 7  # PRO: page request overflow (RW1C; the model sets it with PRS.PRO)
FSTS_FRI_SHIFT = 8  # FRI 15:8: fault record index
FSTS_RW1C = FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE | FSTS_PRO

# -- PRS (spec chapter 11, page request status): both bits RW1C ------------------------------
PRS_PPR = 1 << 0  # PPR: pending page request (set when hardware queued a request)
PRS_PRO = 1 << 1  # PRO: page request overflow (the queue was full, the request was answered)
PRS_RW1C = PRS_PPR | PRS_PRO

# -- IQA / ICS (spec 11.4.10) ----------------------------------------------------------------
IQA_DW = 1 << 11  # DW: descriptor width, 0 = 128-bit, 1 = 256-bit
IQA_QS_MASK = 0x7  # QS 2:0: queue size, 2^QS 4 KiB pages
IQA_ADDR_MASK = ~0xFFF & ((1 << 64) - 1)
IQ_OFFSET_MASK = 0x7FFF0  # IQH/IQT 18:4: byte offset of the descriptor
ICS_IWC = 1 << 0  # IWC: invalidation wait descriptor complete (RW1C)

# -- fault recording registers (spec 11.4.14), 128 bits each: upper qword fields --------------
FRCD_HI_SID_MASK = 0xFFFF  # SID 15:0: requester source-id
FRCD_HI_PP = 1 << 31  # PP: PASID present
FRCD_HI_FR_SHIFT = 32  # FR 39:32: fault reason
FRCD_HI_PV_SHIFT = 40  # PV 59:40: PASID value
FRCD_HI_T = 1 << 62  # T: type, 1 = read, 0 = write
FRCD_HI_F = 1 << 63  # F: fault (RW1C)


def field(value: int, shift: int, width: int) -> int:
    return (value >> shift) & ((1 << width) - 1)


def make_cap(
    *,
    sagaw: int,
    mgaw: int,
    nfr: int,
    sllps: int,
    fl1gp: bool,
    fl5lp: bool,
    mamv: int = 18,
    nd: int = 2,
) -> int:
    """A CAP value for the features the model implements (FRO points at FRCD_OFFSET)."""
    cap = nd << CAP_ND_SHIFT
    cap |= sagaw << CAP_SAGAW_SHIFT
    cap |= (mgaw - 1) << CAP_MGAW_SHIFT
    cap |= (FRCD_OFFSET >> 4) << CAP_FRO_SHIFT
    cap |= sllps << CAP_SLLPS_SHIFT
    cap |= CAP_PSI | CAP_DWD | CAP_DRD
    cap |= (nfr - 1) << CAP_NFR_SHIFT
    cap |= mamv << CAP_MAMV_SHIFT
    if fl1gp:
        cap |= CAP_FL1GP
    if fl5lp:
        cap |= CAP_FL5LP
    return cap


def make_ecap(
    *,
    first_stage: bool,
    second_stage: bool,
    nest: bool,
    ssads: bool,
    pasid_bits: int,
    srs: bool,
    eafs: bool,
    prs: bool,
) -> int:
    """An ECAP value: scalable mode with queued invalidation, the rest per argument."""
    ecap = ECAP_C | ECAP_QI | ECAP_DT | ECAP_PT | ECAP_SC | ECAP_SMTS | ECAP_SMPWCS
    ecap |= (0x50 >> 4) << ECAP_IRO_SHIFT
    if pasid_bits:
        ecap |= ECAP_PASID | (pasid_bits - 1) << ECAP_PSS_SHIFT
    for on, bit in (
        (first_stage, ECAP_FLTS),
        (second_stage, ECAP_SLTS),
        (nest, ECAP_NEST),
        (ssads, ECAP_SLADS),
        (srs, ECAP_SRS),
        (eafs, ECAP_EAFS),
        (prs, ECAP_PRS | ECAP_PDS),
    ):
        if on:
            ecap |= bit
    return ecap


Hook = Callable[[int, int], None]


def define_registers(
    mmio: Mmio,
    *,
    cap: int,
    ecap: int,
    on_gcmd: Hook,
    on_ccmd: Hook,
    on_iqt: Hook,
    on_fsts: Hook,
    on_ics: Hook,
    on_prs: Hook,
    on_frcd_hi: Callable[[int], Hook],
    gsts: Callable[[], int],
    fsts: Callable[[], int],
) -> None:
    """Lay out every modelled register at its offset with its writable mask and side effect."""
    mmio.define("VER", VER, width=4, reset=VERSION, writable=0)
    mmio.define("CAP", CAP, reset=cap, writable=0)
    mmio.define("ECAP", ECAP, reset=ecap, writable=0)
    mmio.define("GCMD", GCMD, width=4, on_write=on_gcmd)
    mmio.define("GSTS", GSTS, width=4, writable=0, on_read=gsts)
    mmio.define("RTADDR", RTADDR, writable=RTADDR_RTA_MASK | 3 << RTADDR_TTM_SHIFT)
    mmio.define("CCMD", CCMD, on_write=on_ccmd)
    # RW1C registers: the writable mask lets the hook see which bits software wrote as 1.
    mmio.define("FSTS", FSTS, width=4, writable=FSTS_RW1C, on_write=on_fsts, on_read=fsts)
    mmio.define("FECTL", FECTL, width=4, reset=1 << 31, writable=1 << 31)  # IM: interrupt mask
    mmio.define("FEDATA", FEDATA, width=4)
    mmio.define("FEADDR", FEADDR, width=4)
    mmio.define("FEUADDR", FEUADDR, width=4)
    mmio.define("IQH", IQH, writable=0)
    mmio.define("IQT", IQT, writable=IQ_OFFSET_MASK, on_write=on_iqt)
    mmio.define("IQA", IQA, writable=IQA_ADDR_MASK | IQA_DW | IQA_QS_MASK)
    mmio.define("ICS", ICS, width=4, writable=ICS_IWC, on_write=on_ics)
    mmio.define("IECTL", IECTL, width=4, reset=1 << 31, writable=1 << 31)
    mmio.define("PQH", PQH, writable=0x7FFE0)
    mmio.define("PQT", PQT, writable=0)
    mmio.define("PQA", PQA, writable=IQA_ADDR_MASK | IQA_QS_MASK)
    mmio.define("PRS", PRS_REG, width=4, writable=PRS_RW1C, on_write=on_prs)
    nfr = field(cap, CAP_NFR_SHIFT, 8) + 1
    base = field(cap, CAP_FRO_SHIFT, 10) << 4
    for i in range(nfr):
        mmio.define(f"FRCD{i}_LO", base + 16 * i, writable=0)
        mmio.define(f"FRCD{i}_HI", base + 16 * i + 8, writable=FRCD_HI_F, on_write=on_frcd_hi(i))
