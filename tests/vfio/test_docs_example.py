"""docs/vfio.md's example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "vfio.md"


def test_example_runs() -> None:
    block = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    scope: dict[str, object] = {}
    exec(compile(block, str(DOC), "exec"), scope)
    assert scope["dev_id"]
