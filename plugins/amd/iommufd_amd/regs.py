"""AMD IOMMU MMIO register offsets and bits (spec pub. 48882, "MMIO Registers"; kernel
``amd_iommu_types.h`` MMIO_* / CONTROL_* / FEATURE_* / MMIO_STATUS_*).

Only numbers live here; :mod:`iommufd_amd.hw` gives the registers their side effects.
"""

from __future__ import annotations

# -- offsets (MMIO_*_OFFSET) --------------------------------------------------------------
DEV_TABLE_BASE = 0x0000  # Device Table Base Address Register: base[51:12], Size[8:0]
CMD_BUF_BASE = 0x0008  # Command Buffer Base Address Register: base[51:12], ComLen[59:56]
EVT_LOG_BASE = 0x0010  # Event Log Base Address Register: base[51:12], EventLen[59:56]
CONTROL = 0x0018  # IOMMU Control Register
EXCL_BASE = 0x0020  # Exclusion Range Base Register: ExEn[0], Allow[1], base[51:12]
EXCL_LIMIT = 0x0028  # Exclusion Range Limit Register: limit[51:12]
EFR = 0x0030  # IOMMU Extended Feature Register (read-only)
PPR_LOG_BASE = 0x0038  # PPR Log Base Address Register: base[51:12], PPRLen[59:56]
GA_LOG_BASE = 0x00E0  # Guest Virtual APIC Log Base Address Register
GA_LOG_TAIL_ADDR = 0x00E8  # Guest Virtual APIC Log Tail Address Register
EFR2 = 0x01A0  # IOMMU Extended Feature 2 Register (read-only)
CMD_HEAD = 0x2000  # Command Buffer Head Pointer Register: CmdHdPtr[18:4]
CMD_TAIL = 0x2008  # Command Buffer Tail Pointer Register: CmdTailPtr[18:4]
EVT_HEAD = 0x2010  # Event Log Head Pointer Register: EventHdPtr[18:4]
EVT_TAIL = 0x2018  # Event Log Tail Pointer Register: EventTailPtr[18:4]
STATUS = 0x2020  # IOMMU Status Register
PPR_HEAD = 0x2030  # PPR Log Head Pointer Register
PPR_TAIL = 0x2038  # PPR Log Tail Pointer Register
GA_HEAD = 0x2040  # Guest Virtual APIC Log Head Pointer Register
GA_TAIL = 0x2048  # Guest Virtual APIC Log Tail Pointer Register

# -- base registers -----------------------------------------------------------------------
BASE_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF  # [51:12] of every *_BASE register
DEV_TABLE_SIZE_MASK = 0x1FF  # DevTabBase Size[8:0]: number of 4 KiB pages minus one
LEN_SHIFT = 56  # ComLen / EventLen / PPRLen [59:56]: log2(number of entries)
LEN_MASK = 0xF
LEN_MIN = 8  # the spec's smallest buffer: 256 entries ("values below 1000b are reserved")
LEN_512 = 9  # what Linux programs (MMIO_CMD_SIZE_512, EVT_LEN_MASK)
PTR_MASK = 0x7FFF0  # head/tail registers hold byte offsets [18:4] of 16-byte entries
ENTRY_SIZE = 16  # command, event and PPR log entries are 128 bits

# -- control register bits (CONTROL_*) ----------------------------------------------------
CTRL_IOMMU_EN = 1 << 0  # IommuEn
CTRL_HT_TUN_EN = 1 << 1  # HtTunEn
CTRL_EVT_LOG_EN = 1 << 2  # EventLogEn
CTRL_EVT_INT_EN = 1 << 3  # EventIntEn
CTRL_COMWAIT_INT_EN = 1 << 4  # ComWaitIntEn
CTRL_INV_TIMEOUT_SHIFT = 5  # InvTimeOut[7:5]
CTRL_COHERENT_EN = 1 << 10  # Coherent
CTRL_CMDBUF_EN = 1 << 12  # CmdBufEn
CTRL_PPRLOG_EN = 1 << 13  # PPRLogEn
CTRL_PPRINT_EN = 1 << 14  # PprIntEn
CTRL_PPR_EN = 1 << 15  # PPREn
CTRL_GT_EN = 1 << 16  # GTEn: guest translation (v2 tables / GCR3) enabled
CTRL_GA_EN = 1 << 17  # GAEn
CTRL_XT_EN = 1 << 50  # XTEn
CTRL_GCR3TRPMODE = 1 << 58  # GCR3TRPMode: GCR3 root pointer in the DTE is a GPA

# -- status register bits (MMIO_STATUS_*) -------------------------------------------------
ST_EVT_OVERFLOW = 1 << 0  # EventOverflow (RW1C)
ST_EVT_INT = 1 << 1  # EventLogInt (RW1C)
ST_COMWAIT_INT = 1 << 2  # ComWaitInt (RW1C)
ST_EVT_RUN = 1 << 3  # EventLogRun (RO)
ST_CMDBUF_RUN = 1 << 4  # CmdBufRun (RO)
ST_PPR_OVERFLOW = 1 << 5  # PprOverflow (RW1C)
ST_PPR_INT = 1 << 6  # PprInt (RW1C)
ST_PPR_RUN = 1 << 7  # PprLogRun (RO)
ST_RW1C = ST_EVT_OVERFLOW | ST_EVT_INT | ST_COMWAIT_INT | ST_PPR_OVERFLOW | ST_PPR_INT

