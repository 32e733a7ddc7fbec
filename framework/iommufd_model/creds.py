"""What iommufd reads of its caller's credentials, read from a real host process.

Linux 7.2's iommufd charges pinned pages by what ``current`` is (drivers/iommu/iommufd/
pages.c): ``capable(CAP_IPC_LOCK)`` when the pages are made (``iopt_alloc_pages()``), the
caller's ``RLIMIT_MEMLOCK`` when they are charged (``incr_user_locked_vm()``,
``__account_locked_vm()``) and its user (``current_user()``, the real uid). The model's
callers are real processes: the Python process itself for the in-process API
(:class:`iommufd_model.process.Process`), the program's processes under ``iommufd-model run``
(run/process.py). This module reads those three things of a pid (0: the calling process),
through ``capget(2)``, ``prlimit(2)`` and ``/proc``, as cheaply as a map can afford.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import struct
import threading
from collections.abc import Iterable

#: the capability numbers of Linux 7.2's include/uapi/linux/capability.h, by name
CAP_NAMES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        [
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ",
            "CAP_PERFMON",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        ]
    )
}
CAP_IPC_LOCK = CAP_NAMES["CAP_IPC_LOCK"]
CAP_SYS_RESOURCE = CAP_NAMES["CAP_SYS_RESOURCE"]
#: RLIM_INFINITY as the kernel compares it (an unsigned long)
RLIM_INFINITY = (1 << 64) - 1

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


_libc = ctypes.CDLL(None, use_errno=True)
_capget = _libc.capget
_capget.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_capset = _libc.capset
_capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
# struct __user_cap_header_struct {u32 version; int pid} and two __user_cap_data_struct
# {u32 effective, permitted, inheritable}: one buffer pair per thread (a map reads the
# caller's capability, so this is on the IOAS_MAP path)
_HDR = struct.Struct("<Ii")
_DATA = struct.Struct("<6I")
_bufs = threading.local()


def _capget_raw(pid: int) -> tuple[int, ...] | None:
    bufs = getattr(_bufs, "pair", None)
    if bufs is None:
        bufs = _bufs.pair = (
            ctypes.create_string_buffer(_HDR.size),
            ctypes.create_string_buffer(_DATA.size),
        )
    hdr, data = bufs
    _HDR.pack_into(hdr, 0, _LINUX_CAPABILITY_VERSION_3, pid)
    if _capget(hdr, data) != 0:
        return None
    return _DATA.unpack(data.raw)


def effective_caps(pid: int = 0) -> int | None:
    """The effective capability set of ``pid`` (0: this process); None if it is gone."""
    got = _capget_raw(pid)
    if got is None:
        return None
    return got[0] | got[3] << 32


def cap_mask(names: Iterable[str]) -> int:
    """The capability set (one bit per capability) of ``names``, each a name of Linux 7.2's
    capability.h (``CAP_SYS_RESOURCE``; case and the ``CAP_`` prefix are optional);
    ValueError names the first unknown one."""
    mask = 0
    for name in names:
        key = name.strip().upper()
        number = CAP_NAMES.get(key if key.startswith("CAP_") else "CAP_" + key)
        if number is None:
            raise ValueError(f"unknown capability {name!r}")
        mask |= 1 << number
    return mask


_own_user_ns: list[str] = []


def _same_user_ns(pid: int) -> bool:
    """``pid`` lives in this process's user namespace (the model's stand-in for the initial
    one: ``capable()`` counts capabilities there only). This process's own namespace is
    read once: the model never changes it."""
    if pid == 0:
        return True
    try:
        if not _own_user_ns:
            _own_user_ns.append(os.readlink("/proc/self/ns/user"))
        return os.readlink(f"/proc/{pid}/ns/user") == _own_user_ns[0]
    except OSError:
        return False


def counted_caps(pid: int = 0) -> int:
    """The capabilities ``capable()`` counts for ``pid`` now: its effective set when it is in
    the model's user namespace, none otherwise or when it is gone."""
    caps = effective_caps(pid)
    return caps if caps and _same_user_ns(pid) else 0


def capable(cap: int, pid: int = 0) -> bool:
    """``capable(cap)`` of ``pid`` now: in its effective set, and the process in the model's
    user namespace. A process that made a user namespace of its own holds every
    capability there (its CapEff shows them), none that the kernel's ``capable()`` counts."""
    caps = effective_caps(pid)
    return caps is not None and bool(caps >> cap & 1) and _same_user_ns(pid)


def _limit(value: int) -> int:
    return RLIM_INFINITY if value == resource.RLIM_INFINITY else value


def memlock_limit(pid: int = 0) -> int | None:
    """The soft ``RLIMIT_MEMLOCK`` of ``pid`` in bytes (the kernel's ``task_rlimit()``);
    None if it is gone. ``prlimit(2)`` first, ``/proc/<pid>/limits`` where prlimit is not
    allowed (another user's process)."""
    if pid == 0:
        return _limit(resource.getrlimit(resource.RLIMIT_MEMLOCK)[0])
    with contextlib.suppress(OSError):
        return _limit(resource.prlimit(pid, resource.RLIMIT_MEMLOCK)[0])
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max locked memory"):
                    soft = line[26:].split()[0]
                    return RLIM_INFINITY if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        pass
    return None


def status_fields(pid: int, *names: str) -> dict[str, list[str]]:
    """The named lines of ``/proc/<pid>/status`` (name without the colon -> its fields);
    an empty dict if the process is gone."""
    want = {name + ":" for name in names}
    out: dict[str, list[str]] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition("\t")
                if key in want:
                    out[key[:-1]] = rest.split()
    except OSError:
        return {}
    return out


def real_uid(pid: int = 0) -> int | None:
    """The real uid of ``pid`` (``current_user()`` is the user of the real uid); None if
    it is gone."""
    if pid == 0:
        return os.getuid()
    fields = status_fields(pid, "Uid").get("Uid")
    return int(fields[0]) if fields else None


def drop_effective(cap: int) -> None:
    """Clear ``cap`` from the calling thread's effective set (``capset(2)``, what libcap's
    ``cap_set_proc()`` does in Linux 7.2's selftest ``drop_cap_ipc_lock()``): the documented
    way to make the in-process model's caller one that pinned-page accounting charges."""
    got = _capget_raw(0)
    if got is None:
        raise OSError(ctypes.get_errno(), "capget")
    words = list(got)
    words[3 * (cap // 32)] &= ~(1 << cap % 32)
    hdr = ctypes.create_string_buffer(_HDR.pack(_LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(_DATA.pack(*words))
    if _capset(hdr, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
