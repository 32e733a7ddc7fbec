"""SMMUv3 walk rates: stage-1 and nested walks (compiled vs pure walker, per call and in the
walker's own loop), a C reference of the stage-1 walk over the same tables, and TLB hits (per
``translate()`` call and inside a DMA burst).

Prints walks per second; no assertions (figures, not a timed test). Run after installing the
plugin: ``python benchmarks/bench_smmuv3_walk.py``.
"""

from __future__ import annotations

from types import ModuleType

from _timing import c_reference, own_loop, rate
from iommufd_arm_smmuv3.driver import plugin
from iommufd_arm_smmuv3.guest import IpaFrames, stage1_tables
from iommufd_arm_smmuv3.hw import WALKER
from iommufd_arm_smmuv3.pgtable import Stage1Format, Stage2Format

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.compiled import is_compiled, load_pure, load_walker
from iommufd_model.hw.memory import PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.machine import Machine

RW = IOMMU_READ | IOMMU_WRITE
PAGES = 4096
BURST = 2048  # pages of the translate_run figure (the TLB holds 4096 entries)
GUEST_IPA = 1 << 30


def tables() -> tuple[PhysicalMemory, RadixPageTable, RadixPageTable, RadixPageTable]:
    mem = PhysicalMemory(1 << 40)
    flat = RadixPageTable(mem, Stage1Format())
    s2 = RadixPageTable(mem, Stage2Format())
    for i in range(PAGES + 64):  # 4 KiB stage-2 pages: the costliest nested walk
        s2.map(GUEST_IPA + i * 4096, (mem.alloc_frame()) << 12, 4096, RW)
    guest = IpaFrames(mem, s2, GUEST_IPA + PAGES * 4096)
    s1 = stage1_tables(guest)
    for i in range(PAGES):
        flat.map(i * 4096, (0x100000 + i) << 12, 4096, RW)
        s1.map(i * 4096, GUEST_IPA + i * 4096, 4096, RW)
    return mem, flat, s1, s2


C_WALK = r"""
#include <stdint.h>
/* VMSAv8-64 stage-1 walk, 4 KiB granule, over a flat copy of physical memory: the same rules
   as walk_s1 without stage 2 (valid, table/page/block, AF, APTable, AP[2:1]); ~0 on a fault */
static uint64_t walk(const uint8_t *mem, uint64_t size, uint64_t ttb, int ia_bits, uint64_t va) {
    const uint64_t oa = ((1ULL << 48) - 1) & ~0xFFFULL;
    int start = 4 - (ia_bits - 12 + 8) / 9, unpriv = 1, rdonly = 0;
    uint64_t table = ttb;
    if (va >> ia_bits) return ~0ULL;
    for (int level = start;; level++) {
        int shift = 12 + 9 * (3 - level);
        int bits = level == start ? ia_bits - shift : 9;
        uint64_t slot = table + ((va >> shift) & ((1ULL << bits) - 1)) * 8;
        if (slot + 8 > size) return ~0ULL;
        uint64_t d = *(const uint64_t *)(mem + slot);
        if (!(d & 1)) return ~0ULL;
        if (level < 3 && (d & 2)) {
            table = d & oa;
            if (d >> 61 & 1) unpriv = 0;
            if (d >> 62 & 1) rdonly = 1;
            continue;
        }
        if ((level == 3 && !(d & 2)) || level == 0 || !(d & (1 << 10))) return ~0ULL;
        if (!unpriv || !(d & (1 << 6))) return ~0ULL;
        (void)rdonly;
        uint64_t m = (1ULL << shift) - 1;
        return ((d & oa) & ~m) | (va & m);
    }
}
uint64_t bench(const uint8_t *mem, uint64_t size, uint64_t root, int ia_bits,
               const uint64_t *vas, int n, int rounds) {
    uint64_t acc = 0;
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < n; i++) acc += walk(mem, size, root, ia_bits, vas[i]);
    return acc;
}
"""


def walkers(name: str, walker: ModuleType) -> dict[str, float]:
    mem, flat, s1, s2 = tables()
    pages, size = mem._pages, mem.size
    iovas = [i * 4096 for i in range(PAGES)]

    def stage1(va: int) -> object:
        args = (False, False, False, 0, 0, 0, 0, False)
        return walker.walk_s1(pages, size, flat.root, va, 48, 48, False, *args)

    def nested(va: int) -> object:
        args = (False, False, True, s2.root, 48, 0, 48, False)
        return walker.walk_s1(pages, size, s1.root, va, 48, 48, False, *args)

    figures = {
        f"stage-1 walk, per call ({name})": rate(stage1, iovas),
        f"nested walk, per call ({name})": rate(nested, iovas),
        f"stage-1 walk, own loop ({name})": own_loop(
            lambda r: walker.bench_s1(pages, size, flat.root, iovas, 48, r), len(iovas)
        ),
        f"nested walk, own loop ({name})": own_loop(
            lambda r: walker.bench_nested(pages, size, s1.root, s2.root, iovas, 48, r), len(iovas)
        ),
    }
    if name == "compiled":
        c = c_reference(C_WALK, mem, flat.root, 48, iovas)
        if c is not None:
            figures["stage-1 walk, own loop (C reference, cc -O2)"] = c
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
    hw.translate_run(dev, 0, BURST * 4096, None, False)  # fill the TLB
    return {
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
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:>14,.0f}")
    comp, pure = (
        figures.get("stage-1 walk, own loop (compiled)"),
        figures["stage-1 walk, own loop (pure)"],
    )
    c_ref = figures.get("stage-1 walk, own loop (C reference, cc -O2)")
    if comp:
        print(
            f"own loops: compiled / pure {comp / pure:.1f}x"
            + (f", C / compiled {c_ref / comp:.1f}x" if c_ref else "")
        )


if __name__ == "__main__":
    main()
