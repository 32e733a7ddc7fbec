"""The VT-d walks of the compiled translate front's IOTLB misses (hw/xlate.py).

A request stream the front knows walks the same tables with the same PASID-entry fields until
the context or PASID cache changes, so :meth:`iommufd_intel_vtd.hw.IntelVtd.translate` binds
them here once (by PGTT: first stage, second stage, nested) and the front calls
``walk(iova, write)`` per miss. The walker comes in as an argument (the IOMMU's own walker
module's function: compiled, or its pure source under ``IOMMUFD_MODEL_PURE=1``, as its slow
path uses); compiled by mypyc (setup.py), this module spares the front a Python frame per
miss. No state beyond the bound arguments, no lock: it runs inside the
model's entry points as the walkers do (docs/concurrency.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Walker = Callable[..., tuple[int, ...]]


class FsWalk:
    """``walk_fs`` of a PASID entry's first-stage table (every request a user request)."""

    def __init__(
        self, walk_fs: Walker, pages: Any, mem_size: int, root: int, levels: int, fl1gp: bool
    ) -> None:
        self.walk_fs = walk_fs
        self.pages = pages
        self.mem_size = mem_size
        self.root = root
        self.levels = levels
        self.fl1gp = fl1gp

    def __call__(self, iova: int, write: bool) -> tuple[int, ...]:
        return self.walk_fs(
            self.pages, self.mem_size, self.root, iova, self.levels, write, self.fl1gp, True
        )


class SsWalk:
    """``walk_ss`` of a PASID entry's second-stage table (SSADE: A/D updates)."""

    def __init__(
        self,
        walk_ss: Walker,
        pages: Any,
        mem_size: int,
        root: int,
        levels: int,
        large_mask: int,
        set_ad: bool,
    ) -> None:
        self.walk_ss = walk_ss
        self.pages = pages
        self.mem_size = mem_size
        self.root = root
        self.levels = levels
        self.large_mask = large_mask
        self.set_ad = set_ad

    def __call__(self, iova: int, write: bool) -> tuple[int, ...]:
        return self.walk_ss(
            self.pages,
            self.mem_size,
            self.root,
            iova,
            self.levels,
            write,
            self.large_mask,
            self.set_ad,
        )


class NestedWalk:
    """``walk_nested``: the first stage (``x86``, the framework's walker) through the second."""

    def __init__(
        self,
        walk_nested: Walker,
        x86: Any,
        pages: Any,
        mem_size: int,
        fs_root: int,
        fs_levels: int,
        ss_root: int,
        ss_levels: int,
        large_mask: int,
        set_ad: bool,
        fl1gp: bool,
    ) -> None:
        self.walk_nested = walk_nested
        self.x86 = x86
        self.pages = pages
        self.mem_size = mem_size
        self.fs_root = fs_root
        self.fs_levels = fs_levels
        self.ss_root = ss_root
        self.ss_levels = ss_levels
        self.large_mask = large_mask
        self.set_ad = set_ad
        self.fl1gp = fl1gp

    def __call__(self, iova: int, write: bool) -> tuple[int, ...]:
        return self.walk_nested(
            self.x86,
            self.pages,
            self.mem_size,
            self.fs_root,
            iova,
            self.fs_levels,
            write,
            self.ss_root,
            self.ss_levels,
            self.large_mask,
            self.set_ad,
            self.fl1gp,
            True,  # every modelled request is a user request (no PM, RID_PRIV = 0)
        )
