"""Circular queues of fixed-size entries in physical memory (command buffers, event logs).

Every vendor keeps its queues the same way -- a base address, a power-of-two number of
entries, a producer and a consumer index -- and encodes the indices differently in its
registers (AMD: byte offsets; SMMUv3: index plus a wrap bit; VT-d: byte offsets of 16/32-byte
descriptors). :class:`MemRing` holds the common part; the vendor converts register values.
"""

from __future__ import annotations

import errno

from iommufd_model.errors import err
from iommufd_model.hw.memory import FrameMemory


class MemRing:
    """``nentries`` entries of ``entry_size`` bytes at ``base``; indices wrap modulo size.

    ``read``/``write`` address entries by index; :meth:`pending` yields the entries between
    a consumer and a producer index in order. ``memory`` reads fail with EFAULT when the ring
    was placed outside memory: hardware models turn that into their fetch-error event.
    """

    def __init__(self, memory: FrameMemory, base: int, entry_size: int, nentries: int) -> None:
        if nentries <= 0 or nentries & (nentries - 1):
            raise err(errno.EINVAL, "ring size must be a power of two")
        self.memory = memory
        self.base = base
        self.entry_size = entry_size
        self.nentries = nentries

    @property
    def size_bytes(self) -> int:
        return self.entry_size * self.nentries

    def addr(self, index: int) -> int:
        return self.base + (index % self.nentries) * self.entry_size

    def read(self, index: int) -> bytes:
        return self.memory.read(self.addr(index), self.entry_size)

    def write(self, index: int, data: bytes) -> None:
        if len(data) != self.entry_size:
            raise err(errno.EINVAL, f"ring entry must be {self.entry_size} bytes")
        self.memory.write(self.addr(index), data)

    def count(self, cons: int, prod: int) -> int:
        """Entries waiting between consumer ``cons`` and producer ``prod`` (plain indices)."""
        return (prod - cons) % self.nentries

    def is_full(self, cons: int, prod: int) -> bool:
        """One slot stays empty so that full and empty differ (AMD, VT-d convention)."""
        return self.count(cons, prod) == self.nentries - 1
