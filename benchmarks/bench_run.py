"""Programs under ``iommufd-model run``: a whole kernel selftest run and threads hammering
ioctls, with a C reference. Figures only, no assertions.

    python benchmarks/bench_run.py            # add --quick for a short run

- The kernel's own ``iommufd`` selftest (Linux 7.2, built unmodified by the kit beside the
  repository when it is there): wall time of the whole run, cases passed.
- ``c/hammer.c``: THREADS threads on one iommufd, each looping IOAS_ALLOC, IOAS_MAP (64 KiB),
  IOAS_UNMAP, DESTROY. The reference is the same program doing as many real kernel ioctls
  (FIONREAD on a pipe): what a syscall round trip costs with no model behind it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KIT = HERE.parent.parent / "shared" / "kselftest" / "build.sh"
CLI = Path(sys.executable).parent / "iommufd-model"


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
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        hammer = Path(tmp, "hammer")
        subprocess.run(
            ["gcc", "-O2", "-o", str(hammer), str(HERE / "c" / "hammer.c"), "-lpthread"],
            check=True,
        )
        iters = 300 if quick else 2000
        for threads in (1, 2, 4):
            model = _hammer(hammer, threads, iters // threads, False)
            ref = _hammer(hammer, threads, 50_000, True)
            figures[f"hammer, {threads} thread(s): model ioctls/s"] = model
            figures[f"hammer, {threads} thread(s): kernel ioctls/s (C reference)"] = ref
            figures[f"hammer, {threads} thread(s): reference / model"] = ref / model
        if KIT.exists():
            subprocess.run(["bash", str(KIT), tmp], check=True, capture_output=True)
            for name in ("iommufd", "iommufd_fail_nth"):
                start = time.perf_counter()
                done = subprocess.run(
                    [str(CLI), "run", "--", str(Path(tmp, name))], capture_output=True, text=True
                )
                took = time.perf_counter() - start
                passed = len(re.findall(r"^ok \d+ ", done.stdout, re.M))
                figures[f"kernel selftest {name}: whole run, s"] = took
                figures[f"kernel selftest {name}: cases passed"] = passed
    return figures


def main() -> None:
    for key, value in run("--quick" in sys.argv).items():
        print(f"  {key:<58} {value:>14,.3f}")


if __name__ == "__main__":
    main()
