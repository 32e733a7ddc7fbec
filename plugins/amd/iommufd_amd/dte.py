"""The 256-bit Device Table Entry (spec "Device Table Entry Format"; kernel DTE_* / DEV_ENTRY_*).

Four little-endian u64 words, ``data[0..3]`` as the kernel's ``struct dev_table_entry``.
:class:`Dte` holds every field the Linux driver touches; :meth:`Dte.encode` /
:meth:`Dte.decode` round-trip exactly, reserved bits included (kept in ``rsvd``), so the
hardware can check them. :func:`check` is the hardware's legality test of an entry.
"""

from __future__ import annotations

import attrs

DTE_SIZE = 32  # DEV_TABLE_ENTRY_SIZE
U64 = (1 << 64) - 1


def _mask(hi: int, lo: int) -> int:
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


# -- data[0] --------------------------------------------------------------------------------
DTE_V = 1 << 0  # V: entry valid (DTE_FLAG_V)
DTE_TV = 1 << 1  # TV: translation fields valid (DTE_FLAG_TV)
DTE_HAD_SHIFT = 7  # HAD[8:7]: host access/dirty update (DTE_FLAG_HAD = 3 << 7)
DTE_MODE_SHIFT = 9  # Mode[11:9]: host paging mode (DTE_MODE_MASK)
DTE_HOST_TRP = _mask(51, 12)  # Host Page Table Root Pointer[51:12] (DTE_HOST_TRP)
DTE_PPR = 1 << 52  # PPR: peripheral page requests enabled (DTE_FLAG_PPR)
DTE_GPRP = 1 << 53  # GPRP: guest PPR response with PASID
DTE_GIOV = 1 << 54  # GIoV: requests without PASID use GCR3[0] (DTE_FLAG_GIOV)
DTE_GV = 1 << 55  # GV: guest translation valid (DTE_FLAG_GV)
DTE_GLX_SHIFT = 56  # GLX[57:56]: GCR3 table levels - 1 (DTE_GLX); 3 is reserved
DTE_GCR3_14_12 = _mask(60, 58)  # GCR3 Table Root Pointer[14:12] (DTE_GCR3_14_12)
DTE_IR = 1 << 61  # IR: read permission (DTE_FLAG_IR)
DTE_IW = 1 << 62  # IW: write permission (DTE_FLAG_IW)
DATA0_RSVD = _mask(6, 2) | (1 << 63)
# -- data[1] --------------------------------------------------------------------------------
DTE_DOMID = _mask(15, 0)  # DomainID[15:0] (DTE_DOMID_MASK)
DTE_GCR3_30_15 = _mask(31, 16)  # GCR3 Table Root Pointer[30:15] (DTE_GCR3_30_15)
DTE_I = 1 << 32  # I: device IOTLB (ATS) enabled (DTE_FLAG_IOTLB)
DTE_SE = 1 << 33  # SE: suppress IO_PAGE_FAULT events
DTE_SA = 1 << 34  # SA: suppress all IO_PAGE_FAULT events
DTE_IOCTL_SHIFT = 35  # IoCtl[36:35]: port I/O control
DTE_CACHE = 1 << 37  # Cache: IOTLB cache hint
DTE_SD = 1 << 38  # SD: snoop disable
DTE_EX = 1 << 39  # EX: exclusion range allowed (DEV_ENTRY_EX)
DTE_SYSMGT_SHIFT = 40  # SysMgt[41:40] (DEV_ENTRY_SYSMGT1/2)
DTE_GCR3_51_31 = _mask(63, 43)  # GCR3 Table Root Pointer[51:31] (DTE_GCR3_51_31)
DATA1_RSVD = 1 << 42
# -- data[2] (interrupt remapping and guest paging mode) -------------------------------------
DTE_IV = 1 << 0  # IV: interrupt map valid (DTE_IRQ_REMAP_ENABLE)
DTE_INTTABLEN_SHIFT = 1  # IntTabLen[4:1] (DTE_INTTABLEN_MASK)
DTE_IG = 1 << 5  # IG: ignore unmapped interrupts
DTE_IRQ_ROOT = _mask(51, 6)  # Interrupt Table Root Pointer[51:6] (DTE_IRQ_PHYS_ADDR_MASK)
DTE_GPT_LEVEL_SHIFT = 54  # GuestPagingMode[55:54]: 0 = 4-level, 1 = 5-level (DTE_GPT_LEVEL_MASK)
DTE_INIT_PASS = 1 << 56  # InitPass (DEV_ENTRY_INIT_PASS)
DTE_EINT_PASS = 1 << 57  # EIntPass (DEV_ENTRY_EINT_PASS)
DTE_NMI_PASS = 1 << 58  # NMIPass (DEV_ENTRY_NMI_PASS)
DTE_INTCTL_SHIFT = 60  # IntCtl[61:60] (DTE_IRQ_REMAP_INTCTL_MASK)
DTE_LINT0_PASS = 1 << 62  # Lint0Pass (DEV_ENTRY_LINT0_PASS)
DTE_LINT1_PASS = 1 << 63  # Lint1Pass (DEV_ENTRY_LINT1_PASS)
DATA2_RSVD = _mask(53, 52) | (1 << 59)
# data[3]: the HW-vIOMMU fields (AMD vIOMMU series DTE_VIOMMU_*): which guest owns the device
# and its guest DeviceID, so the hardware can write the device's events into that guest's log.
DTE_VIOMMU_EN = 1 << 15  # DTE_VIOMMU_EN_SHIFT
DTE_VIOMMU_GDEVID_SHIFT = 16  # GuestDeviceID[31:16] (AMD tree: DTE_VIOMMU_GDEVICEID_*)
DTE_VIOMMU_GUESTID_SHIFT = 32  # GuestID[47:32] (AMD tree: DTE_VIOMMU_GUESTID_*)
DATA3_RSVD = U64 & ~(DTE_VIOMMU_EN | _mask(31, 16) | _mask(47, 32))

