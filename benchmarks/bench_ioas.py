"""IOAS map/unmap cost through the uAPI: pages per second, growth with the number of areas and
with the mapping size, and memory per mapped page. Figures only, no assertions.

    python benchmarks/bench_ioas.py            # add --quick for a short run

Every operation is a real ``IOMMU_IOAS_MAP`` / ``IOMMU_IOAS_UNMAP`` ioctl on a simulated
machine: pinning the user pages, the IOVA area tree, and -- where a device is attached -- the
vendor's page table in simulated memory (the first installed vendor plugin; the mock driver
otherwise). "4 KiB pages" runs with ``IOMMU_OPTION_HUGE_PAGES`` off, so the domain maps every
page as its own 4 KiB page, as VFIO type1 compatibility does (one ``domain_map_pages`` call per
physically contiguous run).
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc

from _timing import print_figures, vendor

import iommufd_model as im
from iommufd_model import uapi as U

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
# One-page areas start above every vendor's reserved windows (MSI below 4 GiB, AMD's
# HyperTransport hole below 1 TiB): 1M of them, a page apart, end below 2 TiB + 8 GiB.
AREAS_IOVA = 1 << 41


class Rig:
    """One process, one iommufd, one IOAS; optionally a device of ``driver`` attached."""

    def __init__(self, driver: str | None, huge_pages: bool = True) -> None:
        self.machine = im.Machine.build(iommus=[driver] if driver else [], memory_size=1 << 44)
        self.proc = self.machine.new_process()
        self.fd = self.proc.open_iommufd()
        self.ioas = self.fd.ioas_alloc()
        if not huge_pages:
            self.fd.option(
                U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_SET, object_id=self.ioas, val64=0
            )
        if driver:
            dev = self.machine.add_pci_device(iommu=0)
            self.fd.attach(self.fd.bind(dev), self.ioas)

    def map(self, va: int, length: int, iova: int) -> None:
        self.fd.ioas_map(self.ioas, va, length, iova=iova)

    def unmap(self, iova: int, length: int) -> None:
        self.fd.ioas_unmap(self.ioas, iova, length)


def one_big_map(driver: str | None, size: int, huge_pages: bool) -> tuple[float, float]:
    """Seconds for one IOAS_MAP of ``size`` bytes and for its IOAS_UNMAP."""
    rig = Rig(driver, huge_pages)
    va = rig.proc.mmap(size, align=GIB)
    gc.collect()
    start = time.perf_counter()
    rig.map(va, size, GIB)
    mapped = time.perf_counter()
    rig.unmap(GIB, size)
    return mapped - start, time.perf_counter() - mapped


def size_sweep(driver: str | None, quick: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    sizes = [4 * KIB, 64 * KIB, 2 * MIB, 64 * MIB] + ([] if quick else [GIB])
    for size in sizes:
        t_map, t_unmap = one_big_map(driver, size, huge_pages=True)
        label = f"{size // KIB} KiB" if size < MIB else f"{size // MIB} MiB"
        out[f"map {label} (large pages allowed): s"] = t_map
        out[f"unmap {label}: s"] = t_unmap
    size = 256 * MIB if quick else GIB
    t_map, t_unmap = one_big_map(driver, size, huge_pages=False)
    label = "256 MiB" if quick else "1 GiB"
    out[f"map {label} in 4 KiB pages: s"] = t_map
    out[f"map {label} in 4 KiB pages: pages/s"] = (size >> 12) / t_map
    out[f"unmap {label} in 4 KiB pages: pages/s"] = (size >> 12) / t_unmap
    return out


def area_sweep(driver: str | None, quick: bool, traced: bool) -> dict[str, float]:
    """Map one-page areas up to 1K, 10K, 100K and 1M of them, every point in full.

    Untraced: the per-call cost at each size, over the last 1000 maps, then over 1000
    unmaps and re-maps at that size. Traced (a second sweep, since tracemalloc slows every
    allocation): the Python heap the areas hold, per area, at each size. The user pages are
    faulted in before either, so the process's own page tables are not counted."""
    rig = Rig(driver)
    points = [1_000, 10_000] + ([] if quick else [100_000, 1_000_000])
    out: dict[str, float] = {}
    va = rig.proc.mmap(points[-1] * 4096)
    for i in range(points[-1]):
        rig.proc.translate(va + i * 4096)
    stride = 2 * 4096  # areas separated by holes: none of them merge
    gc.collect()
    if traced:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    done = 0
    for point in points:
        t_last = 0.0
        while done < point:
            if done == point - 1000:
                t_last = time.perf_counter()
            rig.map(va + done * 4096, 4096, AREAS_IOVA + done * stride)
            done += 1
        map_us = (time.perf_counter() - t_last) / 1000 * 1e6
        start = time.perf_counter()
        for i in range(done - 1000, done):
            rig.unmap(AREAS_IOVA + i * stride, 4096)
        unmap_us = (time.perf_counter() - start) / 1000 * 1e6
        for i in range(done - 1000, done):
            rig.map(va + i * 4096, 4096, AREAS_IOVA + i * stride)
        if traced:
            heap = tracemalloc.get_traced_memory()[0] - base
            out[f"heap per one-page area with {point:,} areas: bytes"] = heap / point
        else:
            out[f"IOAS_MAP with {point:,} areas: us/call"] = map_us
            out[f"IOAS_UNMAP with {point:,} areas: us/call"] = unmap_us
    if traced:
        tracemalloc.stop()
    return out


def memory_per_page(driver: str | None, quick: bool) -> dict[str, float]:
    """Python heap bytes per mapped 4 KiB page (tracemalloc) of one big map in 4 KiB IOMMU
    pages. Frames themselves are not materialised by pinning (nothing written)."""
    out: dict[str, float] = {}
    n = 16_384 if quick else 65_536
    rig = Rig(driver, huge_pages=False)
    va = rig.proc.mmap(n * 4096, align=2 * MIB)
    for i in range(n):
        rig.proc.translate(va + i * 4096)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    rig.map(va, n * 4096, GIB)
    out["heap per page, one area of 4 KiB pages: bytes"] = (
        tracemalloc.get_traced_memory()[0] - before
    ) / n
    tracemalloc.stop()
    return out


def run(quick: bool = False) -> dict[str, float]:
    figures: dict[str, float] = {}
    drv = vendor()
    # Without a device nothing is pinned or mapped until a domain or an access needs it (as
    # in the kernel): that row shows the IOAS bookkeeping alone.
    for label, driver in (("no device, nothing pinned", None), (drv, drv)):
        for key, value in size_sweep(driver, quick).items():
            figures[f"[{label}] {key}"] = value
    for traced in (False, True):
        for key, value in area_sweep(drv, quick, traced).items():
            figures[f"[{drv}] {key}"] = value
    for key, value in memory_per_page(drv, quick).items():
        figures[f"[{drv}] {key}"] = value
    return figures


def main() -> None:
    figures = run(quick="--quick" in sys.argv)
    print_figures(figures, shown=lambda v: f"{v:>14,.3f}" if v < 100 else f"{v:>14,.0f}")


if __name__ == "__main__":
    main()
