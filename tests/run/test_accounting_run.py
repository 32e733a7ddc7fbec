"""Pinned-page accounting of a real program under ``iommufd-model run``: its own
RLIMIT_MEMLOCK (``ulimit -l``), its own CAP_IPC_LOCK, its real uid (Linux 7.2 pages.c
``iopt_alloc_pages()``, ``incr_user_locked_vm()``, ``update_mm_locked_vm()``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from iommufd_model import creds
from iommufd_model.run.launch import build_machine, run_program

Build = Callable[[str, str], Path]
C = Path(__file__).parent / "c"


def _run(prog: Path, *args: str, granted: tuple[str, ...] = ()) -> int:
    """Run ``prog`` with RLIMIT_MEMLOCK at 64 KiB (16 pages) and the capabilities ``granted``
    (``run --cap``); the run leaves nothing."""
    machine = build_machine(["mock"], 0)
    machine.grant_caps(*granted)
    before = machine.memory.frames_in_use
    cmd = " ".join(["ulimit -l 64 && exec", str(prog), *args])
    rc, server = run_program(["sh", "-c", cmd], machine=machine)
    assert server.internal_errors == []
    assert machine.memory.frames_in_use == before
    return rc


def test_enomem_where_the_kernel_gives_it(cc: Build, capfd: pytest.CaptureFixture[str]) -> None:
    """Without CAP_IPC_LOCK: ENOMEM past 16 pages of the user's locked_vm, nothing left by
    the refused map (pins, IOPTEs, VmPin); a forked child of the same user is refused too;
    with RLIMIT_MODE per process (when the run may set it) VmLck is charged instead."""
    prog = cc("memlock", (C / "memlock.c").read_text())
    rc = _run(prog)
    out = capfd.readouterr().out
    assert rc == 0, out
    assert "user: ENOMEM past 16 pages" in out
    assert "user: a child of the same user gets ENOMEM" in out
    if creds.capable(creds.CAP_SYS_RESOURCE):
        assert "mm: ENOMEM past 16 pages of VmLck" in out
    else:
        assert "mm: RLIMIT_MODE needs CAP_SYS_RESOURCE" in out


def test_cap_ipc_lock_is_not_charged(cc: Build, capfd: pytest.CaptureFixture[str]) -> None:
    """With CAP_IPC_LOCK the program's pages are IOPT_PAGES_ACCOUNT_NONE: 20 pages map
    under a 16-page RLIMIT_MEMLOCK."""
    if not creds.capable(creds.CAP_IPC_LOCK):
        pytest.skip("the test process lacks CAP_IPC_LOCK: the program cannot hold it")
    prog = cc("memlock", (C / "memlock.c").read_text())
    rc = _run(prog, "keep")
    out = capfd.readouterr().out
    assert rc == 0, out
    assert "keep: 20 pages mapped" in out


def test_a_granted_cap_ipc_lock_is_not_charged(
    cc: Build, capfd: pytest.CaptureFixture[str]
) -> None:
    """``run --cap CAP_IPC_LOCK``: the program's pages are IOPT_PAGES_ACCOUNT_NONE although it
    dropped the capability from its own effective set: 20 pages map under a 16-page limit."""
    prog = cc("memlock", (C / "memlock.c").read_text())
    rc = _run(prog, "granted", granted=("CAP_IPC_LOCK",))
    out = capfd.readouterr().out
    assert rc == 0, out
    assert "granted: 20 pages mapped without CAP_IPC_LOCK of its own" in out


def test_credentials_read_after_each_change(cc: Build, capfd: pytest.CaptureFixture[str]) -> None:
    """The server keeps the credentials it read between a program's calls, but never one the
    program changed since: CAP_IPC_LOCK through capset, RLIMIT_MEMLOCK through setrlimit,
    prlimit, syscall(SYS_prlimit64) and a child's prlimit of its parent, the real uid
    through setreuid, the user namespace through unshare: each map right after a change
    gets the kernel's answer for the new credentials (tests/run/c/creds.c)."""
    if not (creds.capable(creds.CAP_IPC_LOCK) and creds.capable(creds.CAP_NAMES["CAP_SETUID"])):
        pytest.skip("the test process lacks CAP_IPC_LOCK or CAP_SETUID: the program cannot")
    prog = cc("creds", (C / "creds.c").read_text())
    machine = build_machine(["mock"], 0)
    before = machine.memory.frames_in_use
    rc, server = run_program([str(prog)], machine=machine)
    out = capfd.readouterr().out
    assert rc == 0, out
    assert server.internal_errors == []
    assert machine.memory.frames_in_use == before
    for line in (
        "capset: CAP_IPC_LOCK seen at each map",
        "rlimit: setrlimit, prlimit and syscall(SYS_prlimit64) seen at each map",
        "rlimit: a child's prlimit of its parent seen at the parent's map",
        "setreuid: the real uid's user seen at each map",
    ):
        assert line in out
    assert "unshare: " in out
    assert server.creds_generation >= 9  # each change above was reported
