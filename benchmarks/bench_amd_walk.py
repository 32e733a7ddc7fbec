"""AMD IOMMU walk rates: v1 single-stage and 2-D nested walks (compiled vs pure walker), the
full hardware translation on an IOTLB miss and on an IOTLB hit, and a C reference walk.

Prints translations per second; no assertions (figures, not a timed test). Run after
installing the plugin: ``python benchmarks/bench_amd_walk.py``. Walks are timed two ways:
"per call from Python" (a Python loop calling the walker, what the model pays per walk) and
"own loop" (the walker module's ``bench_*`` driver loops itself -- compiled for the compiled
build, as the C reference runs its own C loop). Two table shapes: 4096 pages spread over the
address space (every walk misses the CPU caches) and 256 consecutive pages ("hot tables").
The C references (``c/amd_walk.c``, built with ``cc -O2`` at bench time when one is
installed) walk the same v1 and nested tables, copied into one flat buffer, with the same rules
(NextLevel 0/7 leaves, skip levels, IR/IW; GCR3, x86-64 guest entries through the host table).
"""

from __future__ import annotations

import random
from functools import partial
from types import ModuleType
from typing import Any

from _rig import one_page_areas
from _timing import c_reference, own_loop, print_figures, rate
from iommufd_amd.gcr3 import Gcr3Table, V2PageTable
from iommufd_amd.hw import AmdIommu
from iommufd_amd.pgtable_v1 import AmdV1PageTable
from librt.vecs import vec
from mypy_extensions import i64

import iommufd_model as im
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.compiled import is_compiled, load_pure, load_walker
from iommufd_model.hw.memory import PAGE_SHIFT, PhysicalMemory

RW = IOMMU_READ | IOMMU_WRITE
PAGES = 4096
GPA = 1 << 36


def host_table() -> tuple[PhysicalMemory, AmdV1PageTable, list[int]]:
    mem = PhysicalMemory(1 << 32)
    pt = AmdV1PageTable(mem, 4)
    iovas = []
    for i in range(PAGES):  # 4 KiB pages spread over the address space: 4 refs per walk
        iova = (i * 0x1_0040_1000) & ((1 << 48) - 1) & ~0xFFF
        pt.map(iova, mem.alloc_frame() << PAGE_SHIFT, 4096, RW)
        iovas.append(iova + 8)
    return mem, pt, iovas


def nested_tables(hot: bool = False) -> tuple[PhysicalMemory, AmdV1PageTable, Gcr3Table, list[int]]:
    """Host v1 (GPA -> SPA, 4 KiB pages), guest v2 and GCR3 tables with GPA == SPA; guest
    pages at random addresses (spread), or 256 consecutive ones (``hot``)."""
    mem = PhysicalMemory(1 << 40)
    host = AmdV1PageTable(mem, 4)
    guest = V2PageTable(mem, 4)
    gcr3 = Gcr3Table(mem, 0)
    rng = random.Random(5)
    gvas = []
    for i in range(256 if hot else PAGES):
        gva = (1 << 39) + (i << PAGE_SHIFT) if hot else rng.randrange(1 << 47) & ~0xFFF
        try:
            guest.map(gva, GPA + i * 4096, 4096, RW)
        except OSError:
            continue
        host.map(GPA + i * 4096, mem.alloc_frame() << PAGE_SHIFT, 4096, RW)
        gvas.append(gva)
    gcr3.set(0, guest.root)
    for frame in sorted(set(guest.tables) | set(gcr3.tables)):
        host.map(frame, frame, 4096, RW)
    return mem, host, gcr3, gvas


def hot_table() -> tuple[PhysicalMemory, AmdV1PageTable, list[int]]:
    """256 consecutive 4 KiB pages: one leaf table, the walk's tables stay in the CPU caches
    (the other workload spreads 4096 pages so that every walk misses them)."""
    mem = PhysicalMemory(1 << 32)
    pt = AmdV1PageTable(mem, 4)
    for i in range(256):
        pt.map(i << PAGE_SHIFT, mem.alloc_frame() << PAGE_SHIFT, 4096, RW)
    return mem, pt, [(i << PAGE_SHIFT) + 8 for i in range(256)]


BURST = 2048  # pages of the translate_run figure (the IOTLB holds 4096 entries)


def machine_rates() -> tuple[float, float, float]:
    """Full hardware translate(): IOTLB miss (flushed each time) and IOTLB hit, per call; and
    IOTLB hits inside a DMA burst (``translate_run``: the context checked once, the hits
    looked up by the compiled ``tlb_run``)."""
    machine = im.Machine.build(iommus=["amd"])
    hw = machine.iommus[0]
    assert isinstance(hw, AmdIommu)
    dev, proc, fd, ioas, iovas = one_page_areas(machine, 256)  # 4 KiB leaves, 4-level walks

    def miss(iova: int) -> object:
        hw.iotlb.flush_all()
        return hw.translate(dev, iova, None, False)

    miss_rate = rate(miss, iovas)
    for iova in iovas:
        hw.translate(dev, iova, None, False)
    hit_rate = rate(lambda iova: hw.translate(dev, iova, None, False), iovas)
    # A burst: one translate_run over BURST consecutive 4 KiB IOMMU pages, the IOTLB warm.
    va = proc.mmap(BURST * 4096)
    fd.ioas_map(ioas, va, BURST * 4096, iova=1 << 40)
    hw.translate_run(dev, 1 << 40, BURST * 4096, None, False)
    burst_rate = own_loop(
        lambda r: sum(
            len(hw.translate_run(dev, 1 << 40, BURST * 4096, None, False)) for _ in range(r)
        ),
        BURST,
    )
    return miss_rate, hit_rate, burst_rate


