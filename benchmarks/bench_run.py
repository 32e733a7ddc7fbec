"""Programs under ``iommufd-model run``: a whole kernel selftest run and threads hammering
ioctls, with a C reference. Figures only, no assertions.

    python benchmarks/bench_run.py            # add --quick for a short run (no selftests)

- The kernel's own ``iommufd`` and ``iommufd_fail_nth`` selftests (Linux 7.2, built unmodified
  by the kit beside the repository when it is there): wall time of the whole run, the CPU
  time of the program, its children and the model server together, cases passed; by
  default, without the spinning waits, and pinned to one CPU.
- ``c/hammer.c``: 1 and 4 threads on one iommufd, each looping IOAS_ALLOC, IOAS_MAP (64 KiB),
  IOAS_UNMAP, DESTROY. The reference is the same program doing as many real kernel ioctls
  (FIONREAD on a pipe): what a syscall round trip costs with no model behind it.
- ``c/access_rw.c``: the selftest's hot loop alone (IOMMU_TEST_OP_ACCESS_RW around a page
  boundary, reads and writes in turn), on the fast path and with MOCK_ACCESS_RW_SLOW_PATH,
  the same with a mock domain attached first, so that the pages stay pinned (the selftest's
  mock_domain variants: a request across the page boundary copies through the pinned pages
  rather than pinning them), and on the fast and pinned paths with the server's short paths
  off (``IOMMUFD_MODEL_SHORT_PATHS=0``) or on the fast path without the spinning waits
  (``IOMMUFD_MODEL_SPIN_US=0``): CPU per request of the
  program and the server together, from two runs of different lengths (so the start-up
  cancels out), and the program's own share and wall time per request (its clocks over the
  loop, as the program prints them).

The load average is printed before and after: on a shared machine the wall times follow it,
the CPU times much less.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KIT = HERE.parent.parent / "shared" / "kselftest" / "build.sh"
CLI = Path(sys.executable).parent / "iommufd-model"
#: the runner without its spinning waits (docs/running-programs.md, "Speed")
NO_SPIN = {"IOMMUFD_MODEL_SPIN_US": "0"}


def _children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def _timed(
    argv: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run ``argv`` (with ``env`` added); (the result, wall seconds, CPU seconds of it and
    its children)."""
    cpu = _children_cpu()
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return done, time.perf_counter() - start, _children_cpu() - cpu


def _hammer(binary: Path, threads: int, iters: int, reference: bool) -> float:
    """ioctls per second of one hammer run."""
    argv = [str(binary), str(threads), str(iters)]
    if reference:
        argv.append("reference")
    else:
        argv = [str(CLI), "run", "--", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    _kind, _threads, ops, secs = out[-4:]
    return int(ops) / float(secs)


def run(quick: bool = False) -> dict[str, float]:
    figures: dict[str, float] = {"load average at start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        hammer = Path(tmp, "hammer")
        subprocess.run(
            ["gcc", "-O2", "-o", str(hammer), str(HERE / "c" / "hammer.c"), "-lpthread"],
            check=True,
        )
        iters = 300 if quick else 2000
        for threads in (1, 4):
            model = _hammer(hammer, threads, iters // threads, False)
            ref = _hammer(hammer, threads, 50_000, True)
            figures[f"hammer, {threads} thread(s): model ioctls/s"] = model
            figures[f"hammer, {threads} thread(s): kernel ioctls/s (C reference)"] = ref
            figures[f"hammer, {threads} thread(s): reference / model"] = ref / model
        rw = Path(tmp, "access_rw")
        subprocess.run(["gcc", "-O2", "-o", str(rw), str(HERE / "c" / "access_rw.c")], check=True)
        # the server's short paths (docs/running-programs.md) on, and off for comparison
        off = {"IOMMUFD_MODEL_SHORT_PATHS": "0"}
        for path, env in (
            ("fast path", {}),
            ("fast path, no spin", NO_SPIN),
            ("slow path", {}),
            ("slow path, pages pinned", {}),
            ("fast path, short paths off", off),
            ("slow path, pages pinned, short paths off", off),
        ):
            extra = ["slow", "pinned"] if "pinned" in path else ["slow"] if "slow" in path else []
            n0, n1 = 500, 5000 if quick else 40_000
            cpus = []
            for n in (n0, n1):
                argv = [str(CLI), "run", "--", str(rw), str(n), *extra]
                done, _wall, cpu = _timed(argv, env)
                done.check_returncode()
                cpus.append(cpu)
            per = (cpus[1] - cpus[0]) / (n1 - n0) * 1e6
            figures[f"ACCESS_RW loop, {path}: CPU us per request (program + server)"] = per
            # the program's own wall and CPU over its loop (its last line: "access_rw N wall
            # cpu"); with the spin, CPU buys wall time (docs/running-programs.md, "Speed")
            loop_wall, loop_cpu = (float(x) for x in done.stdout.split()[-2:])
            figures[f"ACCESS_RW loop, {path}: program CPU us per request"] = loop_cpu / n1 * 1e6
            figures[f"ACCESS_RW loop, {path}: wall us per request"] = loop_wall / n1 * 1e6
        if KIT.exists() and not quick:
            subprocess.run(["bash", str(KIT), tmp], check=True, capture_output=True)
            # Each request is a synchronous round trip: by default each side spins a while
            # for the other when they run on different CPUs; without the spin every wakeup
            # crosses CPUs and wakes an idle one; `taskset -c 0` keeps the pair on one CPU,
            # where neither spins (docs/running-programs.md, "Speed"). The runs grant
            # CAP_SYS_RESOURCE as tests/run/test_kselftests.py does (the sandbox lacks it).
            cpu0 = str(sorted(os.sched_getaffinity(0))[0])
            for name, how in (
                ("iommufd", ""),
                ("iommufd", "no spin"),
                ("iommufd", f"taskset -c {cpu0}"),
                ("iommufd_fail_nth", ""),
            ):
                argv = [str(CLI), "run", "--cap", "CAP_SYS_RESOURCE", "--"]
                argv.append(str(Path(tmp, name)))
                if how.startswith("taskset"):
                    argv = ["taskset", "-c", cpu0, *argv]
                done, wall, cpu = _timed(argv, NO_SPIN if how == "no spin" else None)
                passed = len(re.findall(r"^ok \d+ (?!.*# SKIP)", done.stdout, re.M))
                label = f"{name}, {how}" if how else name
                figures[f"kernel selftest {label}: whole run, wall s"] = wall
                figures[f"kernel selftest {label}: whole run, CPU s"] = cpu
                figures[f"kernel selftest {label}: cases passed"] = passed
    figures["load average at end"] = os.getloadavg()[0]
    return figures


def main() -> None:
    for key, value in run("--quick" in sys.argv).items():
        print(f"  {key:<58} {value:>14,.3f}")


if __name__ == "__main__":
    main()
