"""The conformance kit fails drivers that break the contract, naming the breach.

Each broken driver is the guide's example driver (docs/examples/toy_iommu) with one hook
changed, built and installed as a real distribution next to it, then run through the kit as
its author would run it (``pytest --iommu-driver NAME``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ._toy import install_toy, pip_install, write_project

BROKEN = '''
"""Drivers that break the contract, each in one hook."""

import attrs

from iommufd_model.api import IOMMU_WRITE, DriverInfo, hookimpl
from toy_iommu.driver import ToyDriver, _toy


class Renamed(ToyDriver):
    """The toy under another entry-point name (``DriverInfo.name`` must match it)."""

    NAME = ""

    @hookimpl
    def driver_info(self) -> DriverInfo:
        return attrs.evolve(ToyDriver.driver_info(self), name=self.NAME)


class WritableToy(Renamed):
    """Maps every page writable: a device may write what the VMM mapped read-only."""

    NAME = "writable_toy"

    @hookimpl
    def domain_map(self, domain, iova, pa, size, prot):
        return ToyDriver.domain_map(self, domain, iova, pa, size, prot | IOMMU_WRITE)


class ForgetfulToy(Renamed):
    """Frees a domain without its page-table frames (FREES_TABLES) or its ID (FREES_ID)."""

    FREES_TABLES = FREES_ID = True

    @hookimpl
    def domain_free(self, domain):
        toy = _toy(domain)
        toy.iommu.invalidate(toy.domid)
        if self.FREES_TABLES:
            toy.pt.free()
        if self.FREES_ID:
            toy.iommu.domain_ids.free(toy.domid)
        return True


class LeakyToy(ForgetfulToy):
    NAME, FREES_TABLES = "leaky_toy", False


class IdLeakyToy(ForgetfulToy):
    NAME, FREES_ID = "idleaky_toy", False


class RaisingToy(Renamed):
    """Refuses an unmap with a KeyError instead of an OSError carrying an errno."""

    NAME = "raising_toy"

    @hookimpl
    def domain_unmap(self, domain, iova, size):
        raise KeyError(f"no area at {iova:#x}")


writable = WritableToy()
leaky = LeakyToy()
idleaky = IdLeakyToy()
raising = RaisingToy()
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example driver and the broken ones, each a distribution built and installed here."""
    target = install_toy(tmp_path_factory.mktemp("site"))
    eps = {f"{n}_toy": n for n in ("writable", "leaky", "idleaky", "raising")}
    project = write_project(
        tmp_path_factory.mktemp("src") / "broken", "broken-toys", "broken_toys", BROKEN, eps
    )
    pip_install(project, target)
    return target


def kit(site: Path, cwd: Path, driver: str, *args: str) -> str:
    """Run the kit as a driver author does; the failing run's whole output."""
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("IOMMUFD_MODEL_STRICT", None)  # the kit's own default (strict) applies
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--iommu-driver", driver,
         "-q", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 1, out  # tests failed (not a usage error, not a pass)
    return out


def test_writable_read_only_mapping_fails_the_kit(site: Path, tmp_path: Path) -> None:
    out = kit(site, tmp_path, "writable_toy")
    assert "FAILED" in out and "test_read_only_mapping_refuses_device_writes[writable_toy]" in out
    assert "breach: the device wrote IOVA" in out
    assert "mapping made without IOMMU_IOAS_MAP_WRITEABLE" in out


def test_leaked_tables_fail_the_kit(site: Path, tmp_path: Path) -> None:
    out = kit(site, tmp_path, "leaky_toy", "-k", "not test_uapi_machine")
    assert "test_nothing_leaks_after_destroy_and_close[leaky_toy]" in out
    assert "frame(s) of physical memory still in use after every object was destroyed" in out


def test_leaked_domain_ids_fail_the_kit(site: Path, tmp_path: Path) -> None:
    out = kit(site, tmp_path, "idleaky_toy", "-k", "not test_uapi_machine")
    assert "test_nothing_leaks_after_destroy_and_close[idleaky_toy]" in out
    assert "breach: driver IDs leaked" in out and "domain ID" in out


def test_hook_raising_non_oserror_fails_the_kit(site: Path, tmp_path: Path) -> None:
    out = kit(site, tmp_path, "raising_toy", "-k", "attach_detach or unmap_one_area")
    assert "iommufd-model contract breach" in out
    assert "driver raising_toy: a hook raised KeyError" in out


def test_broken_plugin_is_one_line(site: Path, tmp_path: Path) -> None:
    """A plugin that cannot load stops the kit with one line naming it and why."""
    bad = write_project(
        tmp_path / "bad", "bad-toy", "bad_toy", "import no_such_module_xyz\n", {"bad_toy": "x"}
    )
    target = tmp_path / "site"
    pip_install(bad, target)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{target}")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--iommu-driver", "bad_toy"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode != 0
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if "bad_toy" in ln]
    assert lines == [
        "ERROR: --iommu-driver: BROKEN bad_toy (distribution bad-toy): import failed: "
        "ModuleNotFoundError: No module named 'no_such_module_xyz'"
    ], res.stdout + res.stderr
