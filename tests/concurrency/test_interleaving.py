"""Hypothesis picks two threads' programs of map / unmap / attach / detach / HWPT alloc /
destroy / DMA on one device and IOAS; the threads run them at once, and the outcome must be
linearizable: some interleaving of the two programs that keeps every call after the calls
that had returned before it started, replayed on one thread, gives every call the same result
(value or errno) and leaves the same model state (tests/helpers.py's snapshot: objects, users,
areas, pins, device contexts). That is what the kernel's locks promise its callers."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

import iommufd_model as im
from helpers import snapshot
from iommufd_model.hw.iommu import DmaFault

from .threads import DRIVERS, check_all, run_threads

PAGE = 4096
IOVA = 1 << 24
CHUNK = 16 * PAGE  # long enough calls that the threads overlap inside them
OPS = st.one_of(
    st.tuples(st.just("map"), st.integers(0, 3)),
    st.tuples(st.just("unmap"), st.integers(0, 4)),
    st.tuples(st.just("attach"), st.integers(1, 5)),
    st.tuples(st.just("detach"), st.just(0)),
    st.tuples(st.just("hwpt"), st.just(0)),
    st.tuples(st.just("destroy"), st.integers(1, 6)),
    st.tuples(st.just("dma"), st.integers(0, 4)),
)
PROGRAM = st.lists(OPS, min_size=2, max_size=4)


class World:
    """One device bound to one iommufd and attached to an IOAS (id 2), a buffer of 6 chunks."""

    def __init__(self, driver: str) -> None:
        self.machine = im.Machine.build(iommus=[driver])
        self.dev = self.machine.add_pci_device(iommu=0)
        self.proc = self.machine.new_process()
        self.va = self.proc.mmap(6 * CHUNK)
        for i in range(6):
            self.proc.write(self.va + i * CHUNK, bytes([i + 1]) * CHUNK)
        self.fd = self.proc.open_iommufd()
        self.dev_id = self.fd.bind(self.dev)
        self.ioas = self.fd.ioas_alloc()
        # Start attached, with chunks 4 and 5 mapped: unmaps, DMA and invalidations have work.
        self.fd.attach(self.dev_id, self.ioas)
        self.fd.ioas_map(self.ioas, self.va + 4 * CHUNK, 2 * CHUNK, iova=IOVA + 4 * CHUNK)

    def call(self, op: tuple[str, int]) -> Any:
        """Run one operation; its result as comparable data (value, errno or fault)."""
        name, k = op
        fd = self.fd
        actions: dict[str, Callable[[], Any]] = {
            "map": lambda: fd.ioas_map(
                self.ioas, self.va + k * CHUNK, 2 * CHUNK, iova=IOVA + k * CHUNK
            ),
            "unmap": lambda: fd.ioas_unmap(self.ioas, IOVA + k * CHUNK, 2 * CHUNK),
            "attach": lambda: fd.attach(self.dev_id, k),
            "detach": lambda: fd.detach(self.dev_id),
            "hwpt": lambda: fd.hwpt_alloc(self.dev_id, self.ioas),
            "destroy": lambda: fd.destroy(k),
            "dma": lambda: self.dev.dma_read(IOVA + k * CHUNK, CHUNK),
        }
        try:
            return ("ok", actions[name]())
        except OSError as exc:
            return ("errno", exc.errno)
        except DmaFault:
            return ("fault",)


Op = tuple[str, int]
Timed = tuple[Any, int, int]  # result, start and end (perf_counter_ns)


def replay(driver: str, order: list[tuple[int, Op]], want: list[list[Timed]]) -> World | None:
    """Run ``order`` (thread, op) on one thread; the world if each op gave ``want``'s result."""
    world = World(driver)
    seen = [0, 0]
    for thread, op in order:
        if world.call(op) != want[thread][seen[thread]][0]:
            return None
        seen[thread] += 1
    return world


def linearizations(
    progs: list[list[Op]], timed: list[list[Timed]]
) -> Iterator[list[tuple[int, Op]]]:
    """Interleavings of the two programs that respect real time: a call that returned before
    another started comes first (the linearizability condition)."""
    a, b = progs
    for slots in itertools.combinations(range(len(a) + len(b)), len(a)):
        order: list[tuple[int, int]] = []
        ia = ib = 0
        for i in range(len(a) + len(b)):
            if i in slots:
                order.append((0, ia))
                ia += 1
            else:
                order.append((1, ib))
                ib += 1
        ok = all(
            timed[t2][k2][2] >= timed[t1][k1][1]  # later one did not end before earlier started
            for n, (t1, k1) in enumerate(order)
            for t2, k2 in order[n + 1 :]
            if t1 != t2
        )
        if ok:
            yield [(t, progs[t][k]) for t, k in order]


def run_both(driver: str, progs: list[list[Op]]) -> tuple[World, list[list[Timed]]]:
    """Both programs at once on a fresh world: the world and each call's timed result."""
    world = World(driver)
    timed: list[list[Timed]] = [[], []]

    def thread(i: int) -> None:
        for op in progs[i]:
            t0 = time.perf_counter_ns()
            result = world.call(op)
            timed[i].append((result, t0, time.perf_counter_ns()))

    run_threads([functools.partial(thread, 0), functools.partial(thread, 1)])
    return world, timed


@pytest.mark.parametrize("driver", DRIVERS)
def test_two_threads_are_linearizable(driver: str) -> None:
    examples = 25 if driver == "mock" else 10

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        database=None,
    )
    @hypothesis.given(PROGRAM, PROGRAM)
    def check(left: list[Op], right: list[Op]) -> None:
        for _ in range(3):
            world, timed = run_both(driver, [left, right])
            check_all([world.fd])
            final = snapshot(world.fd)
            for order in linearizations([left, right], timed):
                seq = replay(driver, order, timed)
                if seq is not None and snapshot(seq.fd) == final:
                    break
            else:
                raise AssertionError(f"no interleaving of {left} and {right} explains {timed}")

    check()
