"""Burst translation: ``translate_run`` (IOTLB hits looked up natively after the first page)
answers exactly what page-by-page ``translate()`` answers, for every vendor, and the compiled
``tlb_run`` equals its pure source."""

from __future__ import annotations

import collections
import random
from typing import Any

import pytest

import iommufd_model as im
from iommufd_model import uapi as U
from iommufd_model.hw.compiled import is_compiled, load_pure, load_walker
from iommufd_model.hw.iommu import DmaFault, FastPath, IommuHw
from iommufd_model.hw.iotlb import Iotlb, TlbEntry
from iommufd_model.hw.memory import PhysicalMemory
from iommufd_model.plugins import default_registry

PAGE = 4096
IOVA = 1 << 24  # inside every driver's aperture (the mock's starts here)
PAGES = 48
HOLE = 30  # this page is never mapped: a burst across it faults there
RUN = "iommufd_model.hw.tlb_run"
VENDORS = [d for d in ("amd", "arm_smmuv3", "intel_vtd", "mock") if d in default_registry().drivers]


def rig(driver: str) -> tuple[Any, Any]:
    """A device with ``PAGES`` 4 KiB IOVA pages mapped (scattered frames) but for ``HOLE``;
    pages 20..23 are read-only (:func:`dirty_rig` without dirty tracking)."""
    machine, dev, _dirty = dirty_rig(driver, dirty=False, capacity=None)
    return machine, dev


def pages_of(runs: list[tuple[int, int]], step: int) -> list[int]:
    """The physical address of every IOMMU page (``step`` bytes) of ``runs`` (which may be
    coalesced)."""
    return [pa + off for pa, n in runs for off in range(0, n, step)]


