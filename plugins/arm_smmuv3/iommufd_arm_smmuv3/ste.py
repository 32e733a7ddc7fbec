"""The 64-byte Stream Table Entry (IHI 0070, 5.2) and the 8-byte level-1 stream table descriptor.

:meth:`Ste.decode` reads the fields the model uses; :meth:`Ste.encode` writes them back (other
bits stay zero); :meth:`Ste.illegal` is the hardware's consistency check whose failure is
reported as C_BAD_STE.
"""

from __future__ import annotations

import attrs

from iommufd_arm_smmuv3.cd import TG_GRANULE, granule_refused
from iommufd_arm_smmuv3.pgtable import s2_start_level
from iommufd_model.hw.bits import bit, get, mask, put

STE_SIZE = 64
STE_DWORDS = 8

# Config (word 0, bits 3:1)
CFG_ABORT = 0b000
CFG_BYPASS = 0b100
CFG_S1_TRANS = 0b101  # stage 1 only
CFG_S2_TRANS = 0b110  # stage 2 only
CFG_NESTED = 0b111  # stage 1 then stage 2
CFG_S1 = 0b001  # the Config bit that enables stage 1
CFG_S2 = 0b010  # the Config bit that enables stage 2

S1DSS_TERMINATE = 0
S1DSS_BYPASS = 1
S1DSS_SSID0 = 2
EATS_ABT = 0
EATS_TRANS = 1
EATS_S1CHK = 2
STRW_NSEL1 = 0
STRW_EL2 = 2
SHCFG_INCOMING = 1
S1C_WBRA = 1  # S1CIR / S1COR: write-back read-allocate
SH_ISH = 3

# word 0
STE0_V = bit(0)
STE0_CFG = mask(3, 1)
STE0_S1FMT = mask(5, 4)
STE0_S1CTXPTR = mask(51, 6)
STE0_S1CDMAX = mask(63, 59)
# word 1
STE1_S1DSS = mask(1, 0)
STE1_S1CIR = mask(3, 2)
STE1_S1COR = mask(5, 4)
STE1_S1CSH = mask(7, 6)
STE1_MEV = bit(19)
STE1_S2FWB = bit(25)
STE1_S1STALLD = bit(27)
STE1_EATS = mask(29, 28)
STE1_STRW = mask(31, 30)
STE1_SHCFG = mask(45, 44)
# word 2
STE2_S2VMID = mask(15, 0)
STE2_VTCR = mask(50, 32)  # S2T0SZ, S2SL0, S2IR0, S2OR0, S2SH0, S2TG, S2PS
STE2_S2AA64 = bit(51)
STE2_S2ENDI = bit(52)
STE2_S2AFFD = bit(53)
STE2_S2PTW = bit(54)
STE2_S2S = bit(57)
STE2_S2R = bit(58)
# word 3
STE3_S2TTB = mask(51, 4)

# What userspace may set in a vSTE (the kernel's STRTAB_STE_{0,1}_NESTING_ALLOWED).
NESTING_ALLOWED_0 = STE0_V | STE0_CFG | STE0_S1FMT | STE0_S1CTXPTR | STE0_S1CDMAX
NESTING_ALLOWED_1 = STE1_S1DSS | STE1_S1CIR | STE1_S1COR | STE1_S1CSH | STE1_S1STALLD | STE1_EATS

# Level-1 descriptor of a 2-level stream table
L1_SPAN = mask(4, 0)
L1_L2PTR = mask(51, 6)
# S1Fmt: the CD table's format; level-1 CD descriptor of a 2-level CD table
S1FMT_LINEAR = 0
S1FMT_4K_L2 = 1  # 64 CDs per leaf table
S1FMT_64K_L2 = 2  # 1024 CDs per leaf table (what Linux uses)
L1CD_V = bit(0)
L1CD_L2PTR = mask(51, 12)


