"""The ioctl layer under every command: the command in flight (:class:`Ucmd`) and the table
of commands (:func:`ioctl_op`), as Linux 7.2's ``struct iommufd_ucmd`` and the
``iommufd_ioctl_ops`` table of drivers/iommu/iommufd/main.c.

A leaf of ``core/``: it imports no other module of the package's core, so each object's
module registers its commands here and ``main.py`` (the dispatcher) imports those modules
without a cycle.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from iommufd_model.errors import err
from iommufd_model.uapi.codec import UStruct

if TYPE_CHECKING:
    from iommufd_model.core.main import IommuFd
    from iommufd_model.process import Process


class Ucmd:
    """One ioctl in flight: the decoded struct and the way back to the user's buffer."""

    __slots__ = ("_buf", "_user_size", "caller", "cmd", "ictx", "retval")

    def __init__(self, ictx: IommuFd, cmd: Any, buf: Any, user_size: int, caller: Process) -> None:
        self.ictx = ictx
        self.cmd = cmd
        self._buf = buf
        self._user_size = user_size
        self.caller = caller
        # The ioctl's return value: 0, except for the few commands that return an fd
        # (the self-test's DMABUF_GET).
        self.retval = 0

    def zeroed(self, *fields: str) -> Any:
        """The command's struct once the check most handlers make first has passed: each of
        ``fields`` (``flags``, ``__reserved``: spelled ``reserved``) is zero, else EOPNOTSUPP,
        as Linux 7.2 answers a flag or reserved field it does not know."""
        cmd = self.cmd
        for name in fields:
            if getattr(cmd, name):
                raise err(errno.EOPNOTSUPP, f"{type(cmd).__name__}.{name} must be 0")
        return cmd

    def respond(self) -> None:
        """``iommufd_ucmd_respond``: copy the struct back, never past the user's size."""
        data = self.cmd.pack()
        n = min(self._user_size, len(data))
        self._buf[:n] = data[:n]


Handler = Callable[[Ucmd], None]


@attrs.frozen
class IoctlOp:
    """One row of the kernel's ``iommufd_ioctl_ops`` table."""

    num: int
    struct: type[UStruct]
    last: str  # the last mandatory field: min_size = offsetofend(struct, last)
    handler: Handler

    #: ``offsetofend(struct, last)``: a smaller user ``size`` is EINVAL
    min_size: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "min_size", self.struct.offsetofend(self.last))


#: The command table, by ioctl number (``iommufd_ioctl_ops``).
OPS: dict[int, IoctlOp] = {}


def ioctl_op(num: int, struct: type[UStruct], last: str) -> Callable[[Handler], Handler]:
    """Register a handler for an iommufd command (used by each object's module)."""

    def deco(fn: Handler) -> Handler:
        if num in OPS:
            raise ValueError(f"ioctl {num:#x} registered twice")
        OPS[num] = IoctlOp(num, struct, last, fn)
        return fn

    return deco
