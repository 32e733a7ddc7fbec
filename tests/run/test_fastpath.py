"""The server's short path for IOMMU_TEST_OP_ACCESS_RW against the general path.

``iommufd-model run`` serves an ioctl whose command has a short path (``FAST_OPS``:
``IommuFd.fast_ioctl``) by it when it takes the request, and by ``IommuFd.ioctl`` otherwise.
Two identical worlds get the same random requests and the same random changes between them
(unmaps, munmaps, an IOAS replaced under the access, a closed access fd, another process's
pages, a memfd, read-only and partial areas): one through the short path with the general
path behind it, as the server does, one through the general path only. Every errno, every
byte of the caller's memory and of the mapped pages, and every pin, page count and object
must come out the same, and the short path must have served a good share of the requests.
"""

from __future__ import annotations

import errno
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import MOCK_APERTURE, PAGE, World, snapshot
from iommufd_model.core.main import FAST_OPS
from iommufd_model.failnth import fail_nth
from iommufd_model.mock import selftest as T
from iommufd_model.process import Process
from iommufd_model.run.launch import run_program
from iommufd_model.uapi import iommufd as U

SIZE = T.IommuTestCmd.SIZE
RW = U.IOMMU_IOAS_MAP_READABLE | U.IOMMU_IOAS_MAP_WRITEABLE
FIXED = U.IOMMU_IOAS_MAP_FIXED_IOVA
READ = U.IOMMU_IOAS_MAP_READABLE
WRITE = U.IOMMU_IOAS_MAP_WRITEABLE
#: the caller's buffer for ACCESS_RW's uptr, and an address nothing maps
UBUF = 64 * PAGE
BAD_VA = 0x7FFF_0000_0000


def _test_cmd(op: int, id_: int, payload: bytes, size: int = SIZE) -> bytearray:
    buf = bytearray(struct.pack("<IIII", size, op, id_, 0) + payload.ljust(48, b"\0"))
    return buf + bytearray(8)


def _map(ictx: Any, ioas: int, va: int, length: int, iova: int, flags: int, caller: Any) -> None:
    st = U.IommuIoasMap(
        size=U.IommuIoasMap.SIZE, flags=flags | FIXED, ioas_id=ioas, user_va=va, length=length,
        iova=iova,
    )  # fmt: skip
    ictx.ioctl(U.IOMMU_IOAS_MAP, bytearray(st.pack()), caller=caller)


