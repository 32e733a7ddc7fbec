"""The VT-d second-stage paging format (spec 9.8) as a framework ``PtFormat``.

Entry bits: R=0, W=1, X=2, EMT=5:3, IPAT=6, PS=7 (2 MiB at level 1, 1 GiB at level 2 when
CAP.SLLPS allows), A=8 and D=9 (written by hardware when the PASID entry's SSADE is set),
SNP=11, address 51:12, TM=62. An entry is present when R or W is set. Write permission is the
AND of W along the walk. The number of levels follows the PASID entry's AW (3, 4 or 5).
"""

from __future__ import annotations

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.radix import INVALID, LEAF, TABLE, PtFormat

SS_R = 1 << 0  # R: read
SS_W = 1 << 1  # W: write
SS_X = 1 << 2  # X: execute (only with SSEE)
SS_PS = 1 << 7  # PS: page size (large leaf)
SS_A = 1 << 8  # A: accessed (SSADE)
SS_D = 1 << 9  # D: dirty (SSADE)
SS_SNP = 1 << 11  # SNP: snoop
SS_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF


def sllps_levels(sllps: int) -> frozenset[int]:
    """Leaf levels above 0 allowed by CAP.SLLPS (bit 0: 2 MiB, bit 1: 1 GiB)."""
    return frozenset(level for level in (1, 2) if sllps >> (level - 1) & 1)


class SecondStageFormat(PtFormat):
    """Second-stage tables with ``levels`` = AW + 2 and the large pages CAP.SLLPS allows."""

    name = "vtd_second_stage"
    linear_leaves = True

    def __init__(self, levels: int = 4, sllps: int = 0b11, *, snoop: bool = False) -> None:
        if levels not in (3, 4, 5):
            raise ValueError("second-stage tables have 3, 4 or 5 levels")
        super().__init__(levels)
        self.large_leaf_levels = sllps_levels(sllps)
        self.sllps = sllps
        self.snoop = snoop

    def make_table(self, table_pa: int, level: int) -> int:
        return (table_pa & SS_ADDR_MASK) | SS_R | SS_W

    def make_leaf(self, pa: int, level: int, prot: int) -> int:
        entry = pa & SS_ADDR_MASK
        if prot & IOMMU_READ:
            entry |= SS_R
        if prot & IOMMU_WRITE:
            entry |= SS_W
        if level:
            entry |= SS_PS
        if self.snoop:
            entry |= SS_SNP
        return entry

    def decode(self, entry: int, level: int) -> tuple[int, int, int]:
        if not entry & (SS_R | SS_W):
            return INVALID, 0, 0
        prot = (IOMMU_READ if entry & SS_R else 0) | (IOMMU_WRITE if entry & SS_W else 0)
        if level and entry & SS_PS:
            if level not in self.large_leaf_levels:
                return INVALID, 0, 0  # PS where SLLPS has no such size: reserved
            size_mask = (1 << self.level_shift(level)) - 1
            return LEAF, entry & SS_ADDR_MASK & ~size_mask, prot
        if level == 0:
            return LEAF, entry & SS_ADDR_MASK, prot
        return TABLE, entry & SS_ADDR_MASK, prot

    def is_dirty(self, entry: int) -> bool:
        return bool(entry & SS_D)

    def clear_dirty(self, entry: int) -> int:
        return entry & ~SS_D
