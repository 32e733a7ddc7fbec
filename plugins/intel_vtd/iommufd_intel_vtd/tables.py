"""Scalable-mode translation structures (VT-d spec 9.2, 9.4, 9.5, 9.6): codecs and checks.

RID -> root entry (by bus) -> scalable-mode context entry (by devfn) -> PASID directory entry
(PASID[19:6]) -> PASID table entry (PASID[5:0]) -> first/second-stage tables. Every record
encodes to the qwords software writes and decodes from the qwords hardware reads; ``check``
methods give the fault reason hardware reports for a present entry with bad contents.
"""

from __future__ import annotations

import attrs

from iommufd_intel_vtd import faults as F

U64 = (1 << 64) - 1
ADDR_MASK = ((1 << 64) - 1) & ~0xFFF

ROOT_ENTRY_SIZE = 16
SM_CONTEXT_ENTRY_SIZE = 32
PASID_DIR_ENTRY_SIZE = 8
PASID_ENTRY_SIZE = 64
PASIDS_PER_TABLE = 64  # a 4 KiB PASID table holds 64 entries of 512 bits

# PGTT: PASID granular translation type (PASID entry bits 8:6)
PGTT_FIRST = 1
PGTT_SECOND = 2
PGTT_NESTED = 3
PGTT_PT = 4

# AW (bits 4:2 of a PASID entry): adjusted guest address width of the second stage
AW_39 = 1  # 3-level
AW_48 = 2  # 4-level
AW_57 = 3  # 5-level


def aw_levels(aw: int) -> int:
    return aw + 2


def aw_bits(aw: int) -> int:
    return 30 + 9 * aw


def _bit(value: int, n: int) -> bool:
    return bool(value >> n & 1)


# -- root entry (128 bits) --------------------------------------------------------------------
@attrs.frozen
class RootEntry:
    """Scalable-mode root entry: one per bus; two context-table halves (devfn 0-127, 128-255)."""

    lp: bool = False  # LP (bit 0): lower context table present
    lctp: int = 0  # LCTP (63:12): lower context table pointer, devfn 0..127
    up: bool = False  # UP (bit 64): upper context table present
    uctp: int = 0  # UCTP (127:76): upper context table pointer, devfn 128..255
    rsvd: int = 0  # reserved bits seen on decode (11:1 and 75:65)

    RSVD_MASK = 0xFFE  # bits 11:1 of each half

    def encode(self) -> tuple[int, int]:
        lo = (self.lctp & ADDR_MASK) | int(self.lp)
        hi = (self.uctp & ADDR_MASK) | int(self.up)
        return lo, hi

    @classmethod
    def decode(cls, lo: int, hi: int) -> RootEntry:
        rsvd = (lo & cls.RSVD_MASK) | (hi & cls.RSVD_MASK) << 64
        return cls(bool(lo & 1), lo & ADDR_MASK, bool(hi & 1), hi & ADDR_MASK, rsvd)

    def half(self, devfn: int) -> tuple[bool, int]:
        """``(present, table)`` of the context-table half that holds ``devfn``."""
        return (self.up, self.uctp) if devfn >= 128 else (self.lp, self.lctp)


# -- scalable-mode context entry (256 bits) ---------------------------------------------------
@attrs.frozen
class ContextEntry:
    p: bool = False  # P (bit 0): present
    fpd: bool = False  # FPD (bit 1): fault processing disable
    dte: bool = False  # DTE (bit 2): device-TLB enable
    paside: bool = False  # PASIDE (bit 3): requests with PASID allowed
    pre: bool = False  # PRE (bit 4): page request enable
    pdts: int = 0  # PDTS (11:9): PASID directory has 2^(PDTS+7) entries
    pasid_dir: int = 0  # PASIDDIRPTR (63:12): PASID directory pointer
    rid_pasid: int = 0  # RID_PASID (83:64): PASID used for requests without PASID
    rid_priv: bool = False  # RID_PRIV (bit 84): requests without PASID are supervisor
    rsvd: int = 0

    # bits 8:5 of qword 0, 127:85 (qword 1 above RID_PRIV), all of qwords 2 and 3
    RSVD0 = 0x1E0
    RSVD1 = U64 & ~((1 << 21) - 1)

    def encode(self) -> tuple[int, int, int, int]:
        q0 = (
            int(self.p)
            | int(self.fpd) << 1
            | int(self.dte) << 2
            | int(self.paside) << 3
            | int(self.pre) << 4
            | (self.pdts & 7) << 9
            | (self.pasid_dir & ADDR_MASK)
        )
        q1 = (self.rid_pasid & 0xFFFFF) | int(self.rid_priv) << 20
        return q0, q1, 0, 0

    @classmethod
    def decode(cls, q0: int, q1: int, q2: int = 0, q3: int = 0) -> ContextEntry:
        rsvd = (q0 & cls.RSVD0) | (q1 & cls.RSVD1) | q2 | q3
        return cls(
            p=_bit(q0, 0),
            fpd=_bit(q0, 1),
            dte=_bit(q0, 2),
            paside=_bit(q0, 3),
            pre=_bit(q0, 4),
            pdts=(q0 >> 9) & 7,
            pasid_dir=q0 & ADDR_MASK,
            rid_pasid=q1 & 0xFFFFF,
            rid_priv=_bit(q1, 20),
            rsvd=rsvd,
        )

    @property
    def dir_entries(self) -> int:
        return 1 << (self.pdts + 7)


