"""MMIO register files: offsets, widths, read-only bits and the side effects of writes.

Each vendor declares its registers at the specification's offsets with :meth:`Mmio.define`;
a write handler models what the hardware does when software writes (start a queue, latch a
table base, ring a doorbell). Accesses to undefined offsets read as zero and ignore writes,
as reserved MMIO space does; misaligned or odd-width accesses are refused with EINVAL.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import attrs

from iommufd_model.errors import err
from iommufd_model.locking import serialized

WriteHook = Callable[[int, int], None]  # (old value, new value)
ReadHook = Callable[[], int]


@attrs.define
class Register:
    name: str
    offset: int
    width: int  # bytes: 4 or 8
    value: int = 0
    writable: int = -1  # mask of bits software may change; others keep their value
    on_write: WriteHook | None = None
    on_read: ReadHook | None = None


@serialized()
class Mmio:
    """A register file; 4- and 8-byte accesses, an 8-byte register also by 4-byte halves."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._regs: dict[int, Register] = {}
        self.reads = 0
        self.writes = 0

    def define(
        self,
        name: str,
        offset: int,
        *,
        width: int = 8,
        reset: int = 0,
        writable: int = -1,
        on_write: WriteHook | None = None,
        on_read: ReadHook | None = None,
    ) -> Register:
        if width not in (4, 8) or offset % width:
            raise ValueError(f"register {name} must be 4 or 8 bytes, naturally aligned")
        reg = Register(name, offset, width, reset, writable, on_write, on_read)
        self._regs[offset] = reg
        return reg

    def reg(self, offset: int) -> Register:
        return self._regs[offset]

    def __getitem__(self, name: str) -> int:
        for reg in self._regs.values():
            if reg.name == name:
                return reg.value
        raise KeyError(name)

    def set(self, name: str, value: int) -> None:
        """Hardware-side update (status bits, head pointers): no write side effects."""
        for reg in self._regs.values():
            if reg.name == name:
                reg.value = value & ((1 << (8 * reg.width)) - 1)
                return
        raise KeyError(name)

    def _locate(self, offset: int, width: int) -> tuple[Register | None, int]:
        if width not in (4, 8) or offset % width:
            raise err(errno.EINVAL, f"{self.name}: bad MMIO access {offset:#x}/{width}")
        reg = self._regs.get(offset)
        if reg is not None:
            return reg, 0
        if width == 4:
            reg = self._regs.get(offset - 4)
            if reg is not None and reg.width == 8:
                return reg, 32
        return None, 0

    def read(self, offset: int, width: int = 8) -> int:
        self.reads += 1
        reg, shift = self._locate(offset, width)
        if reg is None:
            return 0
        value = reg.on_read() if reg.on_read is not None else reg.value
        return (value >> shift) & ((1 << (8 * width)) - 1)

    def write(self, offset: int, value: int, width: int = 8) -> None:
        self.writes += 1
        reg, shift = self._locate(offset, width)
        if reg is None:
            return
        full = (1 << (8 * reg.width)) - 1
        mask = ((1 << (8 * width)) - 1) << shift
        new = (reg.value & ~mask) | ((value << shift) & mask)
        new = (reg.value & ~reg.writable) | (new & reg.writable)
        old = reg.value
        reg.value = new & full
        if reg.on_write is not None:
            reg.on_write(old, reg.value)
