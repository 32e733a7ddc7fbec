"""Fixtures of the runner's tests: the kernel's selftest binaries and small C programs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: the kit that builds Linux 7.2's unmodified iommufd selftests (CI has shared/ beside the clone)
KIT = REPO.parent / "shared" / "kselftest"


def kit_build(script: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The binaries the kit's ``script`` builds, in a new directory (skip without the kit)."""
    build = KIT / script
    if not build.exists():
        pytest.skip(f"the kernel selftest kit is absent ({build} does not exist)")
    out = tmp_path_factory.mktemp("kselftest")
    subprocess.run(["bash", str(build), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def kselftest_bins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``iommufd`` and ``iommufd_fail_nth`` built once per session (skip without the kit)."""
    return kit_build("build.sh", tmp_path_factory)


@pytest.fixture(scope="session")
def vfio_bins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seven VFIO selftest binaries built once per session (skip without the kit)."""
    return kit_build("build-vfio.sh", tmp_path_factory)


@pytest.fixture(scope="session")
def uapi_headers() -> Path:
    """The kit's exported Linux 7.2 uAPI headers (skip without the kit)."""
    headers = KIT / "usr-include"
    if not (headers / "linux" / "iommufd.h").exists():
        pytest.skip(f"Linux 7.2 uAPI headers are absent ({headers} does not exist)")
    return headers


@pytest.fixture(scope="session")
def cc(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """Compile a small C program (source text) with gcc; returns the binary's path."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("cprog")
    # the programs' helpers, and the runner's own headers (run/spin_page.h)
    include = [f"-I{Path(__file__).parent / 'c'}", f"-I{REPO / 'framework/iommufd_model/run'}"]

    def build(name: str, source: str) -> Path:
        src = out / f"{name}.c"
        src.write_text(source)
        binary = out / name
        subprocess.run(
            [
                "gcc",
                "-O1",
                "-Wall",
                "-D_GNU_SOURCE",
                *include,
                str(src),
                "-o",
                str(binary),
                "-lpthread",
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "LC_ALL": "C"},
        )
        return binary

    return build