@attrs.define
class Ste:
    v: bool = False  # V: the entry is valid
    config: int = CFG_ABORT  # Config: abort / bypass / S1 / S2 / nested
    s1fmt: int = 0  # S1Fmt: CD table format (0 = linear)
    s1ctxptr: int = 0  # S1ContextPtr: CD table address (an IPA when stage 2 is on)
    s1cdmax: int = 0  # S1CDMax: log2 of the number of CDs (0 = one CD, no substreams)
    s1dss: int = S1DSS_TERMINATE  # S1DSS: what non-substream traffic does when S1CDMax > 0
    s1cir: int = 0  # S1CIR: inner cacheability of CD / stage-1 table fetches
    s1cor: int = 0  # S1COR: outer cacheability
    s1csh: int = 0  # S1CSH: shareability
    mev: bool = False  # MEV: merge events
    s2fwb: bool = False  # S2FWB: stage 2 forces write-back over stage-1 attributes
    s1stalld: bool = False  # S1STALLD: stall disable
    eats: int = EATS_ABT  # EATS: ATS translation requests
    strw: int = STRW_NSEL1  # STRW: StreamWorld
    shcfg: int = 0  # SHCFG: shareability override
    s2vmid: int = 0  # S2VMID
    s2t0sz: int = 0  # VTCR.S2T0SZ: IPA size is 64 - S2T0SZ
    s2sl0: int = 0  # VTCR.S2SL0: stage-2 start level
    s2ir0: int = 0  # VTCR.S2IR0: inner cacheability of stage-2 walks
    s2or0: int = 0  # VTCR.S2OR0
    s2sh0: int = 0  # VTCR.S2SH0
    s2tg: int = 0  # VTCR.S2TG: granule (0 = 4 KiB)
    s2ps: int = 0  # VTCR.S2PS: output size, encoded as IPS
    s2aa64: bool = False  # S2AA64: AArch64 stage-2 tables
    s2endi: bool = False  # S2ENDI: big-endian stage-2 tables
    s2affd: bool = False  # S2AFFD: no access-flag faults at stage 2
    s2ptw: bool = False  # S2PTW: stage-1 walks to device memory fault at stage 2
    s2s: bool = False  # S2S: stall on stage-2 faults
    s2r: bool = False  # S2R: record stage-2 faults
    s2ttb: int = 0  # S2TTB: stage-2 table base
    raw: tuple[int, ...] = (0,) * STE_DWORDS

    @classmethod
    def decode(cls, w: list[int] | tuple[int, ...]) -> Ste:
        w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
        return cls(
            v=bool(w0 & STE0_V),
            config=get(w0, 3, 1),
            s1fmt=get(w0, 5, 4),
            s1ctxptr=w0 & STE0_S1CTXPTR,
            s1cdmax=get(w0, 63, 59),
            s1dss=get(w1, 1, 0),
            s1cir=get(w1, 3, 2),
            s1cor=get(w1, 5, 4),
            s1csh=get(w1, 7, 6),
            mev=bool(w1 & STE1_MEV),
            s2fwb=bool(w1 & STE1_S2FWB),
            s1stalld=bool(w1 & STE1_S1STALLD),
            eats=get(w1, 29, 28),
            strw=get(w1, 31, 30),
            shcfg=get(w1, 45, 44),
            s2vmid=get(w2, 15, 0),
            s2t0sz=get(w2, 37, 32),
            s2sl0=get(w2, 39, 38),
            s2ir0=get(w2, 41, 40),
            s2or0=get(w2, 43, 42),
            s2sh0=get(w2, 45, 44),
            s2tg=get(w2, 47, 46),
            s2ps=get(w2, 50, 48),
            s2aa64=bool(w2 & STE2_S2AA64),
            s2endi=bool(w2 & STE2_S2ENDI),
            s2affd=bool(w2 & STE2_S2AFFD),
            s2ptw=bool(w2 & STE2_S2PTW),
            s2s=bool(w2 & STE2_S2S),
            s2r=bool(w2 & STE2_S2R),
            s2ttb=w3 & STE3_S2TTB,
            raw=tuple(w),
        )

    def encode(self) -> list[int]:
        w0 = (
            (STE0_V if self.v else 0)
            | put(self.config, 3, 1)
            | put(self.s1fmt, 5, 4)
            | (self.s1ctxptr & STE0_S1CTXPTR)
            | put(self.s1cdmax, 63, 59)
        )
        w1 = (
            put(self.s1dss, 1, 0)
            | put(self.s1cir, 3, 2)
            | put(self.s1cor, 5, 4)
            | put(self.s1csh, 7, 6)
            | (STE1_MEV if self.mev else 0)
            | (STE1_S2FWB if self.s2fwb else 0)
            | (STE1_S1STALLD if self.s1stalld else 0)
            | put(self.eats, 29, 28)
            | put(self.strw, 31, 30)
            | put(self.shcfg, 45, 44)
        )
        w2 = (
            put(self.s2vmid, 15, 0)
            | put(self.s2t0sz, 37, 32)
            | put(self.s2sl0, 39, 38)
            | put(self.s2ir0, 41, 40)
            | put(self.s2or0, 43, 42)
            | put(self.s2sh0, 45, 44)
            | put(self.s2tg, 47, 46)
            | put(self.s2ps, 50, 48)
            | (STE2_S2AA64 if self.s2aa64 else 0)
            | (STE2_S2ENDI if self.s2endi else 0)
            | (STE2_S2AFFD if self.s2affd else 0)
            | (STE2_S2PTW if self.s2ptw else 0)
            | (STE2_S2S if self.s2s else 0)
            | (STE2_S2R if self.s2r else 0)
        )
        w3 = self.s2ttb & STE3_S2TTB
        return [w0, w1, w2, w3, 0, 0, 0, 0]

    # -- hardware checks --------------------------------------------------------------------
    @property
    def s1_enabled(self) -> bool:
        return self.config & 0b100 != 0 and bool(self.config & CFG_S1)

    @property
    def s2_enabled(self) -> bool:
        return self.config & 0b100 != 0 and bool(self.config & CFG_S2)

    @property
    def s2_ia_bits(self) -> int:
        return 64 - self.s2t0sz

    @property
    def s2_granule(self) -> int:
        """log2 of the stage-2 granule (12 for a reserved S2TG, which :meth:`illegal`
        refuses)."""
        return TG_GRANULE.get(self.s2tg, 12)

    @property
    def s2_start(self) -> int:
        """The architectural start level of the stage-2 walk (S2SL0 with S2TG)."""
        return s2_start_level(self.s2sl0, self.s2_granule)

    def illegal(
        self,
        ssid_bits: int,
        oas_bits: int,
        cd2l: bool = False,
        *,
        s1p: bool = True,
        s2p: bool = True,
        granules: frozenset[int] = frozenset({12}),
    ) -> str:
        """Why the hardware treats this valid STE as ILLEGAL (C_BAD_STE), or ``""``. A Config
        enabling a stage the SMMU does not implement (IDR0.S1P / S2P clear) is one; so is an
        S2TG whose granule IDR5 does not offer, and an S2SL0 that does not fit S2T0SZ with
        that granule."""
        if not self.v:
            return "V == 0"
        if self.config in (0b001, 0b010, 0b011):
            return f"reserved Config {self.config:#05b}"
        if (self.s1_enabled and not s1p) or (self.s2_enabled and not s2p):
            return f"Config {self.config:#05b} needs a stage IDR0 does not implement"
        if self.s1_enabled:
            if self.s1fmt == 3 or (self.s1fmt and not cd2l):
                return f"S1Fmt {self.s1fmt} not supported"
            if self.s1cdmax > ssid_bits:
                return f"S1CDMax {self.s1cdmax} above SSIDSIZE {ssid_bits}"
            if self.s1ctxptr >> oas_bits:
                return "S1ContextPtr beyond the output address size"
        if self.eats == 3:
            return "reserved EATS"
        if self.s2_enabled:
            if not self.s2aa64:
                return "S2AA64 == 0: AArch32 stage-2 tables are not supported"
            if self.s2endi:
                return "S2ENDI: big-endian tables are not supported"
            why = granule_refused("S2TG", self.s2tg, granules)
            if why:
                return why
            if self.s2sl0 == 3:
                return "reserved S2SL0"
            if not s2_geometry_ok(self.s2t0sz, self.s2sl0, self.s2_granule, oas_bits):
                return f"S2T0SZ {self.s2t0sz} inconsistent with S2SL0 {self.s2sl0}"
            if self.s2ttb >> oas_bits:
                return "S2TTB beyond the output address size"
        return ""


