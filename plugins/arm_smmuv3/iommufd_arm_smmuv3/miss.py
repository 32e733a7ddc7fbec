"""The SMMUv3 walks of the compiled translate front's TLB misses (hw/xlate.py).

A request stream the front knows walks the same tables with the same STE and CD fields until
the STE or CD cache changes, so :meth:`iommufd_arm_smmuv3.hw.Smmuv3._translate_walk` binds
them here once (stage 1, with stage 2 when nested; stage 2 alone; or a CD with EPD0, whose
every walk faults) and the front calls ``walk(iova, write)`` per miss. The walker comes in
as an argument (the IOMMU's own walker module's function: compiled, or its pure source under
``IOMMUFD_MODEL_PURE=1``, as its slow path uses); compiled by mypyc (setup.py), this module
spares the front a Python frame per miss. No state beyond the bound arguments, no lock: it
runs inside the model's entry points as the walkers do (docs/concurrency.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Walker = Callable[..., tuple[int, ...]]


class S1Walk:
    """``walk_s1`` of a CD's TTB0 (through the STE's stage 2 when ``nested``)."""

    def __init__(
        self,
        walk_s1: Walker,
        pages: Any,
        mem_size: int,
        ttb: int,
        ia_bits: int,
        oa_bits: int,
        affd: bool,
        ha: bool,
        nested: bool,
        s2_ttb: int,
        s2_ia_bits: int,
        s2_start: int,
        s2_oa_bits: int,
        s2_affd: bool,
        hd: bool,
    ) -> None:
        self.walk_s1 = walk_s1
        self.pages = pages
        self.mem_size = mem_size
        self.ttb = ttb
        self.ia_bits = ia_bits
        self.oa_bits = oa_bits
        self.affd = affd
        self.ha = ha
        self.nested = nested
        self.s2_ttb = s2_ttb
        self.s2_ia_bits = s2_ia_bits
        self.s2_start = s2_start
        self.s2_oa_bits = s2_oa_bits
        self.s2_affd = s2_affd
        self.hd = hd

    def __call__(self, iova: int, write: bool) -> tuple[int, ...]:
        return self.walk_s1(
            self.pages,
            self.mem_size,
            self.ttb,
            iova,
            self.ia_bits,
            self.oa_bits,
            write,
            self.affd,
            self.ha,
            self.nested,
            self.s2_ttb,
            self.s2_ia_bits,
            self.s2_start,
            self.s2_oa_bits,
            self.s2_affd,
            self.hd,
        )


class S2Walk:
    """``walk_s2`` of an STE's stage-2 table (stage 1 off)."""

    def __init__(
        self,
        walk_s2: Walker,
        pages: Any,
        mem_size: int,
        ttb: int,
        ia_bits: int,
        start_level: int,
        oa_bits: int,
        affd: bool,
    ) -> None:
        self.walk_s2 = walk_s2
        self.pages = pages
        self.mem_size = mem_size
        self.ttb = ttb
        self.ia_bits = ia_bits
        self.start_level = start_level
        self.oa_bits = oa_bits
        self.affd = affd

    def __call__(self, iova: int, write: bool) -> tuple[int, ...]:
        return self.walk_s2(
            self.pages,
            self.mem_size,
            self.ttb,
            iova,
            self.ia_bits,
            self.start_level,
            self.oa_bits,
            write,
            self.affd,
        )


class Fixed:
    """A CD with EPD0 set: no walk, every access a translation fault (stage 1's result
    layout)."""

    def __init__(self, result: tuple[int, int, int, int, int, int, int, int, int]) -> None:
        self.result = result

    def __call__(
        self, iova: int, write: bool
    ) -> tuple[int, int, int, int, int, int, int, int, int]:
        return self.result