GUEST_PGTABLE_4_LEVEL = 0
GUEST_PGTABLE_5_LEVEL = 1
PAGE_MODE_NONE = 0
PAGE_MODE_7_LEVEL = 7  # reserved Mode value

HAD_DIRTY = 3  # HAD = 11b: update A and D (what the kernel sets for dirty tracking)


def gcr3_split(gcr3: int) -> tuple[int, int, int]:
    """The three DTE pieces of a GCR3 table root address: [14:12], [30:15], [51:31]."""
    return (gcr3 >> 12) & 0x7, (gcr3 >> 15) & 0xFFFF, (gcr3 >> 31) & 0x1FFFFF


@attrs.define
class Dte:
    """A decoded DTE; field names follow the spec."""

    v: bool = False
    tv: bool = False
    had: int = 0
    mode: int = 0
    host_root: int = 0  # physical address of the v1 root table (4 KiB aligned)
    ppr: bool = False
    gprp: bool = False
    giov: bool = False
    gv: bool = False
    glx: int = 0
    gcr3: int = 0  # GCR3 table root address, reassembled from the three pieces
    ir: bool = False
    iw: bool = False
    domain_id: int = 0
    i: bool = False
    se: bool = False
    sa: bool = False
    ioctl: int = 0
    cache: bool = False
    sd: bool = False
    ex: bool = False
    sysmgt: int = 0
    iv: bool = False
    int_tab_len: int = 0
    ig: bool = False
    int_root: int = 0
    gpt_level: int = 0
    init_pass: bool = False
    eint_pass: bool = False
    nmi_pass: bool = False
    int_ctl: int = 0
    lint0_pass: bool = False
    lint1_pass: bool = False
    viommu_en: bool = False
    guest_id: int = 0
    gdev_id: int = 0
    # Reserved bits as found, per word: the hardware refuses an entry that sets any.
    rsvd: tuple[int, int, int, int] = (0, 0, 0, 0)

    def encode(self) -> tuple[int, int, int, int]:
        a, b, c = gcr3_split(self.gcr3)
        d0 = (
            (DTE_V if self.v else 0)
            | (DTE_TV if self.tv else 0)
            | (self.had & 3) << DTE_HAD_SHIFT
            | (self.mode & 7) << DTE_MODE_SHIFT
            | (self.host_root & DTE_HOST_TRP)
            | (DTE_PPR if self.ppr else 0)
            | (DTE_GPRP if self.gprp else 0)
            | (DTE_GIOV if self.giov else 0)
            | (DTE_GV if self.gv else 0)
            | (self.glx & 3) << DTE_GLX_SHIFT
            | a << 58
            | (DTE_IR if self.ir else 0)
            | (DTE_IW if self.iw else 0)
            | (self.rsvd[0] & DATA0_RSVD)
        )
        d1 = (
            (self.domain_id & 0xFFFF)
            | b << 16
            | (DTE_I if self.i else 0)
            | (DTE_SE if self.se else 0)
            | (DTE_SA if self.sa else 0)
            | (self.ioctl & 3) << DTE_IOCTL_SHIFT
            | (DTE_CACHE if self.cache else 0)
            | (DTE_SD if self.sd else 0)
            | (DTE_EX if self.ex else 0)
            | (self.sysmgt & 3) << DTE_SYSMGT_SHIFT
            | c << 43
            | (self.rsvd[1] & DATA1_RSVD)
        )
        d2 = (
            (DTE_IV if self.iv else 0)
            | (self.int_tab_len & 0xF) << DTE_INTTABLEN_SHIFT
            | (DTE_IG if self.ig else 0)
            | (self.int_root & DTE_IRQ_ROOT)
            | (self.gpt_level & 3) << DTE_GPT_LEVEL_SHIFT
            | (DTE_INIT_PASS if self.init_pass else 0)
            | (DTE_EINT_PASS if self.eint_pass else 0)
            | (DTE_NMI_PASS if self.nmi_pass else 0)
            | (self.int_ctl & 3) << DTE_INTCTL_SHIFT
            | (DTE_LINT0_PASS if self.lint0_pass else 0)
            | (DTE_LINT1_PASS if self.lint1_pass else 0)
            | (self.rsvd[2] & DATA2_RSVD)
        )
        d3 = (
            (DTE_VIOMMU_EN if self.viommu_en else 0)
            | (self.guest_id & 0xFFFF) << DTE_VIOMMU_GUESTID_SHIFT
            | (self.gdev_id & 0xFFFF) << DTE_VIOMMU_GDEVID_SHIFT
            | (self.rsvd[3] & DATA3_RSVD)
        )
        return d0, d1, d2, d3

    @classmethod
    def decode(cls, words: tuple[int, int, int, int] | list[int]) -> Dte:
        d0, d1, d2, d3 = (w & U64 for w in words)
        gcr3 = (
            ((d0 & DTE_GCR3_14_12) >> 58) << 12
            | ((d1 & DTE_GCR3_30_15) >> 16) << 15
            | ((d1 & DTE_GCR3_51_31) >> 43) << 31
        )
        return cls(
            v=bool(d0 & DTE_V),
            tv=bool(d0 & DTE_TV),
            had=(d0 >> DTE_HAD_SHIFT) & 3,
            mode=(d0 >> DTE_MODE_SHIFT) & 7,
            host_root=d0 & DTE_HOST_TRP,
            ppr=bool(d0 & DTE_PPR),
            gprp=bool(d0 & DTE_GPRP),
            giov=bool(d0 & DTE_GIOV),
            gv=bool(d0 & DTE_GV),
            glx=(d0 >> DTE_GLX_SHIFT) & 3,
            gcr3=gcr3,
            ir=bool(d0 & DTE_IR),
            iw=bool(d0 & DTE_IW),
            domain_id=d1 & DTE_DOMID,
            i=bool(d1 & DTE_I),
            se=bool(d1 & DTE_SE),
            sa=bool(d1 & DTE_SA),
            ioctl=(d1 >> DTE_IOCTL_SHIFT) & 3,
            cache=bool(d1 & DTE_CACHE),
            sd=bool(d1 & DTE_SD),
            ex=bool(d1 & DTE_EX),
            sysmgt=(d1 >> DTE_SYSMGT_SHIFT) & 3,
            iv=bool(d2 & DTE_IV),
            int_tab_len=(d2 >> DTE_INTTABLEN_SHIFT) & 0xF,
            ig=bool(d2 & DTE_IG),
            int_root=d2 & DTE_IRQ_ROOT,
            gpt_level=(d2 >> DTE_GPT_LEVEL_SHIFT) & 3,
            init_pass=bool(d2 & DTE_INIT_PASS),
            eint_pass=bool(d2 & DTE_EINT_PASS),
            nmi_pass=bool(d2 & DTE_NMI_PASS),
            int_ctl=(d2 >> DTE_INTCTL_SHIFT) & 3,
            lint0_pass=bool(d2 & DTE_LINT0_PASS),
            lint1_pass=bool(d2 & DTE_LINT1_PASS),
            viommu_en=bool(d3 & DTE_VIOMMU_EN),
            guest_id=(d3 >> DTE_VIOMMU_GUESTID_SHIFT) & 0xFFFF,
            gdev_id=(d3 >> DTE_VIOMMU_GDEVID_SHIFT) & 0xFFFF,
            rsvd=(d0 & DATA0_RSVD, d1 & DATA1_RSVD, d2 & DATA2_RSVD, d3 & DATA3_RSVD),
        )

    def to_bytes(self) -> bytes:
        return b"".join(w.to_bytes(8, "little") for w in self.encode())

    @classmethod
    def from_bytes(cls, data: bytes) -> Dte:
        return cls.decode([int.from_bytes(data[i : i + 8], "little") for i in range(0, 32, 8)])


