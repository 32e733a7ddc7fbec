"""The few Linux system calls the run server needs that ``os`` lacks, through ctypes.

``process_vm_readv``/``process_vm_writev`` are how the server does ``copy_from_user`` and
``copy_to_user`` on the program (a short transfer means an unmapped byte: EFAULT);
``pidfd_open``/``pidfd_getfd`` give the server its own reference to a file the program
names by fd number (IOAS_MAP_FILE's memfd, a selftest access fd), as ``fget()`` does.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_PIDFD_OPEN = 434
_SYS_PIDFD_GETFD = 438
#: the kernel's UIO_MAXIOV: iovecs per process_vm_* call
IOV_MAX = 1024


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.syscall.restype = ctypes.c_long


def _vm(
    fn: ctypes._NamedFuncPointer,
    pid: int,
    local: ctypes.Array[ctypes.c_char],
    remote: list[tuple[int, int]],
) -> int:
    riov = (_Iovec * len(remote))(*[_Iovec(a, n) for a, n in remote])
    liov = _Iovec(ctypes.addressof(local), len(local))
    got = fn(pid, ctypes.byref(liov), 1, riov, len(remote), 0)
    if got < 0:
        return -ctypes.get_errno()
    return int(got)


def vm_read(pid: int, va: int, n: int) -> bytes | None:
    """``n`` bytes at ``va`` in ``pid``, or None if any of them cannot be read."""
    if n == 0:
        return b""
    if va < 0 or va + n > 1 << 64:
        return None
    buf = ctypes.create_string_buffer(n)
    pos = 0
    while pos < n:
        chunk = min(n - pos, 1 << 30)
        got = _vm(
            _libc.process_vm_readv,
            pid,
            (ctypes.c_char * chunk).from_buffer(buf, pos),
            [(va + pos, chunk)],
        )
        if got != chunk:
            return None
        pos += chunk
    return buf.raw


def vm_write(pid: int, va: int, data: bytes) -> bool:
    """Write ``data`` at ``va`` in ``pid``; False if any byte could not be written."""
    n = len(data)
    if n == 0:
        return True
    if va < 0 or va + n > 1 << 64:
        return False
    buf = ctypes.create_string_buffer(data, n)
    return _vm(_libc.process_vm_writev, pid, buf, [(va, n)]) == n


def vm_readable_pages(pid: int, vas: list[int]) -> bool:
    """True if one byte of every address in ``vas`` can be read (each faulted in)."""
    one = ctypes.create_string_buffer(IOV_MAX)
    for i in range(0, len(vas), IOV_MAX):
        part = vas[i : i + IOV_MAX]
        if part[0] < 0 or part[-1] >= 1 << 64:
            return False
        local = (ctypes.c_char * len(part)).from_buffer(one)
        if _vm(_libc.process_vm_readv, pid, local, [(va, 1) for va in part]) != len(part):
            return False
    return True


def pidfd_open(pid: int) -> int:
    fd = int(_libc.syscall(_SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def pidfd_getfd(pid: int, target_fd: int) -> int:
    """A new fd of this process for ``target_fd`` of ``pid`` (EBADF if it is not open)."""
    if not 0 <= target_fd < 1 << 31:
        raise OSError(errno.EBADF, "bad fd")
    pfd = pidfd_open(pid)
    try:
        fd = int(
            _libc.syscall(
                _SYS_PIDFD_GETFD, ctypes.c_int(pfd), ctypes.c_int(target_fd), ctypes.c_uint(0)
            )
        )
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd
    finally:
        os.close(pfd)
