"""Fail-nth fault injection, like the kernel's ``/proc/self/fail-nth`` + ``fail_iommufd``.

The kernel's iommufd_fail_nth selftest writes ``n`` to ``/proc/self/task/<tid>/fail-nth``;
the n-th fault-injection site the task then reaches (a slab or page allocation, a
``iommufd_should_fail()`` in ``iommufd_get_object()``, the mock domain's map, the pin
accounting ...) fails, and the test checks that the ioctl unwinds cleanly. The model does
the same with a context-managed switch::

    with fail_nth(3) as fp:           # the 3rd failpoint reached inside the block fails
        fd.ioctl(cmd, buf)            # -> OSError(fp.fired_errno), state unchanged
    fp.fired, fp.fired_site, fp.count # did it fire, where, how many sites were reached

Model code marks every place that can fail in the kernel with :func:`failpoint`. When no
switch is armed a failpoint is one global flag test. When one is armed, every site reached
is counted; the n-th raises ``err(errno)`` once (as the kernel's counter, which disarms
itself after firing), so the unwinding code runs with failpoints passing. A sweep raises
``n`` from 1 until the switch no longer fires: then ``n`` exceeded the sites the call
reaches and the call ran to completion.

Sites pass their own errno where the kernel's failing primitive has a fixed one: object
lookups fail with ENOENT (``iommufd_get_object()``), user copies with EFAULT (a failed
``copy_{from,to}_user``); every other site raises the switch's errno (ENOMEM by default).
The site names (``module.function``) are listed in docs/robustness.md.
"""

from __future__ import annotations

import errno as _errno
import threading
from collections.abc import Callable
from typing import Any

import attrs

from iommufd_model.errors import err
from iommufd_model.locking import MODEL_LOCK

__all__ = ["FailNth", "SweepResult", "armed", "fail_nth", "failpoint", "sweep"]

# The only thing a disarmed failpoint looks at: how many threads have a window armed.
_ARMED = 0
# Each thread's armed window: fail-nth is per task in the kernel (/proc/self/task/<tid>/...),
# so one thread's window never fails another thread's calls (docs/concurrency.md).
_local = threading.local()


class FailNth:
    """One armed fail-nth window (see the module docstring); use through :func:`fail_nth`."""

    def __init__(self, n: int, errno: int = _errno.ENOMEM) -> None:
        if n < 1:
            raise ValueError("fail_nth counts sites from 1")
        self.n = n
        self.errno = errno
        self.count = 0  # failpoints reached while armed (including the one that fired)
        self.sites: list[str] = []  # their names, in order
        self.fired_site: str | None = None
        self.fired_errno: int | None = None

    @property
    def fired(self) -> bool:
        return self.fired_site is not None

    def hit(self, site: str, code: int | None) -> None:
        self.count += 1
        self.sites.append(site)
        if self.count == self.n:
            self.fired_site = site
            self.fired_errno = self.errno if code is None else code
            raise err(self.fired_errno, f"fail_nth: injected failure #{self.n} at {site}")

    def __enter__(self) -> FailNth:
        global _ARMED
        if getattr(_local, "current", None) is not None:
            raise RuntimeError("fail_nth windows do not nest")
        with MODEL_LOCK:
            _local.current = self
            _ARMED += 1
        return self

    def __exit__(self, *exc: object) -> None:
        global _ARMED
        with MODEL_LOCK:
            _ARMED -= 1
            _local.current = None

    def __repr__(self) -> str:
        state = f"fired at {self.fired_site}" if self.fired else "not fired"
        return f"<fail_nth n={self.n} {state}, {self.count} sites>"


def fail_nth(n: int, errno: int = _errno.ENOMEM) -> FailNth:
    """Arm fail-nth for a ``with`` block: the ``n``-th failpoint reached raises ``errno``."""
    return FailNth(n, errno)


def armed() -> bool:
    """Whether this thread has a fail-nth window armed."""
    return getattr(_local, "current", None) is not None


def failpoint(site: str, code: int | None = None) -> None:
    """A place that can fail in the kernel; raises only inside an armed :func:`fail_nth`.

    ``code`` is the errno the kernel's failing primitive returns there, if fixed (ENOENT for
    an object lookup, EFAULT for a user copy); otherwise the armed switch's errno is used.
    """
    if _ARMED:
        current = getattr(_local, "current", None)
        if current is not None:
            current.hit(site, code)


@attrs.define
class SweepResult:
    """What a sweep of one call did: the n values tried and where each failure was injected."""

    points: int = 0  # n values whose injected failure fired (the call failed)
    sites: list[str] = attrs.Factory(list)  # the fired site of each point, by n
    reached: int = 0  # sites the final, successful call reached
    result: Any = None  # what the successful call returned


def sweep(
    call: Callable[[], Any],
    check_failed: Callable[[FailNth, OSError | None], None],
    *,
    errno: int = _errno.ENOMEM,
    limit: int = 100_000,
    out: SweepResult | None = None,
) -> SweepResult:
    """Run ``call`` with fail-nth n = 1, 2, ... until the injection no longer fires.

    After every fired point, ``check_failed(fp, exc)`` judges it (``exc`` is the OSError
    the call raised, or None if it swallowed the failure and succeeded); it should compare
    the model state with a snapshot taken before. The last run is the real, successful call
    (it reached every site without one failing); its return value is ``result``. Whatever
    that last call raises propagates; pass ``out`` to keep the counts in that case.
    """
    if out is None:
        out = SweepResult()
    for n in range(1, limit + 1):
        exc: OSError | None = None
        ret: Any = None
        with fail_nth(n, errno) as fp:
            try:
                ret = call()
            except OSError as e:
                if not fp.fired:
                    raise
                exc = e
        if not fp.fired:
            out.reached = fp.count
            out.result = ret
            return out
        out.points += 1
        out.sites.append(fp.fired_site or "")
        check_failed(fp, exc)
    raise RuntimeError(f"fail_nth sweep did not converge within {limit} points")
