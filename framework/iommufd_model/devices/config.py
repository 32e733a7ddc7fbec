"""A PCI function's configuration space: bytes plus per-bit write rules.

Every byte carries two masks, as the PCI Local Bus spec (r3.0 §6.1, §6.2) and the PCIe Base
spec (r6.0 §7.4 "Configuration register types") define register attributes:

- ``wmask``: RW bits, which a write replaces;
- ``w1cmask``: RW1C bits, which a write of 1 clears (status bits);

every other bit is RO (or HwInit, or RsvdP: software cannot change it). Side effects of
writes (FLR, MSI-X unmask, VF Enable) are the function's business: :class:`ConfigSpace` only
stores and masks, and tells its owner which bytes a write touched.

Capability list builders place the standard structures at the offsets a device chooses and
chain them (``Cap Ptr`` at 0x34, ``Next`` at +1; extended capabilities from 0x100 with
``Next`` in bits 31:20 of the header).
"""

from __future__ import annotations

import errno

from iommufd_model.errors import err

PCI_CONFIG_SIZE = 256  # conventional header + capabilities (PCI Local Bus spec 3.0)
PCIE_CONFIG_SIZE = 4096  # PCIe extended configuration space (PCIe Base spec §7.2)
PCI_EXT_CAP_START = 0x100


class RegisterBytes:
    """``size`` bytes of little-endian registers with per-bit RW and RW1C masks.

    Accesses of 1, 2, 4 or 8 bytes anywhere inside; a device's MMIO register block uses it as
    is, the configuration space restricts widths to 1, 2 and 4."""

    WIDTHS: tuple[int, ...] = (1, 2, 4, 8)

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)

    def check(self, offset: int, size: int) -> None:
        """EINVAL for an access the bus cannot make (odd width, outside the block)."""
        if size not in self.WIDTHS or offset < 0 or offset + size > self.size:
            raise err(errno.EINVAL, f"register access {offset:#x}/{size}")

    def read(self, offset: int, size: int) -> int:
        self.check(offset, size)
        return int.from_bytes(self.data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Apply a software write: RW bits take ``value``, RW1C bits set in it clear."""
        self.check(offset, size)
        raw = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        for i, byte in enumerate(raw):
            at = offset + i
            w, c = self.wmask[at], self.w1cmask[at]
            self.data[at] = ((self.data[at] & ~w) | (byte & w)) & ~(byte & c) & 0xFF

    # -- device-side setup (no masks applied) ---------------------------------------------
    def set(self, offset: int, size: int, value: int, *, rw: int = 0, w1c: int = 0) -> None:
        """Initialise a register: its power-on value and which bits are RW / RW1C."""
        self.poke(offset, size, value)
        self.wmask[offset : offset + size] = rw.to_bytes(size, "little")
        self.w1cmask[offset : offset + size] = w1c.to_bytes(size, "little")

    def poke(self, offset: int, size: int, value: int) -> None:
        """Hardware updates a register's value (status bits, pending bits): masks unchanged."""
        self.data[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little"
        )

    def peek(self, offset: int, size: int) -> int:
        """The hardware's view of a register (no access checks)."""
        return int.from_bytes(self.data[offset : offset + size], "little")


class ConfigSpace(RegisterBytes):
    """``size`` bytes of configuration registers with their RW and RW1C masks."""

    WIDTHS = (1, 2, 4)

    def __init__(self, size: int) -> None:
        if size not in (PCI_CONFIG_SIZE, PCIE_CONFIG_SIZE):
            raise ValueError(f"config space is 256 or 4096 bytes, not {size}")
        super().__init__(size)
        self._last_cap = -1  # offset of the last conventional capability
        self._last_ext = -1  # offset of the last extended capability

    # -- capability lists --------------------------------------------------------------
    def add_cap(self, offset: int, cap_id: int, length: int) -> int:
        """Chain a conventional capability at ``offset`` (DWORD aligned, 0x40..0xFF)."""
        if offset % 4 or offset < 0x40 or offset + length > PCI_CONFIG_SIZE:
            raise ValueError(f"capability at {offset:#x}")
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        if self._last_cap < 0:
            self.data[0x34] = offset  # Capabilities Pointer
            self.data[0x06] |= 0x10  # Status: Capabilities List
        else:
            self.data[self._last_cap + 1] = offset
        self._last_cap = offset
        return offset

    def add_ext_cap(self, offset: int, cap_id: int, version: int) -> int:
        """Chain a PCIe extended capability at ``offset`` (the first one is at 0x100)."""
        if self.size != PCIE_CONFIG_SIZE or offset % 4 or offset < PCI_EXT_CAP_START:
            raise ValueError(f"extended capability at {offset:#x}")
        if self._last_ext < 0 and offset != PCI_EXT_CAP_START:
            raise ValueError("the first extended capability lives at 0x100")
        self.poke(offset, 4, cap_id | (version << 16))
        if self._last_ext >= 0:
            header = self.read(self._last_ext, 4)
            self.poke(self._last_ext, 4, (header & 0xFFFFF) | (offset << 20))
        self._last_ext = offset
        return offset

    def find_cap(self, cap_id: int) -> int | None:
        """Offset of conventional capability ``cap_id`` (walking the list, as software does)."""
        pos = self.data[0x34] & ~3 if self.data[0x06] & 0x10 else 0
        seen = 0
        while pos and seen < 48:
            if self.data[pos] == cap_id:
                return pos
            pos = self.data[pos + 1] & ~3
            seen += 1
        return None

    def find_ext_cap(self, cap_id: int) -> int | None:
        """Offset of extended capability ``cap_id``, or None."""
        if self.size != PCIE_CONFIG_SIZE:
            return None
        pos = PCI_EXT_CAP_START
        for _ in range(512):
            header = self.read(pos, 4)
            if header == 0:
                return None
            if header & 0xFFFF == cap_id:
                return pos
            pos = header >> 20
            if pos < PCI_EXT_CAP_START:
                return None
        return None
