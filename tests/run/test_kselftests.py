"""Linux 7.2's own iommufd selftests, built unmodified, run through ``iommufd-model run``.

Every case must pass except those named in expected_failures.txt, and every case named there
must still fail (the file stays true). The kit that builds the binaries lives beside the
repository in CI; without it these tests skip and say so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs

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


def _conditions() -> set[str]:
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return set() if caps >> CAP_SYS_RESOURCE & 1 else {"no-cap-sys-resource"}


def expected_failures(binary: str) -> dict[str, str]:
    """Cases of ``binary`` expected to fail here, with their reasons."""
    out: dict[str, str] = {}
    held = _conditions()
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


def run_selftest(binary: Path, timeout: float) -> tuple[int, str]:
    cmd = [str(Path(sys.executable).parent / "iommufd-model"), "run", "--", str(binary)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ})
    return done.returncode, done.stdout + done.stderr


def check(binary: Path, planned: int, timeout: float) -> Tap:
    rc, out = run_selftest(binary, timeout)
    tap = parse_tap(out)
    assert tap.planned == planned, out[-3000:]
    seen = tap.passed | tap.failed | tap.skipped
    assert len(seen) == planned, f"{planned - len(seen)} cases reported no result:\n{out[-3000:]}"
    expected = expected_failures(binary.name)
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
    tap = check(kselftest_bins / "iommufd", 246, timeout=900)
    assert len(tap.passed) >= 246 - len(tap.skipped) - len(expected_failures("iommufd"))


def test_iommufd_fail_nth_selftest(kselftest_bins: Path) -> None:
    tap = check(kselftest_bins / "iommufd_fail_nth", 8, timeout=900)
    assert not tap.skipped and not tap.failed
