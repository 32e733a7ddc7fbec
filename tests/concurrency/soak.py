"""The 10-minute concurrency soak (not run in CI): the stress and race tests of this folder in
rotation, every driver, until the time is up. Any failure stops it with the traceback.

    nice python tests/concurrency/soak.py            # 600 s
    python tests/concurrency/soak.py --seconds 60    # shorter

Prints one line per kind of run (runs, seconds, calls made) and the totals; the figures of a
real run are in docs/concurrency.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # as pytest's pythonpath: this package and helpers.py
os.environ.setdefault("IOMMUFD_MODEL_STRICT", "1")  # a model bug raises, as under pytest

import pytest  # noqa: E402

from concurrency import test_isolation, test_races  # noqa: E402
from concurrency.test_stress import stress  # noqa: E402
from concurrency.threads import DRIVERS, GUEST_DRIVERS  # noqa: E402


def plan() -> list[tuple[str, Callable[..., Counter[str] | None]]]:
    """(name, run(seed)) for every kind of soak run."""
    # Callable[..., ]: mypy infers no lambda that binds a loop variable by a default argument
    # against a Callable[[int], ] (it takes one more parameter than that)
    runs: list[tuple[str, Callable[..., Counter[str] | None]]] = []
    for d in DRIVERS:
        runs.append((f"stress[{d}]", lambda seed, d=d: stress(d, rounds=40, seed=seed)))
        runs.append(
            (
                f"dma-vs-unmap[{d}]",
                lambda _s, d=d: test_races.test_dma_racing_unmap_sees_the_old_translation_or_faults(
                    d
                ),
            )
        )
        runs.append(
            (
                f"destroy-vs-use[{d}]",
                lambda _s, d=d: test_races.test_destroy_racing_use_is_ebusy_or_complete(d),
            )
        )
    for d in GUEST_DRIVERS:
        for acc in (False, True):
            runs.append(
                (
                    f"guest-invalidations[{d},{'acc' if acc else 'trap'}]",
                    lambda _s, d=d, acc=acc: (
                        test_races.test_concurrent_guest_invalidations_all_complete(d, acc)
                    ),
                )
            )
    for d in ("amd", "arm_smmuv3"):
        runs.append(
            (
                f"vevents[{d}]",
                lambda _s, d=d: test_races.test_vevents_arrive_exactly_once_and_in_order(d),
            )
        )
    runs.append(
        (
            "page-faults[mock]",
            lambda _s: test_races.test_page_faults_arrive_exactly_once_and_in_order(),
        )
    )
    runs.append(
        (
            "garbage-and-close[mock]",
            lambda _s: test_isolation.test_garbage_and_closed_fds_do_not_disturb_a_working_thread(),
        )
    )
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    args = ap.parse_args()
    runs = plan()
    done: Counter[str] = Counter()
    secs: defaultdict[str, float] = defaultdict(float)
    calls: dict[str, Counter[str]] = {}
    skipped: set[str] = set()
    start = time.perf_counter()
    seed = 0
    while time.perf_counter() - start < args.seconds:
        for name, run in runs:
            if name in skipped:
                continue
            t0 = time.perf_counter()
            try:
                got = run(seed)
            except pytest.skip.Exception:
                skipped.add(name)
                continue
            except BaseException:
                traceback.print_exc()
                print(f"FAILED: {name} (seed {seed}) after {time.perf_counter() - start:.0f} s")
                return 1
            secs[name] += time.perf_counter() - t0
            done[name] += 1
            calls.setdefault(name, Counter()).update(got or {})
            if time.perf_counter() - start >= args.seconds:
                break
        seed += 1
    total = time.perf_counter() - start
    for name, _ in runs:
        if done[name]:
            c = calls[name]
            extra = f"  calls {sum(c.values())} ({dict(sorted(c.items()))})" if c else ""
            print(f"{name:<36} runs {done[name]:>4}  {secs[name]:7.1f} s{extra}")
    print(
        f"total: {sum(done.values())} runs in {total:.0f} s, no failure; skipped: {sorted(skipped)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
