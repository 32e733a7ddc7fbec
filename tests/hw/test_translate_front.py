"""The compiled translate front (hw/xlate.py) changes nothing but speed.

One random program per example -- IOAS maps and unmaps of random pages and permissions (random
page tables), PASID and RID attaches and detaches, context-cache drops and IOTLB flushes behind
the driver's back, translations of random IOVAs, PASIDs and directions, bursts -- runs on three
machines of the same vendor: the installed build (compiled front and walkers, when built), the
pure-Python sources of all of them (``IOMMUFD_MODEL_PURE=1`` when the machine is built), and
the vendor's own ``translate()`` alone (no front), which also takes bursts and DMAs page by
page (``translate()`` a page, then its bytes), where the others take them through the burst
path: IOTLB hits of a whole run at once (``tlb_run.hit_run``), native walks, one copy. Bursts
and DMAs come twice in a row too, the second one inside the IOTLB. After every step the three
must agree on the answer or the fault (its reason), the translated runs (contiguous runs
joined), the vendor's event/fault records, the IOTLB's entries (in FIFO order) and counters,
the statistics, the dirty bits and every byte of memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iommufd_model as im
from helpers import mock_domain
from iommufd_model import uapi as U
from iommufd_model.hw.compiled import PURE_ENV, is_compiled, load_walker
from iommufd_model.hw.iommu import DmaFault, IommuHw
from iommufd_model.plugins import default_registry

PAGE = 4096
BASE = 1 << 24  # inside every driver's aperture
PAGES = 24
PASIDS = (None, 0, 1, 9)
_DRIVERS = default_registry().drivers
#: (driver, options): AMD with v1 tables (no PASID domains) and with v2 tables (PASIDs); the
#: mock (no IOTLB: the front reads its table, ``Front.learn_table``)
VENDORS = [
    (d, o)
    for d, o in (
        ("amd", ""),
        ("amd", "pgtable=v2"),
        ("arm_smmuv3", ""),
        ("intel_vtd", ""),
        ("mock", ""),
    )
    if d in _DRIVERS
]
RW = U.IOMMU_IOAS_MAP_READABLE | U.IOMMU_IOAS_MAP_WRITEABLE


@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    import os

    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _tlb(hw: IommuHw) -> Any:
    """The IOTLB (None: the mock has none)."""
    return getattr(hw, "tlb", getattr(hw, "iotlb", None))


def _records(hw: IommuHw) -> list[str]:
    """The vendor's own fault/event records (AMD event log, VT-d fault records, SMMU events)."""
    if hasattr(hw, "read_events"):
        return [repr(e) for e in hw.read_events(consume=False)]
    return [repr(e) for e in getattr(hw, "records", getattr(hw, "events", []))]


def _context_caches(hw: IommuHw) -> list[dict[Any, Any]]:
    names: tuple[str, ...] = ("dte_cache", "context_cache", "pasid_cache", "ste_cache", "cd_cache")
    if hw.driver_name == "mock":  # its context pointers are its only context cache
        names = ("context", "pasid_context")
    return [getattr(hw, n) for n in names if hasattr(hw, n)]


def _drop_context(hw: IommuHw) -> None:
    """Every context cache changed: the vendors' dropped (refetched from memory on the next
    request), the mock's context pointers (its attachments themselves) stored again."""
    for cache in _context_caches(hw):
        if hw.driver_name == "mock":
            for key, value in list(cache.items()):
                cache[key] = value
        else:
            cache.clear()


