"""``translate()`` per call from Python, every driver, IOTLB hit and miss, in one run.

For each installed vendor (AMD, VT-d, SMMUv3) and the mock, one machine per variant, set up
through the uAPI: one IOAS with 256 one-page areas 2 MiB apart (4 KiB IOMMU pages, so a miss
walks every level), the device's RID attached. The variants, measured alternately in one
process (the best of ``TRIALS`` passes each):

- **installed**: the build as installed (the compiled translate front, hw/xlate.py, and the
  compiled walkers);
- **vendor**: the same build with the front removed from the instance, i.e. the vendor's own
  ``translate()`` (interpreted Python around the compiled walkers: what issue 19 measured);
- **pure**: every hot module from its Python source (``IOMMUFD_MODEL_PURE=1`` when the machine
  is built).

A **hit** translates the 256 IOVAs in turn with the IOTLB warm. A **miss** does the same with an
IOTLB of 64 entries (``MISS_CAPACITY``, set before the first translation): cycling through 256
pages in order, every call misses, walks all levels, fills, and evicts the oldest entry (FIFO),
as a stream beyond the IOTLB's reach does. (The mock has no IOTLB: each call reads its table,
so it has one figure, under "hit".) ``call floor`` is the same loop calling a Python function
that does nothing (with translate's four arguments): no per-call figure from Python can
exceed it. Each loop calls ``translate(dev, iova, None, False)`` directly, as a device
model's own loop would (no wrapper function per call).

Timed in this thread's CPU time (``time.thread_time_ns``), like the walk benchmarks' own loops:
on a machine shared with other work, wall time also counts other processes' time slices.

    python benchmarks/bench_translate.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from _rig import BASE, one_page_areas

import iommufd_model as im
from iommufd_model.hw.compiled import PURE_ENV, is_compiled, load_walker
from iommufd_model.plugins import default_registry

N = 256
TRIALS = 5
PASSES = 40  # passes over the 256 IOVAs per timed trial
MISS_CAPACITY = 64  # IOTLB entries for the miss loop: fewer than the pages it cycles through
VARIANTS = ("installed", "vendor", "pure")
NAMES = {"amd": "AMD", "intel_vtd": "VT-d", "arm_smmuv3": "SMMUv3", "mock": "mock"}
FLOOR = "call floor (a Python function doing nothing)"


Call = Callable[[Any, int, "int | None", bool], object]


def cpu_rate(translate: Call, dev: Any, iovas: list[int], passes: int = PASSES) -> float:
    """Calls per second of ``translate(dev, iova, None, False)`` over ``iovas``, ``passes``
    times, written as a device model's loop would call it, in this thread's CPU time."""
    start = time.thread_time_ns()
    for _ in range(passes):
        for iova in iovas:
            translate(dev, iova, None, False)
    return passes * len(iovas) * 1e9 / max(time.thread_time_ns() - start, 1)


def rig(driver: str, variant: str, capacity: int | None = None) -> tuple[Any, Any, list[int]]:
    """``(hw, dev, iovas)`` of a fresh machine of ``driver`` in ``variant`` (``capacity``:
    the IOTLB's number of entries, set before any translation)."""
    old = os.environ.pop(PURE_ENV, None)
    if variant == "pure":
        os.environ[PURE_ENV] = "1"
    try:
        machine = im.Machine.build(iommus=[driver])
    finally:
        os.environ.pop(PURE_ENV, None)
        if old is not None:
            os.environ[PURE_ENV] = old
    hw: Any = machine.iommus[0]
    if variant == "vendor":
        del vars(hw)["translate"]
    iotlb = getattr(hw, "tlb", getattr(hw, "iotlb", None))
    if capacity is not None and iotlb is not None:
        iotlb.capacity = capacity
    # The mock's aperture ends at 2 GiB (mock/domain.py MOCK_APERTURE_*): its areas start lower.
    base = 1 << 24 if driver == "mock" else BASE
    dev, _proc, _fd, _ioas, iovas = one_page_areas(machine, N, base)
    return hw, dev, iovas


def calls(driver: str, variant: str) -> dict[str, tuple[Call, Any, list[int]]]:
    """The hit loop's and (with an IOTLB) the miss loop's ``(translate, dev, iovas)``,
    warmed up."""
    loops: dict[str, tuple[Call, Any, list[int]]] = {}
    kinds = {"hit": None} if driver == "mock" else {"hit": None, "miss": MISS_CAPACITY}
    for kind, capacity in kinds.items():
        hw, dev, iovas = rig(driver, variant, capacity)
        translate = hw.translate
        for iova in iovas:
            translate(dev, iova, None, False)
        loops[kind] = (translate, dev, iovas)
    return loops


def run() -> dict[str, float]:
    drivers = [d for d in NAMES if d in default_registry().drivers]
    loops = {(d, v): calls(d, v) for d in drivers for v in VARIANTS}
    best: dict[str, float] = {}

    def floor(dev: Any, iova: int, pasid: int | None, write: bool) -> object:
        return None

    def measure(key: str, translate: Call, dev: Any, iovas: list[int]) -> None:
        best[key] = max(best.get(key, 0.0), cpu_rate(translate, dev, iovas))

    for _ in range(TRIALS):
        measure(FLOOR, floor, None, list(range(N)))
        for (driver, variant), loop in loops.items():
            for kind, (translate, dev, iovas) in loop.items():
                measure(
                    f"{NAMES[driver]} translate, IOTLB {kind} ({variant})", translate, dev, iovas
                )
    return best


def main() -> None:
    front = load_walker("iommufd_model.hw.xlate")
    print(f"translate front: {'compiled' if is_compiled(front) else 'pure Python'}")
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    figures = run()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    for key, value in figures.items():
        print(f"{key:60s} {value:14,.0f} /s")
    print()
    print(
        "| translate() per call (translations/s) | hit: installed | vendor | pure | "
        "miss: installed | vendor | pure |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in NAMES.values():
        row = [
            figures.get(f"{name} translate, IOTLB {k} ({v})")
            for k in ("hit", "miss")
            for v in VARIANTS
        ]
        if row[0] is not None:
            cells = ["n/a" if x is None else f"{x:,.0f}" for x in row]
            print(f"| {name} | " + " | ".join(cells) + " |")
    floor = figures[FLOOR]
    print()
    print(
        "| ratios | hit: installed / vendor | floor / installed | "
        "miss: installed / vendor | floor / installed |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in NAMES.values():
        if f"{name} translate, IOTLB hit (installed)" not in figures:
            continue
        cells = []
        for k in ("hit", "miss"):
            mine = figures.get(f"{name} translate, IOTLB {k} (installed)")
            if mine is None:
                cells += ["n/a", "n/a"]
                continue
            cells.append(f"{mine / figures[f'{name} translate, IOTLB {k} (vendor)']:.1f}x")
            cells.append(f"{floor / mine:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