class Side:
    """One world: a mock machine, two IOASes, one access, areas of every kind."""

    def __init__(self, fast: bool) -> None:
        self.fast = fast
        self.hits = 0
        w = self.w = World(buf_len=128 * PAGE)
        self.proc: Process = w.proc
        self.other = w.machine.new_process()
        self.other_va = self.other.mmap(8 * PAGE)
        self.ictx = w.fd
        rng = random.Random(7)
        w.proc.write(w.va, rng.randbytes(128 * PAGE))
        self.other.write(self.other_va, rng.randbytes(8 * PAGE))
        self.ioas = [self.ictx.ioas_alloc(), self.ictx.ioas_alloc()]
        self.ictx.attach(w.dev_id, self.ioas[1])  # the second IOAS's pages are pinned
        memfd = self.proc.memfd_create(4 * PAGE)
        for ioas in self.ioas:
            base = MOCK_APERTURE
            _map(self.ictx, ioas, w.va, 8 * PAGE, base, RW, self.proc)  # a plain area
            _map(self.ictx, ioas, w.va + 8 * PAGE, 2 * PAGE, base + 8 * PAGE, RW, self.proc)
            # read-only, write-only, then (after a hole) an unaligned area, another mm's, a
            # memfd's
            _map(self.ictx, ioas, w.va + 10 * PAGE, 2 * PAGE, base + 10 * PAGE, READ, self.proc)
            _map(self.ictx, ioas, w.va + 12 * PAGE, PAGE, base + 12 * PAGE, WRITE, self.proc)
            skew = 100 if ioas == self.ioas[0] else 0  # a domain wants page alignment
            _map(self.ictx, ioas, w.va + 20 * PAGE + skew, PAGE, base + 20 * PAGE, RW, self.proc)
            _map(self.ictx, ioas, self.other_va, 4 * PAGE, base + 24 * PAGE, RW, self.other)
            self.ictx.ioas_map_file(ioas, memfd, 0, 4 * PAGE, iova=base + 28 * PAGE)
        self.access_fd = self._create_access(self.ioas[0])
        self.ioas_now = 0
        self.ubuf = self.proc.mmap(2 * PAGE)  # ACCESS_RW's user buffer

    def _create_access(self, ioas: int) -> int:
        buf = _test_cmd(T.IOMMU_TEST_OP_CREATE_ACCESS, ioas, struct.pack("<II", 0, 0))
        self.ictx.ioctl(T.IOMMU_TEST_CMD, buf)
        return int(struct.unpack_from("<I", buf, 16)[0])

    # -- requests and changes --------------------------------------------------------
    def access_rw(self, buf: bytearray) -> tuple[int, bytes]:
        """The request as ``Server._fast_ioctl`` then ``_ioctl`` serve it: (errno, struct)."""
        try:
            done = self.fast and self.ictx.fast_ioctl(T.IOMMU_TEST_CMD, bytes(buf), self.proc)
            self.hits += done is not None and done is not False
            if done is None or done is False:
                self.ictx.ioctl(T.IOMMU_TEST_CMD, buf)
        except OSError as exc:
            return exc.errno or -1, bytes(buf)
        return 0, bytes(buf)

    def change(self, what: int) -> None:
        """One change of the state the short path reads (the same on both sides)."""
        base = MOCK_APERTURE
        ioas = self.ioas[self.ioas_now]
        if what == 0:  # unmap an area (and map it back elsewhere in the buffer)
            self.ictx.ioas_unmap(ioas, base, 8 * PAGE)
            _map(self.ictx, ioas, self.w.va + 40 * PAGE, 8 * PAGE, base, RW, self.proc)
        elif what == 1:  # the caller's memory goes under the area
            self.proc.munmap(self.w.va + 2 * PAGE, PAGE)
        elif what == 2:  # the access moves to the other IOAS
            self.ioas_now ^= 1
            payload = struct.pack("<I", self.ioas[self.ioas_now])
            buf = _test_cmd(T.IOMMU_TEST_OP_ACCESS_REPLACE_IOAS, self.access_fd, payload)
            self.ictx.ioctl(T.IOMMU_TEST_CMD, buf)
        elif what == 3:  # the access fd is closed, its number reused by a new access
            self.proc.close(self.access_fd)
            fd = self._create_access(self.ioas[self.ioas_now])
            assert fd == self.access_fd
        elif what == 4:  # the other process's mm goes away
            self.other.gone = True

    def state(self) -> tuple[Any, ...]:
        """Everything the two paths must agree on: objects, areas, pins, page counts, and
        every byte of both processes' memory and of the memfd."""
        mem: list[bytes | int | None] = []
        for proc, va, n in ((self.proc, self.w.va, 128), (self.other, self.other_va, 8)):
            for i in range(n):
                try:
                    mem.append(proc.read(va + i * PAGE, PAGE))
                except OSError as exc:
                    mem.append(exc.errno)
        return snapshot(self.ictx), mem, self.proc.read(self.ubuf, 2 * PAGE)


def _request(rng: random.Random, access_fd: int, ubuf: int) -> bytearray:
    base = MOCK_APERTURE
    iova = base + rng.choice([0, 2, 8, 10, 12, 20, 24, 28, 31]) * PAGE + rng.randrange(-64, PAGE)
    length = rng.choice([1, 2, 8, 64, 100, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE, 0])
    if rng.random() < 0.02:
        length = T.ACCESS_MAX_LENGTH + 1
    flags = rng.choice([0, 0, 0, T.MOCK_ACCESS_RW_WRITE, T.MOCK_ACCESS_RW_WRITE])
    if rng.random() < 0.15:
        flags |= rng.choice([T.MOCK_ACCESS_RW_SLOW_PATH, T.MOCK_FLAGS_ACCESS_SYZ, 1 << 9])
    uptr = BAD_VA if rng.random() < 0.05 else ubuf + rng.randrange(PAGE)
    size = SIZE if rng.random() < 0.9 else rng.choice([SIZE - 4, SIZE + 8, 64, 68])
    fd = access_fd if rng.random() < 0.95 else rng.choice([access_fd + 1, 999])
    payload = struct.pack("<QQQII", iova, length, uptr, flags, 0)
    buf = _test_cmd(T.IOMMU_TEST_OP_ACCESS_RW, fd, payload, size)
    if size > SIZE:
        buf += bytearray(b"\x01" * (size - SIZE))
    return buf


def _sides() -> tuple[Side, Side]:
    fast, slow = Side(True), Side(False)
    assert fast.ubuf == slow.ubuf and fast.state() == slow.state()
    return fast, slow


@pytest.mark.parametrize("seed", range(4))
def test_random_requests_agree(seed: int) -> None:
    rng = random.Random(seed)
    fast, slow = _sides()
    for step in range(700):
        if rng.random() < 0.03:
            what = rng.randrange(5)
            fast.change(what)
            slow.change(what)
        buf = _request(rng, fast.access_fd, fast.ubuf)
        got = fast.access_rw(bytearray(buf))
        want = slow.access_rw(bytearray(buf))
        assert got == want, (step, buf.hex())
        if step % 50 == 0:
            assert fast.state() == slow.state(), step
    assert fast.state() == slow.state()
    assert 100 < fast.hits < 600, fast.hits  # each path served a good share
    assert fast.ictx.internal_errors == [] and slow.ictx.internal_errors == []


