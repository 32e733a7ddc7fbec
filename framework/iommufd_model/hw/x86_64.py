"""The x86-64 long-mode page-table format: AMD v2 (guest) tables and VT-d first-stage tables.

Both IOMMUs walk the CPU's 4- or 5-level format, so both vendors use this one module (the
kernel shares it too: generic_pt's x86_64 format). Bits (Intel SDM vol. 3 4.5, AMD APM 5.3):
P=0, R/W=1, U/S=2, PWT=3, PCD=4, A=5, D=6, PS=7 (in PDPTE/PDE), G=8, address 12..51, XD=63.
Write permission is the AND of R/W over all levels; PS makes a 1 GiB (level 2) or 2 MiB
(level 1) leaf. An input address must be canonical for the paging depth.
"""

from __future__ import annotations

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.radix import INVALID, LEAF, TABLE, PtFormat

X86_P = 1 << 0
X86_RW = 1 << 1
X86_US = 1 << 2
X86_PWT = 1 << 3
X86_PCD = 1 << 4
X86_A = 1 << 5
X86_D = 1 << 6
X86_PS = 1 << 7
X86_G = 1 << 8
X86_XD = 1 << 63
X86_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF


def canonical(iova: int, va_bits: int) -> bool:
    """True when bits above ``va_bits - 1`` all equal bit ``va_bits - 1`` (64-bit value)."""
    top = iova >> (va_bits - 1)
    return top == 0 or top == (1 << (65 - va_bits)) - 1


class X86_64Format(PtFormat):  # noqa: N801 - the format's name
    """4-level (48-bit) or 5-level (57-bit) x86-64 paging."""

    name = "x86_64"
    large_leaf_levels = frozenset({1, 2})
    linear_leaves = True

    def __init__(self, levels: int = 4, *, user: bool = True) -> None:
        if levels not in (4, 5):
            raise ValueError("x86-64 paging has 4 or 5 levels")
        super().__init__(levels)
        self.user = user

    def make_table(self, table_pa: int, level: int) -> int:
        # Tables grant everything; leaves restrict (the usual Linux choice).
        return (table_pa & X86_ADDR_MASK) | X86_P | X86_RW | (X86_US if self.user else 0) | X86_A

    def make_leaf(self, pa: int, level: int, prot: int) -> int:
        entry = (pa & X86_ADDR_MASK) | X86_A
        if prot & IOMMU_READ or prot & IOMMU_WRITE:
            entry |= X86_P
        if prot & IOMMU_WRITE:
            entry |= X86_RW  # D is set by the hardware on the first write
        if self.user:
            entry |= X86_US
        if level:
            entry |= X86_PS
        return entry

    def decode(self, entry: int, level: int) -> tuple[int, int, int]:
        if not entry & X86_P:
            return INVALID, 0, 0
        prot = IOMMU_READ | (IOMMU_WRITE if entry & X86_RW else 0)
        if level == 0 or (entry & X86_PS and level in self.large_leaf_levels):
            shift = 12 + 9 * level
            return LEAF, entry & X86_ADDR_MASK & ~((1 << shift) - 1), prot
        if entry & X86_PS:
            return INVALID, 0, 0  # PS at PML4/PML5 is reserved: treated as a bad entry
        return TABLE, entry & X86_ADDR_MASK, prot

    def is_dirty(self, entry: int) -> bool:
        return bool(entry & X86_D)

    def clear_dirty(self, entry: int) -> int:
        return entry & ~X86_D
