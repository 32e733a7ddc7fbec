"""Broken plugins are reported with their distribution and do not take the good ones down."""

from __future__ import annotations

import importlib.metadata as md
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from iommufd_model.hookspecs import hookimpl
from iommufd_model.machine import Machine
from iommufd_model.mock.driver import MockDriver
from iommufd_model.plugins import DriverRegistry
from iommufd_model.scenarios import PASS, SCENARIOS, run_scenario


class MissingAttach(MockDriver):
    """Lacks a required hook: ``attach`` is masked out."""

    attach = None  # type: ignore[assignment]


class Misspelled(MockDriver):
    @hookimpl
    def domian_map(self, domain: object) -> bool:  # typo of domain_map
        return True


class WrongArgs(MockDriver):
    @hookimpl
    def attach(self, iommu: object, device: object, domain: object) -> None:
        """``device`` is no argument of the hookspec: pluggy refuses the plugin."""


def _problem(reg: DriverRegistry, name: str) -> str:
    (p,) = [p for p in reg.problems if p.name == name]
    assert p.distribution == "iommufd-model-broken"
    return p.message


def _assert_mock_still_works(reg: DriverRegistry) -> None:
    # None of the broken plugins got in; the good ones (mock, and any installed vendor) did.
    assert "mock" in reg.drivers
    assert not {"explodes", "missing", "misspelled", "wrongargs"} & set(reg.drivers)
    machine = Machine.build(iommus=["mock"], registry=reg)
    assert machine.iommus[0].driver_name == "mock"
    result = run_scenario(SCENARIOS["paging_dma"], "mock", reg)
    assert result.status == PASS, result.detail


@pytest.fixture
def broken_dist(tmp_path: Path) -> Iterator[None]:
    """A distribution with four driver entry points, one per way of being broken."""
    dist = tmp_path / "iommufd_model_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: iommufd-model-broken\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[iommufd_model.drivers]\n"
        "explodes = broken_drv_explodes:plugin\n"
        "missing = broken_drv_ok:missing\n"
        "misspelled = broken_drv_ok:misspelled\n"
        "wrongargs = broken_drv_ok:wrongargs\n"
    )
    (tmp_path / "broken_drv_explodes.py").write_text("raise RuntimeError('vendor SDK not found')\n")
    mod = types.ModuleType("broken_drv_ok")
    mod.missing = MissingAttach()  # type: ignore[attr-defined]
    mod.misspelled = Misspelled()  # type: ignore[attr-defined]
    mod.wrongargs = WrongArgs()  # type: ignore[attr-defined]
    sys.modules["broken_drv_ok"] = mod
    sys.path.insert(0, str(tmp_path))
    yield
    sys.path.remove(str(tmp_path))
    del sys.modules["broken_drv_ok"]


def test_broken_entry_points(broken_dist: None) -> None:
    reg = DriverRegistry()
    reg.load_entry_points()
    assert "import failed: RuntimeError: vendor SDK not found" in _problem(reg, "explodes")
    assert "missing required hook(s): attach" in _problem(reg, "missing")
    assert "unknown hook(s) (misspelled?): domian_map" in _problem(reg, "misspelled")
    msg = _problem(reg, "wrongargs")
    assert "invalid hooks" in msg and "device" in msg
    _assert_mock_still_works(reg)
    assert {ep.name for ep in md.entry_points(group="iommufd_model.drivers")} >= {"explodes"}


@pytest.mark.parametrize("plugin", [MissingAttach(), Misspelled(), WrongArgs()], ids=type)
def test_register_broken_object(plugin: object) -> None:
    reg = DriverRegistry()
    reg.register("mock", MockDriver(), distribution="iommufd-model")
    assert reg.register("bad", plugin, distribution="iommufd-model-broken") is None
    assert _problem(reg, "bad")
    _assert_mock_still_works(reg)


def test_broken_plugin_is_not_routed_to() -> None:
    reg = DriverRegistry()
    reg.register("mock", MockDriver(), distribution="iommufd-model")
    reg.register("bad", Misspelled(), distribution="iommufd-model-broken")
    with pytest.raises(OSError):
        Machine.build(iommus=["bad"], registry=reg)