class Rig:
    """One machine of ``driver``: two PASID-capable devices, two IOASes with a PASID-capable
    HWPT each (4 KiB IOMMU pages), both RIDs attached to the first (so a domain's IOTLB
    entries outlive one device's move to the other)."""

    def __init__(self, driver: str, variant: str, options: str = "") -> None:
        opts = dict(o.split("=") for o in options.split(",") if o)
        with _env(PURE_ENV, "1" if variant == "pure" else None):
            self.machine = im.Machine.build(iommus=[driver], options={driver: opts})
        self.hw: IommuHw = self.machine.iommus[0]
        self.by_page = variant == "slow"
        if variant == "slow":  # the vendor's translate() alone
            del vars(self.hw)["translate"]
        self.proc = self.machine.new_process()
        self.fd = self.proc.open_iommufd()
        self.devs = [self.machine.add_pci_device(iommu=0) for _ in range(2)]
        self.dev_ids = [self.fd.bind(dev) for dev in self.devs]
        self.dev, self.dev_id = self.devs[0], self.dev_ids[0]
        self.ioas = [self.fd.ioas_alloc(), self.fd.ioas_alloc()]
        self.hwpt: list[int] = []
        for ioas in self.ioas:
            self.fd.option(
                U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_SET, object_id=ioas, val64=0
            )
            flags = U.IOMMU_HWPT_ALLOC_PASID
            if driver == "mock":  # the mock's writes set dirty bits while tracking is on
                flags |= U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
            self.hwpt.append(self.fd.hwpt_alloc(self.dev_id, ioas, flags=flags))
        for dev_id in self.dev_ids:
            self.fd.attach(dev_id, self.hwpt[0])

    def step(self, op: tuple[Any, ...]) -> object:
        """Run one operation; its outcome (an answer, a fault, an errno)."""
        kind = op[0]
        hw, fd = self.hw, self.fd
        try:
            if kind == "map":
                _, which, first, n, writable = op
                va = self.proc.mmap(n * PAGE)
                flags = RW if writable else U.IOMMU_IOAS_MAP_READABLE
                fd.ioas_map(self.ioas[which], va, n * PAGE, iova=BASE + first * PAGE, flags=flags)
            elif kind == "unmap":
                _, which, first, n = op
                return fd.ioas_unmap(self.ioas[which], BASE + first * PAGE, n * PAGE)
            elif kind == "attach":
                _, d, which, pasid = op
                fd.attach(self.dev_ids[d], self.hwpt[which], pasid=pasid)
            elif kind == "move":  # d moves; the other device keeps the old domain's entries
                _, d, which, page = op
                out: list[object] = []
                for dev in (d, 1 - d, d, None, 1 - d, d):
                    if dev is None:
                        out.append(self.step(("attach", d, which, None)))
                    else:
                        out.append(self.step(("xlate", dev, page, 8, None, False)))
                return out
            elif kind == "detach":
                fd.detach(self.dev_ids[op[1]], pasid=op[2])
            elif kind == "drop_ctx":  # a context cache dropped behind the driver's back
                _drop_context(hw)
            elif kind == "flush":
                tlb = _tlb(hw)
                if tlb is not None:
                    tlb.flush_all()
            elif kind == "dirty":  # dirty tracking on or off (refused where not allocated)
                _, which, enable = op
                fd.hwpt_set_dirty_tracking(self.hwpt[which], enable)
            elif kind == "xlate":
                _, d, page, off, pasid, write = op
                return hw.translate(self.devs[d], BASE + page * PAGE + off, pasid, write)
            elif kind == "burst":
                _, d, page, n, pasid, write = op
                iova, dev = BASE + page * PAGE, self.devs[d]
                if self.by_page:
                    return _joined(self._pages(dev, iova, n * PAGE, pasid, write))
                return _joined(hw.translate_run(dev, iova, n * PAGE, pasid, write))
            elif kind == "dma":
                _, d, page, off, size, pasid, write = op
                return self._dma(self.devs[d], BASE + page * PAGE + off, size, pasid, write)
            elif kind == "twice":  # the same burst or DMA again: now inside the IOTLB
                return [self.step(op[1]), self.step(op[1])]
        except DmaFault as f:
            return ("fault", f.iova, f.write, f.pasid, f.reason)
        except OSError as e:
            return ("errno", e.errno)
        return None

    def _pages(
        self, dev: Any, iova: int, n: int, pasid: int | None, write: bool
    ) -> list[tuple[int, int]]:
        """``translate()`` page after page; a read takes each page's bytes (``read_back``)
        before the next translation (which may set A/D bits), as the hardware reads them."""
        runs: list[tuple[int, int]] = []
        got: list[bytes] = []
        at, end = iova, iova + n
        while at < end:
            pa, run = self.hw.translate(dev, at, pasid, write)
            runs.append((pa, min(run, end - at)))
            if not write:
                got.append(self.machine.memory.read(*runs[-1]))
            at += runs[-1][1]
        self.read_back = b"".join(got)
        return runs

    def _dma(self, dev: Any, iova: int, n: int, pasid: int | None, write: bool) -> object:
        """One DMA of ``n`` bytes: the bytes read, or "written" (a pattern of ``n`` and
        ``iova``); page by page on the slow rig (translations first, then the copy)."""
        data = bytes((iova + n + i) & 0xFF for i in range(min(n, 256))) * (n // 256 + 1)
        data = data[:n]
        memory = self.machine.memory
        if not self.by_page:
            if write:
                dev.dma_write(iova, data, pasid)
                return "written"
            return dev.dma_read(iova, n, pasid)
        runs = self._pages(dev, iova, n, pasid, write)
        if not write:
            return self.read_back
        pos = 0
        for pa, chunk in runs:
            memory.write(pa, data[pos : pos + chunk])
            pos += chunk
        return "written"

    def state(self) -> object:
        hw = self.hw
        tlb = _tlb(hw)
        dirty = None
        if hw.driver_name == "mock":  # the dirty bits its writes set
            dirty = [sorted(mock_domain(self.fd, h).pt.dirty) for h in self.hwpt]
        return (
            hw.stats.snapshot(),
            None if tlb is None else tlb.entries(),
            None if tlb is None else (tlb.hits, tlb.misses, tlb.invalidations),
            dirty,
            [repr(r) for r in hw.fault_log],
            _records(hw),
            {pfn: bytes(frame) for pfn, frame in self.machine.memory._pages.items()},
        )


def _joined(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``runs`` with physically contiguous neighbours joined (how a burst splits its runs is
    the path's own business; which bytes it names is not)."""
    out: list[tuple[int, int]] = []
    for pa, n in runs:
        if out and out[-1][0] + out[-1][1] == pa:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((pa, n))
    return out


_page = st.integers(0, PAGES - 1)
_pasid = st.sampled_from(PASIDS)
_dev = st.integers(0, 1)
_BURST = st.tuples(st.just("burst"), _dev, _page, st.integers(1, 6), _pasid, st.booleans())
#: a DMA of up to 6 pages from any byte of a page
_DMA = st.tuples(
    st.just("dma"),
    _dev,
    _page,
    st.integers(0, PAGE - 1),
    st.integers(1, 6 * PAGE),
    _pasid,
    st.booleans(),
)
OPS = st.one_of(
    st.tuples(st.just("map"), st.integers(0, 1), _page, st.integers(1, 4), st.booleans()),
    st.tuples(st.just("unmap"), st.integers(0, 1), _page, st.integers(1, 4)),
    st.tuples(st.just("attach"), _dev, st.integers(0, 1), _pasid),
    st.tuples(st.just("detach"), _dev, _pasid),
    st.tuples(st.just("move"), _dev, st.integers(0, 1), _page),
    st.tuples(st.just("drop_ctx")),
    st.tuples(st.just("flush")),
    st.tuples(st.just("dirty"), st.integers(0, 1), st.booleans()),
    *[
        st.tuples(st.just("xlate"), _dev, _page, st.integers(0, PAGE - 1), _pasid, st.booleans())
        for _ in range(4)  # translations are most of a program
    ],
    _BURST,
    st.tuples(st.just("twice"), st.one_of(_BURST, _DMA)),
    _DMA,
)
# A warm start: both IOASes mapped in places, so that most programs translate something;
# dirty tracking on for the first HWPT (the mock's writes then set dirty bits; the vendors'
# HWPTs refuse it, allocated without IOMMU_HWPT_ALLOC_DIRTY_TRACKING).
PRELUDE = [
    ("map", 0, 0, 10, True),
    ("map", 0, 10, 4, False),
    ("map", 1, 2, 6, True),
    ("dirty", 0, True),
]

#: after every program: a hit twice, then DMAs over writable pages into read-only ones (mapped
#: so by the prelude, unless the program changed them), inside the IOTLB the second time: a
#: write's hits stop at the first cached entry without write permission
CODA = [
    ("xlate", 0, 1, 8, None, False),
    ("xlate", 0, 1, 8, None, False),
    ("twice", ("dma", 0, 8, 0, 4 * PAGE, None, False)),
    ("twice", ("dma", 0, 8, 0, 4 * PAGE, None, True)),
    ("twice", ("burst", 0, 8, 4, None, True)),
]


@pytest.mark.parametrize(("driver", "options"), VENDORS)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(program=st.lists(OPS, min_size=5, max_size=40))
def test_front_pure_and_vendor_translate_agree(
    driver: str, options: str, program: list[Any]
) -> None:
    rigs = [Rig(driver, v, options) for v in ("installed", "pure", "slow")]
    for op in PRELUDE + program + CODA:
        outcomes = [r.step(op) for r in rigs]
        states = [r.state() for r in rigs]
        assert outcomes[0] == outcomes[1] == outcomes[2], op
        assert states[0] == states[1] == states[2], op


@pytest.mark.parametrize(("driver", "options"), VENDORS)
def test_front_answers_hits_without_the_vendor(driver: str, options: str) -> None:
    """Not a tautology: after one full translation the stream's hits never reach the
    vendor's translate(), and a context-cache change sends the next one there again."""
    rig = Rig(driver, "installed", options)
    rig.step(("map", 0, 0, 4, True))
    hw = rig.hw
    calls: list[int] = []
    slow = hw.front.slow

    def counted(dev: Any, iova: int, pasid: int | None, write: bool) -> tuple[int, int]:
        calls.append(iova)
        return slow(dev, iova, pasid, write)

    hw.front.slow = counted
    first = hw.translate(rig.dev, BASE + 8, None, True)  # a write: the entry allows both
    assert calls == [BASE + 8]
    for write in (False, True, False):
        assert hw.translate(rig.dev, BASE + 8, None, write) == first
    assert hw.translate(rig.dev, BASE + 16, None, False) == (first[0] + 8, first[1] - 8)
    assert calls == [BASE + 8]  # hits, reads and writes
    # Answered by the front: IOTLB hits, or (the mock, no IOTLB) table reads after the first.
    answered = hw.stats.iotlb_hits if _tlb(hw) is not None else hw.stats.translations - 1
    assert answered == 4
    _drop_context(hw)
    assert hw.translate(rig.dev, BASE + 8, None, False) == first
    assert calls == [BASE + 8, BASE + 8]


def test_front_is_compiled_with_the_burst_path() -> None:
    """Both are in the framework's mypyc list: either both are built or neither is."""
    front = load_walker("iommufd_model.hw.xlate")
    assert is_compiled(front) == is_compiled(load_walker("iommufd_model.hw.tlb_run"))
