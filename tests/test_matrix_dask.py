"""``matrix --sweep --scheduler``: a small sweep on a Dask cluster this test starts itself
(a LocalCluster of two worker processes) gives the local run's results, cell for cell."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from iommufd_model import cli
from iommufd_model.plugins import default_registry
from iommufd_model.sweep import ClusterError, dask_executor

distributed = pytest.importorskip("distributed")

# Two scenarios under every AMD configuration: 2 x 8 cells, a few seconds of work.
SMALL = ["--sweep", "--driver", "amd", "--scenario", "paging_dma", "--scenario", "nested_dma"]
# Two seeded shards of the kit's state machine on the mock.
SHARDS = ["campaign", "--driver", "mock", "--shards", "2", "--examples", "3", "--steps", "8"]
HYPOTHESIS = importlib.util.find_spec("hypothesis") is not None


def _records(path: Path, key: str = "cells") -> list[dict[str, object]]:
    """Every cell (or shard) but its wall time (the one value that changes between runs)."""
    return [
        {k: v for k, v in c.items() if k != "wall_s"} for c in json.loads(path.read_text())[key]
    ]


def test_cluster_sweep_equals_local(tmp_path: Path) -> None:
    local, remote = tmp_path / "local.json", tmp_path / "dask.json"
    local_shards, remote_shards = tmp_path / "local-shards.json", tmp_path / "dask-shards.json"
    assert cli.main(["matrix", *SMALL, "--jobs", "1", "--json", str(local)]) == 0
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        argv = ["matrix", *SMALL, "--scheduler", cluster.scheduler_address]
        with distributed.get_task_stream(client) as tasks:
            assert cli.main([*argv, "--json", str(remote)]) == 0
        # Both workers ran cells: the sweep really was spread over the cluster.
        assert len({t["worker"] for t in tasks.data}) == 2
        # State-machine shards go the same way (they need hypothesis on the workers).
        if HYPOTHESIS:
            assert cli.main([*SHARDS, "--scheduler", cluster.scheduler_address, "--json",
                             str(remote_shards)]) == 0  # fmt: skip
    if HYPOTHESIS:
        assert cli.main([*SHARDS, "--jobs", "1", "--json", str(local_shards)]) == 0
        assert _records(remote_shards, "shards") == _records(local_shards, "shards")
    data = json.loads(remote.read_text())
    assert data["executor"] == f"Dask cluster at {cluster.scheduler_address}"
    n_sets = 1 + len(default_registry().drivers["amd"].info.option_sets)
    assert len(data["cells"]) == 2 * n_sets
    assert _records(remote) == _records(local)


def test_unreachable_scheduler() -> None:
    with pytest.raises(ClusterError) as exc, dask_executor("tcp://127.0.0.1:9", timeout=1):
        pass
    assert str(exc.value).startswith("cannot reach the Dask scheduler at tcp://127.0.0.1:9: ")
