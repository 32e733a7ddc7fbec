"""The tree stays ruff-clean (lint and format) and ``mypy --strict`` clean: checked with the suite.

Both tools come with the test extras, so a missing tool is a failure, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: The code besides the packages that ``mypy --strict`` checks: the root conftest.py, the
#: framework's tests, each plugin's tests and the benchmarks (conftest.py files included).
CHECKED = (
    "conftest.py",
    "tests",
    *sorted(f"plugins/{p.parent.name}/tests" for p in ROOT.glob("plugins/*/tests")),
    "benchmarks",
)
#: The folders whose modules are imported by bare name: pytest's ``pythonpath`` (helpers, kutil,
#: failsweep, fuzzlib...) and benchmarks/ (_rig, _timing: run_all.py puts it on sys.path).
#: They are mypy's package bases besides the packages' ``mypy_path`` and the root.
IMPORT_ROOTS = (*PYPROJECT["tool"]["pytest"]["ini_options"]["pythonpath"], "benchmarks")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=None if env is None else os.environ | env,
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


def _module_name(path: Path, bases: list[Path]) -> str:
    """The name mypy's ``--explicit-package-bases`` gives a file: its path from the deepest
    base holding it (the root is the last resort)."""
    base = max((b for b in bases if path.is_relative_to(b)), key=lambda b: len(b.parts))
    parts = path.relative_to(base).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def mypy_runs() -> list[list[str]]:
    """The files of CHECKED in as few mypy runs as keep every module name unique within a run.

    A file is named as Python imports it (from the deepest import root holding it), so a shared
    module checked as a source and the same module imported by a test are one module. Several
    files still share a name: the conftest.py at the top of each import root (``conftest``) and
    each plugin's tests (``tests.conftest``, ``tests.test_uapi``... from the plugin's folder, a
    package base of ``mypy_path``); nothing imports those by name, and a folder's files go to
    one run together, so the relative imports between them (``from .conftest import``) resolve.
    """
    package_bases = PYPROJECT["tool"]["mypy"]["mypy_path"].split(":")
    bases = [ROOT / b for b in (*IMPORT_ROOTS, *package_bases)] + [ROOT]
    folders: dict[Path, list[Path]] = {}
    for top in CHECKED:
        files = [ROOT / top] if top.endswith(".py") else sorted((ROOT / top).rglob("*.py"))
        for f in files:
            folders.setdefault(f.parent, []).append(f)
    runs: list[tuple[set[str], list[str]]] = []
    for files in folders.values():
        names = {_module_name(f, bases) for f in files}
        paths = [str(f.relative_to(ROOT)) for f in files]
        for taken, run in runs:
            if not taken & names:
                taken |= names
                run += paths
                break
        else:
            runs.append((names, paths))
    return [run for _, run in runs]


def test_mypy_strict_clean_tests_and_benchmarks() -> None:
    """The tests and benchmarks are held to the packages' ``mypy --strict``: a test that reads an
    attribute which does not exist, or passes the wrong type, cannot check what it claims.

    The same cache as the packages' run (.mypy_cache), so the framework is analysed once. By hand:
    ``MYPYPATH=tests:tests/selftest:tests/robustness:tests/fuzz:benchmarks mypy
    --explicit-package-bases tests/core`` (any set of folders without two files of one name).
    """
    env = {"MYPYPATH": os.pathsep.join(IMPORT_ROOTS)}
    failures = []
    for files in mypy_runs():
        res = _run("mypy", "--explicit-package-bases", *files, env=env)
        if res.returncode != 0:
            failures.append(res.stdout + res.stderr)
    assert not failures, "\n".join(failures)


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