# -- extended feature register (FEATURE_*) ------------------------------------------------
EFR_PREF_SUP = 1 << 0  # PreFSup: PREFETCH_IOMMU_PAGES
EFR_PPR_SUP = 1 << 1  # PPRSup
EFR_XT_SUP = 1 << 2  # XTSup
EFR_NX_SUP = 1 << 3  # NXSup
EFR_GT_SUP = 1 << 4  # GTSup: guest translation
EFR_IA_SUP = 1 << 6  # IASup: INVALIDATE_IOMMU_ALL
EFR_GA_SUP = 1 << 7  # GASup
EFR_HE_SUP = 1 << 8  # HESup: hardware error registers
EFR_PC_SUP = 1 << 9  # PCSup
EFR_HATS_SHIFT = 10  # HATS[11:10]: host table levels 00b=4, 01b=5, 10b=6
EFR_GATS_SHIFT = 12  # GATS[13:12]: guest table levels 00b=4, 01b=5
EFR_GLX_SHIFT = 14  # GLXSup[15:14]: GCR3 table levels 00b=1, 01b=2 (GLX max)
EFR_PASMAX_SHIFT = 32  # PASmax[36:32]: PASID width minus one
EFR_GIO_SUP = 1 << 48  # GIoSup: guest I/O protection (DTE GIoV)
EFR_HA_SUP = 1 << 49  # HASup: host access bit
EFR_EPH_SUP = 1 << 50  # EPHSup
EFR_HD_SUP = 1 << 52  # HDSup: host dirty bit (dirty tracking)

EFR2_GCR3TRPMODE = 1 << 3  # GCR3TRPMode supported (FEATURE_GCR3TRPMODE)


def base_value(addr: int, log2_entries: int) -> int:
    """A command / event / PPR base register value: address plus the length field."""
    return (addr & BASE_ADDR_MASK) | ((log2_entries & LEN_MASK) << LEN_SHIFT)


def dev_table_base_value(addr: int, pages: int) -> int:
    """The device table base register: address and Size (pages - 1)."""
    return (addr & BASE_ADDR_MASK) | ((pages - 1) & DEV_TABLE_SIZE_MASK)


# -- HW-vIOMMU (AMD's tree AMDESE/linux-iommu: amd_iommu_types.h, amd_viommu.h, viommu.c) -------
EFR_VIOMMU_SUP = 1 << 55  # FEATURE_VIOMMU: hardware-accelerated virtualised IOMMU
CTRL_VCMD_EN = 1 << 52  # CONTROL_VCMD_EN: guest command buffers are fetched by hardware
CTRL_VIOMMU_EN = 1 << 53  # CONTROL_VIOMMU_EN
CTRL_GSTBUFFERTRPMODE = 1 << 60  # CONTROL_GSTBUFFERTRPMODE: guest buffer bases are GPAs
VIOMMU_STATUS = 0x0190  # MMIO_VIOMMU_STATUS_OFFSET (model: guest command trap pending)
VST_CMD_TRAP = 1 << 0  # model: some guest's command processor stalled on a command for the VMM

# The IOMMU Private Address space (PAS): per-IOMMU v1 table, private address -> system memory.
PAS_GUEST_MMIO_BASE = 0x0  # VIOMMU_GUEST_MMIO_BASE: 64 bytes of guest MMIO per guest ID
PAS_GUEST_MMIO_ENTRY = 64
PAS_CMDBUF_DIRTY_BASE = 0x40_0000  # VIOMMU_CMDBUF_DIRTY_STATUS_BASE
PAS_CMDBUF_DIRTY_SIZE = 0x2000  # VIOMMU_CMDBUF_DIRTY_STATUS_SIZE
PAS_DEVID_MAP_BASE = 0x10_0000_0000  # VIOMMU_DEVID_MAPPING_BASE
PAS_DEVID_MAP_SIZE = 1 << 20  # VIOMMU_DEVID_MAPPING_ENTRY_SIZE: 64 Ki gDevIDs x 16 bytes
PAS_DEVID_ENTRY = 16
PAS_DOMID_MAP_BASE = 0x20_0000_0000  # VIOMMU_DOMID_MAPPING_BASE
PAS_DOMID_MAP_SIZE = 1 << 19  # VIOMMU_DOMID_MAPPING_ENTRY_SIZE: 64 Ki gDomIDs x 8 bytes
PAS_DOMID_ENTRY = 8
MAX_GDEVID = 0xFFFF  # VIOMMU_MAX_GDEVID
MAX_GDOMID = 0xFFFF  # VIOMMU_MAX_GDOMID
MAP_V = 1 << 0  # model: mapping-table entry valid (the in-memory format is not published)
MAP_HID_SHIFT = 16  # model: host DevID / DomID in [31:16] of a mapping-table entry

