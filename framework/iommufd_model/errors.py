"""One errno discipline for the whole model: every refusal is an ``OSError`` with an errno.

The uAPI promises that nothing but ``OSError`` leaves an ioctl, so internal code raises
through :func:`err` and the dispatcher converts anything else into ``EFAULT``-free kernel
style errors only where the kernel would (see ``core.main``).
"""

from __future__ import annotations

import errno
import os

#: Set to 1 to make a model or driver bug (any exception but OSError) raise instead of
#: reaching the caller as EIO; unset, empty or 0 is off. The conformance kit turns it on.
STRICT_ENV = "IOMMUFD_MODEL_STRICT"


def strict_mode() -> bool:
    """Whether ``IOMMUFD_MODEL_STRICT`` asks bugs to raise (``0`` and empty mean no)."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


#: os.strerror() by errno, as asked (refusals are frequent: some programs make many)
_STRERROR: dict[int, str] = {}


def err(code: int, detail: str = "") -> OSError:
    """Build the ``OSError`` the kernel would return as ``-code``; ``detail`` aids debugging."""
    msg = _STRERROR.get(code)
    if msg is None:
        msg = _STRERROR[code] = os.strerror(code)
    if detail:
        msg = f"{msg} ({detail})"
    return OSError(code, msg)


def check(cond: bool, code: int, detail: str = "") -> None:
    """Raise ``err(code)`` unless ``cond`` holds."""
    if not cond:
        raise err(code, detail)


EINVAL = errno.EINVAL
ENOENT = errno.ENOENT
EBUSY = errno.EBUSY
EOPNOTSUPP = errno.EOPNOTSUPP
EOVERFLOW = errno.EOVERFLOW
E2BIG = errno.E2BIG
EFAULT = errno.EFAULT
ENOMEM = errno.ENOMEM
EEXIST = errno.EEXIST
ENOTTY = errno.ENOTTY
EMSGSIZE = errno.EMSGSIZE
ENOSPC = errno.ENOSPC
EIO = errno.EIO
EPERM = errno.EPERM
ENODEV = errno.ENODEV
EAGAIN = errno.EAGAIN
EBADF = errno.EBADF
