"""Walks per second of the VT-d hot paths, compiled (mypyc) vs pure Python. No assertions.

    python benchmarks/bench_vtd_walk.py

first-stage: the framework's x86-64 walker (4-level); second-stage: ``walk_ss`` (4-level);
nested: ``walk_nested`` (4-level over 4-level, 24 memory references), over 256 consecutive
pages (hot tables: they stay in the CPU caches) and over 4096 (nested: 1024) pages spread over
the address space (every walk misses the caches); IOTLB hit: a full ``IntelVtd.translate`` of
a cached page through the uAPI-built machine, and IOTLB hits inside a DMA burst
(``translate_run``). "per call": a Python loop calls the walker; "own loop": the walker
module's driver loops itself (compiled in the compiled build), as the C references of the three
walks (``c/vtd_walk.c``, built with ``cc -O2`` at bench time, skipped without a compiler) loop
over the same tables.
"""

from __future__ import annotations

from collections.abc import Callable

from _timing import c_reference, own_loop, print_figures, rate
from iommufd_intel_vtd.pgtable import SecondStageFormat
from librt.vecs import vec
from mypy_extensions import i64

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
SPREAD = 4096  # pages of the spread tables (nested: the first 1024)
GUEST_PAGES = 1024 + 3 * 1024 + 64  # data pages, the spread guest tables, the hot ones


def spread(i: int) -> int:
    """The i-th spread page: 4 table levels apart from its neighbours (cache-cold walks)."""
    return (i * 0x1_0040_1000) & ((1 << 48) - 1) & ~0xFFF


def run() -> dict[str, float]:
    mem = PhysicalMemory(1 << 40)
    pages = mem._pages
    s2 = RadixPageTable(mem, SecondStageFormat(4, sllps=0))
    host = mem.alloc_contiguous(GUEST_PAGES) << 12
    # "guest RAM" with 4 KiB second-stage pages
    s2.map(0, host, GUEST_PAGES << 12, RW)

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

    s1 = RadixPageTable(GuestRam(), X86_64Format(4))
    s1.map(0, 0, 256 << 12, RW)
    fs = RadixPageTable(mem, X86_64Format(4))
    fs.map(0, host, 256 << 12, RW)
    # Spread tables: first stage and second stage of SPREAD pages, nested of 1024.
    fs_far = RadixPageTable(mem, X86_64Format(4))
    s2_far = RadixPageTable(mem, SecondStageFormat(4, sllps=0))
    far = [spread(i) for i in range(SPREAD)]
    for i, iova in enumerate(far):
        fs_far.map(iova, (mem.alloc_frame()) << 12, 4096, RW)
        s2_far.map(iova, host + (i << 12), 4096, RW)
    for iova in far[1:1024]:  # far[0] is 0, mapped above: one guest data page for all
        s1.map(iova, 0, 4096, RW)

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
    shapes = {  # walk -> (tables, addresses) of the hot and spread shapes
        "hot": (fs.root, s2.root, s1.root, addrs, addrs),
        "spread": (fs_far.root, s2_far.root, s1.root, far, far[:1024]),
    }
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
        for shape, (fs_root, s2_root, s1_root, where, nested_where) in shapes.items():
            tag = "" if shape == "hot" else ", spread tables"

            # defs, not lambdas: mypy types no lambda that binds the loop's values as defaults
            def fs_loop(r: int, c: bool = compiled, t: int = fs_root, a: list[int] = where) -> int:
                return int(x86[c].walk_many(pages, size, t, vec[i64](a), 4, r))

            def ss_loop(r: int, c: bool = compiled, t: int = s2_root, a: list[int] = where) -> int:
                return int(vtd[c].bench_ss(pages, size, t, vec[i64](a), 4, r))

            def nested_loop(
                r: int,
                c: bool = compiled,
                f: object = fs_walk,
                t: int = s1_root,
                a: list[int] = nested_where,
            ) -> int:
                return int(vtd[c].bench_nested(f, pages, size, t, vec[i64](a), 4, s2.root, 4, r))

            figures[f"first-stage x86-64 walk{tag}, own loop ({name})"] = own_loop(
                fs_loop, len(where)
            )
            figures[f"second-stage walk{tag}, own loop ({name})"] = own_loop(ss_loop, len(where))
            figures[f"nested walk{tag}, own loop ({name})"] = own_loop(
                nested_loop, len(nested_where)
            )

    for shape, (fs_root, s2_root, s1_root, where, nested_where) in shapes.items():
        tag = "" if shape == "hot" else ", spread tables"
        for label, func, addrs_of, args in (
            ("first-stage x86-64 walk", "bench_fs", where, (fs_root, 4)),
            ("second-stage walk", "bench_ss", where, (s2_root, 4)),
            ("nested walk", "bench_nested", nested_where, (s1_root, 4, s2.root, 4)),
        ):
            c_ref = c_reference("vtd_walk", func, mem, addrs_of, *args)
            if c_ref is not None:
                figures[f"{label}{tag}, own loop (C reference, cc -O2)"] = c_ref

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
    iotlb = hw.iotlb  # type: ignore[attr-defined]

    def miss(i: int) -> object:
        iotlb.flush_all()
        return hw.translate(dev, (i & 255) << 12, None, False)

    figures["hw translate, IOTLB miss (installed walker)"] = rate(miss, range(256))
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
    print_figures(figures, "walks/s")


if __name__ == "__main__":
    main()
