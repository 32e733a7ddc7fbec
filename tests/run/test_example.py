"""docs/examples/vmm_ioas.c, built against Linux 7.2's uAPI headers, run with ``--iommu amd``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_vmm_example_runs_on_amd(tmp_path: Path, uapi_headers: Path) -> None:
    headers = uapi_headers
    binary = tmp_path / "vmm_ioas"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-isystem",
            str(headers),
            "-o",
            str(binary),
            str(REPO / "docs" / "examples" / "vmm_ioas.c"),
        ],
        check=True,
    )
    cli = Path(sys.executable).parent / "iommufd-model"
    done = subprocess.run(
        [str(cli), "run", "--iommu", "amd", "--", str(binary)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "guest RAM: 64 MiB at IOVA 0" in done.stdout
    assert "unmapped 66 MiB" in done.stdout
    assert done.stdout.rstrip().endswith("ok")