# VF control MMIO (VFCTRL BAR, 64 bytes per guest ID; host kernel only).
VFCTRL_DID_MAP_CONTROL0 = 0x00  # VIOMMU_VFCTRL_GUEST_DID_MAP_CONTROL0_OFFSET: gDevID map
VFCTRL_DID_MAP_CONTROL1 = 0x08  # ..._DID_MAP_CONTROL1_OFFSET: gDomID map
VFCTRL_MISC_CONTROL = 0x10  # VIOMMU_VFCTRL_GUEST_MISC_CONTROL_OFFSET: trans DevID [31:16]
VFCTRL_CMD_CONTROL = 0x20  # guest command buffer (amd_viommu_set_cmdbuf_flags)
VFCTRL_EVT_CONTROL = 0x28  # guest event log (amd_viommu_set_evtbuf_flags)
VFCTRL_PPR_CONTROL = 0x30  # guest PPR log (amd_viommu_set_pprbuf_flags)
MAPCTL_GO = 1 << 63  # DEVID_ENTRY_WRITE / DOMID_ENTRY_WRITE
MAPCTL_VALID = 1 << 0  # DEVID_ENTRY_VALID / DOMID_ENTRY_VALID
MAPCTL_HID_SHIFT = 14  # DEVID_ENTRY_HDEVID_MASK / DOMID_ENTRY_HDOMID_MASK [29:14]
MAPCTL_GID_SHIFT = 46  # DEVID_ENTRY_GDEVID_MASK / DOMID_ENTRY_GDOMID_MASK [61:46]
MISC_TRANS_DEVID_SHIFT = 16  # amd_iommu_update_vfctrl_mmio_translate_devid(): ID in [31:16]
# Guest buffer registers: Len[3:0] (log2 of the entries, the ComLen/EventLen/PPRLen encoding),
# base[51:12] (command, event) or base >> 12 in [55:16] (PPR), enable bits from bit 8.
GBUF_LEN_MASK = 0xF
GBUF_BASE_MASK = BASE_ADDR_MASK
GBUF_PPR_BASE_SHIFT = 16  # amd_viommu_set_pprbuf_flags(): FIELD_PREP(GENMASK(55, 16), base >> 12)
GBUF_PPR_BASE_MASK = ((1 << 56) - 1) & ~((1 << 16) - 1)
GCMD_CMDBUF_EN = 1 << 8  # CMD_CONTROL bit 8 <- CONTROL CmdBufEn
GCMD_COMWAIT_EN = 1 << 9  # CMD_CONTROL bit 9 <- CONTROL ComWaitIntEn
GEVT_LOG_EN = 1 << 8  # EVT_CONTROL bit 8 <- CONTROL EventLogEn
GEVT_INT_EN = 1 << 9  # EVT_CONTROL bit 9 <- CONTROL EventIntEn
GPPR_LOG_EN = 1 << 8  # PPR_CONTROL bit 8 <- CONTROL PPRLogEn
GPPR_INT_EN = 1 << 9  # PPR_CONTROL bit 9 <- CONTROL PprIntEn
GPPR_EN = 1 << 10  # PPR_CONTROL bit 10 <- CONTROL PPREn


def gbuf_value(off: int, base: int, log2_entries: int, enables: int) -> int:
    """A VFCTRL guest buffer register as AMD's ``amd_viommu_set_*buf_flags()`` compose it."""
    if off == VFCTRL_PPR_CONTROL:
        addr = ((base >> 12) << GBUF_PPR_BASE_SHIFT) & GBUF_PPR_BASE_MASK
    else:
        addr = base & GBUF_BASE_MASK
    return addr | (log2_entries & GBUF_LEN_MASK) | enables


def gbuf_base(off: int, value: int) -> int:
    """The guest-physical base a VFCTRL guest buffer register holds."""
    if off == VFCTRL_PPR_CONTROL:
        return ((value & GBUF_PPR_BASE_MASK) >> GBUF_PPR_BASE_SHIFT) << 12
    return value & GBUF_BASE_MASK


# VF MMIO: the guest's third 4 KiB MMIO page (offsets relative to MMIO 0x2000), one 4 KiB
# page per guest ID in the VF BAR (VIOMMU_VF_MMIO_ENTRY_SIZE); the VMM maps it, no trap.
VF_CMD_HEAD = CMD_HEAD - 0x2000
VF_CMD_TAIL = CMD_TAIL - 0x2000
VF_EVT_HEAD = EVT_HEAD - 0x2000
VF_EVT_TAIL = EVT_TAIL - 0x2000
VF_STATUS = STATUS - 0x2000
VF_PPR_HEAD = PPR_HEAD - 0x2000
VF_PPR_TAIL = PPR_TAIL - 0x2000
VF_MMIO_SIZE = 4096
GST_CMD_TRAP = 1 << 8  # model: guest command processor stalled, waiting for the VMM (RW1C)
