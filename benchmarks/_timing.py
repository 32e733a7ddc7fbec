"""Timing helpers shared by the benchmarks: rates, never assertions."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

SECONDS = 0.5  # how long each figure is measured for


def rate(fn: Callable[[int], object], args: Sequence[int], seconds: float = SECONDS) -> float:
    """Calls per second of ``fn``: whole passes over ``args`` for at least ``seconds``."""
    passes = 0
    begin = time.perf_counter()
    deadline = begin + seconds
    while not passes or time.perf_counter() < deadline:
        for arg in args:
            fn(arg)
        passes += 1
    return passes * len(args) / (time.perf_counter() - begin)


def own_loop(fn: Callable[[int], int], per_round: int, seconds: float = SECONDS / 2) -> float:
    """Operations per second of a driver that runs ``rounds`` passes in its own (compiled)
    loop: the rounds double until one call lasts ``seconds``, so call overhead vanishes."""
    rounds = 1
    while True:
        start = time.perf_counter()
        fn(rounds)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return rounds * per_round / elapsed
        rounds *= 4


def vendor() -> str:
    """The first installed vendor driver (the mock when none is installed)."""
    names = {ep.name for ep in entry_points(group="iommufd_model.drivers")}
    for name in ("amd", "intel_vtd", "arm_smmuv3"):
        if name in names:
            return name
    return "mock"
