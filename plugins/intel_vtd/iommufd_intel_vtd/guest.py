"""What a guest VT-d driver writes: first-stage (x86-64) tables in guest RAM.

The guest's RAM is a range of the VMM's address space mapped into an IOAS at guest-physical
addresses (IOVA = GPA). :class:`GuestRam` presents that RAM to the framework's radix engine
as if it were physical memory, so the guest builds its stage-1 tables with the very same
``RadixPageTable`` + ``X86_64Format`` the host drivers use; the addresses in them are GPAs.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, cast

from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.x86_64 import X86_64Format

if TYPE_CHECKING:
    from iommufd_model.core.process import Process


class GuestRam:
    """``size`` bytes of guest RAM at GPA ``gpa_base``, backed by VMM memory at ``va``."""

    def __init__(self, proc: Process, va: int, gpa_base: int, size: int) -> None:
        self.proc = proc
        self.va = va
        self.gpa_base = gpa_base
        self.size = size
        self._next = gpa_base  # bump allocator for table pages (the guest's page allocator)

    def _va(self, gpa: int, n: int) -> int:
        if not (self.gpa_base <= gpa and gpa + n <= self.gpa_base + self.size):
            raise err(errno.EFAULT, f"GPA {gpa:#x} outside guest RAM")
        return self.va + gpa - self.gpa_base

    # -- the PhysicalMemory subset RadixPageTable uses --------------------------------------
    def alloc_frame(self) -> int:
        gpa = self._next
        if gpa + PAGE_SIZE > self.gpa_base + self.size:
            raise err(errno.ENOMEM, "guest RAM exhausted")
        self._next += PAGE_SIZE
        self.proc.write(self._va(gpa, PAGE_SIZE), bytes(PAGE_SIZE))
        return gpa >> PAGE_SHIFT

    def put_frame(self, pfn: int) -> None:
        """The guest never returns table pages in this model."""

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.proc.read(self._va(gpa, 8), 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.proc.write(self._va(gpa, 8), value.to_bytes(8, "little"))

    def reserve(self, size: int) -> int:
        """Take ``size`` bytes (page multiple) of guest RAM for data; returns its GPA."""
        gpa = self._next
        self._next += -(-size // PAGE_SIZE) * PAGE_SIZE
        if self._next > self.gpa_base + self.size:
            raise err(errno.ENOMEM, "guest RAM exhausted")
        return gpa


def guest_first_stage(ram: GuestRam, levels: int = 4) -> RadixPageTable:
    """A guest stage-1 table (x86-64 format) whose root and tables live in guest RAM."""
    return RadixPageTable(cast(PhysicalMemory, ram), X86_64Format(levels))
