"""Running model calls from several threads the way a VMM does, and checking what is left.

:func:`run_threads` starts every body behind one barrier with a tiny switch interval (so the
interpreter switches threads every few bytecodes and interleavings are dense), joins them with
a deadline, and re-raises the first failure of any thread. :func:`check_all` is the oracle
after the join: the object table, users counts, pins and frame references of every iommufd
(:func:`tests.helpers.check_invariants`).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable

from tests.helpers import check_invariants

from iommufd_model.core.main import IommuFd

DRIVERS = ("mock", "amd", "arm_smmuv3", "intel_vtd")
SWITCH = 1e-6  # seconds: sys.setswitchinterval while the threads run


def run_threads(bodies: Iterable[Callable[[], None]], *, deadline: float = 120.0) -> None:
    """Run each body in its own thread, all released at once; raise the first failure."""
    bodies = list(bodies)
    errors: list[BaseException] = []
    start = threading.Barrier(len(bodies))

    def main(body: Callable[[], None]) -> None:
        start.wait()
        try:
            body()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(b,), daemon=True) for b in bodies]
    old = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(deadline)
    finally:
        sys.setswitchinterval(old)
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"threads still running after {deadline} s (deadlock?): {hung}"
    if errors:
        raise errors[0]


def check_all(fds: Iterable[IommuFd]) -> None:
    """The invariants of every open iommufd, and that no ioctl hit a model bug."""
    for fd in fds:
        assert not fd.internal_errors, fd.internal_errors
        if not fd.closed:
            # The mock's tables are not in machine memory; a vendor's are (left out here).
            mock = all(hw.driver_name == "mock" for hw in fd.machine.iommus)
            check_invariants(fd, kernel_frames=mock)
