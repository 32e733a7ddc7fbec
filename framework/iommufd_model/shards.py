"""State-machine shards: the kit's hypothesis uAPI state machine cut into independent runs.

A campaign of the state machine (``testing/suite/test_uapi_machine.py``) has no natural end;
here it is cut into shards -- a driver configuration, a seed and a number of examples each --
that go through the same executors as the matrix's cells (in process, a local pool, a Dask
cluster). A shard is deterministic: hypothesis runs it from its seed with no example
database, so the same shard generates the same examples, and shrinks a failure to the same
steps, on any worker. Shards need the test extra (pytest and hypothesis) wherever they run.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import attrs

from iommufd_model.plugins import DriverRegistry, default_registry
from iommufd_model.scenarios import FAIL, PASS
from iommufd_model.sweep import Column, worker_registry

MACHINE_MODULE = "iommufd_model.testing.suite.test_uapi_machine"


@attrs.frozen
class ShardSpec:
    """One shard: ``examples`` runs of at most ``steps`` steps from ``seed`` on ``column``."""

    column: Column
    seed: int
    examples: int
    steps: int


@attrs.define
class ShardResult:
    """How a shard went: the falsifying steps hypothesis reported, if it failed."""

    driver: str
    option_set: str
    seed: int
    status: str
    examples: int = 0
    steps: int = 0
    detail: str = ""
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def shard_specs(
    cols: list[Column], shards: int, seed: int, examples: int, steps: int
) -> list[ShardSpec]:
    """``shards`` consecutive seeds from ``seed`` for every column."""
    return [ShardSpec(c, seed + i, examples, steps) for c in cols for i in range(shards)]


class ShardsUnavailable(Exception):
    """The state machine needs hypothesis and pytest (the test extra)."""


def machine_module() -> Any:
    """The kit's state-machine module, or :class:`ShardsUnavailable` without the test extra."""
    for name in ("hypothesis", "pytest"):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ShardsUnavailable(
                f"state-machine shards need {name}: pip install 'iommufd-model[test]'"
            ) from exc
    return importlib.import_module(MACHINE_MODULE)


def run_shard(spec: ShardSpec, registry: DriverRegistry | None = None) -> ShardResult:
    """Run one shard in this process; a failure of the model is a FAIL, never an exception."""
    reg = registry or worker_registry() or default_registry()
    machines = machine_module()
    hypothesis: Any = importlib.import_module("hypothesis")
    reporting: Any = importlib.import_module("hypothesis.reporting")
    stateful: Any = importlib.import_module("hypothesis.stateful")
    col = spec.column
    result = ShardResult(col.driver, col.option_set.name, spec.seed, PASS)
    start = time.perf_counter()
    cls = machines.machine_for(col.driver, reg, col.option_set)
    hypothesis.seed(spec.seed)(cls)
    cfg = hypothesis.settings(
        max_examples=spec.examples,
        stateful_step_count=spec.steps,
        deadline=None,
        database=None,
        print_blob=False,
        # No "explain" phase: it names source lines by absolute path, which differ between
        # machines, and a shard's result must be the same on every worker.
        phases=[p for p in hypothesis.Phase if p.name != "explain"],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    report: list[str] = []
    try:
        # hypothesis reports the falsifying steps through its reporter: kept, not printed.
        with reporting.with_reporter(report.append):
            stateful.run_state_machine_as_test(cls, settings=cfg)
    except Exception as exc:
        result.status = FAIL
        notes = [str(n) for n in getattr(exc, "__notes__", [])]
        text = f"{type(exc).__name__}: {exc}"
        result.detail = "\n".join([text, *notes, *map(str, report)]).strip()
    result.examples = cls.stats["examples"]
    result.steps = cls.stats["steps"]
    result.wall_s = time.perf_counter() - start
    return result
