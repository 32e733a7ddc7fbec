"""DMA copy throughput through the IOMMU translation, as a ratio to a plain bytes copy.

    python benchmarks/bench_dma.py            # add --quick for smaller buffers

A device behind each installed vendor IOMMU (AMD, VT-d, SMMUv3; the mock driver when none is
installed) reads and writes a buffer mapped through the uAPI with 4 KiB, 2 MiB or 1 GiB IOMMU
pages (1 GiB for the first vendor only) (user memory made
physically contiguous and aligned so that the driver can use the large pages; the page size
the walk found is printed). Steady state: the frames exist and the IOTLB holds what it can --
16 MiB of 4 KiB pages fit the model's 4096-entry IOTLB (one walk-free burst), 64 MiB do not
(every page misses and walks, as on hardware whose IOTLB cannot reach the buffer). The plain
copy is ``bytes(src)`` (read) and ``memoryview(dst)[:] = src`` (write) of the same size.
Every figure is the best of several calls (15 for 16 MiB, 7 for 64 MiB, 3 above) timed in the
thread's CPU time (``time.thread_time``, page faults of a fresh copy included), as the walk
benchmarks' own loops are: the copy and the DMA it is compared with are then not stretched
unevenly by other processes on a loaded machine. The four calls of a case (DMA read, DMA
write, plain read, plain write) take turns, round after round, so that a spell of contention
for the memory bus or the caches (other processes) lands on all four rather than on whichever
was being timed then. No assertions.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from _timing import print_figures, vendor

import iommufd_model as im
from iommufd_model import uapi as U

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
IOVA = 4 * GIB


def best(fns: list[Callable[[], object]], repeat: int = 3) -> list[float]:
    """The best thread CPU time of each of ``fns`` over ``repeat`` rounds, each round
    calling every one of them once, in turn."""
    times = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            gc.collect()
            start = time.thread_time()
            fn()
            times[i] = min(times[i], time.thread_time() - start)
    return times


def setup(driver: str, page: int, size: int) -> tuple[im.Machine, object]:
    """A device of ``driver`` with ``size`` bytes at IOVA mapped by ``page``-sized pages."""
    machine = im.Machine.build(iommus=[driver], memory_size=1 << 40)
    proc = machine.new_process()
    fd = proc.open_iommufd()
    dev = machine.add_pci_device(iommu=0)
    ioas = fd.ioas_alloc()
    if page == 4 * KIB:
        fd.option(U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_SET, object_id=ioas, val64=0)
    fd.attach(fd.bind(dev), ioas)
    va = proc.mmap(size, align=max(page, 2 * MIB))
    mem = machine.memory
    held = []  # filler frames: the user pages then start on a page-aligned frame
    while mem._next_pfn % (page >> 12):
        held.append(mem.alloc_frame())
    for off in range(0, size, 4096):  # fault in, in order: physically contiguous
        proc.translate(va + off)
    fd.ioas_map(ioas, va, size, iova=IOVA)
    return machine, dev


def vendors() -> list[str]:
    """Every installed vendor driver, the first (:func:`_timing.vendor`) first."""
    names = {ep.name for ep in entry_points(group="iommufd_model.drivers")}
    first = vendor()
    return [first] + [d for d in ("amd", "intel_vtd", "arm_smmuv3") if d in names and d != first]


def run(quick: bool = False) -> dict[str, float]:
    figures: dict[str, float] = {}
    for n, driver in enumerate(vendors()):
        cases = [(4 * KIB, 16 * MIB), (2 * MIB, 64 * MIB if quick else 256 * MIB)]
        if not quick:
            cases.insert(1, (4 * KIB, 64 * MIB))
        if not quick and n == 0:
            cases.append((GIB, GIB))
        figures.update(run_driver(driver, cases))
    return figures


def run_driver(driver: str, cases: list[tuple[int, int]]) -> dict[str, float]:
    """The figures of ``driver`` (keys prefixed ``[driver]``) for each ``(page, size)``."""
    figures: dict[str, float] = {}
    for page, size in cases:
        machine, dev = setup(driver, page, size)
        hw = machine.iommus[0]
        _pa, run_len = hw.translate(dev, IOVA, None, False)  # type: ignore[arg-type]
        found = run_len  # bytes to the end of the page the walk found (IOVA is aligned)
        data = bytes(range(256)) * (size // 256)
        dev.dma_write(IOVA, data)  # type: ignore[attr-defined]  # materialise, fill the IOTLB
        assert dev.dma_read(IOVA, size) == data  # type: ignore[attr-defined]
        # Short runs are measured more often: one preemption on a loaded machine would set
        # their best time otherwise.
        repeat = 15 if size <= 16 * MIB else 7 if size <= 64 * MIB else 3
        src = bytearray(data)
        target = memoryview(bytearray(size))

        def dma_read(d: Any = dev, n: int = size) -> None:
            d.dma_read(IOVA, n)

        def dma_write(d: Any = dev, b: bytes = data) -> None:
            d.dma_write(IOVA, b)

        def plain_read(s: bytearray = src) -> None:
            bytes(s)

        def plain_write(d: memoryview = target, s: bytes = data) -> None:
            d[:] = s

        t_read, t_write, t_plain_read, t_plain_write = best(
            [dma_read, dma_write, plain_read, plain_write], repeat
        )
        label = f"{page // KIB} KiB pages" if page < MIB else f"{page // MIB} MiB pages"
        label = f"[{driver}] DMA %s, {label}"
        label += f" ({size // MIB} MiB buffer, walk found {found // KIB} KiB pages)"
        figures[f"{label % 'read'}: MB/s"] = size / t_read / 1e6
        figures[f"{label % 'read'}: ratio to a plain copy"] = t_plain_read / t_read
        figures[f"{label % 'write'}: MB/s"] = size / t_write / 1e6
        figures[f"{label % 'write'}: ratio to a plain copy"] = t_plain_write / t_write
        del machine, dev, data, src, target
        gc.collect()
    return figures


def main() -> None:
    figures = run(quick="--quick" in sys.argv)
    print_figures(figures, shown=lambda v: f"{v:>12,.2f}")


if __name__ == "__main__":
    main()