def test_fault_injection_sites_agree() -> None:
    """Under fail-nth the short path hits the same sites (the user copies) with the same
    errnos as the general path, and fails or succeeds at the same n."""
    fast, slow = _sides()
    for flags in (0, T.MOCK_ACCESS_RW_WRITE):
        for n in range(1, 4):
            buf = _test_cmd(
                T.IOMMU_TEST_OP_ACCESS_RW, fast.access_fd,
                struct.pack("<QQQII", MOCK_APERTURE + PAGE - 8, 16, fast.ubuf, flags, 0),
            )  # fmt: skip
            results = []
            for side in (fast, slow):
                with fail_nth(n) as fp:
                    results.append((side.access_rw(bytearray(buf)), fp.fired_site))
            assert results[0] == results[1], (flags, n, results)
    assert fast.hits and fast.state() == slow.state()


def test_only_the_test_command_has_a_short_path() -> None:
    assert set(FAST_OPS) == {T.IOMMU_TEST_CMD}
    fast, _slow = _sides()
    buf = bytes(_test_cmd(T.IOMMU_TEST_OP_MD_CHECK_MAP, 1, b""))
    assert fast.ictx.fast_ioctl(T.IOMMU_TEST_CMD, buf, fast.proc) is None
    assert fast.ictx.fast_ioctl(U.IOMMU_IOAS_MAP, buf, fast.proc) is None


# -- a real program through the server -----------------------------------------------------
PROGRAM = Path(__file__).parent / "c" / "access_rw_diff.c"


def _run_diff(binary: Path, tmp: Path, short: str, seed: int, n: int) -> tuple[str, Any]:
    out = tmp / f"out-{short}"
    os.environ["IOMMUFD_MODEL_SHORT_PATHS"] = short
    try:
        rc, server = run_program([str(binary), str(seed), str(n), str(out)], devices=1)
    finally:
        del os.environ["IOMMUFD_MODEL_SHORT_PATHS"]
    assert rc == 0 and server.internal_errors == []
    return out.read_text(), server


@pytest.mark.parametrize("seed", [1, 2])
def test_a_program_sees_the_same_with_and_without_short_paths(
    cc: Callable[[str, str], Path], tmp_path: Path, seed: int
) -> None:
    """``c/access_rw_diff.c``: random requests and changes under them (an area unmapped
    and mapped elsewhere, the access moved to another IOAS, its fd number taken by a pipe
    then by a new access, the caller's pages replaced, another process's area, gone
    processes' pinned pages, shared memory and a memfd written by the program, a pinned
    shared page unmapped): every result and every byte the same with the short paths
    (Python and compiled, through an mm and through the pinned pages) and without."""
    binary = cc("access_rw_diff", PROGRAM.read_text())
    on, server_on = _run_diff(binary, tmp_path, "1", seed, 3000)
    off, server_off = _run_diff(binary, tmp_path, "0", seed, 3000)
    assert on == off
    assert server_off._fastrw is None
    table = server_on._fastrw
    if table is not None:  # built: it served a good share, through the pinned pages too
        assert 900 < table.served < 2700 and table.served_frames > 100, (
            table.served,
            table.served_frames,
        )
    errnos = {line.split()[1] for line in on.splitlines() if line[0].isdigit()}
    assert {"0", str(errno.EFAULT), str(errno.EINVAL), str(errno.ENOENT)} <= errnos, errnos
    assert str(errno.EBADFD) in on and str(errno.EPERM) in errnos


def test_a_racing_dup2_is_seen_through_the_fd_generation(
    cc: Callable[[str, str], Path], tmp_path: Path
) -> None:
    """``c/fdgen_race.c``: one thread switches an fd number between two accesses with
    dup2 (no release, so no event reaches the server) while another reads through it; every
    read made with no switch in progress shows the access the number named. The switches are
    paced by the reads (one per 8 at the most), so however the machine schedules the two
    threads the compiled path served most reads on its cached check and asked the kernel
    again after switches."""
    binary = cc("fdgen_race", (PROGRAM.parent / "fdgen_race.c").read_text())
    rc, server = run_program([str(binary), "3000"], devices=1)
    assert rc == 0 and server.internal_errors == []
    table = server._fastrw
    if table is not None:
        assert table.served > 1000 and 0 < table.checks < table.served, (
            table.served,
            table.checks,
        )
