"""Guest RAM as the guest's IOMMU driver sees it: guest-physical addresses, guest frames."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE
from iommufd_model.locking import serialized

if TYPE_CHECKING:
    from iommufd_model.process import Process


@serialized()
class GuestMemory:
    """A :class:`~iommufd_model.hw.memory.FrameMemory` over ``[0, size)`` of guest-physical
    space, backed by the VMM's mapping at ``ram_va``. Guest frames for IOMMU structures come
    from the top ``table_pool`` bytes of RAM, so they never collide with DMA buffers that
    scenarios place from the bottom."""

    def __init__(self, vmm: Process, ram_va: int, size: int, table_pool: int) -> None:
        self.vmm = vmm
        self.ram_va = ram_va
        self.size = size
        self.pool_start = (size - table_pool) >> PAGE_SHIFT
        self._next = self.pool_start
        self._free: list[int] = []
        self._used: set[int] = set()

    def _va(self, gpa: int, n: int) -> int:
        if gpa < 0 or gpa + n > self.size:
            raise err(errno.EFAULT, f"guest physical {gpa:#x}+{n:#x} outside guest RAM")
        return self.ram_va + gpa

    def read(self, pa: int, n: int) -> bytes:
        return self.vmm.read(self._va(pa, n), n)

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        self.vmm.write(self._va(pa, len(data)), data)

    def read_u64(self, pa: int) -> int:
        return int.from_bytes(self.read(pa, 8), "little")

    def write_u64(self, pa: int, value: int) -> None:
        self.write(pa, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))

    def alloc_frame(self) -> int:
        """A zeroed guest frame from the table pool (returns the guest frame number)."""
        if self._free:
            gfn = self._free.pop()
        elif (self._next + 1) << PAGE_SHIFT <= self.size:
            gfn = self._next
            self._next += 1
        else:
            raise err(errno.ENOMEM, "guest table pool exhausted")
        self._used.add(gfn)
        self.write(gfn << PAGE_SHIFT, bytes(PAGE_SIZE))
        return gfn

    def alloc_contiguous(self, count: int, align: int = 1) -> int:
        """``count`` zeroed guest frames at consecutive guest-physical addresses aligned to
        ``align`` frames, from the never-used top of the pool (a 16 or 64 KiB granule's
        tables); the skipped alignment gap goes back to the free list."""
        start = -(-self._next // align) * align
        if (start + count) << PAGE_SHIFT > self.size:
            raise err(errno.ENOMEM, "guest table pool exhausted")
        self._free.extend(range(self._next, start))
        self._next = start + count
        for gfn in range(start, start + count):
            self._used.add(gfn)
            self.write(gfn << PAGE_SHIFT, bytes(PAGE_SIZE))
        return start

    def put_frame(self, pfn: int) -> None:
        self._used.remove(pfn)
        self._free.append(pfn)

    @property
    def frames_in_use(self) -> int:
        return len(self._used)
