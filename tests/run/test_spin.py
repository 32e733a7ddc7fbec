"""The wait for a reply and for the next request: both sides spin a while before they sleep
when they run on different CPUs, and never when they share one (preload.c ``recv_reply``,
_uaccess.c ``Waiter``). What is tested is who spins when, and that a spinning wait returns
exactly what ``epoll.poll`` returns; never how fast it is."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

from iommufd_model.run import native
from iommufd_model.run.launch import run_program
from iommufd_model.run.server import SPIN_PAGE_SIZE, SPIN_PAGE_START

C = Path(__file__).parent / "c"
Build = Callable[[str, str], Path]

#: (server_cpu, client_cpu, spin_until) at the start of the spin page
PAGE = struct.Struct("<I60xI60xq")


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@pytest.fixture
def pinned() -> Iterator[Callable[[int], None]]:
    """Pin this thread (the server's, in run_program) to a CPU; the affinity comes back after."""
    before = os.sched_getaffinity(0)
    yield lambda cpu: os.sched_setaffinity(0, {cpu})
    os.sched_setaffinity(0, before)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A spin page as the server creates it, open read-write."""
    path = tmp_path / "spin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, SPIN_PAGE_SIZE)
    os.pwrite(fd, SPIN_PAGE_START, 0)
    yield fd, path
    os.close(fd)


def set_client_cpu(fd: int, cpu: int) -> None:
    os.pwrite(fd, struct.pack("<I", cpu), 64)


def read_page(fd: int) -> tuple[int, int, int]:
    got: tuple[int, int, int] = PAGE.unpack(os.pread(fd, PAGE.size, 0))
    return got


def test_the_program_names_its_cpu_and_the_server_spins_only_across_cpus(
    cc: Build, pinned: Callable[[int], None]
) -> None:
    """The program (pinned by itself) writes its CPU with every request; the server, pinned
    elsewhere, spins at its waits, and pinned to the program's CPU never spins."""
    allowed = cpus()
    if len(allowed) < 2:
        pytest.skip("one CPU: nothing to spin across")
    prog = str(cc("spin", (C / "spin.c").read_text()))
    pinned(allowed[0])
    rc, server = run_program([prog, str(allowed[0])])
    assert rc == 0
    assert server.spin_stats()[0] == 0
    pinned(allowed[1])
    rc, server = run_program([prog, str(allowed[0])])
    assert rc == 0
    assert server.spin_stats()[0] > 0


def test_spinning_is_off_with_a_zero_budget(
    cc: Build, pinned: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """IOMMUFD_MODEL_SPIN_US=0: no spin page, no spin, the same results."""
    allowed = cpus()
    if len(allowed) < 2:
        pytest.skip("one CPU: nothing to spin across")
    monkeypatch.setenv("IOMMUFD_MODEL_SPIN_US", "0")
    prog = str(cc("spin", (C / "spin.c").read_text()))
    pinned(allowed[1])
    # the program finds no spin page: its CHECK(path != NULL) fails (exit 1), nothing else
    rc, server = run_program([prog, str(allowed[0])])
    assert rc == 1
    assert server.spin_stats() == (0, 0, 0)
    assert server.internal_errors == []


def test_waiter_returns_what_epoll_returns(page: tuple[int, Path]) -> None:
    """Ready descriptors, hangups included, come back as from select.epoll.poll, spinning or
    not; a wait with nothing ready returns [] after its timeout."""
    fd, _ = page
    ep = select.epoll()
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        for a, _b in pairs:
            ep.register(a.fileno(), select.EPOLLIN)
        me = os.sched_getaffinity(0)
        set_client_cpu(fd, max(me) + 1)  # another CPU: every empty wait spins
        waiter = native.Waiter(ep.fileno(), fd, 50_000)
        assert waiter.wait(0.002) == []
        assert waiter.stats()[0] == 1
        pairs[1][1].send(b"x")
        pairs[3][1].close()
        want = sorted(ep.poll(0))
        assert sorted(waiter.wait(1.0)) == want
        assert {f for f, _ in want} == {pairs[1][0].fileno(), pairs[3][0].fileno()}
        assert waiter.stats()[0] == 1  # events were ready: no spin
    finally:
        ep.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_waiter_spins_only_when_the_client_is_elsewhere(
    page: tuple[int, Path], pinned: Callable[[int], None]
) -> None:
    fd, _ = page
    cpu = cpus()[0]
    pinned(cpu)
    ep = select.epoll()
    try:
        waiter = native.Waiter(ep.fileno(), fd, 50_000)
        assert waiter.wait(0.001) == []  # the client's CPU is unknown: no spin
        assert waiter.stats()[0] == 0
        assert read_page(fd)[0] == cpu  # the server's CPU is published
        set_client_cpu(fd, cpu)
        assert waiter.wait(0.001) == []
        assert waiter.stats()[0] == 0
        set_client_cpu(fd, cpu + 1)
        assert waiter.wait(0.001) == []
        assert waiter.stats()[0] == 1
    finally:
        ep.close()


def test_waiter_budget_adapts(page: tuple[int, Path]) -> None:
    """A wait far longer than the longest spin halves the budget, down to none; a short one
    after a spin gave up grows it again (the cpuidle haltpoll governor's rule)."""
    fd, _ = page
    set_client_cpu(fd, max(cpus()) + 1)
    ep = select.epoll()
    a, b = socket.socketpair()
    try:
        ep.register(a.fileno(), select.EPOLLIN)
        waiter = native.Waiter(ep.fileno(), fd, 80_000)
        budgets = []
        for _ in range(4):
            waiter.wait(0.005)  # nothing comes: 5 ms > 80 us
            budgets.append(waiter.stats()[2])
        assert budgets == [40_000, 20_000, 10_000, 0]
        b.send(b"x")
        assert waiter.wait(1.0) == [(a.fileno(), select.EPOLLIN)]  # ready at once: unchanged
        assert waiter.stats()[2] == 0
    finally:
        ep.close()
        a.close()
        b.close()


def test_waiter_signal_raises_as_epoll(page: tuple[int, Path]) -> None:
    """A signal whose handler raises ends the wait with that exception, as epoll.poll's
    (PEP 475); one whose handler returns lets the wait run to its timeout."""
    fd, _ = page
    ep = select.epoll()
    waiter = native.Waiter(ep.fileno(), fd, 10_000)
    seen: list[int] = []

    def returns(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    def raises(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, returns)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        assert waiter.wait(0.05) == []
        assert seen == [signal.SIGALRM]
        signal.signal(signal.SIGALRM, raises)
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        with pytest.raises(KeyboardInterrupt):
            waiter.wait(-1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        ep.close()


def test_a_bad_spin_setting_is_a_usage_error(
    cc: Build, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """IOMMUFD_MODEL_SPIN_US that is no number: the CLI says so and exits 2 before the
    program runs; the Python API raises ValueError (the server closed, nothing left)."""
    marker = tmp_path / "ran"
    prog = cc(
        "touch_marker",
        f'#include <stdio.h>\nint main(void) {{ return !fopen("{marker}", "w"); }}\n',
    )
    monkeypatch.setenv("IOMMUFD_MODEL_SPIN_US", "fast")
    cli = Path(sys.executable).parent / "iommufd-model"
    done = subprocess.run([str(cli), "run", "--", str(prog)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "IOMMUFD_MODEL_SPIN_US" in done.stderr
    with pytest.raises(ValueError, match="IOMMUFD_MODEL_SPIN_US"):
        run_program([str(prog)])
    assert not marker.exists()
    monkeypatch.setenv("IOMMUFD_MODEL_SPIN_US", "0")
    rc, server = run_program([str(prog)])
    assert rc == 0 and marker.exists()
    assert server.spin_stats() == (0, 0, 0)
