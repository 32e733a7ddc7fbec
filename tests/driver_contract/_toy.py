"""Build the guide's example driver (and drivers derived from it) as real distributions.

``pip install --target`` builds a wheel from the example's own ``pyproject.toml`` with the
setuptools of this environment (no index, no build isolation: nothing is downloaded) and
unpacks it with its ``*.dist-info``; ``importlib.metadata`` then finds the entry point on
``sys.path`` exactly as for a pip-installed distribution, so the real discovery path is used.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "toy_iommu"


def pip_install(project: Path, target: Path) -> None:
    """Build ``project`` into a wheel and install it into ``target`` (not the environment)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(project)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def install_toy(target: Path) -> Path:
    """The guide's example driver, built and installed into ``target``."""
    pip_install(EXAMPLE, target)
    return target


def write_project(
    root: Path, name: str, module: str, source: str, entry_points: dict[str, str]
) -> Path:
    """A one-module distribution ``name`` whose entry points register driver plugins."""
    root.mkdir(parents=True)
    eps = "\n".join(f'{ep} = "{module}:{obj}"' for ep, obj in entry_points.items())
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "0.1.0"\nlicense = "MIT"\n'
        f'[project.entry-points."iommufd_model.drivers"]\n{eps}\n'
        f'[tool.setuptools]\npy-modules = ["{module}"]\n'
    )
    (root / f"{module}.py").write_text(source)
    return root
