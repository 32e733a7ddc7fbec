"""The fail-nth switch itself: counting, firing once, errno choice, disarming, sweeps."""

from __future__ import annotations

import contextlib
import errno

import pytest

from iommufd_model import failnth
from iommufd_model.failnth import fail_nth, failpoint, sweep


def three_sites() -> str:
    failpoint("a")
    failpoint("b", errno.ENOENT)
    failpoint("c")
    return "done"


def test_nth_site_fires_once_with_its_errno() -> None:
    with fail_nth(2) as fp, pytest.raises(OSError) as e:
        three_sites()
    assert e.value.errno == errno.ENOENT  # the site's own errno wins
    assert (fp.fired, fp.fired_site, fp.count, fp.sites) == (True, "b", 2, ["a", "b"])
    with fail_nth(3, errno.EAGAIN) as fp, pytest.raises(OSError) as e:
        three_sites()
    assert e.value.errno == errno.EAGAIN and fp.fired_site == "c"
    # Past the last site nothing fires; every site was still counted.
    with fail_nth(4) as fp:
        assert three_sites() == "done"
    assert not fp.fired and fp.count == 3
    # After firing, later sites pass (the kernel's counter disarms itself).
    with fail_nth(1) as fp:
        with pytest.raises(OSError):
            failpoint("x")
        failpoint("y")
    assert fp.count == 2 and fp.fired_site == "x"


def test_disarmed_and_not_nested() -> None:
    assert not failnth.armed()
    three_sites()  # no window: nothing fails
    with fail_nth(1):
        assert failnth.armed()
        with pytest.raises(RuntimeError), fail_nth(1):
            pass
    assert not failnth.armed()
    with pytest.raises(ValueError):
        fail_nth(0)


def test_sweep_counts_points_and_reports_swallowed_failures() -> None:
    seen: list[tuple[str | None, int | None]] = []
    res = sweep(
        three_sites,
        lambda fp, exc: seen.append((fp.fired_site, None if exc is None else exc.errno)),
    )
    assert res.points == 3 and res.reached == 3 and res.result == "done"
    assert seen == [("a", errno.ENOMEM), ("b", errno.ENOENT), ("c", errno.ENOMEM)]

    def swallow() -> None:
        with contextlib.suppress(OSError):
            failpoint("s")

    got: list[object] = []
    sweep(swallow, lambda fp, exc: got.append(exc))
    assert got == [None]  # the checker is told the failure was swallowed
