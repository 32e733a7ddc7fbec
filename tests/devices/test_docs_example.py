"""docs/devices.md's example runs as printed."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "devices.md"


def test_example_prints_what_the_doc_shows() -> None:
    block = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    shown = re.findall(r"^# (\[.*\])$", block, re.M)[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(DOC), "exec"), {})
    assert out.getvalue().strip() == shown
