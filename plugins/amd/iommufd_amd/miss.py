"""The AMD walks of the compiled translate front's IOTLB misses (hw/xlate.py).

A request stream the front knows walks the same tables with the same DTE fields until the
DTE cache changes, so :meth:`iommufd_amd.hw.AmdIommu.lookup` binds them here once and the
front calls ``walk(iova, write)`` per miss. The walker comes in as an argument (the IOMMU's
own ``walk`` module's function: compiled, or its pure source under ``IOMMUFD_MODEL_PURE=1``,
as its slow path uses); compiled by mypyc (setup.py), this module spares the front a Python
frame per miss. No state beyond the bound arguments, no lock: it runs inside the
model's entry points as the walkers do (docs/concurrency.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Walker = Callable[..., tuple[int, int, int, int, int]]


class V1Walk:
    """``walk_v1`` of a DTE's host (v1) table: Mode levels from ``root``, DTE HAD."""

    def __init__(
        self, walk_v1: Walker, pages: Any, mem_size: int, root: int, mode: int, had: int
    ) -> None:
        self.walk_v1 = walk_v1
        self.pages = pages
        self.mem_size = mem_size
        self.root = root
        self.mode = mode
        self.had = had

    def __call__(self, iova: int, write: bool) -> tuple[int, int, int, int, int]:
        return self.walk_v1(self.pages, self.mem_size, self.root, self.mode, iova, write, self.had)


class NestedWalk:
    """``walk_nested`` of one PASID's guest (v2) tables through the DTE's GCR3 table (and its
    host table, Mode > 0)."""

    def __init__(
        self,
        walk_nested: Walker,
        pages: Any,
        mem_size: int,
        host_root: int,
        host_mode: int,
        had: int,
        gcr3: int,
        glx: int,
        guest_levels: int,
        pasid: int,
        x86: Any,
    ) -> None:
        self.walk_nested = walk_nested
        self.pages = pages
        self.mem_size = mem_size
        self.host_root = host_root
        self.host_mode = host_mode
        self.had = had
        self.gcr3 = gcr3
        self.glx = glx
        self.guest_levels = guest_levels
        self.pasid = pasid
        self.x86 = x86

    def __call__(self, iova: int, write: bool) -> tuple[int, int, int, int, int]:
        return self.walk_nested(
            self.pages,
            self.mem_size,
            self.host_root,
            self.host_mode,
            self.had,
            self.gcr3,
            self.glx,
            self.guest_levels,
            self.pasid,
            iova,
            write,
            self.x86,
        )
