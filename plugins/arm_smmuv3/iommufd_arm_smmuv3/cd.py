"""The 64-byte Context Descriptor (IHI 0070, 5.4): stage-1 translation settings of one substream.

:meth:`Cd.illegal` is the hardware's check whose failure is reported as C_BAD_CD.
"""

from __future__ import annotations

import attrs

from iommufd_model.hw.bits import bit, get, mask, put

CD_SIZE = 64

CD0_T0SZ = mask(5, 0)
CD0_TG0 = mask(7, 6)
CD0_IR0 = mask(9, 8)
CD0_OR0 = mask(11, 10)
CD0_SH0 = mask(13, 12)
CD0_EPD0 = bit(14)
CD0_ENDI = bit(15)
CD0_EPD1 = bit(30)
CD0_V = bit(31)
CD0_IPS = mask(34, 32)
CD0_AFFD = bit(35)
CD0_AA64 = bit(41)
CD0_HD = bit(42)
CD0_HA = bit(43)
CD0_S = bit(44)
CD0_R = bit(45)
CD0_A = bit(46)
CD0_ASET = bit(47)
CD0_ASID = mask(63, 48)
CD1_TTB0 = mask(51, 4)

TG0_4K = 0
TG0_64K = 1
TG0_16K = 2
IRGN_WBWA = 1
#: log2 of the granule each TG0 (and STE.S2TG) encoding selects; 3 is reserved
TG_GRANULE = {TG0_4K: 12, TG0_16K: 14, TG0_64K: 16}


def granule_refused(field: str, tg: int, granules: frozenset[int]) -> str:
    """Why a TG / S2TG encoding is ILLEGAL: reserved, or a granule IDR5 does not offer."""
    shift = TG_GRANULE.get(tg)
    if shift in granules:
        return ""
    if len(granules) == 1:
        return f"{field} {tg}: only the {1 << (min(granules) - 10)} KiB granule is implemented"
    sizes = "/".join(str(1 << (g - 10)) for g in sorted(granules))
    return f"{field} {tg}: granule not implemented (IDR5: {sizes} KiB)"


@attrs.define
class Cd:
    t0sz: int = 0  # T0SZ: the TTB0 region covers 64 - T0SZ bits of VA
    tg0: int = TG0_4K  # TG0: TTB0 granule
    ir0: int = 0  # IR0: inner cacheability of table walks
    or0: int = 0  # OR0: outer cacheability
    sh0: int = 0  # SH0: shareability
    epd0: bool = False  # EPD0: walks through TTB0 disabled (translation fault)
    endi: bool = False  # ENDI: big-endian tables
    epd1: bool = False  # EPD1: walks through TTB1 disabled
    v: bool = False  # V: the CD is valid
    ips: int = 0  # IPS: output (intermediate physical) address size
    affd: bool = False  # AFFD: no access-flag faults
    aa64: bool = False  # AA64: VMSAv8-64 tables
    hd: bool = False  # HD: hardware dirty-state update
    ha: bool = False  # HA: hardware access-flag update
    s: bool = False  # S: stall faulting transactions
    r: bool = False  # R: record faults in the event queue
    a: bool = False  # A: abort (rather than RAZ/WI) terminated transactions
    aset: bool = False  # ASET: ASID set (shared with the PE or not)
    asid: int = 0  # ASID: tag of this context's TLB entries
    ttb0: int = 0  # TTB0: translation table base (an IPA when stage 2 is on)
    mair: int = 0  # MAIR: memory attribute indirection register (word 3)

    @classmethod
    def decode(cls, w: list[int] | tuple[int, ...]) -> Cd:
        w0 = w[0]
        return cls(
            t0sz=get(w0, 5, 0),
            tg0=get(w0, 7, 6),
            ir0=get(w0, 9, 8),
            or0=get(w0, 11, 10),
            sh0=get(w0, 13, 12),
            epd0=bool(w0 & CD0_EPD0),
            endi=bool(w0 & CD0_ENDI),
            epd1=bool(w0 & CD0_EPD1),
            v=bool(w0 & CD0_V),
            ips=get(w0, 34, 32),
            affd=bool(w0 & CD0_AFFD),
            aa64=bool(w0 & CD0_AA64),
            hd=bool(w0 & CD0_HD),
            ha=bool(w0 & CD0_HA),
            s=bool(w0 & CD0_S),
            r=bool(w0 & CD0_R),
            a=bool(w0 & CD0_A),
            aset=bool(w0 & CD0_ASET),
            asid=get(w0, 63, 48),
            ttb0=w[1] & CD1_TTB0,
            mair=w[3],
        )

    def encode(self) -> list[int]:
        w0 = (
            put(self.t0sz, 5, 0)
            | put(self.tg0, 7, 6)
            | put(self.ir0, 9, 8)
            | put(self.or0, 11, 10)
            | put(self.sh0, 13, 12)
            | (CD0_EPD0 if self.epd0 else 0)
            | (CD0_ENDI if self.endi else 0)
            | (CD0_EPD1 if self.epd1 else 0)
            | (CD0_V if self.v else 0)
            | put(self.ips, 34, 32)
            | (CD0_AFFD if self.affd else 0)
            | (CD0_AA64 if self.aa64 else 0)
            | (CD0_HD if self.hd else 0)
            | (CD0_HA if self.ha else 0)
            | (CD0_S if self.s else 0)
            | (CD0_R if self.r else 0)
            | (CD0_A if self.a else 0)
            | (CD0_ASET if self.aset else 0)
            | put(self.asid, 63, 48)
        )
        return [w0, self.ttb0 & CD1_TTB0, 0, self.mair, 0, 0, 0, 0]

    @property
    def ia_bits(self) -> int:
        return 64 - self.t0sz

    @property
    def granule(self) -> int:
        """log2 of the TTB0 granule (12 for a reserved TG0, which :meth:`illegal` refuses)."""
        return TG_GRANULE.get(self.tg0, 12)

    def illegal(self, granules: frozenset[int] = frozenset({12}), vax: bool = False) -> str:
        """Why the hardware rejects this CD (C_BAD_CD), or ``""``: a TG0 whose granule IDR5
        does not offer, or a T0SZ outside 16..39 (12..39 with IDR5.VAX and the 64 KiB
        granule: 52-bit VAs), the model's reading of IHI 0070's CD.TG0 / T0SZ rules."""
        if not self.v:
            return "V == 0"
        if not self.aa64:
            return "AA64 == 0: AArch32 tables are not supported"
        if self.endi:
            return "ENDI: big-endian tables are not supported"
        why = granule_refused("TG0", self.tg0, granules)
        if why:
            return why
        low = 12 if vax and self.tg0 == TG0_64K else 16
        if not low <= self.t0sz <= 39:
            return f"T0SZ {self.t0sz} outside {low}..39"
        return ""
