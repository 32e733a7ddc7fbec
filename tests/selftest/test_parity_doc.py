"""docs/selftest-parity.md must not claim a port that does not exist.

Every row marked *ported* names a pytest node id; each must be collected from tests/selftest
(or tests/robustness, for the fail_nth port).
The counts at the top must match the table.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "selftest-parity.md"


def _rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[4] in ("ported", "not yet"):
            rows.append(cells)
    return rows


def test_parity_doc_ported_rows_are_collected() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-o",
            "addopts=--import-mode=importlib -p no:cacheprovider",
            "tests/selftest",
            "tests/robustness",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    collected = {line for line in res.stdout.splitlines() if "::" in line}
    rows = _rows()
    ported = [r for r in rows if r[4] == "ported"]
    assert ported, "the table lists no ported test"
    for row in ported:
        node = row[5].strip("`")
        assert node in collected, f"{node} is marked ported but is not a collected test"
    for row in rows:
        if row[4] == "not yet":
            assert row[5], f"{row[2]} is not ported and gives no reason"


def test_parity_doc_counts_match_table() -> None:
    text = DOC.read_text()
    rows = _rows()
    for source in ("iommufd.c", "iommufd_fail_nth.c"):
        mine = [r for r in rows if r[0] == source]
        done = sum(r[4] == "ported" for r in mine)
        summary = re.search(rf"^\| {re.escape(source)} \| (\d+) \| (\d+) \| (\d+) \|", text, re.M)
        assert summary is not None, source
        assert tuple(map(int, summary.groups())) == (len(mine), done, len(mine) - done)
