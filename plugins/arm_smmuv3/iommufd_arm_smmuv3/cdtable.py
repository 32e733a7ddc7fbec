"""A master's context-descriptor table as Linux 7.2 lays it out (``arm_smmu_alloc_cd_tables``).

S1CDMax is the master's SSID width (``ssid_bits``: the device's PASID width, capped by
IDR1.SSIDSIZE, and by 10 without IDR0.CD2L). Up to 1024 CDs the table is linear; above that
it has two levels: level-1 descriptors (V, L2Ptr) and leaf tables of 1024 CDs (S1Fmt =
64K_L2) allocated when a substream of their range is first used. A new leaf table's level-1
descriptor is followed by a non-leaf CFGI_CD (an invalid L1 descriptor may be cached).

Facts from Linux 7.2 arm-smmu-v3.c / .h; the code is the model's.
"""

from __future__ import annotations

from iommufd_arm_smmuv3.cd import CD_SIZE
from iommufd_arm_smmuv3.ste import L1CD_L2PTR, L1CD_V, S1FMT_64K_L2, S1FMT_LINEAR
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory

L2_ENTRIES = 1024  # CTXDESC_L2_ENTRIES
LINEAR_CDMAX = 10  # CTXDESC_LINEAR_CDMAX: a linear table of 64 KiB at most


class CdTable:
    """``struct arm_smmu_ctx_desc_cfg``: where each substream's CD lives."""

    def __init__(self, memory: PhysicalMemory, s1cdmax: int, two_level: bool) -> None:
        self.memory = memory
        self.s1cdmax = s1cdmax
        contexts = 1 << s1cdmax
        self.used_ssids = 0  # valid CDs other than substream 0
        self.l2: dict[int, int] = {}  # level-1 index -> leaf table address
        if not two_level or contexts <= L2_ENTRIES:
            self.s1fmt = S1FMT_LINEAR
            self.base = self._alloc(contexts * CD_SIZE)
        else:
            self.s1fmt = S1FMT_64K_L2
            self.base = self._alloc(-(-contexts // L2_ENTRIES) * 8)

    def _alloc(self, size: int) -> int:
        pages = max(1, -(-size // PAGE_SIZE))
        return self.memory.alloc_contiguous(pages) << PAGE_SHIFT

    def cd_addr(self, ssid: int) -> int | None:
        """``arm_smmu_get_cd_ptr()``: the CD's address, None when its leaf table is absent."""
        if self.s1fmt == S1FMT_LINEAR:
            return self.base + ssid * CD_SIZE
        l2 = self.l2.get(ssid // L2_ENTRIES)
        return None if l2 is None else l2 + (ssid % L2_ENTRIES) * CD_SIZE

    def alloc_leaf(self, ssid: int) -> bool:
        """Allocate the leaf table of ``ssid`` and write its level-1 descriptor; True when
        one was made (the caller then issues the non-leaf CFGI_CD)."""
        if self.s1fmt == S1FMT_LINEAR or ssid // L2_ENTRIES in self.l2:
            return False
        l2 = self._alloc(L2_ENTRIES * CD_SIZE)
        self.l2[ssid // L2_ENTRIES] = l2
        self.memory.write_u64(self.base + (ssid // L2_ENTRIES) * 8, (l2 & L1CD_L2PTR) | L1CD_V)
        return True
