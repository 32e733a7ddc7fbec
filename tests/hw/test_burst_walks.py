"""A burst's walks (``IommuHw.walk_run``: the IOTLB misses of a DMA walked in one compiled
call, ``tlb_run.walk_run``, or AMD's own ``walk.walk_run``) change nothing but speed.

Every table kind each vendor walks -- AMD host (v1) tables and nested guest tables; VT-d first
stage, second stage and nested; SMMUv3 stage 1, stage 2 and nested -- runs one sequence of DMA
reads and writes on three machines: the installed build (compiled walkers and burst loop),
the pure-Python sources of every hot module (``IOMMUFD_MODEL_PURE=1`` when the machine is
built), and page by page (``translate()`` for every page, then the bytes copied). The tables
have a hole and read-only pages, so bursts fault midway; a tiny IOTLB makes bursts evict their
own fills; dirty tracking turns on accessed/dirty updates; the last DMAs run inside the IOTLB
(whole runs of hits, ``tlb_run.hit_run``, and one copy). After every DMA the three must agree
on the bytes read or the fault, the statistics, the fault records, the IOTLB's entries (in
FIFO order) and counters, and at the end every byte of memory (page tables with their A/D
bits included) and the dirty bitmap.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

import iommufd_model as im
from iommufd_model import uapi as U
from iommufd_model.hw.compiled import PURE_ENV, is_compiled, load_walker
from iommufd_model.hw.iommu import DmaFault, IommuHw
from iommufd_model.hw.iotlb import Iotlb
from iommufd_model.plugins import default_registry
from iommufd_model.vmm import Vm

from .test_translate_front import _env, _records

PAGE = 4096
MIB = 1 << 20
IOVA = 1 << 24  # inside every driver's aperture
PAGES = 48
HOLE = 30  # never mapped: a burst across it faults there
READ_ONLY = range(20, 24)
_DRIVERS = default_registry().drivers

#: (driver, machine options, tables): "paging" is an IOAS domain (the driver's default
#: stage, or the only one the options leave), "nested" a guest's stage 1 over the IOAS
KINDS = [
    (d, o, t)
    for d, o, t in (
        ("amd", {}, "paging"),
        ("amd", {}, "nested"),
        ("intel_vtd", {}, "paging"),  # first stage
        ("intel_vtd", {"first_stage": False, "nest": False}, "paging"),  # second stage
        ("intel_vtd", {}, "nested"),
        ("arm_smmuv3", {}, "paging"),  # stage 1
        ("arm_smmuv3", {"s1p": False}, "paging"),  # stage 2
        ("arm_smmuv3", {}, "nested"),
    )
    if d in _DRIVERS
]
IDS = [f"{d}-{'-'.join(map(str, o.values())) or 'default'}-{t}" for d, o, t in KINDS]

#: (write, first page, byte offset, pages, byte tail): whole bursts, unaligned ones, bursts
#: across the read-only pages and the hole, and the whole range (beyond a tiny IOTLB)
DMAS = [
    (False, 0, 0, 30, 0),
    (True, 0, 0, 12, 0),
    (False, 2, 100, 9, 7),
    (True, 14, 0, 8, 0),  # faults at the read-only pages
    (False, 12, 0, 12, 0),  # reads them
    (True, 24, 5, 10, 0),  # faults at the hole
    (True, 31, 0, 17, 0),
    (False, 0, 0, 48, 0),
    (True, 40, 0, 8, 0),
    (True, 1, 3, 18, 100),
    (False, 25, 0, 5, 0),
    (True, 33, 0, 15, 0),
    (False, 31, 1, 16, 4095),
    # Inside the IOTLB (all but the tiny one): pages the DMAs above filled, read and written
    # again; the first write after reads meets entries without the dirty state under dirty
    # tracking (translate() walks those), the second hits them
    (False, 0, 0, 30, 0),
    (True, 2, 0, 10, 0),
    (True, 2, 0, 10, 0),
    (False, 31, 0, 17, 0),
]


class Rig:
    """One machine of a kind: ``PAGES`` 4 KiB pages at ``IOVA`` (scattered frames) but for
    ``HOLE``, ``READ_ONLY`` pages mapped without write, an IOTLB cut to ``capacity`` entries."""

    def __init__(
        self, driver: str, options: dict[str, Any], tables: str, dirty: bool, capacity: int
    ) -> None:
        self.machine = machine = im.Machine.build(iommus=[driver], options={driver: options})
        self.dev = machine.add_pci_device(iommu=0)
        self.hw: IommuHw = machine.iommus[0]
        self.dirty: Callable[[], object] = list
        order = random.Random(5).sample(range(PAGES), PAGES)
        if tables == "nested":
            self.vm = vm = Vm(machine, 16 * MIB, table_pool=4 * MIB)
            guest = vm.viommu(self.hw)
            dom = guest.attach(guest.add_device(self.dev, 3))
            for i in order:
                if i != HOLE:
                    buf = vm.alloc_buffer(PAGE)
                    vm.memory.write(buf, bytes([i]) * PAGE)
                    guest.map(dom, IOVA + i * PAGE, buf, PAGE, write=i not in READ_ONLY)
            guest.invalidate(dom)
        else:
            self._paging(order, dirty)
        for name in ("iotlb", "tlb"):  # AMD and VT-d / SMMUv3
            if isinstance(getattr(self.hw, name, None), Iotlb):
                getattr(self.hw, name).capacity = capacity

    def _paging(self, order: list[int], dirty: bool) -> None:
        proc = self.machine.new_process()
        fd = proc.open_iommufd()
        ioas = fd.ioas_alloc()
        fd.option(U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_SET, object_id=ioas, val64=0)
        dev_id = fd.bind(self.dev)
        flags = U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING if dirty else 0
        hwpt = fd.hwpt_alloc(dev_id, ioas, flags=flags)
        fd.attach(dev_id, hwpt)
        if dirty:
            fd.hwpt_set_dirty_tracking(hwpt, True)
            self.dirty = lambda: fd.hwpt_get_dirty_bitmap(
                hwpt, IOVA, PAGES * PAGE, PAGE, clear=False
            )
        for i in order:
            if i != HOLE:
                va = proc.mmap(PAGE)
                proc.write(va, bytes([i]) * PAGE)
                write = 0 if i in READ_ONLY else U.IOMMU_IOAS_MAP_WRITEABLE
                fd.ioas_map(
                    ioas, va, PAGE, iova=IOVA + i * PAGE, flags=U.IOMMU_IOAS_MAP_READABLE | write
                )

    def state(self) -> tuple[object, ...]:
        """What a DMA may change besides memory: statistics, records, the IOTLB."""
        hw = self.hw
        tlb = getattr(hw, "iotlb", getattr(hw, "tlb", None))
        assert isinstance(tlb, Iotlb)
        counts = (tlb.hits, tlb.misses, tlb.invalidations)
        return (
            hw.stats.snapshot(),
            [str(r) for r in hw.fault_log],
            _records(hw),
            tlb.entries(),
            counts,
        )

    def dma(self, write: bool, iova: int, data: bytes, by_page: bool) -> object:
        """One DMA (``data``'s length; written when ``write``): the bytes read, "written", or
        the fault. ``by_page``: ``translate()`` page after page, then the copy."""
        dev, memory = self.dev, self.machine.memory
        try:
            if not by_page:
                if write:
                    dev.dma_write(iova, data)
                    return "written"
                return dev.dma_read(iova, len(data))
            runs = []
            at, end = iova, iova + len(data)
            got = []
            while at < end:
                pa, run = self.hw.translate(dev, at, None, write)
                runs.append((pa, min(run, end - at)))
                if not write:  # a read takes each page's bytes before the next walk
                    got.append(memory.read(pa, runs[-1][1]))
                at += runs[-1][1]
            if not write:
                return b"".join(got)
            pos = 0
            for pa, chunk in runs:
                memory.write(pa, data[pos : pos + chunk])
                pos += chunk
            return "written"
        except DmaFault as f:
            return ("fault", f.iova, f.reason)


def _run(kind: tuple[str, dict[str, Any], str], dirty: bool, capacity: int, build: str) -> Any:
    driver, options, tables = kind
    with _env(PURE_ENV, "1" if build == "pure" else None):
        rig = Rig(driver, options, tables, dirty, capacity)
    if build == "pure":
        assert not is_compiled(rig.hw.burst)
    walked = []  # pages the burst walks translated (none page by page)
    walk_run = rig.hw.walk_run

    def counted(req: Any, iova: int) -> int:
        stop = walk_run(req, iova)
        walked.append(stop - iova)
        return stop

    rig.hw.walk_run = counted  # type: ignore[method-assign]
    hit = []  # pages the bursts' IOTLB hit runs translated (none page by page)
    tlb = getattr(rig.hw, "iotlb", getattr(rig.hw, "tlb", None))
    assert isinstance(tlb, Iotlb)
    hit_run = tlb.hit_run

    def hits(*args: Any) -> tuple[int, int]:
        got = hit_run(*args)
        hit.append(got[0])
        return got

    tlb.hit_run = hits  # type: ignore[method-assign,assignment]
    steps = []
    for n, (write, first, off, count, tail) in enumerate(DMAS):
        data = bytes([n + 100]) * (count * PAGE + tail)
        steps.append(
            (rig.dma(write, IOVA + first * PAGE + off, data, build == "page"), rig.state())
        )
    memory = {pfn: bytes(frame) for pfn, frame in rig.machine.memory._pages.items()}
    return steps, memory, rig.dirty(), sum(walked), sum(hit)


def _tracks_dirty(kind: tuple[str, dict[str, Any], str]) -> bool:
    """Whether the kind has dirty tracking to toggle: not on a guest's nested tables (dirty
    tracking is the IOAS domain's), not on an SMMUv3 without stage 1 (7.2 refuses it)."""
    return kind[2] != "nested" and kind[1].get("s1p", True)


#: (kind, dirty): every kind plain, and with dirty tracking where it exists.
KIND_MODES = [
    pytest.param(kind, dirty, id=f"{kid}-{'dirty-tracking' if dirty else 'plain'}")
    for kind, kid in zip(KINDS, IDS, strict=True)
    for dirty in (False, True)
    if not dirty or _tracks_dirty(kind)
]


@pytest.mark.parametrize(("kind", "dirty"), KIND_MODES)
@pytest.mark.parametrize("capacity", [4096, 5], ids=["iotlb", "tiny-iotlb"])
def test_burst_walks_equal_pure_and_page_by_page(
    kind: tuple[str, dict[str, Any], str], dirty: bool, capacity: int
) -> None:
    results = {b: _run(kind, dirty, capacity, b) for b in ("installed", "pure", "page")}
    steps = {b: r[0] for b, r in results.items()}
    for n, dma in enumerate(DMAS):
        assert steps["installed"][n] == steps["page"][n], (n, dma)
        assert steps["pure"][n] == steps["page"][n], (n, dma)
    for b in ("installed", "pure"):
        assert results[b][1] == results["page"][1]  # every byte of memory
        assert results[b][2] == results["page"][2]  # the dirty bitmap
    outcomes = [s[0] for s in steps["page"]]
    assert any(isinstance(o, tuple) for o in outcomes)  # faults midway happened
    assert "written" in outcomes and any(isinstance(o, bytes) for o in outcomes)
    # The bursts walked (the pages of many misses each), in both builds
    assert results["installed"][3] >= 8 * PAGE
    assert results["pure"][3] == results["installed"][3]
    # ... and took whole runs of IOTLB hits (the DMAs inside the IOTLB: 60 pages at least)
    assert results["installed"][4] >= 60 or capacity < PAGES
    assert results["pure"][4] == results["installed"][4]
    assert results["page"][4] == 0


def test_the_burst_loop_is_compiled_when_built() -> None:
    run = load_walker("iommufd_model.hw.tlb_run")
    xlate = load_walker("iommufd_model.hw.xlate")
    assert is_compiled(run) == is_compiled(xlate)
