"""Compiled hot path: bytes into frames in place, one native 64-bit load and store per word.

A frame (``memory.Frame``) is a ``vec[i64]`` whose buffer Python sees read-only, so the
interpreter can only fill it by building a new frame from a buffer. Compiled, a word is
``read_i64_le`` of the source ``bytes`` (a native load) and a native store into the vec, so a
4 KiB frame fills in place, with no allocation and no fresh pages to fault in: a long DMA
write runs at about the speed of a plain copy. Free of framework imports so that mypyc
compiles it alone (``setup.py``); :mod:`iommufd_model.hw.memory` uses it only when compiled
(uncompiled, one Python store per word would be far slower than rebuilding the frame).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from librt.strings import read_i64_le
from mypy_extensions import i64

if TYPE_CHECKING:
    from librt.vecs import vec

    Frame = vec[i64]


def fill_frames(frames: list[Frame], src: bytes, pos: i64) -> None:
    """Overwrite every frame of ``frames`` with the next 4096 bytes of ``src`` from ``pos``."""
    for frame in frames:
        i: i64 = 0
        while i < 512:
            frame[i] = read_i64_le(src, pos + i * 8)
            i += 1
        pos += 4096
