"""The bits IOMMU_HWPT_GET_DIRTY_BITMAP sets for a driver's dirty runs, in bulk.

Linux 7.2 (drivers/iommu/iommufd/iova_bitmap.c, ``iova_bitmap_set()``) sets, for a dirty
``(iova, size)`` run inside the bitmap's ``[start, last]``, bit ``(iova - start) >>
__ffs(page_size)`` through bit ``(iova + size - 1 - start) >> __ffs(page_size)`` of the
user's bitmap (bit 0 = bit 0 of its first byte), clipped to the range. The runs a driver
reports are in IOVA order, so their spans of bits are too.

The model builds those bits for all runs at once (the model's own code: ``core/_dirty_bits.c``
in C, the loop below without it), as bytes from the first run's first byte to the last
run's last; ``hw_pagetable._get_dirty_bitmap`` ORs them into the user's bytes. Between two
groups of bytes the runs touch there is a byte no run touches, so each maximal stretch of
non-zero bytes here is one group (:func:`byte_groups`).
"""

from __future__ import annotations

import re

from iommufd_model.hw import compiled

#: ``core/_dirty_bits.c``, or None: :func:`_span_bits` does the same
_C = compiled.load_c_helper("iommufd_model.core._dirty_bits")
_U64 = (1 << 64) - 1
_NONZERO = re.compile(rb"[^\x00]+")


def span_bits(
    runs: list[tuple[int, int]], start: int, last: int, shift: int, max_bytes: int
) -> tuple[int, bytes] | None:
    """``(first byte, bytes)``: every run's bits set, in the bytes from the first run's first
    bit to the last run's last. None (nothing to build here) when the runs are not in IOVA
    order (a span starting or ending before the one before it), one is empty, outside
    ``[start, last]`` or beyond 64 bits, or the bytes would be more than ``max_bytes``."""
    if _C is not None:
        got: tuple[int, bytes] | None = _C.span_bits(runs, start, last, shift, max_bytes)
        return got
    return _span_bits(runs, start, last, shift, max_bytes)


def _span_bits(
    runs: list[tuple[int, int]], start: int, last: int, shift: int, max_bytes: int
) -> tuple[int, bytes] | None:
    if not runs or shift > 63 or last < start:
        return None
    spans: list[tuple[int, int]] = []
    prev_first = prev_last = 0
    for iova, size in runs:
        end = iova + size - 1
        if size <= 0 or iova < 0 or end > _U64 or iova > last or end < start:
            return None
        first_bit = ((iova if iova > start else start) - start) >> shift
        last_bit = ((end if end < last else last) - start) >> shift
        if spans and (first_bit < prev_first or last_bit < prev_last):
            return None
        spans.append((first_bit, last_bit))
        prev_first, prev_last = first_bit, last_bit
    base = spans[0][0] >> 3
    nbytes = (prev_last >> 3) - base + 1
    if nbytes > max_bytes:
        return None
    # the bits as '0'/'1' digits, bit 0 first, then read as one little-endian integer
    digits = bytearray(b"0") * (nbytes << 3)
    for first_bit, last_bit in spans:
        lo, hi = first_bit - (base << 3), last_bit - (base << 3) + 1
        digits[lo:hi] = b"1" * (hi - lo)
    return base, int(digits[::-1], 2).to_bytes(nbytes, "little")


def byte_groups(bits: bytes) -> list[tuple[int, int]]:
    """``(first, last)`` offsets of each maximal stretch of non-zero bytes of ``bits``."""
    return [(m.start(), m.end() - 1) for m in _NONZERO.finditer(bits)]
