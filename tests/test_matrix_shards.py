"""``iommufd-model campaign``: the kit's uAPI state machine in seeded shards, run through the
matrix's executors; a shard's result (a failure's shrunk steps included) is the same in
process and in a pool worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from iommufd_model import cli
from iommufd_model.hookspecs import hookimpl
from iommufd_model.hw.iommu import page_run
from iommufd_model.hw.pci import PciDevice
from iommufd_model.machine import Machine
from iommufd_model.mock.driver import MockDriver
from iommufd_model.mock.hw import MockIommu
from iommufd_model.plugins import DriverRegistry

pytest.importorskip("hypothesis")

SMALL = ["campaign", "--shards", "2", "--examples", "3", "--steps", "8"]


class UnblockedIommu(MockIommu):
    """A mock IOMMU that lets a device with no domain attached DMA untranslated."""

    def translate(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        if pasid is None and self.context.get(dev.rid) is None:
            return iova, page_run(iova)
        return super().translate(dev, iova, pasid, write)


class UnblockedMock(MockDriver):
    """The mock on :class:`UnblockedIommu`: a bound, unattached device is not blocked. The
    machine binds its two devices before any rule runs, and checks after every step (and
    before the first) that their DMA faults, so every example of every seed finds it."""

    @hookimpl
    def probe(self, machine: Machine, index: int, options: dict[str, Any]) -> MockIommu:
        return UnblockedIommu(machine, index)


def _reg(**drivers: object) -> DriverRegistry:
    reg = DriverRegistry()
    for name, plugin in drivers.items():
        reg.register(name, plugin, distribution=f"dist-{name}")
    return reg


def _shards(path: Path) -> list[dict[str, object]]:
    return [
        {k: v for k, v in s.items() if k != "wall_s"}
        for s in json.loads(path.read_text())["shards"]
    ]


def test_shards_pass_the_same_in_process_and_in_a_pool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = _reg(mock=MockDriver())
    runs = []
    for jobs in ("1", "2"):
        out = tmp_path / f"c{jobs}.json"
        assert cli.main([*SMALL, "--jobs", jobs, "--json", str(out)], reg) == 0
        runs.append(_shards(out))
    assert runs[0] == runs[1]
    assert [(s["driver"], s["seed"], s["status"]) for s in runs[0]] == [
        ("mock", 0, "pass"),
        ("mock", 1, "pass"),
    ]
    assert all(int(str(s["steps"])) > 0 for s in runs[0])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["configuration", "shards", "failed", "examples", "steps"]
    assert table[2].split()[:3] == ["mock", "2", "0"]


def test_a_failing_shard_reports_the_same_steps_anywhere(tmp_path: Path) -> None:
    """Two failing shards, in this process and in a pool of two: the same records, each a
    FAIL naming the machine and the breach hypothesis shrank to."""
    reg = _reg(unblocked=UnblockedMock())
    runs = []
    for jobs in ("1", "2"):
        out = tmp_path / f"f{jobs}.json"
        argv = ["campaign", "--shards", "2", "--examples", "5", "--steps", "6"]
        assert cli.main([*argv, "--jobs", jobs, "--json", str(out)], reg) == 1
        runs.append(_shards(out))
    assert runs[0] == runs[1]
    assert [(s["seed"], s["status"]) for s in runs[0]] == [(0, "fail"), (1, "fail")]
    for shard in runs[0]:
        detail = str(shard["detail"])
        assert "state = UapiMachine_unblocked()" in detail  # hypothesis' shrunk steps
        assert "expected an IOMMU fault" in detail


def test_jobs_and_scheduler_exclude_each_other() -> None:
    with pytest.raises(SystemExit) as exc:
        argv = [*SMALL, "-n", "2", "--scheduler", "tcp://127.0.0.1:1"]
        cli.main(argv, _reg(mock=MockDriver()))
    assert exc.value.code == "iommufd-model: --jobs and --scheduler exclude each other"
