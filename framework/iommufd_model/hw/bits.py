"""Bit fields as the specifications and the kernel write them: BIT, GENMASK, FIELD_GET,
FIELD_PREP, and the little-endian 64-bit words every table entry and queue record is made of.

Shared by every vendor plugin, so a register or descriptor codec reads the same everywhere.
"""

from __future__ import annotations


def bit(n: int) -> int:
    """A single-bit field, as ``BIT(n)``."""
    return 1 << n


def mask(hi: int, lo: int) -> int:
    """Bits ``hi..lo`` set (inclusive), as ``GENMASK_ULL(hi, lo)``."""
    return ((1 << (hi - lo + 1)) - 1) << lo


def get(value: int, hi: int, lo: int) -> int:
    """``FIELD_GET``: the field at bits ``hi..lo`` of ``value``."""
    return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


def put(field: int, hi: int, lo: int) -> int:
    """``FIELD_PREP``: ``field`` placed at bits ``hi..lo`` (extra high bits are dropped)."""
    return (field & ((1 << (hi - lo + 1)) - 1)) << lo


def words(data: bytes) -> list[int]:
    """Little-endian 64-bit words of a table entry or queue record."""
    return [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), 8)]


def pack(values: list[int] | tuple[int, ...]) -> bytes:
    """The little-endian bytes of 64-bit words."""
    return b"".join((v & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little") for v in values)
