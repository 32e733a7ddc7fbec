"""Running matrix cells through a ``concurrent.futures`` executor: in process, a local process
pool, or a Dask distributed cluster; the same cells and the same results whichever runs them.

A cell is (scenario, driver, option set). ``matrix`` runs every scenario against each
driver's defaults; ``matrix --sweep`` also runs it under every :class:`OptionSet` the driver
declares (``DriverInfo.option_sets``). Each cell builds fresh machines and takes its
configuration from its spec alone, so a worker on another machine computes the same result as
this process: only ``wall_s`` differs from run to run.

Dask is optional (the ``cluster`` extra: ``pip install 'iommufd-model[cluster]'``); it is
imported only when ``--scheduler`` asks for it. Its workers load their drivers from their own
installed entry points, so they need the same package and plugins installed.
"""

from __future__ import annotations

import functools
import importlib
import math
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol, TextIO, TypeVar

import attrs

from iommufd_model.driver import DEFAULT_OPTION_SET, Feature, OptionSet
from iommufd_model.plugins import DriverRegistry
from iommufd_model.scenarios import FAIL, PASS, SCENARIOS, ScenarioResult, run_scenario

S = TypeVar("S")
R = TypeVar("R")


class HasStatus(Protocol):
    """A finished unit of work: a matrix cell or a state-machine shard."""

    @property
    def status(self) -> str: ...


@attrs.frozen
class Column:
    """A driver under one configuration: a column of the matrix, a column group of a sweep."""

    driver: str
    option_set: OptionSet = DEFAULT_OPTION_SET

    @property
    def label(self) -> str:
        """``amd`` for a driver's defaults, ``amd:host4`` for a declared option set."""
        if self.option_set == DEFAULT_OPTION_SET:
            return self.driver
        return f"{self.driver}:{self.option_set.name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "driver": self.driver,
            "option_set": self.option_set.name,
            "options": dict(self.option_set.options),
            "lacks": sorted(f.value for f in self.option_set.lacks),
            "adds": sorted(f.value for f in self.option_set.adds),
            "doc": self.option_set.doc,
        }


@attrs.frozen
class CellSpec:
    """Everything a worker needs to run one cell: picklable, and no registry inside."""

    scenario: str
    column: Column


def columns(reg: DriverRegistry, drivers: list[str], *, sweep: bool) -> list[Column]:
    """Each driver's defaults, then (with ``sweep``) each option set it declares."""
    out = []
    for d in drivers:
        out.append(Column(d))
        if sweep:
            out += [Column(d, o) for o in reg.drivers[d].info.option_sets]
    return out


def cell_specs(scenarios: list[str], cols: list[Column]) -> list[CellSpec]:
    """The cells in display order: scenario-major, then column."""
    return [CellSpec(sc, col) for sc in scenarios for col in cols]


# The registry a worker runs cells against. The local pool's workers are forked, so they
# inherit it (a hand-built registry in a test included); a Dask worker (or a spawned one)
# finds None and loads its own installed drivers.
_WORKER_REGISTRY: DriverRegistry | None = None


def worker_registry() -> DriverRegistry | None:
    """The registry a forked pool worker inherited, None elsewhere (load the installed)."""
    return _WORKER_REGISTRY


def run_cell(spec: CellSpec, registry: DriverRegistry | None = None) -> ScenarioResult:
    """One cell, in whatever process the executor chose."""
    reg = registry if registry is not None else _WORKER_REGISTRY
    col = spec.column
    return run_scenario(SCENARIOS[spec.scenario], col.driver, reg, col.option_set)


