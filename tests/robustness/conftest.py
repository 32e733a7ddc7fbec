"""Fail-nth robustness tests: the totals of every sweep, printed at the end of the session
(``failsweep.py`` and ``tests/helpers.py`` are importable through pytest's ``pythonpath``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _fail_nth_totals(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the (sequence, n) points each fail-nth case tried, and the total."""
    yield
    from failsweep import TOTALS

    if not TOTALS:
        return
    lines: list[str] = []
    write = lines.append
    write("")
    write("fail-nth points tried (case: points / calls swept / seconds):")
    for name, st in TOTALS.items():
        extra = f"  [stopped at unsupported: {', '.join(st.unsupported)}]" if st.unsupported else ""
        write(f"  {name:40s} {st.points:6d} / {st.steps:3d} / {st.seconds:6.2f}{extra}")
    total = sum(st.points for st in TOTALS.values())
    secs = sum(st.seconds for st in TOTALS.values())
    write(f"  {'TOTAL':40s} {total:6d} / {sum(s.steps for s in TOTALS.values()):3d} / {secs:6.2f}")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if capman is None or tr is None:
        return
    with capman.global_and_fixture_disabled():
        for line in lines:
            tr.write_line(line)
