"""The runner itself: small C programs under ``run_program`` (bad pointers, fd semantics,
poll on a vEVENTQ fd, a client killed mid-ioctl, leaks), and the server's state after them."""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from iommufd_model import creds
from iommufd_model.machine import Machine
from iommufd_model.run.launch import build_machine, preload_path, run_program
from iommufd_model.run.server import Server

Build = Callable[[str, str], Path]

C = Path(__file__).parent / "c"


def run(binary: Path, *args: str, machine: Machine | None = None) -> tuple[int, Server]:
    return run_program([str(binary), *args], machine=machine)


def run_clean(binary: Path, runs: int = 1) -> None:
    """Run ``binary`` (``runs`` times on one machine): it must exit 0 and leave nothing."""
    machine = build_machine(["mock"], 0)
    before = machine.memory.frames_in_use
    for _ in range(runs):
        rc, server = run(binary, machine=machine)
        assert rc == 0
        assert_clean(server, machine, before)


def assert_clean(server: Server, machine: Machine, frames_before: int) -> None:
    """Nothing of the run is left: no file, no internal error, every frame returned."""
    assert server.internal_errors == []
    assert server.files == {}
    assert machine.memory.frames_in_use == frames_before


def test_preload_is_built() -> None:
    lib = preload_path()
    assert lib.exists()
    syms = subprocess.run(
        ["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    for name in ("open", "openat", "ioctl", "read", "pwrite", "mmap", "munmap", "opendir"):
        assert f" T {name}\n" in syms, name


@pytest.mark.parametrize(
    ("program", "runs"),
    [
        ("efault", 1),  # garbage pointers: EFAULT, the server lives on
        ("fdsem", 1),  # dup / fork / close
        ("vevent_poll", 1),  # poll() wakes on an event another thread queues
        ("killed", 2),  # killed mid-ioctl, leaking everything: the next run starts clean
        ("threads", 1),  # threads and processes sharing one model, one thread sending garbage
        ("fdtable", 1),  # the preload's model-fd table and pid cache at their edges
    ],
)
def test_program_leaves_nothing(cc: Build, program: str, runs: int) -> None:
    run_clean(cc(program, (C / f"{program}.c").read_text()), runs)


def test_cli_runs_a_program_and_passes_its_status(cc: Build) -> None:
    prog = cc("status", "#include <stdlib.h>\nint main(int c, char **v) { return atoi(v[1]); }\n")
    cli = Path(sys.executable).parent / "iommufd-model"
    done = subprocess.run([str(cli), "run", "--", str(prog), "7"], capture_output=True)
    assert done.returncode == 7
    done = subprocess.run([str(cli), "run", "--", "/nonexistent/program"], capture_output=True)
    assert done.returncode == 127
    assert b"nonexistent" in done.stderr


def test_cli_cap_grants_a_capability(cc: Build) -> None:
    """``run --cap NAME``: the model counts the program as holding NAME in its initial user
    namespace (RLIMIT_MODE SET succeeds, even from a user namespace of the program's own);
    without it the program's real capabilities decide; an unknown name is a usage error
    (exit status 2, nothing run)."""
    cli = str(Path(sys.executable).parent / "iommufd-model")
    prog = str(cc("capns", (C / "capns.c").read_text()))
    granted = subprocess.run([cli, "run", "--cap", "CAP_SYS_RESOURCE", "--", prog])
    assert granted.returncode == 0
    plain = subprocess.run([cli, "run", "--", prog])
    assert plain.returncode == (0 if creds.capable(creds.CAP_SYS_RESOURCE) else errno.EPERM)
    both = subprocess.run([cli, "run", "--cap=CAP_IPC_LOCK", "--cap=sys_resource", "--", prog])
    assert both.returncode == 0
    if not subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True).returncode:
        in_ns = subprocess.run(
            [cli, "run", "--cap", "CAP_SYS_RESOURCE", "--", "unshare", "-U", "-r", prog]
        )
        assert in_ns.returncode == 0
    bad = subprocess.run(
        [cli, "run", "--cap", "CAP_NOPE", "--", "sh", "-c", "echo ran"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "ran" not in bad.stdout
    assert "unknown capability 'CAP_NOPE'" in bad.stderr


@pytest.mark.parametrize("path", ["/proc/self/task/%d/fail-nth", "/proc/thread-self/fail-nth"])
def test_fail_nth_file_is_served(cc: Build, path: str) -> None:
    rc, server = run(cc("failnth", (C / "failnth.c").read_text()), path)
    assert rc == 0
    assert server.internal_errors == []


def test_status_shows_the_models_pins(cc: Build) -> None:
    """VmPin of /proc/<pid>/status counts what the model pinned from that mm, whichever way
    the program opens it (fopen, open; self, PID, task/TID, thread-self)."""
    run_clean(cc("vmpin", (C / "vmpin.c").read_text()))


def test_capability_of_a_user_namespace_does_not_count(cc: Build) -> None:
    """A program in a user namespace of its own holds CAP_SYS_RESOURCE there (its CapEff
    shows it), but capable() checks the initial namespace: RLIMIT_MODE SET stays EPERM."""
    if subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True).returncode:
        pytest.skip("unshare -U -r is not permitted here: no user namespace to try")
    prog = cc("capns", (C / "capns.c").read_text())
    rc, server = run_program(["unshare", "-U", "-r", str(prog)])
    assert rc == errno.EPERM
    assert server.internal_errors == []
