"""``iommufd-model matrix --sweep``: every scenario under each driver's declared option sets,
through the local process pool or in process, with the same results either way."""

from __future__ import annotations

import errno
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import attrs
import pytest

from iommufd_model import cli
from iommufd_model.driver import DriverInfo, Feature, OptionSet
from iommufd_model.hookspecs import hookimpl
from iommufd_model.mock.driver import MockDriver
from iommufd_model.plugins import DriverRegistry, default_registry
from iommufd_model.scenarios import FAIL, PASS, SCENARIOS, UNSUPPORTED, run_scenario
from iommufd_model.sweep import Progress, option_set_problems

# A small sweep: paging and dirty tracking, under every VT-d configuration.
SMALL = ["--driver", "intel_vtd", "--scenario", "paging_dma", "--scenario", "dirty_tracking"]


def _reg(**drivers: object) -> DriverRegistry:
    reg = DriverRegistry()
    for name, plugin in drivers.items():
        reg.register(name, plugin, distribution=f"dist-{name}")
    return reg


class SetsMock(MockDriver):
    """A mock declaring option sets (the mock's probe takes no option: each set is bad)."""

    def __init__(self, *sets: OptionSet) -> None:
        self.sets = sets

    @hookimpl
    def driver_info(self) -> DriverInfo:
        return attrs.evolve(MockDriver.driver_info(self), option_sets=self.sets)


def test_installed_option_sets_probe(iommu_driver: str) -> None:
    """The kit's check, for every installed driver (the kit runs it for a driver author)."""
    problems = option_set_problems(default_registry(), iommu_driver)
    assert not problems, "\n".join(problems)


def test_bad_option_sets_are_reported() -> None:
    reg = _reg(
        mock=SetsMock(
            OptionSet("default", {"x": 1}),
            OptionSet("empty"),
            OptionSet("empty"),
            OptionSet("nopaging", {"y": 2}, lacks=frozenset({Feature.PAGING})),
            OptionSet("huge", {"z": 3}, lacks=frozenset({Feature.LARGE_PAGES})),
        )
    )
    problems = option_set_problems(reg, "mock")
    assert "default: the name is taken" in problems
    assert "empty: the name is taken" in problems
    assert "empty: sets no option (the defaults are swept already)" in problems
    assert "nopaging: a configuration without paging cannot run a scenario" in problems
    assert "huge: lacks features never declared: large_pages" in problems
    # The mock refuses every probe option: those sets do not probe.
    assert any(p.startswith("default: paging_dma fail: unexpected EINVAL") for p in problems)
    assert not any(p.startswith("empty: paging_dma") for p in problems)  # no options: probes


def test_a_lacked_feature_that_works_is_a_fail() -> None:
    """A configuration claiming to lack a feature the driver still grants cannot hide it."""
    reg = default_registry()
    honest = OptionSet("no-slads", {"dirty": False}, lacks=frozenset({Feature.DIRTY_TRACKING}))
    lying = OptionSet("lie", {"pasid_bits": 8}, lacks=frozenset({Feature.DIRTY_TRACKING}))
    r = run_scenario(SCENARIOS["dirty_tracking"], "intel_vtd", reg, honest)
    assert (r.status, r.feature, r.errno) == (UNSUPPORTED, "dirty_tracking", errno.EOPNOTSUPP)
    assert r.option_set == "no-slads"
    r = run_scenario(SCENARIOS["dirty_tracking"], "intel_vtd", reg, lying)
    assert r.status == FAIL
    assert r.detail == "driver accepted dirty_tracking but does not declare it"


def test_options_reach_the_hardware() -> None:
    """5-level first-stage tables walk more per miss than the 4-level default."""
    reg = default_registry()
    sets = {o.name: o for o in reg.drivers["intel_vtd"].info.option_sets}
    four = run_scenario(SCENARIOS["paging_dma"], "intel_vtd", reg)
    five = run_scenario(SCENARIOS["paging_dma"], "intel_vtd", reg, sets["aw57-fs5"])
    assert four.status == five.status == PASS
    misses = four.costs["iotlb_misses"]
    assert misses and misses == five.costs["iotlb_misses"]
    assert five.costs["walk_mem_refs"] > four.costs["walk_mem_refs"]


def _cells(path: Path) -> list[dict[str, object]]:
    return [
        {k: v for k, v in c.items() if k != "wall_s"} for c in json.loads(path.read_text())["cells"]
    ]


