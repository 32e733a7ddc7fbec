"""What the model lock costs a single thread, measured against the same code without it.

    python benchmarks/bench_lock.py            # add --quick for fewer trials

The machine this runs on is shared and loaded, so comparing two runs of ``run_all.py`` (one
before the lock, one after) mostly measures the neighbours. This bench alternates, in one
process, trials with every entry point locked and trials with the lock wrappers taken out
(each wrapped method put back to the function it wraps), and keeps each variant's best trial:
the difference is the lock's own cost. Where even that drowns in noise, the second estimate
holds: how many times one operation takes the lock (counted) times what one acquisition
through a wrapper costs (a tight loop, best of the trials). Paths measured: a 4 KiB DMA
read per call (the smallest locked call), one-page and 64 MiB ``IOMMU_IOAS_MAP``/``UNMAP`` in
4 KiB IOMMU pages, and ``hw.translate`` on an IOTLB hit (not an entry point: 0 by design).

Every time is the thread's CPU time (``time.thread_time``), as the walk benchmarks' own loops
are timed (``_timing.own_loop``): on a loaded machine a wall-clock trial of a short loop is
stretched by whatever other processes get the core meanwhile, unevenly between the trials
whose ratio is taken; CPU time is not.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from _timing import vendor

import iommufd_model as im
from iommufd_model import locking
from iommufd_model import uapi as U

KIB, MIB = 1 << 10, 1 << 20
IOVA = 1 << 32


def _classes() -> list[type]:
    """Every class whose methods the lock wraps (vendor subclasses found at run time)."""
    from iommufd_model.core.eventq import EventFile
    from iommufd_model.core.main import IommuFd
    from iommufd_model.core.mmap import IommufdVma
    from iommufd_model.hw.iommu import IommuHw
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.hw.regs import Mmio
    from iommufd_model.process import Process
    from iommufd_model.vmm import GuestIommu, GuestMemory, Vm

    out: list[type] = []
    todo: list[type] = [IommuFd, Process, PciDevice, Mmio, EventFile, im.Machine, IommuHw]
    todo += [Vm, GuestMemory, GuestIommu, IommufdVma]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


@contextmanager
def unlocked() -> Iterator[None]:
    """The model with every lock wrapper replaced by the function it wraps (benchmark only:
    never with threads)."""
    saved = []
    for cls in _classes():
        for name, value in list(vars(cls).items()):
            if getattr(value, "__model_locked__", False):
                saved.append((cls, name, value))
                setattr(cls, name, value.__wrapped__)
    try:
        yield
    finally:
        for cls, name, value in saved:
            setattr(cls, name, value)


def acquisitions(fn: Callable[[], float]) -> int:
    """How many times one call of ``fn`` takes the model lock (re-entries included).

    The C lock (``_lockcall.c``) counts its acquisitions itself. ``threading.RLock`` (a pure
    build) does not: the count then comes from the profiler's C-call events on
    :data:`~iommufd_model.locking.MODEL_LOCK` (``acquire``, and ``__enter__`` for the
    ``with`` blocks of fail-nth and event waits), as the wrappers call its C methods."""
    lock = locking.MODEL_LOCK
    if hasattr(lock, "acquisitions"):
        before = lock.acquisitions
        fn()
        return int(lock.acquisitions - before)
    taken = 0

    def profile(frame: object, event: str, arg: Any) -> None:
        nonlocal taken
        if event == "c_call" and getattr(arg, "__self__", None) is lock:
            taken += arg.__name__ in ("acquire", "__enter__")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return taken


def one_acquisition(trials: int, pure: bool = False) -> float:
    """Seconds one wrapped call adds (a call through :func:`locked` minus a plain call);
    ``pure``: through the pure build's wrapper instead (generated in Python, around a
    ``threading.RLock``), measured in the same run for comparison."""

    def noop() -> None:
        return None

    if pure:
        wrapped = locking._with_signature(noop, noop.__code__, threading.RLock())
    else:
        wrapped = locking.locked(noop)
    n = 100_000
    best_plain = best_locked = float("inf")
    for _ in range(trials):
        t = time.thread_time()
        for _ in range(n):
            noop()
        best_plain = min(best_plain, time.thread_time() - t)
        t = time.thread_time()
        for _ in range(n):
            wrapped()
        best_locked = min(best_locked, time.thread_time() - t)
    return (best_locked - best_plain) / n


def best(fn: Callable[[], float], trials: int) -> tuple[float, float]:
    """Best seconds of ``fn`` with the lock and without, alternating ``trials`` times each."""
    locked_t, bare_t = float("inf"), float("inf")
    for _ in range(trials):
        locked_t = min(locked_t, fn())
        with unlocked():
            bare_t = min(bare_t, fn())
    return locked_t, bare_t


class Rig:
    """A device of ``driver`` attached to an IOAS with huge pages off (4 KiB IOMMU pages)."""

    def __init__(self, driver: str) -> None:
        self.machine = im.Machine.build(iommus=[driver], memory_size=1 << 40)
        self.proc = self.machine.new_process()
        self.fd = self.proc.open_iommufd()
        self.ioas = self.fd.ioas_alloc()
        self.fd.option(
            U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_SET, object_id=self.ioas, val64=0
        )
        self.dev = self.machine.add_pci_device(iommu=0)
        self.fd.attach(self.fd.bind(self.dev), self.ioas)


def run(quick: bool = False) -> dict[str, float]:
    driver = vendor() or "mock"
    trials = 5 if quick else 15
    rig = Rig(driver)
    fd, ioas, proc = rig.fd, rig.ioas, rig.proc
    big = 64 * MIB
    va = proc.mmap(big, align=2 * MIB)
    for off in range(0, big, 4 * KIB):
        proc.write(va + off, b"\1")
    figures: dict[str, float] = {}

    cost = one_acquisition(trials)
    figures["one lock acquisition through a wrapper: ns"] = cost * 1e9
    pure_cost = one_acquisition(trials, pure=True)
    figures["one acquisition through the pure build's wrapper and threading.RLock: ns"] = (
        pure_cost * 1e9
    )

    def report(what: str, per: int, fn: Callable[[], float]) -> None:
        locked_t, bare_t = best(fn, trials)
        taken = acquisitions(fn) / per
        figures[f"[{driver}] {what}, locked: ns/op"] = locked_t / per * 1e9
        figures[f"[{driver}] {what}, no lock: ns/op"] = bare_t / per * 1e9
        figures[f"[{driver}] {what}: measured lock cost %"] = (locked_t / bare_t - 1) * 100
        figures[f"[{driver}] {what}: lock acquisitions/op"] = taken
        figures[f"[{driver}] {what}: acquisitions x cost %"] = taken * cost / (bare_t / per) * 100
        figures[f"[{driver}] {what}: acquisitions x cost %, pure build's lock"] = (
            taken * pure_cost / (bare_t / per) * 100
        )

    def map_big() -> float:
        t = time.thread_time()
        fd.ioas_map(ioas, va, big, iova=IOVA)
        fd.ioas_unmap(ioas, IOVA, big)
        return time.thread_time() - t

    report("IOAS_MAP + UNMAP of 64 MiB in 4 KiB pages", 1, map_big)

    n = 200

    def map_small() -> float:
        t = time.thread_time()
        for i in range(n):
            fd.ioas_map(ioas, va + i * 4 * KIB, 4 * KIB, iova=IOVA + i * 4 * KIB)
        for i in range(n):
            fd.ioas_unmap(ioas, IOVA + i * 4 * KIB, 4 * KIB)
        return time.thread_time() - t

    report("IOAS_MAP + UNMAP of one page", n, map_small)

    fd.ioas_map(ioas, va, 4 * MIB, iova=IOVA)
    dev, hw = rig.dev, rig.dev.iommu
    reads = 2000

    def dma_small() -> float:
        t = time.thread_time()
        for i in range(reads):
            dev.dma_read(IOVA + (i & 255) * 4 * KIB, 4 * KIB)
        return time.thread_time() - t

    report("DMA read of 4 KiB (IOTLB hit)", reads, dma_small)

    def translate() -> float:
        t = time.thread_time()
        for i in range(reads):
            hw.translate(dev, IOVA + (i & 255) * 4 * KIB, None, False)
        return time.thread_time() - t

    report("hw translate, IOTLB hit", reads, translate)
    return figures


def main() -> None:
    kind = type(locking.MODEL_LOCK)
    print(f"  the model lock: {kind.__module__}.{kind.__name__}")
    for key, value in run(quick="--quick" in sys.argv).items():
        print(f"  {key:<62} {value:>12,.1f}")


if __name__ == "__main__":
    main()
