"""Walks per second of the VT-d hot paths, compiled (mypyc) vs pure Python. No assertions.

    python benchmarks/bench_vtd_walk.py

first-stage: the framework's x86-64 walker (4-level); second-stage: ``walk_ss`` (4-level);
nested: ``walk_nested`` (4-level over 4-level, 24 memory references), over 256 pages (the
tables stay in the CPU caches); IOTLB hit: a full ``IntelVtd.translate`` of a cached page
through the uAPI-built machine, and IOTLB hits inside a DMA burst (``translate_run``).
"per call": a Python loop calls the walker; "own loop": the walker module's driver loops
itself (compiled in the compiled build), as the C reference of the first-stage walk (built with
``cc -O2`` at bench time, skipped without a compiler) loops over the same tables.
"""

from __future__ import annotations

from collections.abc import Callable

from _timing import c_reference, own_loop, rate
from iommufd_intel_vtd.pgtable import SecondStageFormat

import iommufd_model as im
from iommufd_model import uapi as U
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw import walk_x86
from iommufd_model.hw.compiled import is_compiled, load_pure, load_walker
from iommufd_model.hw.memory import PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.x86_64 import X86_64Format

RW = IOMMU_READ | IOMMU_WRITE
N = 20_000
VTD = "iommufd_intel_vtd.walk"
BURST = 2048  # pages of the translate_run figure (the IOTLB holds 4096 entries)
C_WALK = r"""
#include <stdint.h>
/* x86-64 first-stage walk over a flat copy of physical memory, the rules of walk_x86
   (present, R/W, PS leaves at levels 1-2): the physical address, or ~0 on a fault */
static uint64_t walk(const uint8_t *mem, uint64_t size, uint64_t root, int levels,
                     uint64_t iova, int write) {
    const uint64_t addr = ((1ULL << 52) - 1) & ~0xFFFULL;
    uint64_t table = root;
    int prot = 3;
    if (iova >> (12 + 9 * levels)) return ~0ULL;
    for (int level = levels - 1; level >= 0; level--) {
        int shift = 12 + 9 * level;
        uint64_t slot = table + ((iova >> shift) & 0x1FF) * 8;
        if (slot + 8 > size) return ~0ULL;
        uint64_t e = *(const uint64_t *)(mem + slot);
        if (!(e & 1)) return ~0ULL;
        if (!(e & 2)) prot &= 1;
        if (level == 0 || ((e & 0x80) && level <= 2)) {
            if (write && !(prot & 2)) return ~0ULL;
            uint64_t m = (1ULL << shift) - 1;
            return ((e & addr) & ~m) | (iova & m);
        }
        if (e & 0x80) return ~0ULL;
        table = e & addr;
    }
    return ~0ULL;
}
uint64_t bench(const uint8_t *mem, uint64_t size, uint64_t root, int levels,
               const uint64_t *iovas, int n, int rounds) {
    uint64_t acc = 0;
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < n; i++) acc += walk(mem, size, root, levels, iovas[i], 0);
    return acc;
}
"""


