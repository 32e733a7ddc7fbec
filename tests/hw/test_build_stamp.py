"""The build stamp: a compiled module older than its source is refused, not run.

An editable install keeps the extension built from the source as it was at install time, and
Python imports the extension before the ``.py`` beside it; without the stamp an edit or a pull
runs old code far from where it was changed (``hw/compiled.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import iommufd_model
from iommufd_model.hw import compiled


def _package(tmp_path: Path) -> Path:
    package = tmp_path / "pkg"
    (package / "hw").mkdir(parents=True)
    (package / "hw" / "walk.py").write_text("X = 1\n")
    (package / "fast.c").write_text("int x;\n")
    compiled.write_stamp(
        package, [(package / "hw" / "walk.py", "hw/walk"), (package / "fast.c", "_fast")]
    )
    (package / "hw" / "walk.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (package / "_fast.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    return package


def test_a_fresh_build_is_accepted(tmp_path: Path) -> None:
    assert compiled.stale_sources(_package(tmp_path)) == []


def test_an_edited_source_is_stale_python_and_c(tmp_path: Path) -> None:
    package = _package(tmp_path)
    (package / "hw" / "walk.py").write_text("X = 2\n")
    assert compiled.stale_sources(package) == [package / "hw" / "walk.py"]
    (package / "fast.c").write_text("int y;\n")
    assert set(compiled.stale_sources(package)) == {package / "hw" / "walk.py", package / "fast.c"}


def test_a_source_without_its_extension_is_not_stale(tmp_path: Path) -> None:
    """A pure install (no extension beside the source) runs the source itself."""
    package = _package(tmp_path)
    (package / "hw" / "walk.cpython-311-x86_64-linux-gnu.so").unlink()
    (package / "hw" / "walk.py").write_text("X = 2\n")
    assert compiled.stale_sources(package) == []


def test_a_pure_build_removes_the_stamp(tmp_path: Path) -> None:
    package = _package(tmp_path)
    compiled.write_stamp(package, [])
    assert not (package / compiled.STAMP).exists()
    assert compiled.stale_sources(package) == []


def test_load_walker_refuses_a_stale_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _package(tmp_path)
    (package / "__init__.py").write_text("")
    (package / "hw" / "__init__.py").write_text("")
    (package / "hw" / "walk.py").write_text("X = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"walk\.py: changed since it was compiled"):
        compiled.load_walker("pkg.hw.walk")


def test_the_installed_framework_matches_its_stamp() -> None:
    package = Path(iommufd_model.__file__).parent
    assert compiled.stale_sources(package) == []
