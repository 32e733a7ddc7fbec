"""The tree stays ruff-clean (lint and format) and ``mypy --strict`` clean: checked with the suite.

Both tools come with the test extras, so a missing tool is a failure, not a skip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_clean() -> None:
    res = _run("ruff", "check", ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format_clean() -> None:
    # One formatting for the whole tree, so diffs show changes of substance only.
    res = _run("ruff", "format", "--check", ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict_clean() -> None:
    res = _run("mypy")  # configuration (strict, packages) lives in pyproject.toml
    assert res.returncode == 0, res.stdout + res.stderr


def test_one_attrs_spelling() -> None:
    """Records are ``@attrs.define`` (slots are its default), ``@attrs.frozen`` when
    immutable, ``@attrs.define(eq=False)`` when compared by identity: nothing else."""
    allowed = {"@attrs.define", "@attrs.frozen", "@attrs.define(eq=False)"}
    seen: dict[str, str] = {}
    for path in ROOT.glob("**/*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for line in path.read_text().splitlines():
            deco = line.strip()
            if deco.startswith(("@attr.", "@attrs.")):
                seen.setdefault(deco, str(path.relative_to(ROOT)))
    odd = {deco: where for deco, where in seen.items() if deco not in allowed}
    assert not odd, odd
