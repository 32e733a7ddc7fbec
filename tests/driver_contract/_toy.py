"""Install the example out-of-tree driver into a directory the way pip would lay it out.

A ``*.dist-info`` with ``METADATA`` and ``entry_points.txt`` (generated from the example's own
pyproject) next to the package: ``importlib.metadata`` then finds the entry point on
``sys.path`` exactly as for a pip-installed distribution, so the real discovery path is used.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "toy_iommu"


def install_toy(target: Path) -> Path:
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    shutil.copytree(EXAMPLE / "toy_iommu", target / "toy_iommu")
    dist = target / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    lines = []
    for group, eps in meta["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in eps.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return target