def check(dte: Dte, *, max_mode: int, gt_enabled: bool, max_glx: int, gpt5: bool) -> str:
    """The hardware's legality test of a valid entry: ``""`` or why it is illegal.

    An illegal entry makes the IOMMU log ILLEGAL_DEV_TABLE_ENTRY and abort the request.
    Only V=1, TV=1 entries are checked for translation fields (TV=0 leaves them unused).
    """
    if not dte.v or not dte.tv:
        return ""
    if dte.rsvd[0] or dte.rsvd[1]:
        return "reserved bit set"
    if dte.mode == PAGE_MODE_7_LEVEL:
        return "Mode 7 is reserved"
    if dte.mode > max_mode:
        return f"Mode {dte.mode} beyond HATS"
    if dte.mode and dte.host_root == 0:
        return "host page table root is zero"
    if dte.gv:
        if not gt_enabled:
            return "GV set while guest translation (GTEn) is off"
        if dte.glx == 3 or dte.glx > max_glx:
            return f"GLX {dte.glx} not supported"
        if dte.gpt_level > GUEST_PGTABLE_5_LEVEL or (
            dte.gpt_level == GUEST_PGTABLE_5_LEVEL and not gpt5
        ):
            return f"GuestPagingMode {dte.gpt_level} not supported"
    if dte.iv and dte.rsvd[2]:
        return "reserved interrupt bit set"
    return ""
