"""VMSAv8-64 translation tables as the driver writes them (io-pgtable-arm), with the 4, 16 or
64 KiB granule.

Two :class:`~iommufd_model.hw.radix.PtFormat` subclasses let the framework's radix engine build
stage-1 and stage-2 tables; the hardware walks them with ``walk.py``. The radix engine numbers
levels from the leaf (0 = pages of the granule); the Arm ARM numbers them from the root (3 =
pages), so radix level ``n`` is architectural level ``3 - n``. :func:`pgtable_cfg` is what
io-pgtable-arm derives from the SMMU's page sizes and address sizes (granule, input and output
sizes, levels, concatenated stage-2 start tables, the TCR / VTCR fields the driver copies).

Descriptor fields (Arm ARM D8.3): [1:0] 0b11 table/page, 0b01 block; [4:2] AttrIndx (stage 1) or
[5:2] MemAttr (stage 2); [7:6] AP[2:1] (stage 1) or S2AP (stage 2); [9:8] SH; [10] AF; [11] nG;
[47:g] output address (with the 64 KiB granule PA[51:48] in [15:12]); [53] PXN; [54] XN/UXN.
"""

from __future__ import annotations

import attrs

from iommufd_arm_smmuv3 import walk
from iommufd_model.driver import IOMMU_CACHE, IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.radix import INVALID, LEAF, TABLE, PtFormat

PTE_VALID = walk.DESC_VALID
PTE_TYPE_TABLE = walk.DESC_TABLE  # also "page" at level 3
PTE_AF = walk.DESC_AF
PTE_ADDR = walk.DESC_OA
PTE_SH_IS = 3 << 8  # inner shareable
PTE_SH_OS = 2 << 8  # outer shareable (a mapping without IOMMU_CACHE)
PTE_NG = 1 << 11
PTE_DBM = 1 << 51  # dirty bit modifier: with CD.HD the SMMU clears AP[2] on a write
PTE_XN = 1 << 54  # only for IOMMU_NOEXEC, which iommufd never passes
PTE_AP_UNPRIV = walk.S1_AP_UNPRIV
PTE_AP_RDONLY = walk.S1_AP_RDONLY
PTE_ATTRINDX_CACHE = 1 << 2  # MAIR slot 1: normal write-back (the driver's MAIR below)
PTE_S2AP_R = walk.S2AP_READ
PTE_S2AP_W = walk.S2AP_WRITE
PTE_MEMATTR_OIWB = 0xF << 2  # stage-2 MemAttr: normal, outer and inner write-back
PTE_MEMATTR_FWB_WB = 0x6 << 2  # the same under S2FWB (stage 2 forces write-back)
PTE_MEMATTR_NC = 0x5 << 2

# MAIR as io-pgtable-arm (Linux 7.2) programs it: slot 0 non-cacheable, 1 write-back RWA,
# 2 device nGnRE, 3 inner non-cacheable / outer write-back.
MAIR_VALUE = 0x44 | (0xFF << 8) | (0x04 << 16) | (0xF4 << 24)

GRANULE_SHIFT = 12
VA_BITS = 48  # T0SZ = 16: four levels, start level 0
PGSIZE_BITMAP = (1 << 12) | (1 << 21) | (1 << 30)

# CD.TG0 and STE.S2TG (VTCR.TG0) encodings of the translation granule (arm-smmu-v3.h, Arm ARM)
TG_4K, TG_64K, TG_16K = 0, 1, 2
TG_SHIFT = {TG_4K: 12, TG_16K: 14, TG_64K: 16}
SHIFT_TG = {shift: tg for tg, shift in TG_SHIFT.items()}
# The page sizes io-pgtable-arm allows with each granule (arm_lpae_restrict_pgsizes): the
# granule's pages and its level-2 and level-1 blocks (4 TiB only with a 52-bit output size).
GRANULE_PGSIZES = {
    12: (1 << 12) | (1 << 21) | (1 << 30),
    14: (1 << 14) | (1 << 25),
    16: (1 << 16) | (1 << 29),
}
BLOCK_4T = 1 << 42
IPS_OF_BITS = {32: 0, 36: 1, 40: 2, 42: 3, 44: 4, 48: 5, 52: 6}
#: the largest stage-2 start tables io-pgtable-arm concatenates (ARM_LPAE_S2_MAX_CONCAT_PAGES)
S2_MAX_CONCAT = 16


def arch_level(radix_level: int) -> int:
    return 3 - radix_level


def s2_start_level(sl0: int, granule_shift: int = GRANULE_SHIFT) -> int:
    """Stage-2 start level from STE.S2SL0 (VTCR.SL0): with the 4 KiB granule SL0 = 0, 1, 2 ->
    levels 2, 1, 0; with 16 and 64 KiB SL0 = 0, 1, 2 -> levels 3, 2, 1 (what io-pgtable-arm's
    ``~sl & 3`` with the 4 KiB ``sl++`` encodes)."""
    return (2 if granule_shift == 12 else 3) - sl0


