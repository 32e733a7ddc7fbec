"""The sweep's size and wall time: in process, a local pool of two processes, and a Dask
LocalCluster of two worker processes, one after the other in one run (ratios, not seconds,
are what carries over to another machine).

    python benchmarks/bench_sweep.py           # every scenario under every option set
    python benchmarks/bench_sweep.py --quick   # four scenarios

The three runs must agree cell for cell (everything but ``wall_s``); the script says so or
stops. Without Dask installed (the ``cluster`` extra) the cluster run is skipped.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from typing import Any

from iommufd_model.plugins import default_registry
from iommufd_model.scenarios import SCENARIOS, ScenarioResult
from iommufd_model.sweep import (
    cell_specs,
    columns,
    dask_executor,
    local_executor,
    run_cell,
    run_specs,
)

QUICK_SCENARIOS = ["paging_dma", "dirty_tracking", "nested_dma", "nested_invalidation"]


def _timed(fn: Callable[[], list[ScenarioResult]]) -> tuple[float, list[ScenarioResult]]:
    start = time.perf_counter()
    results = fn()
    return time.perf_counter() - start, results


def _comparable(results: list[ScenarioResult]) -> list[tuple[object, ...]]:
    return [
        (r.scenario, r.driver, r.option_set, r.status, r.detail, r.errno, sorted(r.costs.items()))
        for r in results
    ]


def main() -> None:
    reg = default_registry()
    scenarios = QUICK_SCENARIOS if "--quick" in sys.argv else list(SCENARIOS)
    cols = columns(reg, sorted(reg.drivers), sweep=True)
    specs = cell_specs(scenarios, cols)
    print(
        f"sweep: {len(scenarios)} scenarios x {len(cols)} driver configurations "
        f"({', '.join(f'{d} {sum(c.driver == d for c in cols)}' for d in sorted(reg.drivers))})"
        f" = {len(specs)} cells"
    )
    serial_s, serial = _timed(lambda: run_specs(run_cell, specs, None, None, reg))
    print(f"  in process          {serial_s:7.1f} s  1.00x")

    def pool() -> list[ScenarioResult]:
        with local_executor(2, reg) as ex:
            return run_specs(run_cell, specs, ex)

    pool_s, pooled = _timed(pool)
    print(f"  local pool, 2 procs {pool_s:7.1f} s  {serial_s / pool_s:.2f}x")
    assert _comparable(pooled) == _comparable(serial), "the local pool disagrees"
    try:  # the optional cluster extra, untyped: Any, as in iommufd_model.sweep
        distributed: Any = importlib.import_module("distributed")
    except ImportError:
        print("  Dask cluster: skipped (pip install 'iommufd-model[cluster]')")
        return
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address

        def dask() -> list[ScenarioResult]:
            with dask_executor(address) as ex:
                return run_specs(run_cell, specs, ex)

        dask_s, remote = _timed(dask)
        warm_s, again = _timed(dask)  # the workers have imported the model and its drivers
    print(f"  Dask, 2 workers     {dask_s:7.1f} s  {serial_s / dask_s:.2f}x  (cluster up already)")
    print(f"  the same, warm      {warm_s:7.1f} s  {serial_s / warm_s:.2f}x  (workers loaded)")
    assert _comparable(remote) == _comparable(serial), "the Dask cluster disagrees"
    assert _comparable(again) == _comparable(serial), "the Dask cluster disagrees"
    print("  all three runs agree cell for cell")


if __name__ == "__main__":
    main()
