"""The GCR3 table: guest CR3 (v2 table root) per PASID (spec "Guest CR3 Table"; kernel
``gcr3_tbl_info``, ``__get_gcr3_pte``, ``update_gcr3``).

GLX + 1 levels of 512 u64 entries; level ``n`` is indexed by PASID bits [9n+8:9n]. Every entry
is ``address[51:12] | GCR3_VALID``; the leaf entry's address is the root of an x86-64 (v2)
table. The v2 tables themselves are the framework's radix engine over ``X86_64Format``.
"""

from __future__ import annotations

import errno

from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SHIFT, PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.x86_64 import X86_64Format

GCR3_VALID = 1  # GCR3_VALID
GCR3_ADDR = ((1 << 52) - 1) & ~0xFFF


def glx_for(pasid_bits: int) -> int:
    """GCR3 levels - 1 for a PASID width (kernel get_gcr3_levels): 9 bits per level."""
    return max(0, (pasid_bits - 1) // 9)


class Gcr3Table:
    """A device's GCR3 table, built by the driver in system memory."""

    def __init__(self, memory: PhysicalMemory, glx: int) -> None:
        if not 0 <= glx <= 2:
            raise err(errno.EINVAL, f"GLX {glx} out of range")
        self.memory = memory
        self.glx = glx
        self.root = memory.alloc_frame() << PAGE_SHIFT
        self.tables = [self.root]
        self.count = 0  # attached PASIDs (pasid_cnt)

    def _slot(self, pasid: int, alloc: bool) -> int:
        if pasid >> (9 * (self.glx + 1)):
            raise err(errno.EINVAL, f"PASID {pasid:#x} beyond the GCR3 table")
        mem = self.memory
        table = self.root
        for level in range(self.glx, 0, -1):
            slot = table + ((pasid >> (9 * level)) & 0x1FF) * 8
            entry = mem.read_u64(slot)
            if not entry & GCR3_VALID:
                if not alloc:
                    return -1
                nxt = mem.alloc_frame() << PAGE_SHIFT
                self.tables.append(nxt)
                mem.write_u64(slot, nxt | GCR3_VALID)
                entry = nxt | GCR3_VALID
            table = entry & GCR3_ADDR
        return table + (pasid & 0x1FF) * 8

    def set(self, pasid: int, cr3: int) -> None:
        """Point ``pasid`` at the v2 table rooted at ``cr3`` (update_gcr3(..., true))."""
        slot = self._slot(pasid, True)
        if not self.memory.read_u64(slot) & GCR3_VALID:
            self.count += 1
        self.memory.write_u64(slot, (cr3 & GCR3_ADDR) | GCR3_VALID)

    def clear(self, pasid: int) -> None:
        slot = self._slot(pasid, False)
        if slot >= 0 and self.memory.read_u64(slot) & GCR3_VALID:
            self.memory.write_u64(slot, 0)
            self.count -= 1

    def get(self, pasid: int) -> int:
        """The cr3 of ``pasid`` or -1."""
        slot = self._slot(pasid, False)
        if slot < 0:
            return -1
        entry = self.memory.read_u64(slot)
        return entry & GCR3_ADDR if entry & GCR3_VALID else -1

    def free(self) -> None:
        for table in self.tables:
            self.memory.put_frame(table >> PAGE_SHIFT)
        self.tables.clear()


class V2PageTable(RadixPageTable):
    """A v2 (x86-64, 4- or 5-level) page table, as the kernel's amdv2 domains build."""

    def __init__(self, memory: PhysicalMemory, levels: int = 4) -> None:
        super().__init__(memory, X86_64Format(levels))