def run() -> dict[str, float]:
    mem = PhysicalMemory(1 << 40)
    pages = mem._pages
    s2 = RadixPageTable(mem, SecondStageFormat(4, sllps=0))
    host = mem.alloc_contiguous(1024) << 12
    s2.map(0, host, 1024 << 12, RW)  # 4 MiB of "guest RAM" with 4 KiB second-stage pages

    class GuestRam:  # the guest's stage-1 tables live in the stage-2-mapped range
        nxt = 512 << 12

        def alloc_frame(self) -> int:
            self.nxt += 4096
            return (self.nxt - 4096) >> 12

        def read_u64(self, gpa: int) -> int:
            return mem.read_u64(host + gpa)

        def write_u64(self, gpa: int, value: int) -> None:
            mem.write_u64(host + gpa, value)

        def read(self, gpa: int, n: int) -> bytes:
            return mem.read(host + gpa, n)

        def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
            mem.write(host + gpa, data)

        def put_frame(self, pfn: int) -> None:
            pass

    s1 = RadixPageTable(GuestRam(), X86_64Format(4))  # type: ignore[arg-type]
    s1.map(0, 0, 256 << 12, RW)
    fs = RadixPageTable(mem, X86_64Format(4))
    fs.map(0, host, 256 << 12, RW)

    x86 = {True: walk_x86, False: load_pure("iommufd_model.hw.walk_x86")}
    vtd = {True: load_walker(VTD), False: load_pure(VTD)}
    size = mem.size

    def first_stage(compiled: bool) -> Callable[[int], object]:
        walker = x86[compiled].walk_x86
        return lambda i: walker(pages, size, fs.root, (i & 255) << 12, 4, False, None)

    def second_stage(compiled: bool) -> Callable[[int], object]:
        walker = vtd[compiled].walk_ss
        return lambda i: walker(pages, size, s2.root, (i & 255) << 12, 4, False, 0, False)

    def nested(compiled: bool) -> Callable[[int], object]:
        walker, fs_walk = vtd[compiled].walk_nested, x86[compiled].walk_x86
        return lambda i: walker(
            fs_walk, pages, size, s1.root, (i & 255) << 12, 4, False, s2.root, 4, 0, False
        )

    figures: dict[str, float] = {}
    addrs = [i << 12 for i in range(256)]
    for compiled in (True, False):
        if compiled and not is_compiled(vtd[True]):
            continue
        name = "compiled" if compiled else "pure"
        for label, make in (
            ("first-stage x86-64 walk", first_stage),
            ("second-stage walk", second_stage),
            ("nested walk", nested),
        ):
            figures[f"{label}, per call ({name})"] = rate(make(compiled), range(N))
        fs_walk = x86[compiled].walk_x86
        figures[f"first-stage x86-64 walk, own loop ({name})"] = own_loop(
            lambda r, c=compiled: x86[c].walk_many(pages, size, fs.root, addrs, 4, r), 256
        )
        figures[f"second-stage walk, own loop ({name})"] = own_loop(
            lambda r, c=compiled: vtd[c].bench_ss(pages, size, s2.root, addrs, 4, r), 256
        )
        figures[f"nested walk, own loop ({name})"] = own_loop(
            lambda r, c=compiled, f=fs_walk: vtd[c].bench_nested(
                f, pages, size, s1.root, addrs, 4, s2.root, 4, r
            ),
            256,
        )

    c_ref = c_reference(C_WALK, mem, fs.root, 4, addrs)
    if c_ref is not None:
        figures["first-stage x86-64 walk, own loop (C reference, cc -O2)"] = c_ref

    machine = im.Machine.build(iommus=["intel_vtd"])
    dev = machine.add_pci_device(iommu=0)
    proc = machine.new_process()
    va = proc.mmap(1 << 20)
    fd = proc.open_iommufd()
    dev_id = fd.bind(dev)
    ioas = fd.ioas_alloc()
    fd.option(U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_SET, object_id=ioas, val64=0)
    fd.ioas_map(ioas, va, 1 << 20, iova=0)
    fd.attach(dev_id, ioas)
    hw = dev.iommu
    hw.translate(dev, 0, None, False)
    hit = rate(lambda i: hw.translate(dev, 0x10, None, False), range(100_000))
    figures["hw translate, IOTLB hit"] = hit
    # A burst: one translate_run over BURST 4 KiB IOMMU pages, the IOTLB warm.
    fd.ioas_map(ioas, proc.mmap(BURST << 12), BURST << 12, iova=1 << 32)
    hw.translate_run(dev, 1 << 32, BURST << 12, None, False)
    figures[f"hw translate_run, IOTLB hits in a {BURST}-page burst"] = own_loop(
        lambda r: sum(
            len(hw.translate_run(dev, 1 << 32, BURST << 12, None, False)) for _ in range(r)
        ),
        BURST,
    )
    return figures


def main() -> None:
    figures = run()
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:>14,.0f} walks/s")


if __name__ == "__main__":
    main()
