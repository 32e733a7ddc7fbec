"""SMMUv3 walk rates: stage-1 and nested walks (compiled vs pure walker) and TLB hits.

Prints walks per second; no assertions (figures, not a timed test). Run after installing the
plugin: ``python benchmarks/bench_smmuv3_walk.py``.
"""

from __future__ import annotations

from types import ModuleType

from _timing import rate
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


def walkers(walker: ModuleType) -> dict[str, float]:
    mem, flat, s1, s2 = tables()
    pages, size = mem._pages, mem.size
    iovas = [i * 4096 for i in range(PAGES)]

    def stage1(va: int) -> object:
        args = (False, False, False, 0, 0, 0, 0, False)
        return walker.walk_s1(pages, size, flat.root, va, 48, 48, False, *args)

    def nested(va: int) -> object:
        args = (False, False, True, s2.root, 48, 0, 48, False)
        return walker.walk_s1(pages, size, s1.root, va, 48, 48, False, *args)

    return {"stage-1": rate(stage1, iovas), "nested": rate(nested, iovas)}


def tlb_hits() -> float:
    m = Machine.build(iommus=["arm_smmuv3"])
    hw = m.iommus[0]
    dev = m.add_pci_device(iommu=0)
    domain = plugin.domain_alloc_paging(iommu=hw, dev=dev, flags=0)
    plugin.attach_dev(iommu=hw, dev=dev, domain=domain)
    base = m.memory.alloc_contiguous(256) << 12
    plugin.domain_map(domain=domain, iova=0, pa=base, size=256 * 4096, prot=RW)
    iovas = [i * 4096 for i in range(256)]
    for iova in iovas:
        hw.translate(dev, iova, None, False)  # fill the TLB
    return rate(lambda iova: hw.translate(dev, iova, None, False), iovas)


def main() -> None:
    compiled = load_walker(WALKER)
    pure = load_pure(WALKER)
    fast = walkers(compiled)
    slow = walkers(pure)
    label = "compiled" if is_compiled(compiled) else "pure (no mypyc build)"
    for kind in ("stage-1", "nested"):
        print(
            f"{kind:8s} walks/s: {label} {fast[kind]:>12,.0f}   pure {slow[kind]:>12,.0f}"
            f"   x{fast[kind] / slow[kind]:.1f}"
        )
    print(f"TLB hit  translations/s (Smmuv3.translate): {tlb_hits():>12,.0f}")


if __name__ == "__main__":
    main()
