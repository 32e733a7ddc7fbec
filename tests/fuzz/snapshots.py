"""Check (3) of the fuzz: a refused uAPI call leaves the model as it was, compared with the
fail-nth sweep's full snapshot (tests/robustness/failsweep.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from failsweep import full_snapshot, snapshot_diff
from fuzzlib import FuzzBug, errno_sig


def refused_unchanged(fd: Any, call: Callable[[], object]) -> str:
    """``ok``, or the errno name of a refusal that changed nothing (else :class:`FuzzBug`).

    An invalidation that handled some entries before refusing one changed state legitimately
    (the kernel reports how many it handled): only a refusal with none handled is compared.
    """
    before = full_snapshot(fd)
    try:
        call()
    except OSError as exc:
        name = errno_sig(exc)
        handled = getattr(exc, "handled", 0)
        if handled:
            return f"{name}@{handled}"
        after = full_snapshot(fd)
        if after != before:
            raise FuzzBug(f"refused call ({name}) changed the model:\n"
                          + snapshot_diff(before, after)) from exc  # fmt: skip
        return name
    return "ok"
