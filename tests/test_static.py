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
