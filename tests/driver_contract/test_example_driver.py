"""The guide's example driver (docs/examples/toy_iommu), built as a real distribution, found
through its entry point and run through the whole kit, as docs/writing-a-driver.md says."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from iommufd_model.machine import Machine
from iommufd_model.plugins import DriverRegistry
from iommufd_model.scenarios import PASS, SCENARIOS, UNSUPPORTED, run_scenario

from ._toy import install_toy


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = install_toy(tmp_path_factory.mktemp("site"))
    sys.path.insert(0, str(path))
    yield path
    sys.path.remove(str(path))
    for mod in [m for m in sys.modules if m == "toy_iommu" or m.startswith("toy_iommu.")]:
        del sys.modules[mod]


def test_entry_point_discovery_finds_toy(toy_path: Path) -> None:
    reg = DriverRegistry()
    reg.load_entry_points()
    assert reg.problems == []
    entry = reg.drivers["toy"]
    assert entry.distribution == "iommufd-model-toy"
    assert entry.version == "0.1.0"
    assert "mock" in reg.drivers  # the framework's own driver is still there


def test_toy_next_to_mock_in_one_machine(toy_path: Path) -> None:
    reg = DriverRegistry()
    reg.load_entry_points()
    machine = Machine.build(iommus=["toy", "mock"], registry=reg)
    assert [hw.driver_name for hw in machine.iommus] == ["toy", "mock"]
    for name in ("paging_dma", "pasid_side_by_side", "dirty_tracking"):
        mock = run_scenario(SCENARIOS[name], "mock", reg)
        toy = run_scenario(SCENARIOS[name], "toy", reg)
        assert mock.status == PASS, mock.detail
        assert toy.status == (PASS if name == "paging_dma" else UNSUPPORTED), toy.detail
    assert toy.feature == "dirty_tracking"


def test_conformance_kit_against_toy(toy_path: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(toy_path))
    env.pop("IOMMUFD_MODEL_STRICT", None)  # the kit turns strict mode on by itself
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--iommu-driver", "toy",
         "-rA", "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    for ok in (
        "test_contract.py::test_scenario[toy-paging_dma]",
        "test_contract.py::test_attach_detach_replace[toy]",
        "test_contract.py::test_read_only_mapping_refuses_device_writes[toy]",
        "test_contract.py::test_nothing_leaks_after_destroy_and_close[toy]",
        "test_uapi_machine.py::test_uapi_machine[toy]",  # hypothesis is installed: it ran
    ):
        assert f"PASSED {ok}" in out, ok
    assert "unsupported: pasid" in out
    assert "unsupported: dirty_tracking" in out
    assert "unsupported: nest_parent" in out
    assert " failed" not in out
