"""Byte-level fuzz tests: make the harness modules importable (the suite runs with
--import-mode=importlib, which leaves sys.path alone)."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent, _HERE.parent / "robustness"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