class Progress:
    """``[####....] 37/120 cells, 1 failed, ETA 0:42`` on a terminal's stderr, else nothing
    (``unit`` names what is counted: cells, shards).

    The ETA is the mean wall time per finished cell times the cells left: cells differ in
    cost by two orders of magnitude, so it settles only after a few dozen cells.
    """

    def __init__(self, total: int, stream: TextIO | None = None, unit: str = "cells") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.unit = unit
        self.total = total
        self.done = 0
        self.failed = 0
        self.start = time.perf_counter()
        self.enabled = self.stream.isatty()

    def line(self) -> str:
        width = 24
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        eta = "-:--"
        if self.done:
            left = (time.perf_counter() - self.start) / self.done * (self.total - self.done)
            minutes, seconds = divmod(math.ceil(left), 60)
            eta = f"{minutes}:{seconds:02d}"
        return f"[{bar}] {self.done}/{self.total} {self.unit}, {self.failed} failed, ETA {eta}"

    def step(self, result: HasStatus) -> None:
        self.done += 1
        self.failed += result.status == FAIL
        if self.enabled:
            self.stream.write(f"\r{self.line():<79}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()


def default_jobs() -> int:
    """One process per CPU this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@contextmanager
def local_executor(jobs: int, registry: DriverRegistry) -> Iterator[Executor]:
    """A ``ProcessPoolExecutor`` of ``jobs`` workers, forked where the platform can, so the
    workers run against ``registry`` (a test's hand-built one too)."""
    global _WORKER_REGISTRY
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    _WORKER_REGISTRY = registry
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            yield pool
    finally:
        _WORKER_REGISTRY = None


class ClusterError(Exception):
    """``--scheduler`` cannot be used: Dask is not installed or the scheduler is unreachable."""


@contextmanager
def dask_executor(address: str, timeout: float = 30.0) -> Iterator[Executor]:
    """The ``concurrent.futures`` executor of a Dask distributed client at ``address``."""
    try:
        # Imported by name: Dask is an optional extra, typed or absent as the install has it.
        distributed: Any = importlib.import_module("distributed")
    except ImportError as exc:
        raise ClusterError("--scheduler needs Dask: pip install 'iommufd-model[cluster]'") from exc
    try:
        client = distributed.Client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
    try:
        # pure=False: every cell is submitted once; Dask must not merge or cache them.
        yield client.get_executor(pure=False)
    finally:
        client.close()


def _put(finished: queue.Queue[tuple[int, Future[Any]]], index: int, fut: Future[Any]) -> None:
    finished.put((index, fut))


def run_specs(
    fn: Callable[[S, DriverRegistry | None], R],
    specs: Sequence[S],
    executor: Executor | None = None,
    on_result: Callable[[R], None] | None = None,
    registry: DriverRegistry | None = None,
) -> list[R]:
    """``fn`` over ``specs`` (in this process, with ``registry``, without an executor) and the
    results in the specs' order, whatever order they finished in; ``on_result`` sees each as
    it finishes. ``fn`` is :func:`run_cell` for matrix cells, ``run_shard`` for state-machine
    shards: a module-level function, so a worker process can import it.

    Completion is collected through ``add_done_callback`` into a queue: one loop for every
    executor, whose futures may finish in any order.
    """
    results: dict[int, R] = {}

    def finish(i: int, result: R) -> None:
        results[i] = result
        if on_result:
            on_result(result)

    if executor is None:
        for i, spec in enumerate(specs):
            finish(i, fn(spec, registry))
    else:
        finished: queue.Queue[tuple[int, Future[Any]]] = queue.Queue()
        for i, spec in enumerate(specs):
            fut = executor.submit(fn, spec, None)
            fut.add_done_callback(functools.partial(_put, finished, i))
        for _ in specs:
            i, fut = finished.get()
            finish(i, fut.result())
    return [results[i] for i in range(len(specs))]


def execute(
    fn: Callable[[S, DriverRegistry | None], R],
    specs: Sequence[S],
    registry: DriverRegistry,
    jobs: int = 1,
    scheduler: str | None = None,
    on_result: Callable[[R], None] | None = None,
) -> list[R]:
    """``fn`` over ``specs`` on the Dask cluster at ``scheduler``, else in a local pool of
    ``jobs`` processes, else (one job or one spec) in this process: the same results."""
    if scheduler is not None:
        with dask_executor(scheduler) as pool:
            return run_specs(fn, specs, pool, on_result)
    if jobs <= 1 or len(specs) <= 1:
        return run_specs(fn, specs, None, on_result, registry)
    with local_executor(min(jobs, len(specs)), registry) as pool:
        return run_specs(fn, specs, pool, on_result)


def option_set_problems(registry: DriverRegistry, driver: str) -> list[str]:
    """What is wrong with ``driver``'s declared option sets (the kit's check; [] if nothing).

    Names must be unique and not ``default``, each set must change at least one option and
    may not take away paging nor a feature the driver never declared, nor add one it declares
    anyway, and each must probe:
    the ``paging_dma`` scenario (a machine with the options, a bound device, a mapping that
    DMA reads and writes through) must pass under it.
    """
    info = registry.drivers[driver].info
    problems = []
    seen: set[str] = set()
    for o in info.option_sets:
        if o.name == DEFAULT_OPTION_SET.name or o.name in seen:
            problems.append(f"{o.name}: the name is taken")
        seen.add(o.name)
        if not o.options:
            problems.append(f"{o.name}: sets no option (the defaults are swept already)")
        if Feature.PAGING in o.lacks:
            problems.append(f"{o.name}: a configuration without paging cannot run a scenario")
        if not o.lacks <= info.features:
            extra = sorted(f.value for f in o.lacks - info.features)
            problems.append(f"{o.name}: lacks features never declared: {', '.join(extra)}")
        if o.adds & info.features:
            extra = sorted(f.value for f in o.adds & info.features)
            problems.append(f"{o.name}: adds features declared already: {', '.join(extra)}")
        r = run_scenario(SCENARIOS["paging_dma"], driver, registry, o)
        if r.status != PASS:
            problems.append(f"{o.name}: paging_dma {r.status}: {r.detail}")
    return problems
