"""The README's example runs as printed, and the docs stand alone (no link out of the repo)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_python_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2  # the typed example, then the raw ioctl once
    scope: dict[str, object] = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), scope)  # one session, as a reader
    assert scope["other_ioas"] != scope["ioas_id"]


def test_readme_uses_the_typed_layer() -> None:
    text = (ROOT / "README.md").read_text()
    for call in ("fd.ioas_alloc()", "fd.ioas_map(", "fd.hwpt_alloc(", "fd.attach("):
        assert call in text, call
    assert text.count("fd.ioctl(") == 1  # the raw bytes, shown once


def test_docs_point_nowhere_outside() -> None:
    for path in DOCS:
        text = path.read_text()
        for outside in ("../shared", "/work/", "DESIGN.md"):
            assert outside not in text, f"{path.relative_to(ROOT)} refers to {outside}"
        for link in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" not in link:
                assert (path.parent / link).exists(), f"{path.name}: broken link {link}"