def levels_for(ia_bits: int, granule_shift: int) -> int:
    """Levels that resolve ``ia_bits`` with this granule (``DIV_ROUND_UP(va_bits, bits)``)."""
    stride = granule_shift - 3
    return -(-(ia_bits - granule_shift) // stride)


@attrs.frozen
class PgtableCfg:
    """What io-pgtable-arm (Linux 7.2) settles for one domain: the granule from the SMMU's
    page sizes, the clamped input / output sizes, the levels and the concatenated stage-2
    start tables, and the TCR / VTCR fields arm_smmu_make_s1_cd / _make_s2_domain_ste copy."""

    stage: int
    granule_shift: int
    ias: int
    oas: int
    pgsize_bitmap: int
    levels: int  # levels the walk uses (after concatenation)
    concat: bool  # stage 2: the start level holds concatenated tables

    @property
    def tg(self) -> int:
        return SHIFT_TG[self.granule_shift]

    @property
    def tsz(self) -> int:
        return 64 - self.ias

    @property
    def ips(self) -> int:
        return IPS_OF_BITS[self.oas]

    @property
    def start_level(self) -> int:
        return 4 - self.levels

    @property
    def sl0(self) -> int:
        """VTCR.SL0 as arm_64_lpae_alloc_pgtable_s2 writes it: ``~sl & 3``, ``sl`` the start
        level, plus one with the 4 KiB granule."""
        sl = self.start_level + (1 if self.granule_shift == 12 else 0)
        return ~sl & 3

    def format(self, *, hd: bool = False, fwb: bool = False) -> _VmsaFormat:
        if self.stage == 1:
            return Stage1Format(hd=hd, cfg=self)
        return Stage2Format(fwb=fwb, cfg=self)


def pgtable_cfg(smmu_pgsizes: int, ias: int, oas: int, stage: int) -> PgtableCfg | None:
    """arm_lpae_restrict_pgsizes() and arm_lpae_alloc_pgtable() on a 4 KiB PAGE_SIZE host
    (io-pgtable-arm.c): the granule is 4 KiB when the SMMU offers it, else the smallest it
    offers (16 KiB before 64 KiB); sizes clamp to 48 bits (52 with 64 KiB); a stage-2 table
    concatenates its start level where arm_lpae_concat_mandatory() says so. None: no usable
    granule (``alloc_io_pgtable_ops`` fails)."""
    page = 1 << 12
    if smmu_pgsizes & page:
        granule = page
    elif smmu_pgsizes & ~(page - 1):
        larger = smmu_pgsizes & ~(page - 1)
        granule = larger & -larger
    else:
        return None
    shift = granule.bit_length() - 1
    if shift not in GRANULE_PGSIZES:
        return None
    max_bits = 52 if shift == 16 else 48
    sizes = GRANULE_PGSIZES[shift] | (BLOCK_4T if shift == 16 and oas > 48 else 0)
    ias, oas = min(ias, max_bits), min(oas, max_bits)
    levels = levels_for(ias, shift)
    concat = False
    if stage == 2:
        start = 4 - levels
        if shift == 14 and start == 0:
            concat = oas == 48 or ias == 48
        elif shift == 12 and start == 0:
            concat = oas in (40, 42)
        else:
            concat = shift == 14 and start == 1 and oas == 40
        if concat:
            levels -= 1
    return PgtableCfg(stage, shift, ias, oas, smmu_pgsizes & sizes, levels, concat)


def oa_to_pte(pa: int, granule_shift: int) -> int:
    """paddr_to_iopte(): the address field of a descriptor; with 64 KiB PA[51:48] go to [15:12]."""
    if granule_shift == 16:
        return (pa | pa >> 36) & PTE_ADDR
    return pa & PTE_ADDR


def pte_to_oa(entry: int, granule_shift: int) -> int:
    """iopte_to_paddr(): the address a descriptor holds."""
    addr = entry & PTE_ADDR
    if granule_shift == 16:
        return (addr | addr << 36) & (PTE_ADDR << 4)
    return addr


class _VmsaFormat(PtFormat):
    large_leaf_levels = frozenset({1, 2})  # 2 MiB and 1 GiB blocks
    linear_leaves = True

    def __init__(self, cfg: PgtableCfg | None = None) -> None:
        if cfg is None or (cfg.granule_shift == 12 and cfg.ias == 48 and not cfg.concat):
            super().__init__(4)
            self.cfg = cfg
            return
        super().__init__(cfg.levels, cfg.granule_shift, cfg.ias)
        self.cfg = cfg
        blocks = {1} if cfg.granule_shift != 12 else {1, 2}
        if cfg.pgsize_bitmap & BLOCK_4T:
            blocks.add(2)
        self.large_leaf_levels = frozenset(b for b in blocks if b < cfg.levels)

    def make_table(self, table_pa: int, level: int) -> int:
        return oa_to_pte(table_pa, self.granule_shift) | PTE_VALID | PTE_TYPE_TABLE

    def _leaf_bits(self, pa: int, level: int, prot: int) -> int:
        sh = PTE_SH_IS if prot & IOMMU_CACHE else PTE_SH_OS
        addr = oa_to_pte(pa, self.granule_shift)
        return addr | PTE_VALID | PTE_AF | sh | (PTE_TYPE_TABLE if level == 0 else 0)

    def _prot(self, entry: int) -> int:
        raise NotImplementedError

    def decode(self, entry: int, level: int) -> tuple[int, int, int]:
        if not entry & PTE_VALID:
            return INVALID, 0, 0
        addr = pte_to_oa(entry, self.granule_shift)
        if level == 0:
            if not entry & PTE_TYPE_TABLE:
                return INVALID, 0, 0
            return LEAF, addr & ~((1 << self.granule_shift) - 1), self._prot(entry)
        if entry & PTE_TYPE_TABLE:
            return TABLE, addr & ~((1 << self.granule_shift) - 1), IOMMU_READ | IOMMU_WRITE
        if level not in self.large_leaf_levels:
            return INVALID, 0, 0
        size = 1 << self.level_shift(level)
        return LEAF, addr & ~(size - 1), self._prot(entry)


class Stage1Format(_VmsaFormat):
    """Stage-1 (VMSAv8-64 EL1&0) descriptors as arm_lpae_prot_to_pte() writes them: nG,
    AP[1] (unprivileged) always, AP[2] (read-only) for read-only maps, DBM on writable ones
    of a dirty-tracking domain (``hd``, IO_PGTABLE_QUIRK_ARM_HD), AttrIndx 1 for IOMMU_CACHE;
    no XN (iommufd never passes IOMMU_NOEXEC)."""

    name = "vmsav8-64-s1"

    def __init__(self, hd: bool = False, cfg: PgtableCfg | None = None) -> None:
        super().__init__(cfg)
        self.hd = hd

    def make_leaf(self, pa: int, level: int, prot: int) -> int:
        entry = self._leaf_bits(pa, level, prot) | PTE_NG | PTE_AP_UNPRIV
        if prot & IOMMU_CACHE:
            entry |= PTE_ATTRINDX_CACHE
        if not prot & IOMMU_WRITE and prot & IOMMU_READ:
            entry |= PTE_AP_RDONLY
        elif self.hd:
            entry |= PTE_DBM
        return entry

    def is_dirty(self, entry: int) -> bool:
        """iopte_writeable_dirty(): DBM set and AP[2] clear (the SMMU cleared it on a write,
        or the map made it so)."""
        return entry & (PTE_AP_RDONLY | PTE_DBM) == PTE_DBM

    def clear_dirty(self, entry: int) -> int:
        """iopte_set_writeable_clean(): AP[2] set again; the next write makes it dirty."""
        return entry | PTE_AP_RDONLY

    def _prot(self, entry: int) -> int:
        if not entry & PTE_AP_UNPRIV:
            return 0
        if entry & PTE_AP_RDONLY and not entry & PTE_DBM:
            return IOMMU_READ
        return IOMMU_READ | IOMMU_WRITE


class Stage2Format(_VmsaFormat):
    """Stage-2 descriptors: S2AP read/write bits and MemAttr."""

    name = "vmsav8-64-s2"

    def __init__(self, fwb: bool = False, cfg: PgtableCfg | None = None) -> None:
        super().__init__(cfg)
        self.fwb = fwb  # IO_PGTABLE_QUIRK_ARM_S2FWB: nest parents on an S2FWB SMMU

    def make_leaf(self, pa: int, level: int, prot: int) -> int:
        entry = self._leaf_bits(pa, level, prot)
        if prot & IOMMU_CACHE:
            entry |= PTE_MEMATTR_FWB_WB if self.fwb else PTE_MEMATTR_OIWB
        else:
            entry |= PTE_MEMATTR_NC
        if prot & IOMMU_READ:
            entry |= PTE_S2AP_R
        if prot & IOMMU_WRITE:
            entry |= PTE_S2AP_W
        return entry

    def _prot(self, entry: int) -> int:
        return (IOMMU_READ if entry & PTE_S2AP_R else 0) | (
            IOMMU_WRITE if entry & PTE_S2AP_W else 0
        )