def s2_geometry_ok(t0sz: int, sl0: int, granule: int = 12, oas_bits: int = 48) -> bool:
    """Whether a stage-2 walk of a ``64 - t0sz``-bit IPA can start at the SL0 level with the
    granule ``1 << granule`` (SL0 3 is reserved for every granule: start level 0 with 16 KiB
    needs FEAT_LPA2, which the model does not implement).

    The start-level table resolves the bits above that level's entry size: at least one bit and
    at most ``granule - 3`` + 4 (up to 16 concatenated tables), and no concatenation at level 0.
    IPAs are 24..48 bits (4 KiB), 25..48 bits (16 and 64 KiB), 52 with 64 KiB on a 52-bit OAS.
    """
    ia_bits = 64 - t0sz
    top = 52 if granule == 16 and oas_bits > 48 else 48
    if not (24 if granule == 12 else 25) <= ia_bits <= top:
        return False
    stride = granule - 3
    start = s2_start_level(sl0, granule)
    bits = ia_bits - (granule + stride * (3 - start))
    if start == 0:
        return 1 <= bits <= stride
    return 1 <= bits <= stride + 4


def ips_bits(ips: int) -> int:
    """Address size of an IPS / S2PS / OAS encoding (the reserved 7 reads as 48 bits here;
    the hardware caps every size at its OAS: ``Smmuv3.oa_bits``)."""
    return (32, 36, 40, 42, 44, 48, 52)[ips] if ips <= 6 else 48
