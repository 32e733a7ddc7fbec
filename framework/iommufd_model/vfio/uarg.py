"""The ioctl argument as VFIO reads it: ``copy_from_user`` of a fixed minimum, ``argsz`` rules.

Every VFIO ioctl copies a fixed number of bytes (``minsz``, the end of its last mandatory
field) whatever ``argsz`` says, checks ``argsz`` itself, and copies back only what it owns.
``arg`` is the user memory at the ioctl's pointer (a writable buffer, as for iommufd's
commands); a buffer shorter than what the kernel would touch is an unreadable pointer, EFAULT.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, TypeVar

from iommufd_model.errors import err
from iommufd_model.uapi.codec import UStruct

if TYPE_CHECKING:
    from iommufd_model.process import Process

S = TypeVar("S", bound=UStruct)


def ioctl_caller(closed: bool, what: str, caller: Process | None) -> Process:
    """What every VFIO file's ioctl checks before its command: a closed file is EBADF, and
    the model needs the calling process (its memory holds the pointers the argument carries),
    so a call without one is EINVAL. Returns the caller."""
    if closed:
        raise err(errno.EBADF, f"{what} file is closed")
    if caller is None:
        raise err(errno.EINVAL, f"a {what} ioctl needs the calling process")
    return caller


def user_buffer(arg: Any) -> bytearray | memoryview:
    """The argument as a buffer; an integer (or a read-only view) is a bad pointer: EFAULT."""
    if isinstance(arg, bytearray) or (isinstance(arg, memoryview) and not arg.readonly):
        return arg
    raise err(errno.EFAULT, "ioctl argument must be a writable buffer")


def copy_from(arg: Any, n: int) -> bytes:
    """``copy_from_user(.., arg, n)``."""
    buf = user_buffer(arg)
    if len(buf) < n:
        raise err(errno.EFAULT, f"argument shorter than the {n} bytes VFIO reads")
    return bytes(buf[:n])


def struct_from(arg: Any, cls: type[S], minsz: int) -> S:
    """``copy_from_user(&s, arg, minsz)``: the first ``minsz`` bytes, the rest zero."""
    return cls.unpack(copy_from(arg, minsz).ljust(cls.SIZE, b"\0"))


def copy_to(arg: Any, offset: int, data: bytes) -> None:
    """``copy_to_user(arg + offset, data)``."""
    buf = user_buffer(arg)
    if offset + len(data) > len(buf):
        raise err(errno.EFAULT, "argument shorter than what VFIO writes")
    buf[offset : offset + len(data)] = data


def struct_to(arg: Any, value: UStruct, n: int) -> None:
    """``copy_to_user(arg, &s, n)``: the first ``n`` bytes of the struct."""
    copy_to(arg, 0, value.pack()[:n])


def argsz_struct_from(arg: Any, cls: type[S], minsz: int) -> S:
    """``get_user(argsz)`` then ``copy_struct_from_user(&s, sizeof, arg, argsz)``.

    argsz below ``minsz`` is EINVAL; bytes past the struct the kernel knows must be zero
    (E2BIG); a short struct is zero-filled."""
    argsz = int.from_bytes(copy_from(arg, 4), "little")
    if argsz < minsz:
        raise err(errno.EINVAL, f"argsz {argsz} below {minsz}")
    data = copy_from(arg, argsz)
    if argsz > cls.SIZE and any(data[cls.SIZE :]):
        raise err(errno.E2BIG, "non-zero bytes past the struct VFIO knows")
    return cls.unpack(data[: cls.SIZE].ljust(cls.SIZE, b"\0"))
