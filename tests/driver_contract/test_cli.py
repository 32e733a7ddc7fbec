"""``iommufd-model drivers`` and ``matrix`` over hand-built registries."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import attrs
import pytest

from iommufd_model import cli
from iommufd_model.driver import DriverInfo, Feature
from iommufd_model.hookspecs import hookimpl
from iommufd_model.mock import selftest
from iommufd_model.mock.driver import MockDriver
from iommufd_model.plugins import DriverRegistry
from iommufd_model.scenarios import PASS, SCENARIOS, UNSUPPORTED, run_scenario


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


def parse_table(out: str, *, full: bool = False) -> dict[tuple[str, str], str]:
    """The status (or ``full`` text) of every (scenario, driver) cell of the printed table,
    its columns found by the dashes under the header."""
    lines = out.splitlines()
    spans, pos = [], 0
    for dashes in lines[1].split("  "):
        spans.append((pos, pos + len(dashes)))
        pos += len(dashes) + 2
    drivers = [lines[0][a:b].strip() for a, b in spans[1:]]
    cells = {}
    for line in lines[2:]:
        if not line.strip():
            break
        sc = line[: spans[0][1]].strip()
        for drv, (a, b) in zip(drivers, spans[1:], strict=True):
            cells[sc, drv] = line[a:b].strip() if full else line[a:b].split()[0]
    return cells


def test_matrix_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["matrix"], _reg(mock=MockDriver())) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["scenario", "mock"]
    rows = {sc: status for (sc, _), status in parse_table(out).items()}
    assert list(rows) == list(SCENARIOS)
    for name in (
        "paging_dma",
        "replace_under_dma",
        "pasid_side_by_side",
        "dirty_tracking",
        "teardown_orders",
        "nested_alloc",
        "viommu_vdevice_lifetime",
        "hwpt_invalidate",
    ):
        assert rows[name] == "pass"
    if MockDriver().driver_info().veventq_types:
        assert rows["veventq_alloc"] == "pass"
    else:  # no vEVENTQ type declared: the core's errno for a type it does not know
        assert rows["veventq_alloc"] == "unsupported"
        assert "veventq_alloc @ mock: unsupported: veventq: EOPNOTSUPP" in out
    paging = next(line for line in out.splitlines() if line.startswith("paging_dma "))
    assert re.search(r"pass \d+t \d+w \d+h \d+m \d+c \d+ms", paging), paging
    assert "t VMM traps, w page-walk memory references" in out


def test_matrix_json_and_filters(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--json", "matrix", "--scenario", "paging_dma", "--scenario", "hw_queue_alloc"]
    assert cli.main(argv, _reg(mock=UntypedMock())) == 0
    data = json.loads(capsys.readouterr().out)
    cells = data["cells"]
    assert [(c["scenario"], c["status"]) for c in cells] == [
        ("paging_dma", "pass"),
        ("hw_queue_alloc", "unsupported"),
    ]  # UntypedMock: not declared
    assert set(data["cost_keys"]) == {*cells[0]["costs"], "wall_s"}
    for key in ("traps", "walk_mem_refs", "iotlb_hits", "iotlb_misses", "commands"):
        assert key in cells[0]["costs"]
    assert cells[0]["costs"]["translations"] > 0 and cells[0]["wall_s"] > 0
    assert cells[1]["errno_name"] == "EOPNOTSUPP" and cells[1]["feature"] == "hw_queue"
    # matrix --json (after the subcommand) means the same; with a FILE the table still prints
    assert cli.main([*argv[1:], "--json"], _reg(mock=UntypedMock())) == 0
    assert json.loads(capsys.readouterr().out)["drivers"] == ["mock"]


class TypedMock(MockDriver):
    """The mock declaring the self-test's vEVENTQ and HW queue types, as the kernel has them."""

    @hookimpl
    def driver_info(self) -> DriverInfo:
        info = MockDriver.driver_info(self)
        return attrs.evolve(
            info,
            features=info.features | {Feature.VEVENTQ, Feature.HW_QUEUE},
            veventq_types=frozenset({selftest.IOMMU_VEVENTQ_TYPE_SELFTEST}),
            hw_queue_types=frozenset({selftest.IOMMU_HW_QUEUE_TYPE_SELFTEST}),
        )


class UntypedMock(TypedMock):
    """Declares the features but no type: unsupported, with the errno for an unknown type."""

    @hookimpl
    def driver_info(self) -> DriverInfo:
        return attrs.evolve(
            TypedMock.driver_info(self), veventq_types=frozenset(), hw_queue_types=frozenset()
        )