def test_sweep_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jpath, hpath = tmp_path / "s.json", tmp_path / "s.html"
    argv = ["matrix", "--sweep", "-n", "1", *SMALL, "--json", str(jpath), "--html", str(hpath)]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    sets = default_registry().drivers["intel_vtd"].info.option_sets
    names = ["default", *(o.name for o in sets)]
    data = json.loads(jpath.read_text())
    assert data["sweep"] is True and data["executor"] == "in process"
    assert [c["option_set"] for c in data["columns"]] == names
    assert data["columns"][1]["options"] == dict(sets[0].options)
    cells = {(c["scenario"], c["option_set"]): c for c in data["cells"]}
    assert set(cells) == {(s, n) for s in ("paging_dma", "dirty_tracking") for n in names}
    for n, o in zip(names, [None, *sets], strict=True):
        lacks_dirty = o is not None and Feature.DIRTY_TRACKING in o.lacks
        want = UNSUPPORTED if lacks_dirty else PASS
        assert cells["dirty_tracking", n]["status"] == want, (n, cells["dirty_tracking", n])
        assert cells["paging_dma", n]["status"] == PASS
    # The table: one section per driver, a column per option set, each set explained.
    lines = out.out.splitlines()
    assert lines[0] == "== intel_vtd =="
    assert lines[2].split() == ["scenario", *names]
    assert lines[4].split() == ["paging_dma"] + ["pass"] * len(names)
    for o in sets:
        assert any(line.startswith(f"  intel_vtd:{o.name}: ") for line in lines)
    assert out.err == ""  # captured stderr is no terminal: no progress line

    class Cells(HTMLParser):
        found: dict[tuple[str, str], str] = {}

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if tag == "td":
                self.found[str(a["data-scenario"]), str(a["data-option-set"])] = str(
                    a["data-status"]
                )

    page = Cells()
    page.feed(hpath.read_text())
    assert page.found == {key: c["status"] for key, c in cells.items()}


def test_sweep_pool_equals_in_process(tmp_path: Path) -> None:
    runs = []
    for jobs in ("1", "2"):
        out = tmp_path / f"s{jobs}.json"
        assert cli.main(["matrix", "--sweep", "--jobs", jobs, *SMALL, "--json", str(out)]) == 0
        runs.append(_cells(out))
    assert runs[0] == runs[1]
    assert len(runs[0]) == 2 * (1 + len(default_registry().drivers["intel_vtd"].info.option_sets))


def test_plain_matrix_has_no_option_set_columns(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    assert cli.main(["matrix", "--scenario", "paging_dma", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["sweep"] is False
    assert [c["label"] for c in data["columns"]] == data["drivers"]
    assert {c["option_set"] for c in data["cells"]} == {"default"}


def test_jobs_and_scheduler_exclude_each_other() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(
            ["matrix", "--jobs", "2", "--scheduler", "tcp://127.0.0.1:1"], _reg(m=MockDriver())
        )
    assert exc.value.code == "iommufd-model: --jobs and --scheduler exclude each other"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_only() -> None:
    reg = _reg(mock=MockDriver())
    ok = run_scenario(SCENARIOS["paging_dma"], "mock", reg)
    bad = attrs.evolve(ok, status=FAIL)
    tty = Tty()
    p = Progress(4, tty)
    assert p.line() == "[........................] 0/4 cells, 0 failed, ETA -:--"
    p.step(ok)
    p.step(bad)
    shown = tty.getvalue().split("\r")[-1]
    assert shown.startswith("[############............] 2/4 cells, 1 failed, ETA 0:")
    p.close()
    assert tty.getvalue().endswith("\r" + " " * 79 + "\r")
    piped = io.StringIO()
    q = Progress(4, piped)
    q.step(ok)
    q.close()
    assert piped.getvalue() == ""


def test_a_host_without_nesting_gets_no_nested_viommu() -> None:
    """VT-d without ECAP.NEST: the VMM's vIOMMU refuses (QEMU's vtd_check_hiod), so the
    nested cells are unsupported with its errno rather than running on a host that cannot."""
    reg = default_registry()
    no_nest = {o.name: o for o in reg.drivers["intel_vtd"].info.option_sets}["no-nest"]
    r = run_scenario(SCENARIOS["nested_dma"], "intel_vtd", reg, no_nest)
    assert (r.status, r.feature, r.errno) == (UNSUPPORTED, "nested", errno.EOPNOTSUPP), r
    assert "ECAP.NEST" in r.detail


def test_scheduler_without_dask(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dask(name: str) -> object:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr("iommufd_model.sweep.importlib.import_module", no_dask)
    with pytest.raises(SystemExit) as exc:
        cli.main(["matrix", "--scheduler", "tcp://127.0.0.1:1"], _reg(mock=MockDriver()))
    assert exc.value.code == (
        "iommufd-model: --scheduler needs Dask: pip install 'iommufd-model[cluster]'"
    )
