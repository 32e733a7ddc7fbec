"""The kernel's struct-size rules (iommufd_fops_ioctl + copy_struct_from_user) per command.

size < offsetofend(last) -> EINVAL; size > sizeof with a non-zero tail -> E2BIG; a zero tail
or a short-but-sufficient size is accepted and behaves exactly like the exact size; a size
running past the user's buffer -> EFAULT; an unknown command -> ENOTTY. Every refusal leaves
the whole model untouched.
"""

from __future__ import annotations

import errno

import pytest

from helpers import Scenario, run, snapshot, valid_cmd
from iommufd_model import uapi as U
from iommufd_model.core.main import registered_ops
from iommufd_model.testing import assert_errno

OPS = registered_ops()
CORE = {c: op for c, op in OPS.items() if (c & 0xFF) <= 0x94}
IDS = [f"{op.struct.__name__}" for op in CORE.values()]


def _with_size(raw: bytes, size: int, total: int | None = None, tail: bytes = b"") -> bytearray:
    buf = bytearray(raw) + bytearray(tail)
    if total is not None:
        buf = buf[:total].ljust(total, b"\0")
    buf[0:4] = size.to_bytes(4, "little")
    return buf


def _refused(sc: Scenario, cmd: int, buf: bytearray, code: int) -> None:
    before = snapshot(sc.fd)
    orig = bytes(buf)
    assert run(sc.fd, cmd, buf) == code
    assert snapshot(sc.fd) == before
    assert bytes(buf) == orig, "a refused ioctl wrote to the user's struct"


@pytest.mark.parametrize("cmd", list(CORE), ids=IDS)
def test_below_min_size_is_einval(cmd: int) -> None:
    sc = Scenario()
    op = CORE[cmd]
    raw = valid_cmd(sc, cmd).pack()
    for size in sorted({0, 4, op.min_size - 1}):
        _refused(sc, cmd, _with_size(raw, size), errno.EINVAL)


@pytest.mark.parametrize("cmd", list(CORE), ids=IDS)
def test_nonzero_tail_is_e2big(cmd: int) -> None:
    sc = Scenario()
    raw = valid_cmd(sc, cmd).pack()
    n = len(raw)
    for extra, tail in ((8, b"\0" * 7 + b"\1"), (1, b"\xff"), (64, b"\1" + b"\0" * 63)):
        _refused(sc, cmd, _with_size(raw, n + extra, tail=tail), errno.E2BIG)


@pytest.mark.parametrize("cmd", list(CORE), ids=IDS)
def test_zero_tail_behaves_like_exact_size(cmd: int) -> None:
    a, b = Scenario(), Scenario()
    raw = valid_cmd(a, cmd).pack()
    assert raw == valid_cmd(b, cmd).pack()
    exact = bytearray(raw)
    longer = _with_size(raw, len(raw) + 24, tail=bytes(24))
    ra, rb = run(a.fd, cmd, exact), run(b.fd, cmd, longer)
    assert ra == rb
    assert rb not in (errno.E2BIG,)
    assert snapshot(a.fd) == snapshot(b.fd)
    assert longer[4 : len(raw)] == exact[4:]
    assert longer[len(raw) :] == bytes(24), "the reply ran past the kernel struct"


@pytest.mark.parametrize("cmd", list(CORE), ids=IDS)
def test_min_size_behaves_like_full_size(cmd: int) -> None:
    """An old userspace's shorter struct: the missing tail reads as zero."""
    op = CORE[cmd]
    a, b = Scenario(), Scenario()
    st = valid_cmd(a, cmd)
    raw = bytearray(st.pack())
    raw[op.min_size :] = bytes(len(raw) - op.min_size)  # what the short struct cannot say
    full = bytearray(raw)
    # The short buffer is followed by bytes the kernel must neither read nor write.
    short = _with_size(bytes(raw[: op.min_size]), op.min_size, tail=b"\xaa" * 16)
    ra, rb = run(a.fd, cmd, full), run(b.fd, cmd, short)
    assert ra == rb
    assert rb != errno.EINVAL or ra == errno.EINVAL
    assert snapshot(a.fd) == snapshot(b.fd)
    assert short[op.min_size :] == b"\xaa" * 16, "the reply ran past the user's size"
    assert short[4 : op.min_size] == full[4 : op.min_size]


@pytest.mark.parametrize("cmd", list(CORE), ids=IDS)
def test_size_past_the_buffer_is_efault(cmd: int) -> None:
    sc = Scenario()
    raw = valid_cmd(sc, cmd).pack()
    n = len(raw)
    # declared exact size, buffer one byte short; declared larger than the struct, buffer exact
    _refused(sc, cmd, _with_size(raw, n, total=n - 1), errno.EFAULT)
    _refused(sc, cmd, _with_size(raw, n + 8, total=n), errno.EFAULT)
    # not even the size field is readable
    for short in (b"", b"\x28", b"\x28\0\0"):
        _refused(sc, cmd, bytearray(short), errno.EFAULT)


@pytest.mark.parametrize("cmd", list(CORE), ids=IDS)
def test_readonly_buffer_is_efault(cmd: int) -> None:
    sc = Scenario()
    before = snapshot(sc.fd)
    raw = valid_cmd(sc, cmd).pack()
    assert_errno(errno.EFAULT, lambda: sc.fd.ioctl(cmd, memoryview(raw)))
    assert snapshot(sc.fd) == before


UNKNOWN = [
    (0x3B << 8) | 0x95,
    (0x3B << 8) | 0x7F,
    (0x3B << 8) | 0xFF,
    (0x3C << 8) | 0x80,  # another ioctl type with a valid nr
    0,
    (3 << 30) | (40 << 16) | U.IOMMU_IOAS_MAP,  # _IOWR(';', 0x85, 40 bytes): not _IO
    (1 << 30) | (8 << 16) | U.IOMMU_DESTROY,
]


@pytest.mark.parametrize("cmd", UNKNOWN, ids=hex)
def test_unknown_command_is_enotty(cmd: int) -> None:
    assert cmd not in OPS
    sc = Scenario()
    buf = bytearray(U.IommuDestroy(size=8, id=sc.spare).pack())
    _refused(sc, cmd, buf, errno.ENOTTY)


def test_closed_fd_is_ebadf() -> None:
    sc = Scenario()
    fd = sc.fd
    fd.close()
    assert fd.closed
    assert run(fd, U.IOMMU_IOAS_ALLOC, bytearray(U.IommuIoasAlloc(size=12).pack())) == errno.EBADF