@pytest.mark.parametrize("driver", VENDORS)
@pytest.mark.parametrize("write", [False, True])
def test_burst_equals_page_by_page(driver: str, write: bool) -> None:
    outcomes = []
    for burst in (True, False):
        machine, dev = rig(driver)
        hw = machine.iommus[0]
        step = 0
        for i in (9, 10, 20, 21, 40):  # a warm IOTLB (read entries) in places
            step = hw.translate(dev, IOVA + i * PAGE, None, False)[1]  # the IOMMU page size
        got: list[object] = []
        for first, count in ((0, 30), (12, 8), (31, 17), (2, 40), (9, 2)):
            iova, n = IOVA + first * PAGE, count * PAGE
            try:
                if burst:
                    got.append(pages_of(hw.translate_run(dev, iova, n, None, write), step))
                else:
                    steps = []
                    for k in range(n // step):
                        steps.append(hw.translate(dev, iova + k * step, None, write)[0])
                    got.append(steps)
            except DmaFault as f:
                got.append(("fault", f.iova, f.reason))
        outcomes.append((got, hw.stats.snapshot(), [str(r) for r in hw.fault_log]))
    assert outcomes[0] == outcomes[1]
    assert any(isinstance(g, tuple) for g in outcomes[0][0])  # the hole and read-only pages


@pytest.mark.parametrize("driver", VENDORS)
def test_dma_over_a_burst_reads_and_writes_every_page(driver: str) -> None:
    _machine, dev = rig(driver)
    assert (
        dev.dma_read(IOVA + 8 * PAGE + 5, 20 * PAGE)
        == b"".join(bytes([i]) * PAGE for i in range(8, 29))[5 : 5 + 20 * PAGE]
    )
    dev.dma_write(IOVA + 24 * PAGE, b"\xaa" * (6 * PAGE))
    assert dev.dma_read(IOVA + 19 * PAGE, 11 * PAGE) == b"".join(
        bytes([i]) * PAGE for i in range(19, 24)
    ) + b"\xaa" * (6 * PAGE)
    with pytest.raises(DmaFault):  # across the read-only pages
        dev.dma_write(IOVA + 18 * PAGE, b"\xbb" * (3 * PAGE))
    assert dev.dma_read(IOVA + 18 * PAGE, PAGE) == bytes([18]) * PAGE
    with pytest.raises(DmaFault):  # across the hole: nothing written
        dev.dma_write(IOVA + 29 * PAGE, b"\xbb" * (2 * PAGE))
    assert dev.dma_read(IOVA + 29 * PAGE, PAGE) == b"\xaa" * PAGE


def test_compiled_and_pure_hit_runs_agree() -> None:
    builds = [load_walker(RUN), load_pure(RUN)]
    assert not is_compiled(builds[1])
    rng = random.Random(11)
    for _ in range(200):
        tlb = Iotlb()
        for _ in range(rng.randrange(40)):
            shift = rng.choice([12, 12, 12, 21])
            page = rng.randrange(64) << 12
            pa = rng.randrange(1 << 20) << shift if rng.random() < 0.5 else page + (1 << 30)
            tlb.insert(rng.choice(["a", "b"]), page, TlbEntry(pa, shift, rng.randrange(8), 4))
        start = rng.randrange(64) << 12 | rng.randrange(PAGE)
        end = start + rng.randrange(20 * PAGE)
        need = rng.choice([1, 2, 3, 6])
        pa_end = rng.choice([1 << 40, 1 << 30, (1 << 30) + rng.randrange(1 << 22)])
        results = []
        for build in builds:
            out: list[tuple[int, int]] = []
            results.append((build.hit_run(tlb._tables, "a", start, end, need, pa_end, out), out))
        assert results[0] == results[1]
        assert all(pa + n <= pa_end for pa, n in results[0][1])


class _Dev:
    name = "dev"


#: Stands in for a PciDevice: the IOMMU below and its faults read only the name.
DEV: Any = _Dev()


class _HugeLeafPastTheEnd(IommuHw):
    """One cached 1 GiB page at IOVA 0 whose end lies past memory (1 GiB - 8 KiB of it):
    ``translate()`` clips at the end of memory and aborts beyond it, as AMD and VT-d do."""

    def __init__(self) -> None:
        class _Machine:
            memory = PhysicalMemory((1 << 30) - 2 * PAGE)

        super().__init__(_Machine(), 0)  # type: ignore[arg-type]
        self.iotlb = Iotlb()
        self.iotlb.insert("t", 0, TlbEntry(0, 30, 3, 4))

    def translate(self, dev: Any, iova: int, pasid: int | None, write: bool) -> tuple[int, int]:
        self.stats.translations += 1
        if iova >= self.memory.size:
            raise self.fault(dev, iova, write, pasid, "master abort")
        return iova, min((1 << 30) - iova, self.memory.size - iova)

    def iotlb_fast(self, dev: Any, pasid: int | None, write: bool) -> FastPath | None:
        return self.iotlb, "t", 1


def test_a_burst_stops_at_the_end_of_memory() -> None:
    hw = _HugeLeafPastTheEnd()
    end = hw.memory.size
    runs = hw.translate_run(DEV, end - 3 * PAGE, 2 * PAGE, None, False)
    assert runs == [(end - 3 * PAGE, 2 * PAGE)]
    # The first run is clipped at the end of memory; the hits must not carry the burst past it.
    with pytest.raises(DmaFault, match="master abort"):
        hw.translate_run(DEV, 0, end + PAGE, None, False)
    hw.translate(DEV, end - PAGE, None, False)  # warm: the next page is a hit in the IOTLB
    with pytest.raises(DmaFault, match="master abort"):
        hw.translate_run(DEV, end - 2 * PAGE, 3 * PAGE, None, False)


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure"])
def test_fill_equals_inserts_one_by_one(pure: bool) -> None:
    """``tlb_run.fill`` (a burst's walks, filled at once, then the oldest evicted) leaves the
    same entries and FIFO as one ``insert`` after the other, full IOTLB or not, and the
    compiled build answers as its pure source."""
    run = load_pure(RUN) if pure else load_walker(RUN)
    rng = random.Random(13)
    for _ in range(300):
        capacity = rng.randrange(1, 12)
        tlbs = [Iotlb(capacity), Iotlb(capacity)]
        held = rng.sample(range(40), rng.randrange(20))
        for page in held:  # the same history in both
            shift, tag = rng.choice([(12, "a"), (12, "b"), (21, "a")])
            for tlb in tlbs:
                tlb.insert(tag, page << shift, TlbEntry(page << shift, shift, 3, 1))
        cached = {k[2] for k in tlbs[0]._fifo if k[1] == "a"}
        fresh = [p for p in range(40, 80) if p not in cached][: rng.randrange(1, 20)]
        keys = [(12 if rng.random() < 0.8 else 21, "a", p) for p in fresh]
        entries: list[object] = [TlbEntry(p << 12, shift, 1, 2) for shift, _t, p in keys]
        for (shift, tag, page), entry in zip(keys, entries, strict=True):
            run.insert(tlbs[0]._tables, tlbs[0]._fifo, capacity, tag, page << shift, shift, entry)
        run.fill(tlbs[1]._tables, tlbs[1]._fifo, capacity, keys, entries)
        assert tlbs[0].entries() == tlbs[1].entries()
        assert tlbs[0]._tables == tlbs[1]._tables
        assert len(tlbs[1]) == min(capacity, min(capacity, len(held)) + len(keys))


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure"])
def test_insert_new_equals_insert(pure: bool) -> None:
    """``tlb_run.insert_new`` (the front's fill of a key the IOTLB does not hold, with or
    without the pages its lookup found) leaves the same entries, FIFO and dicts as
    ``insert``, whatever page size and tag (equal, not the same object) the evicted key has."""
    run = load_pure(RUN) if pure else load_walker(RUN)
    rng = random.Random(17)
    for _ in range(300):
        capacity = rng.randrange(1, 10)
        tlbs = [Iotlb(capacity), Iotlb(capacity)]
        for _step in range(rng.randrange(1, 40)):
            shift = rng.choice([12, 21])
            tag = rng.choice([("a", 1), ("b", 2)])
            page = rng.randrange(30)
            if any(k[0] == shift and k[1] == tag and k[2] == page for k in tlbs[0]._fifo):
                continue  # insert_new is for keys not held
            entry = TlbEntry(page << shift, shift, 3, 1)
            run.insert(tlbs[0]._tables, tlbs[0]._fifo, capacity, tag, page << shift, shift, entry)
            tags = tlbs[1]._tables.get(shift)
            held = tags.get(tag) if tags is not None and rng.random() < 0.5 else None
            fresh = (tag[0], tag[1])  # an equal tag, another object
            run.insert_new(
                tlbs[1]._tables, tlbs[1]._fifo, capacity, fresh, page, shift, entry, held
            )
            assert tlbs[0].entries() == tlbs[1].entries()
            assert tlbs[0]._tables == tlbs[1]._tables


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure"])
def test_fifo_is_a_deque(pure: bool) -> None:
    """``tlb_run.Fifo`` (the IOTLB's key order) answers as a ``collections.deque`` through
    appends, extends, pops from the front across its compactions, and clears."""
    fifo = (load_pure(RUN) if pure else load_walker(RUN)).Fifo()
    ref: collections.deque[tuple[int, object, int]] = collections.deque()
    rng = random.Random(19)
    compactions = 0
    for step in range(20000):
        op = rng.random()
        head = fifo.head
        if op < 0.3:
            key = (12, "t", step)
            fifo.append(key)
            ref.append(key)
        elif op < 0.32:
            keys = [(21, "u", step + i) for i in range(rng.randrange(150))]
            fifo.extend(keys)
            ref.extend(keys)
        elif op < 0.9995:
            if ref:
                assert fifo.popleft() == ref.popleft()
            else:
                with pytest.raises(IndexError):
                    fifo.popleft()
        else:
            fifo.clear()
            ref.clear()
        compactions += fifo.head < head
        assert len(fifo) == len(ref)
        if step % 97 == 0:
            assert list(fifo) == list(ref)
    assert compactions > 10  # the popped keys were dropped from the list's front, often


def dirty_rig(driver: str, dirty: bool, capacity: int | None) -> tuple[Any, Any, Any]:
    """A device with ``PAGES`` 4 KiB IOVA pages mapped (scattered frames: runs break) but for
    ``HOLE``, pages 20..23 read-only, on a HWPT allocated with dirty tracking (and tracking
    on) when ``dirty``, with the IOTLB cut to ``capacity`` entries (a burst then evicts its
    own fills); returns the machine, the device and a function giving the dirty IOVAs."""
    machine = im.Machine.build(iommus=[driver])
    proc = machine.new_process()
    fd = proc.open_iommufd()
    dev = machine.add_pci_device(iommu=0)
    ioas = fd.ioas_alloc()
    fd.option(U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_SET, object_id=ioas, val64=0)
    dev_id = fd.bind(dev)
    flags = U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING if dirty else 0
    hwpt = fd.hwpt_alloc(dev_id, ioas, flags=flags)
    fd.attach(dev_id, hwpt)
    if dirty:
        fd.hwpt_set_dirty_tracking(hwpt, True)
    for i in random.Random(5).sample(range(PAGES), PAGES):
        if i != HOLE:
            va = proc.mmap(PAGE)
            proc.write(va, bytes([i]) * PAGE)
            write = 0 if 20 <= i < 24 else U.IOMMU_IOAS_MAP_WRITEABLE
            fd.ioas_map(
                ioas, va, PAGE, iova=IOVA + i * PAGE, flags=U.IOMMU_IOAS_MAP_READABLE | write
            )
    hw = machine.iommus[0]
    for name in ("iotlb", "tlb"):  # AMD and VT-d / SMMUv3
        if capacity is not None and isinstance(getattr(hw, name, None), Iotlb):
            getattr(hw, name).capacity = capacity

    def dirty_iovas() -> list[int]:
        if not dirty:
            return []
        return list(fd.hwpt_get_dirty_bitmap(hwpt, IOVA, PAGES * PAGE, PAGE, clear=False))

    return machine, dev, dirty_iovas


#: (first page, byte offset, pages, byte tail): whole bursts, unaligned ones, bursts across
#: the read-only pages 20..23 and across the hole (30): a write faults there, midway
WRITES = [(0, 0, 12, 0), (2, 100, 9, 7), (14, 0, 8, 0), (24, 5, 10, 0), (31, 0, 17, 0)]
WRITES += [(0, 0, 48, 0), (40, 0, 8, 0), (1, 3, 18, 100), (25, 0, 5, 0), (33, 0, 15, 0)]


@pytest.mark.parametrize("driver", VENDORS)
@pytest.mark.parametrize("dirty", [False, True], ids=["plain", "dirty-tracking"])
@pytest.mark.parametrize("capacity", [4096, 5], ids=["iotlb", "tiny-iotlb"])
def test_dma_write_burst_equals_page_by_page(driver: str, dirty: bool, capacity: int) -> None:
    """``dma_write`` (a burst: IOTLB hits and native walks after the first page, frames
    filled whole) leaves what translating page by page with ``translate()`` and then writing
    each page leaves: the same faults at the same page (nothing written by a faulting DMA),
    statistics, fault logs, IOTLB contents, every byte of memory (data, page tables with
    their accessed/dirty bits) and dirty bitmap. Some bursts start warm (read entries in the
    IOTLB: a write cannot use them); a tiny IOTLB makes a burst evict its own fills."""
    outcomes = []
    for burst in (True, False):
        machine, dev, dirty_iovas = dirty_rig(driver, dirty, capacity)
        hw = machine.iommus[0]
        for i in (9, 10, 26, 41):
            hw.translate(dev, IOVA + i * PAGE, None, False)
        got: list[object] = []
        for n, (first, off, count, tail) in enumerate(WRITES):
            iova = IOVA + first * PAGE + off
            data = bytes([n + 1]) * (count * PAGE + tail)
            try:
                if burst:
                    dev.dma_write(iova, data)
                else:
                    runs = []
                    at, end = iova, iova + len(data)
                    while at < end:
                        pa, run = hw.translate(dev, at, None, True)
                        runs.append((pa, min(run, end - at)))
                        at += runs[-1][1]
                    pos = 0
                    for pa, chunk in runs:
                        machine.memory.write(pa, data[pos : pos + chunk])
                        pos += chunk
                got.append("written")
            except DmaFault as f:
                got.append(("fault", f.iova, f.reason))
            if n == 4:  # the second half starts from what the read half left in the IOTLB
                for i in (3, 4, 5, 35):
                    hw.translate(dev, IOVA + i * PAGE, None, False)
        memory = {pfn: bytes(frame) for pfn, frame in machine.memory._pages.items()}
        tlb = getattr(hw, "iotlb", getattr(hw, "tlb", None))
        outcomes.append(
            (
                got,
                hw.stats.snapshot(),
                [str(r) for r in hw.fault_log],
                tlb.entries() if isinstance(tlb, Iotlb) else None,
                memory,
                dirty_iovas(),
            )
        )
    assert outcomes[0][0] == outcomes[1][0]
    for a, b in zip(outcomes[0][1:], outcomes[1][1:], strict=True):
        assert a == b
    assert any(isinstance(g, tuple) for g in outcomes[0][0])  # faults midway happened
    assert "written" in outcomes[0][0]
    if dirty:
        assert outcomes[0][5]  # the hardware marked pages dirty