def test_driver_own_types() -> None:
    reg = _reg(typed=TypedMock(), untyped=UntypedMock())
    for name in ("veventq_alloc", "hw_queue_alloc", "viommu_vdevice_lifetime", "nested_alloc"):
        r = run_scenario(SCENARIOS[name], "typed", reg)
        assert r.status == PASS, (name, r.detail)
    for name, feature in (("veventq_alloc", "veventq"), ("hw_queue_alloc", "hw_queue")):
        r = run_scenario(SCENARIOS[name], "untyped", reg)
        assert (r.status, r.feature, r.errno) == (UNSUPPORTED, feature, errno.EOPNOTSUPP), r


def test_parallel_equals_serial(tmp_path: Path) -> None:
    reg = _reg(mock=MockDriver(), typed=TypedMock())
    runs = []
    for jobs in ("1", "2"):
        out = tmp_path / f"m{jobs}.json"
        assert cli.main(["matrix", "-n", jobs, "--json", str(out)], reg) == 0
        cells = json.loads(out.read_text())["cells"]
        runs.append([{k: v for k, v in c.items() if k != "wall_s"} for c in cells])
    assert runs[0] == runs[1]
    assert len(runs[0]) == 2 * len(SCENARIOS)
    assert cli.build_parser().parse_args(["matrix", "-n", "auto"]).jobs >= 1
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["matrix", "-n", "0"])


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
    for argv in (["--json", "drivers"], ["drivers", "--json"]):  # before or after the command
        assert cli.main(argv, reg) == 1  # a broken plugin is an installation error
        data = json.loads(capsys.readouterr().out)
        assert [d["name"] for d in data["drivers"]] == ["mock"]
        assert data["problems"][0]["distribution"] == "dist-bad"
    assert cli.main(["drivers"], reg) == 1
    out, err = capsys.readouterr()
    assert out.startswith("mock ")
    assert err.splitlines() == [
        "BROKEN bad (distribution dist-bad): missing required hook(s): driver_info, probe, "
        "domain_alloc_user, domain_map, domain_unmap, attach"
    ]
    assert cli.main(["drivers"], _reg(mock=MockDriver())) == 0
    assert cli.main(["drivers"], _reg()) == 1  # nothing loads: non-zero
    assert cli.main(["matrix"], _reg()) == 1
    with pytest.raises(SystemExit, match=r"^iommufd-model: driver bad is installed but broken: "):
        cli.main(["matrix", "--driver", "bad"], reg)


class MisspelledMock(MockDriver):
    """A hook whose argument pluggy refuses: its multi-line reason is reported on one line."""

    @hookimpl
    def domain_unmap(self, domain: object, iova: int, size: int, colour: int) -> int:  # type: ignore[override]
        return size


def test_invalid_hooks_reported_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    reg = _reg(mock=MockDriver(), odd=MisspelledMock())
    assert cli.main(["drivers"], reg) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("BROKEN odd (distribution dist-odd): invalid hooks: ")
    assert "colour" in line


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    for argv in (["--version"], ["drivers", "--version"], ["matrix", "--version"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv, _reg())
        assert exc.value.code == 0
        assert capsys.readouterr().out == f"iommufd-model {version('iommufd-model')}\n"


def test_help_is_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"], _reg())
    text = capsys.readouterr().out
    assert "drivers" in text and "matrix" in text and "exit status" in text
    for note in ("Stdlib", "argparse", "pluggy", "``"):
        assert note not in text, note


@pytest.mark.parametrize(
    ("option", "path", "why"),
    [
        ("--html", "/no/such/dir/x.html", "no such directory: /no/such/dir"),
        ("--json", "/no/such/dir/x.json", "no such directory: /no/such/dir"),
        ("--html", "/", "is a directory"),
    ],
)
def test_bad_output_path_refused_before_the_run(
    option: str, path: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the matrix ran before the output path was checked")

    monkeypatch.setattr(cli, "run_cells", no_run)
    with pytest.raises(SystemExit) as exc:
        cli.main(["matrix", option, path], _reg(mock=MockDriver()))
    assert exc.value.code == f"iommufd-model: cannot write {option} {path}: {why}"


def test_every_scenario_declares_paging() -> None:
    assert all("paging" in {f.value for f in s.features} for s in SCENARIOS.values())
