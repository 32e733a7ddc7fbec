"""Linux 7.2's own iommufd selftests, built unmodified, run through ``iommufd-model run``.

Every case must pass except those named in expected_failures.txt, and every case named there
must still fail (the file stays true). The kit that builds the binaries lives beside the
repository in CI; without it these tests skip and say so.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest

from iommufd_model.core.ucmd import OPS, Ucmd
from iommufd_model.run.launch import run_program
from iommufd_model.uapi import iommufd as U

HERE = Path(__file__).parent
CAP_SYS_RESOURCE = 24
_TAP = re.compile(r"^(ok|not ok) \d+ (\S+)(?: # (SKIP|XFAIL)\b.*)?$")


@attrs.define
class Tap:
    passed: set[str]
    failed: set[str]
    skipped: set[str]
    planned: int


def parse_tap(text: str) -> Tap:
    """The kselftest harness's TAP: ``ok N name``, ``not ok N name``, ``# SKIP`` directives."""
    tap = Tap(set(), set(), set(), -1)
    for line in text.splitlines():
        if line.startswith("1.."):
            tap.planned = int(line[3:])
        m = _TAP.match(line)
        if not m:
            continue
        status, name, directive = m.groups()
        if directive == "SKIP":
            tap.skipped.add(name)
        elif status == "ok":
            tap.passed.add(name)
        else:
            tap.failed.add(name)
    return tap


#: what the main run of ``iommufd`` grants the program (``iommufd-model run --cap``): the
#: capability a selftest run as root on a VM holds and this sandbox's bounding set lacks
GRANTED = ("CAP_SYS_RESOURCE",)


def _conditions(granted: Sequence[str] = ()) -> set[str]:
    """The conditions of expected_failures.txt that hold for a run granting ``granted``."""
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    if caps >> CAP_SYS_RESOURCE & 1 or "CAP_SYS_RESOURCE" in granted:
        return set()
    return {"no-cap-sys-resource"}


def expected_failures(binary: str, granted: Sequence[str] = ()) -> dict[str, str]:
    """Cases of ``binary`` expected to fail in a run granting ``granted``, with their reasons."""
    out: dict[str, str] = {}
    held = _conditions(granted)
    for raw in (HERE / "expected_failures.txt").read_text().splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        head, _, why = raw.partition(" -- ")
        words = head.split()
        if words[0] != binary:
            continue
        if len(words) == 4 and words[2] == "if" and words[3] not in held:
            continue
        out[words[1]] = why
    return out


def run_selftest(binary: Path, timeout: float, granted: Sequence[str] = ()) -> tuple[int, str]:
    cli = str(Path(sys.executable).parent / "iommufd-model")
    cmd = [cli, "run", *(f"--cap={cap}" for cap in granted), "--", str(binary)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ})
    return done.returncode, done.stdout + done.stderr


def check(binary: Path, planned: int, timeout: float, granted: Sequence[str] = ()) -> Tap:
    rc, out = run_selftest(binary, timeout, granted)
    tap = parse_tap(out)
    assert tap.planned == planned, out[-3000:]
    seen = tap.passed | tap.failed | tap.skipped
    assert len(seen) == planned, f"{planned - len(seen)} cases reported no result:\n{out[-3000:]}"
    expected = expected_failures(binary.name, granted)
    unexpected = sorted(tap.failed - expected.keys())
    stale = sorted(expected.keys() & tap.passed)
    unknown = sorted(expected.keys() - seen)
    assert not unexpected, f"cases failing unexpectedly: {unexpected}\n{out[-6000:]}"
    assert not stale, f"cases in expected_failures.txt that pass now: {stale}"
    assert not unknown, f"expected_failures.txt names cases that do not exist: {unknown}"
    assert "internal error" not in out, out[-3000:]
    assert rc == (1 if tap.failed else 0), out[-2000:]
    return tap


def test_iommufd_selftest(kselftest_bins: Path) -> None:
    """The whole ``iommufd`` binary, run as on a VM as root: with CAP_SYS_RESOURCE granted
    (``--cap``), every case passes but the five the kernel skips too (no vIOMMU variant)."""
    tap = check(kselftest_bins / "iommufd", 246, timeout=900, granted=GRANTED)
    assert not expected_failures("iommufd", GRANTED)
    assert (len(tap.passed), len(tap.skipped)) == (241, 5)


def test_iommufd_selftest_without_the_grant(
    kselftest_bins: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Without ``--cap``, the program has only its real capabilities, as on a kernel: where the
    test process lacks CAP_SYS_RESOURCE, exactly the cases expected_failures.txt names for
    that fail, each at IOMMU_OPTION RLIMIT_MODE SET with the kernel's EPERM
    (``iommufd_option_rlimit_mode()``, Linux 7.2 ioas.c); with it, they pass. Only those
    cases run (the harness's ``-r FIXTURE.VARIANT.TEST``)."""
    cases = sorted(
        expected_failures("iommufd", ()).keys() - expected_failures("iommufd", GRANTED).keys()
    )
    assert len(cases) == 3, cases
    # what RLIMIT_MODE SET answers the program, in the server (this process)
    answers: list[int] = []
    option = OPS[U.IOMMU_OPTION]

    def spy(ucmd: Ucmd) -> None:
        rlimit_set = (ucmd.cmd.option_id, ucmd.cmd.op) == (
            U.IOMMU_OPTION_RLIMIT_MODE,
            U.IOMMU_OPTION_OP_SET,
        )
        try:
            option.handler(ucmd)
        except OSError as exc:
            if rlimit_set:
                answers.append(exc.errno or 0)
            raise
        if rlimit_set:
            answers.append(0)

    monkeypatch.setitem(OPS, U.IOMMU_OPTION, attrs.evolve(option, handler=spy))
    argv = [str(kselftest_bins / "iommufd"), *(a for case in cases for a in ("-r", case))]
    rc, server = run_program(argv)
    out = capfd.readouterr().out
    tap = parse_tap(out)
    assert server.internal_errors == []
    assert tap.planned == len(cases), out
    if _conditions():
        assert sorted(tap.failed) == cases, out
        assert answers == [errno.EPERM] * len(cases), answers
        assert rc == 1
    else:
        assert sorted(tap.passed) == cases, out
        assert 0 in answers and errno.EPERM not in answers
        assert rc == 0


def test_iommufd_fail_nth_selftest(kselftest_bins: Path) -> None:
    tap = check(kselftest_bins / "iommufd_fail_nth", 8, timeout=900)
    assert not tap.skipped and not tap.failed
