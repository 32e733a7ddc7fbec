"""The model server's CPU per call in one run of a program under ``iommufd-model run``.

    python benchmarks/profile_run.py OUT.txt [run options] -- PROGRAM [ARGS...]
    # e.g. OUT.txt --cap CAP_SYS_RESOURCE -- ../shared/kselftest-build/iommufd

Runs the CLI's ``run`` in this process with every ioctl served by the general path
(``IommuFd._ioctl``) and every call of the mock page table's ``map``, ``unmap`` and
``read_and_clear_dirty`` timed in thread CPU time (``time.thread_time_ns``: the server's own
thread, whatever else the machine runs), and writes per ioctl (IOMMU_TEST_CMD per op) and
per table call (also split by the ioctl it ran in) the count, the total and the time per call.
Requests the short paths serve (``fast_ioctl``, the compiled ACCESS_RW table) are not seen.
Each timed call adds about 1 us. Figures only, no assertions.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from iommufd_model import cli
from iommufd_model.core import main as core_main
from iommufd_model.mock import iommufd_test, iommupt
from iommufd_model.uapi import iommufd as U

NAMES = {
    value: name
    for name, value in vars(U).items()
    if name.startswith("IOMMU_") and isinstance(value, int) and value >> 8 == U.IOMMUFD_TYPE
}
#: ioctl name -> [calls, thread CPU ns]
totals: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
_current = ["(outside ioctls)"]


def _name(cmd: int, buf: Any) -> str:
    if cmd == iommufd_test.IOMMU_TEST_CMD and not isinstance(buf, int) and len(buf) >= 8:
        return f"IOMMU_TEST_CMD op {int.from_bytes(bytes(buf[4:8]), 'little')}"
    return NAMES.get(cmd, hex(cmd))


def _wrap_ioctl() -> None:
    general = core_main.IommuFd._ioctl

    def timed(self: core_main.IommuFd, cmd: int, buf: Any, caller: Any) -> int:
        name = _name(cmd, buf)
        outer, _current[0] = _current[0], name
        start = time.thread_time_ns()
        try:
            return general(self, cmd, buf, caller)
        finally:
            entry = totals[name]
            entry[0] += 1
            entry[1] += time.thread_time_ns() - start
            _current[0] = outer

    setattr(core_main.IommuFd, "_ioctl", timed)  # noqa: B010 (a method replaced for timing)


def _wrap_table(op: str) -> None:
    real: Callable[..., Any] = getattr(iommupt.MockPageTable, op)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time_ns()
        try:
            return real(*args, **kwargs)
        finally:
            spent = time.thread_time_ns() - start
            for key in (f"table.{op}", f"  table.{op} in {_current[0]}"):
                totals[key][0] += 1
                totals[key][1] += spent

    setattr(iommupt.MockPageTable, op, timed)


def report(out: str) -> None:
    lines = [f"server thread CPU, whole process: {time.thread_time_ns() / 1e9:.2f} s"]
    for key, (calls, ns) in sorted(totals.items(), key=lambda item: -item[1][1]):
        lines.append(f"{key:60s} {calls:8d} calls {ns / 1e9:8.3f} s {ns / calls / 1e3:10.1f} us")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    _wrap_ioctl()
    for op in ("map", "unmap", "read_and_clear_dirty"):
        _wrap_table(op)
    try:
        return cli.main(["run", *argv[1:]])
    finally:
        report(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
