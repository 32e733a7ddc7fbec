"""SMMUv3 walk rates: stage-1 and nested walks (compiled vs pure walker, per call and in the
walker's own loop), a C reference of the stage-1 walk over the same tables, and TLB hits (per
``translate()`` call and inside a DMA burst).

Tables of 4096 consecutive pages (hot: they stay in the CPU caches) and of 4096 pages spread over
the address space (every walk misses them); the C references are ``c/smmuv3_walk.c``, built
with ``cc -O2`` at bench time (skipped without a compiler). Prints walks per second; no
assertions (figures, not a timed test). Run after installing the plugin:
``python benchmarks/bench_smmuv3_walk.py``.
"""

from __future__ import annotations

from types import ModuleType

from _timing import c_reference, own_loop, print_figures, rate
from iommufd_arm_smmuv3.driver import plugin
from iommufd_arm_smmuv3.guest import IpaFrames, stage1_tables
from iommufd_arm_smmuv3.hw import WALKER
from iommufd_arm_smmuv3.pgtable import Stage1Format, Stage2Format
from librt.vecs import vec
from mypy_extensions import i64

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.compiled import is_compiled, load_pure, load_walker
from iommufd_model.hw.memory import PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.machine import Machine

RW = IOMMU_READ | IOMMU_WRITE
PAGES = 4096
BURST = 2048  # pages of the translate_run figure (the TLB holds 4096 entries)
GUEST_IPA = 1 << 30


def spread(i: int) -> int:
    """The i-th spread page: 4 table levels apart from its neighbours (cache-cold walks)."""
    return (i * 0x1_0040_1000) & ((1 << 48) - 1) & ~0xFFF


def tables(
    hot: bool,
) -> tuple[PhysicalMemory, RadixPageTable, RadixPageTable, RadixPageTable, list[int]]:
    """Stage-1 tables of PAGES 4 KiB pages, flat and nested (over 4 KiB stage-2 pages, the
    costliest nested walk): consecutive pages (``hot``: the tables stay in the CPU caches) or
    spread over the address space (every walk misses them); and the pages' addresses."""
    mem = PhysicalMemory(1 << 40)
    flat = RadixPageTable(mem, Stage1Format())
    s2 = RadixPageTable(mem, Stage2Format())
    table_frames = 64 if hot else 3 * PAGES + 64
    for i in range(PAGES + table_frames):
        s2.map(GUEST_IPA + i * 4096, (mem.alloc_frame()) << 12, 4096, RW)
    guest = IpaFrames(mem, s2, GUEST_IPA + PAGES * 4096)
    s1 = stage1_tables(guest)
    vas = [i * 4096 if hot else spread(i) for i in range(PAGES)]
    for i, va in enumerate(vas):
        flat.map(va, (0x100000 + i) << 12, 4096, RW)
        s1.map(va, GUEST_IPA + i * 4096, 4096, RW)
    return mem, flat, s1, s2, vas


def walkers(name: str, walker: ModuleType) -> dict[str, float]:
    figures: dict[str, float] = {}
    for hot in (True, False):
        figures |= shape(name, walker, hot)
    return figures


def shape(name: str, walker: ModuleType, hot: bool) -> dict[str, float]:
    """The walk figures of one table shape (hot or spread)."""
    mem, flat, s1, s2, iovas = tables(hot)
    pages, size = mem._pages, mem.size
    tag = "" if hot else ", spread tables"

    def stage1(va: int) -> object:
        args = (False, False, False, 0, 0, 0, 0, False)
        return walker.walk_s1(pages, size, flat.root, va, 48, 48, False, *args)

    def nested(va: int) -> object:
        args = (False, False, True, s2.root, 48, 0, 48, False)
        return walker.walk_s1(pages, size, s1.root, va, 48, 48, False, *args)

    native = vec[i64](iovas)  # the drivers loop over native ints, as the C references do
    figures: dict[str, float] = {}
    if hot:
        figures[f"stage-1 walk, per call ({name})"] = rate(stage1, iovas)
        figures[f"nested walk, per call ({name})"] = rate(nested, iovas)
    figures[f"stage-1 walk{tag}, own loop ({name})"] = own_loop(
        lambda r: walker.bench_s1(pages, size, flat.root, native, 48, r), len(iovas)
    )
    figures[f"nested walk{tag}, own loop ({name})"] = own_loop(
        lambda r: walker.bench_nested(pages, size, s1.root, s2.root, native, 48, r), len(iovas)
    )
    if name == "compiled":
        for label, func, args in (
            ("stage-1 walk", "bench_s1", (flat.root, 48)),
            ("nested walk", "bench_nested", (s1.root, s2.root, 48)),
        ):
            c = c_reference("smmuv3_walk", func, mem, iovas, *args)
            if c is not None:
                figures[f"{label}{tag}, own loop (C reference, cc -O2)"] = c
    return figures


def tlb_hits() -> dict[str, float]:
    """``translate()`` per call on a TLB hit, and TLB hits inside a DMA burst."""
    m = Machine.build(iommus=["arm_smmuv3"])
    hw = m.iommus[0]
    dev = m.add_pci_device(iommu=0)
    domain = plugin.domain_alloc_user(
        iommu=hw, dev=dev, flags=0, parent=None, viommu=None, user_data=None
    )
    plugin.attach(iommu=hw, dev=dev, domain=domain)
    base = m.memory.alloc_contiguous(BURST) << 12
    plugin.domain_map(domain=domain, iova=0, pa=base, size=BURST * 4096, prot=RW)
    iovas = [i * 4096 for i in range(256)]
    tlb = hw.tlb  # type: ignore[attr-defined]

    def miss(iova: int) -> object:
        tlb.flush_all()
        return hw.translate(dev, iova, None, False)

    miss_rate = rate(miss, iovas)
    hw.translate_run(dev, 0, BURST * 4096, None, False)  # fill the TLB
    return {
        "hw translate, TLB miss (installed walker)": miss_rate,
        "hw translate, TLB hit": rate(lambda iova: hw.translate(dev, iova, None, False), iovas),
        f"hw translate_run, TLB hits in a {BURST}-page burst": own_loop(
            lambda r: sum(
                len(hw.translate_run(dev, 0, BURST * 4096, None, False)) for _ in range(r)
            ),
            BURST,
        ),
    }


def run() -> dict[str, float]:
    figures: dict[str, float] = {}
    compiled = load_walker(WALKER)
    if is_compiled(compiled):
        figures |= walkers("compiled", compiled)
    figures |= walkers("pure", load_pure(WALKER))
    figures |= tlb_hits()
    return figures


def main() -> None:
    figures = run()
    print_figures(figures)
    for walk in ("stage-1 walk", "nested walk"):
        for tag in ("", ", spread tables"):
            comp = figures.get(f"{walk}{tag}, own loop (compiled)")
            pure = figures[f"{walk}{tag}, own loop (pure)"]
            c_ref = figures.get(f"{walk}{tag}, own loop (C reference, cc -O2)")
            if comp:
                print(
                    f"{walk}{tag or ', hot tables'}, own loops: compiled / pure {comp / pure:.1f}x"
                    + (f", C / compiled {c_ref / comp:.1f}x" if c_ref else "")
                )


if __name__ == "__main__":
    main()
