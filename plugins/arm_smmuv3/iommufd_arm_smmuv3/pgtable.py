"""VMSAv8-64 translation tables with the 4 KiB granule, as the driver writes them (io-pgtable-arm).

Two :class:`~iommufd_model.hw.radix.PtFormat` subclasses let the framework's radix engine build
stage-1 and stage-2 tables; the hardware walks them with ``walk.py``. The radix engine numbers
levels from the leaf (0 = 4 KiB pages); the Arm ARM numbers them from the root (3 = 4 KiB pages),
so radix level ``n`` is architectural level ``3 - n``.

Descriptor fields (Arm ARM D8.3): [1:0] 0b11 table/page, 0b01 block; [4:2] AttrIndx (stage 1) or
[5:2] MemAttr (stage 2); [7:6] AP[2:1] (stage 1) or S2AP (stage 2); [9:8] SH; [10] AF; [11] nG;
[47:12] output address; [53] PXN; [54] XN/UXN.
"""

from __future__ import annotations

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


def arch_level(radix_level: int) -> int:
    return 3 - radix_level


def s2_start_level(sl0: int) -> int:
    """Stage-2 start level from STE.S2SL0 with the 4 KiB granule (SL0 = 0, 1, 2 -> 2, 1, 0)."""
    return 2 - sl0


class _VmsaFormat(PtFormat):
    large_leaf_levels = frozenset({1, 2})  # 2 MiB and 1 GiB blocks
    linear_leaves = True

    def __init__(self) -> None:
        super().__init__(4)

    def make_table(self, table_pa: int, level: int) -> int:
        return (table_pa & PTE_ADDR) | PTE_VALID | PTE_TYPE_TABLE

    def _leaf_bits(self, pa: int, level: int, prot: int) -> int:
        sh = PTE_SH_IS if prot & IOMMU_CACHE else PTE_SH_OS
        return (pa & PTE_ADDR) | PTE_VALID | PTE_AF | sh | (PTE_TYPE_TABLE if level == 0 else 0)

    def _prot(self, entry: int) -> int:
        raise NotImplementedError

    def decode(self, entry: int, level: int) -> tuple[int, int, int]:
        if not entry & PTE_VALID:
            return INVALID, 0, 0
        if level == 0:
            if not entry & PTE_TYPE_TABLE:
                return INVALID, 0, 0
            return LEAF, entry & PTE_ADDR, self._prot(entry)
        if entry & PTE_TYPE_TABLE:
            return TABLE, entry & PTE_ADDR, IOMMU_READ | IOMMU_WRITE
        if level not in self.large_leaf_levels:
            return INVALID, 0, 0
        size = 1 << self.level_shift(level)
        return LEAF, entry & PTE_ADDR & ~(size - 1), self._prot(entry)


class Stage1Format(_VmsaFormat):
    """Stage-1 (VMSAv8-64 EL1&0) descriptors as arm_lpae_prot_to_pte() writes them: nG,
    AP[1] (unprivileged) always, AP[2] (read-only) for read-only maps, DBM on writable ones
    of a dirty-tracking domain (``hd``, IO_PGTABLE_QUIRK_ARM_HD), AttrIndx 1 for IOMMU_CACHE;
    no XN (iommufd never passes IOMMU_NOEXEC)."""

    name = "vmsav8-64-s1"

    def __init__(self, hd: bool = False) -> None:
        super().__init__()
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

    def __init__(self, fwb: bool = False) -> None:
        super().__init__()
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
