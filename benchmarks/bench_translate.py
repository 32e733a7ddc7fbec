"""``translate()`` per call from Python, every vendor, IOTLB hit and miss, in one run.

For each installed vendor (AMD, VT-d, SMMUv3) one machine per variant, set up through the
uAPI: one IOAS with 256 one-page areas 2 MiB apart (4 KiB IOMMU pages, so a miss walks every
level), the device's RID attached. The variants, measured alternately in one process (the best
of ``TRIALS`` passes each, so that load on a shared machine shows up as noise on all of them
alike):

- **installed**: the build as installed (the compiled translate front, hw/xlate.py, and the
  compiled walkers);
- **vendor**: the same build with the front removed from the instance, i.e. the vendor's own
  ``translate()`` (interpreted Python around the compiled walkers: what issue 19 measured);
- **pure**: every hot module from its Python source (``IOMMUFD_MODEL_PURE=1`` when the machine
  is built).

A hit translates the 256 IOVAs in turn with the IOTLB warm; a miss flushes the IOTLB
(``flush_all``) before each call, as the other walk benchmarks do, so the miss figure includes
the flush. ``call floor`` is the same loop calling a Python function that does nothing: no
per-call figure from Python can exceed it.

    python benchmarks/bench_translate.py
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from _rig import one_page_areas
from _timing import rate

import iommufd_model as im
from iommufd_model.hw.compiled import PURE_ENV, is_compiled, load_walker
from iommufd_model.plugins import default_registry

N = 256
TRIALS = 5
SECONDS = 0.2
VARIANTS = ("installed", "vendor", "pure")
NAMES = {"amd": "AMD", "intel_vtd": "VT-d", "arm_smmuv3": "SMMUv3"}


def rig(driver: str, variant: str) -> tuple[Any, Any, list[int], Any]:
    """``(hw, dev, iovas, iotlb)`` of a fresh machine of ``driver`` in ``variant``."""
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
    dev, _proc, _fd, _ioas, iovas = one_page_areas(machine, N)
    iotlb = hw.tlb if hasattr(hw, "tlb") else hw.iotlb
    return hw, dev, iovas, iotlb


def calls(driver: str, variant: str) -> dict[str, Callable[[int], object]]:
    hw, dev, iovas, iotlb = rig(driver, variant)
    translate = hw.translate
    flush = iotlb.flush_all

    def miss(iova: int) -> object:
        flush()
        return translate(dev, iova, None, False)

    for iova in iovas:
        translate(dev, iova, None, False)
    return {
        "hit": lambda iova: translate(dev, iova, None, False),
        "miss": miss,
        "iovas": iovas,  # type: ignore[dict-item]
    }


def run() -> dict[str, float]:
    drivers = [d for d in NAMES if d in default_registry().drivers]
    loops = {(d, v): calls(d, v) for d in drivers for v in VARIANTS}
    best: dict[str, float] = {}
    iovas = list(range(N))

    def floor(iova: int) -> object:
        return None

    for _ in range(TRIALS):
        key = "call floor (a Python function doing nothing)"
        best[key] = max(best.get(key, 0.0), rate(floor, iovas, SECONDS))
        for (driver, variant), loop in loops.items():
            for kind in ("hit", "miss"):
                key = f"{NAMES[driver]} translate, IOTLB {kind} ({variant})"
                got = rate(loop[kind], loop["iovas"], SECONDS)  # type: ignore[arg-type]
                best[key] = max(best.get(key, 0.0), got)
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
            print(f"| {name} | " + " | ".join(f"{x:,.0f}" for x in row if x is not None) + " |")
    floor = figures["call floor (a Python function doing nothing)"]
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
            mine = figures[f"{name} translate, IOTLB {k} (installed)"]
            cells.append(f"{mine / figures[f'{name} translate, IOTLB {k} (vendor)']:.1f}x")
            cells.append(f"{floor / mine:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