def walkers() -> list[tuple[str, ModuleType, ModuleType]]:
    out = [("pure", load_pure("iommufd_amd.walk"), load_pure("iommufd_model.hw.walk_x86"))]
    comp = load_walker("iommufd_amd.walk")
    if is_compiled(comp):
        out.insert(0, ("compiled", comp, load_walker("iommufd_model.hw.walk_x86")))
    return out


def run() -> dict[str, float]:
    mem, pt, iovas = host_table()
    nmem, host, gcr3, gvas = nested_tables()
    figures: dict[str, float] = {}
    pages, size = mem._pages, mem.size
    npages, nsize = nmem._pages, nmem.size
    gvas = gvas[:1024]
    for name, w, x86 in walkers():
        figures[f"v1 single-stage walk, per call from Python ({name})"] = rate(
            partial(w.walk_v1, pages, size, pt.root, 4, write=False, had=0), iovas
        )
        nested = partial(w.walk_nested, npages, nsize, host.root, 4, 0, gcr3.root, 0, 4, 0)

        # defs, not lambdas: mypy types no lambda that binds the loop's values as defaults
        def nested_call(gva: int, n: partial[Any] = nested, x: ModuleType = x86) -> object:
            return n(gva, False, x.walk_x86)

        def v1_loop(r: int, w: ModuleType = w) -> int:
            return int(w.bench_v1(pages, size, pt.root, 4, vec[i64](iovas), r))

        def nested_loop(r: int, w: ModuleType = w, x: ModuleType = x86) -> int:
            return int(
                w.bench_nested(
                    npages, nsize, host.root, 4, gcr3.root, 4, vec[i64](gvas), r, x.walk_x86
                )
            )

        figures[f"2-D nested walk (29 refs), per call from Python ({name})"] = rate(
            nested_call, gvas
        )
        figures[f"v1 single-stage walk, own loop ({name})"] = own_loop(v1_loop, len(iovas))
        figures[f"2-D nested walk (29 refs), own loop ({name})"] = own_loop(nested_loop, len(gvas))
    hmem, hpt, hot = hot_table()
    gmem, ghost, ggcr3, ghot = nested_tables(hot=True)
    for name, w, x86 in walkers():

        def hot_v1_loop(r: int, w: ModuleType = w) -> int:
            return int(w.bench_v1(hmem._pages, hmem.size, hpt.root, 4, vec[i64](hot), r))

        def hot_nested_loop(r: int, w: ModuleType = w, x: ModuleType = x86) -> int:
            return int(
                w.bench_nested(
                    gmem._pages,
                    gmem.size,
                    ghost.root,
                    4,
                    ggcr3.root,
                    4,
                    vec[i64](ghot),
                    r,
                    x.walk_x86,
                )
            )

        figures[f"v1 single-stage walk, hot tables, own loop ({name})"] = own_loop(
            hot_v1_loop, len(hot)
        )
        figures[f"2-D nested walk (29 refs), hot tables, own loop ({name})"] = own_loop(
            hot_nested_loop, len(ghot)
        )
    c_refs: dict[str, tuple[str, PhysicalMemory, list[int], *tuple[int, ...]]] = {
        "v1 single-stage walk, own loop": ("bench_v1", mem, iovas, pt.root, 4),
        "v1 single-stage walk, hot tables, own loop": ("bench_v1", hmem, hot, hpt.root, 4),
        "2-D nested walk (29 refs), own loop": (
            "bench_nested",
            nmem,
            gvas,
            host.root,
            4,
            gcr3.root,
            4,
        ),
        "2-D nested walk (29 refs), hot tables, own loop": (
            "bench_nested",
            gmem,
            ghot,
            ghost.root,
            4,
            ggcr3.root,
            4,
        ),
    }
    for label, (func, m, addrs, *args) in c_refs.items():
        c = c_reference("amd_walk", func, m, addrs, *args)
        if c is not None:
            figures[f"{label} (C reference, cc -O2)"] = c
    miss, hit, burst = machine_rates()
    figures["hw translate, IOTLB miss (installed walker)"] = miss
    figures["hw translate, IOTLB hit"] = hit
    figures["hw translate_run, IOTLB hits in a 2048-page burst"] = burst
    return figures


def ratios(figures: dict[str, float]) -> list[str]:
    out = []
    for how in ("per call from Python", "own loop"):
        comp = figures.get(f"v1 single-stage walk, {how} (compiled)")
        pure = figures[f"v1 single-stage walk, {how} (pure)"]
        if comp:
            nested = (
                figures[f"2-D nested walk (29 refs), {how} (compiled)"]
                / figures[f"2-D nested walk (29 refs), {how} (pure)"]
            )
            out.append(
                f"compiled / pure, {how}: single-stage {comp / pure:.1f}x, nested {nested:.1f}x"
            )
    for walk in ("v1 single-stage walk", "2-D nested walk (29 refs)"):
        for kind in ("", "hot tables, "):
            c = figures.get(f"{walk}, {kind}own loop (C reference, cc -O2)")
            comp = figures.get(f"{walk}, {kind}own loop (compiled)")
            pure = figures[f"{walk}, {kind}own loop (pure)"]
            if c is None:
                out.append("C reference skipped: no C compiler (cc/gcc) found")
            elif comp:
                out.append(
                    f"{walk}, {kind or 'spread tables, '}own loops: C / compiled "
                    f"{c / comp:.1f}x, compiled / pure {comp / pure:.1f}x"
                )
    return out


def main() -> None:
    figures = run()
    print_figures(figures, "translations/s")
    for line in ratios(figures):
        print(line)


if __name__ == "__main__":
    main()
