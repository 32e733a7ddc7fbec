"""The kit's uAPI state machine, run as a driver author runs it, against every in-tree driver.

The machine lives in the conformance kit (``iommufd_model/testing/suite``); this runs the kit
in a subprocess with the repository's example database (``tests/corpus/uapi_machine``,
read-only unless ``IOMMUFD_MODEL_GROW_CORPUS=1``: hypothesis drops saved examples that no
longer fail, so a writable run would delete committed files) and fails if any driver did not
run it to a pass.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

DRIVERS = ("amd", "arm_smmuv3", "intel_vtd", "mock")
CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "uapi_machine"


def test_uapi_machine_every_driver(tmp_path: Path) -> None:
    from iommufd_model.plugins import default_registry

    missing = set(DRIVERS) - set(default_registry().drivers)
    assert not missing, f"in-tree drivers not installed: {sorted(missing)}"
    env = dict(
        os.environ,
        IOMMUFD_MODEL_STRICT="1",
        PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
        IOMMUFD_MODEL_EXAMPLE_DB=str(CORPUS),
    )
    # The kit opens the database read-only when CI is set; only a deliberate grow run writes.
    env["CI"] = "" if os.environ.get("IOMMUFD_MODEL_GROW_CORPUS") == "1" else "1"
    args = [f"--iommu-driver={d}" for d in DRIVERS]
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "iommufd_model.testing",
         "-p", "no:randomly", "-rA", "-q", *args, "-k", "test_uapi_machine"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    passed = set(re.findall(r"PASSED \S*test_uapi_machine\[(\w+)\]", out))
    assert passed == set(DRIVERS), f"not passed (skipped or missing): {set(DRIVERS) - passed}"
    # each driver ran steps, not an empty machine
    for driver, steps in re.findall(r"uapi-machine (\w+): examples=\d+ steps=(\d+)", out):
        assert int(steps) > 0, driver