# -- PASID directory entry (64 bits) ----------------------------------------------------------
@attrs.frozen
class PasidDirEntry:
    p: bool = False  # P (bit 0): present
    fpd: bool = False  # FPD (bit 1): fault processing disable
    table: int = 0  # SMPTBLPTR (63:12): scalable-mode PASID table pointer
    rsvd: int = 0  # reserved bits seen on decode (11:2)

    RSVD_MASK = 0xFFC

    def encode(self) -> int:
        return int(self.p) | int(self.fpd) << 1 | (self.table & ADDR_MASK)

    @classmethod
    def decode(cls, q: int) -> PasidDirEntry:
        return cls(_bit(q, 0), _bit(q, 1), q & ADDR_MASK, q & cls.RSVD_MASK)


# -- PASID table entry (512 bits) -------------------------------------------------------------
@attrs.frozen
class PasidEntry:
    # qword 0
    p: bool = False  # P (bit 0): present
    fpd: bool = False  # FPD (bit 1): fault processing disable
    aw: int = 0  # AW (4:2): second-stage address width (1: 39, 2: 48, 3: 57 bits)
    ssee: bool = False  # SSEE (bit 5): second-stage execute enable
    pgtt: int = 0  # PGTT (8:6): 1 first, 2 second, 3 nested, 4 pass-through
    ssade: bool = False  # SSADE (bit 9): second-stage accessed/dirty enable
    slptptr: int = 0  # SSPTPTR/SLPTPTR (63:12): second-stage table pointer
    # qword 1
    did: int = 0  # DID (15:0): domain-id tagging the caches
    pwsnp: bool = False  # PWSNP (bit 23): page-walk snoop
    pgsnp: bool = False  # PGSNP (bit 24): page snoop
    # qword 2
    sre: bool = False  # SRE (bit 128): supervisor requests enable
    fspm: int = 0  # FSPM (131:130): first-stage paging mode, 0 4-level, 1 5-level
    wpe: bool = False  # WPE (bit 132): write protect enable (supervisor)
    eafe: bool = False  # EAFE (bit 135): extended accessed flag enable
    fsptptr: int = 0  # FSPTPTR/FLPTPTR (191:140): first-stage table pointer
    rsvd: int = 0

    RSVD0 = 0xC00  # bits 11:10
    RSVD2 = 0xF00  # bits 139:136 (11:8 of qword 2); qwords 3..7 are not modelled: must be 0

    def encode(self) -> tuple[int, int, int, int, int, int, int, int]:
        q0 = (
            int(self.p)
            | int(self.fpd) << 1
            | (self.aw & 7) << 2
            | int(self.ssee) << 5
            | (self.pgtt & 7) << 6
            | int(self.ssade) << 9
            | (self.slptptr & ADDR_MASK)
        )
        q1 = (self.did & 0xFFFF) | int(self.pwsnp) << 23 | int(self.pgsnp) << 24
        q2 = (
            int(self.sre)
            | (self.fspm & 3) << 2
            | int(self.wpe) << 4
            | int(self.eafe) << 7
            | (self.fsptptr & ADDR_MASK)
        )
        return q0, q1, q2, 0, 0, 0, 0, 0

    @classmethod
    def decode(cls, qs: list[int] | tuple[int, ...]) -> PasidEntry:
        q0, q1, q2 = qs[0], qs[1], qs[2]
        rsvd = (q0 & cls.RSVD0) | (q2 & cls.RSVD2) | sum(qs[3:])
        return cls(
            p=_bit(q0, 0),
            fpd=_bit(q0, 1),
            aw=(q0 >> 2) & 7,
            ssee=_bit(q0, 5),
            pgtt=(q0 >> 6) & 7,
            ssade=_bit(q0, 9),
            slptptr=q0 & ADDR_MASK,
            did=q1 & 0xFFFF,
            pwsnp=_bit(q1, 23),
            pgsnp=_bit(q1, 24),
            sre=_bit(q2, 0),
            fspm=(q2 >> 2) & 3,
            wpe=_bit(q2, 4),
            eafe=_bit(q2, 7),
            fsptptr=q2 & ADDR_MASK,
            rsvd=rsvd,
        )

    def check(self, sagaw: int, fl5lp: bool) -> int:
        """0 when a present entry is usable, else the fault reason (0x5A reserved, 0x5B invalid)."""
        if self.rsvd:
            return F.FR_PASID_ENTRY_RSVD
        if self.pgtt not in (PGTT_FIRST, PGTT_SECOND, PGTT_NESTED, PGTT_PT):
            return F.FR_PASID_ENTRY_INVALID
        if self.pgtt in (PGTT_SECOND, PGTT_NESTED) and not (self.aw and sagaw >> self.aw & 1):
            return F.FR_PASID_ENTRY_INVALID
        if self.pgtt in (PGTT_FIRST, PGTT_NESTED) and (self.fspm > 1 or (self.fspm and not fl5lp)):
            return F.FR_PASID_ENTRY_INVALID
        return 0

    @property
    def fs_levels(self) -> int:
        return 5 if self.fspm == 1 else 4


def pasid_dir_index(pasid: int) -> int:
    return pasid >> 6


def pasid_table_index(pasid: int) -> int:
    return pasid & (PASIDS_PER_TABLE - 1)
