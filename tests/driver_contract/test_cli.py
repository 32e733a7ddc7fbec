"""``iommufd-model drivers`` and ``matrix`` over hand-built registries."""

from __future__ import annotations

import json

import pytest

from iommufd_model import cli
from iommufd_model.hookspecs import hookimpl
from iommufd_model.mock.driver import MockDriver
from iommufd_model.plugins import DriverRegistry
from iommufd_model.scenarios import SCENARIOS


class LyingMock(MockDriver):
    """A mock whose DMA unmap forgets to unmap: paging_dma must FAIL."""

    @hookimpl
    def domain_unmap(self, domain: object, iova: int, size: int) -> int:
        return size


def _reg(**drivers: object) -> DriverRegistry:
    reg = DriverRegistry()
    for name, plugin in drivers.items():
        reg.register(name, plugin, distribution=f"dist-{name}")
    return reg


def test_matrix_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["matrix"], _reg(mock=MockDriver())) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["scenario", "mock"]
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line[:1] != " "
            and len(line.split()) == 2}
    for name in ("paging_dma", "replace_under_dma", "pasid_side_by_side", "dirty_tracking",
                 "teardown_orders", "nested_alloc", "viommu_vdevice_lifetime",
                 "hwpt_invalidate"):
        assert rows[name] == "pass"
    assert rows["veventq_alloc"] == "unsupported"
    assert "veventq_alloc @ mock: unsupported: veventq: EOPNOTSUPP" in out


def test_matrix_json_and_filters(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--json", "matrix", "--scenario", "paging_dma", "--scenario", "hw_queue_alloc"]
    assert cli.main(argv, _reg(mock=MockDriver())) == 0
    cells = json.loads(capsys.readouterr().out)["cells"]
    assert [(c["scenario"], c["status"]) for c in cells] == [
        ("paging_dma", "pass"), ("hw_queue_alloc", "unsupported")]
    assert cells[0]["costs"]["translations"] > 0 and cells[0]["wall_s"] > 0
    assert cells[1]["errno_name"] == "EOPNOTSUPP" and cells[1]["feature"] == "hw_queue"


def test_matrix_fails_on_broken_driver(capsys: pytest.CaptureFixture[str]) -> None:
    reg = _reg(mock=MockDriver(), liar=LyingMock())
    assert cli.main(["matrix", "--scenario", "paging_dma"], reg) == 1
    out = capsys.readouterr().out
    assert "paging_dma @ liar: FAIL: read after unmap" in out
    assert cli.main(["matrix", "--driver", "mock", "--scenario", "paging_dma"], reg) == 0


def test_unknown_filter() -> None:
    with pytest.raises(SystemExit, match="unknown scenario"):
        cli.main(["matrix", "--scenario", "nope"], _reg(mock=MockDriver()))


def test_drivers_with_problems(capsys: pytest.CaptureFixture[str]) -> None:
    reg = _reg(mock=MockDriver())
    reg.register("bad", object(), distribution="dist-bad")
    assert cli.main(["--json", "drivers"], reg) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data["drivers"]] == ["mock"]
    assert data["problems"][0]["distribution"] == "dist-bad"
    assert cli.main(["drivers"], _reg()) == 1  # nothing loads: non-zero
    assert cli.main(["matrix"], _reg()) == 1


def test_every_scenario_declares_paging() -> None:
    assert all("paging" in {f.value for f in s.features} for s in SCENARIOS.values())
