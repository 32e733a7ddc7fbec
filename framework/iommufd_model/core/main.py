"""The open ``/dev/iommu``: ioctl dispatch with the kernel's struct-size rules, and destroy.

``IommuFd.ioctl(cmd, buf)`` behaves like ``fcntl.ioctl`` on the real fd: ``buf`` is a mutable
buffer whose first u32 is the user's ``size``; the struct is copied in with
``copy_struct_from_user`` rules (short -> zero-filled, long -> the tail must be zero else
E2BIG, below the command's minimum -> EINVAL), the handler runs, and the response is copied
back over at most ``size`` bytes. Only ``OSError`` ever leaves.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

# The object modules register their commands in the table when imported.
from iommufd_model.core import eventq, hw_pagetable, viommu  # noqa: F401
from iommufd_model.core.device import (
    Device,
    device_attach,
    device_bind,
    device_detach,
    device_unbind,
)
from iommufd_model.core.ioas import Ioas, ioas_option_huge_pages
from iommufd_model.core.mmap import (
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    IommufdVma,
    MmapTable,
    fops_mmap,
)
from iommufd_model.core.objects import IommufdObject, ObjectTable
from iommufd_model.core.typed import TypedCalls
from iommufd_model.core.ucmd import OPS, IoctlOp, Ucmd, ioctl_op
from iommufd_model.core.vfio_compat import vfio_ioctl
from iommufd_model.errors import err, strict_mode
from iommufd_model.locking import serialized
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.machine import Machine
    from iommufd_model.process import Process


#: ``fast(ictx, struct, caller)``: a command's short path for its commonest requests, by ioctl
#: number (the model's own; registered by the module owning the command, see
#: :meth:`IommuFd.fast_ioctl`): None when it does not take the request, else what it did
FastOp = Callable[["IommuFd", bytes, "Process"], object]
FAST_OPS: dict[int, FastOp] = {}


def registered_ops() -> dict[int, IoctlOp]:
    """Every command of the table (the object modules imported above registered theirs)."""
    return dict(OPS)


@serialized()
class IommuFd(TypedCalls):
    """One iommufd context (``struct iommufd_ctx``): the object table and its ioctls.

    Every command is a typed method (``ioas_alloc``, ``ioas_map``, ``hwpt_alloc``,
    ``viommu_alloc`` ... from :class:`~iommufd_model.core.typed.TypedCalls`) over
    :meth:`ioctl`, which takes the uAPI's bytes as ``ioctl(2)`` on ``/dev/iommu`` does.
    :meth:`bind`, :meth:`attach` and :meth:`detach` are the VFIO device side.

    Attributes:
        machine: the :class:`~iommufd_model.machine.Machine` the fd belongs to.
        proc: the process that opened it (user pointers are its addresses).
        fd: the file descriptor number in ``proc`` (-1 until installed).
        objects: the object table (``struct xarray objects``), by id.
        mmaps: regions drivers expose through ``mmap()`` of the fd.
        vfio_ioas: the IOAS the VFIO container compatibility layer uses, if any.
        account_mode: IOMMU_OPTION_RLIMIT_MODE, 0 per user, 1 per process.
        closed: the context was released (every later call is EBADF).
        file_refs: references FAULT / vEVENTQ fds hold on this file.
        internal_errors: model bugs turned into EIO (outside strict mode); stays empty.
    """

    def __init__(self, machine: Machine, proc: Process) -> None:
        self.machine = machine
        self.proc = proc
        self.fd = -1
        self.objects = ObjectTable()
        self.mmaps = MmapTable()  # mt_mmap: regions drivers expose through mmap()
        self.vfio_ioas: Ioas | None = None
        self.account_mode = 0  # IOMMU_OPTION_RLIMIT_MODE: 0 user, 1 process (mm)
        self.closed = False
        # References other files (FAULT / vEVENTQ fds) hold on this iommufd's file: the
        # context is released only when the fd and all of them are closed.
        self.file_refs = 0
        self._release_pending = False
        # Failures of the model itself (not of the caller); tests assert this stays empty.
        self.internal_errors: list[BaseException] = []

    # -- the uAPI entry point -----------------------------------------------------------
    def ioctl(
        self, cmd: int, buf: bytearray | memoryview | int, *, caller: Process | None = None
    ) -> int:
        """Issue ioctl ``cmd`` with argument struct ``buf`` (mutated in place).

        Returns the ioctl's value: 0 for iommufd's commands; the VFIO compat commands
        (core/vfio_compat.py) return theirs, and some take an ``int`` argument instead.
        """
        # _guard's rules, without its closure: this is every command's path
        try:
            return self._ioctl(cmd, buf, caller or self.proc)
        except OSError:
            raise
        except Exception as exc:
            raise self._internal(exc) from exc

    def fast_ioctl(self, cmd: int, struct: bytes, caller: Process) -> object:
        """Serve ``ioctl(cmd)`` whose struct is ``struct`` (the user's bytes, read whole) by the
        command's short path, if it has one and the request is one it takes: the short
        path's report of what it did when done (the ioctl returned 0 and wrote nothing into
        the struct; OSError when it failed), None when nothing was done and the request
        must go to :meth:`ioctl`.

        The short paths (``FAST_OPS``, the model's own) skip the decoding and layers of the
        general path, not its rules: each takes only requests whose every check passes as it
        would there and then does what the general path would (tests/run/test_fastpath.py
        compares the two on random requests)."""
        fast = FAST_OPS.get(cmd)
        if fast is None or self.closed:
            return None
        return self._guard(lambda: fast(self, struct, caller))

    def _ioctl(self, cmd: int, buf: bytearray | memoryview | int, caller: Process) -> int:
        if self.closed:
            raise err(errno.EBADF, "iommufd is closed")
        op = OPS.get(cmd)
        if op is None:
            # iommufd_fops_ioctl(): numbers outside iommufd's table go to the VFIO
            # container compatibility layer, which answers ENOTTY for what it lacks.
            return vfio_ioctl(self, cmd, buf, caller)
        if type(buf) is not bytearray and (
            not isinstance(buf, (bytearray, memoryview))
            or (isinstance(buf, memoryview) and buf.readonly)
        ):
            raise err(errno.EFAULT, "ioctl argument must be a writable buffer")
        if len(buf) < 4:
            raise err(errno.EFAULT, "ioctl argument shorter than its size field")
        user_size = int.from_bytes(buf[0:4], "little")
        if user_size < op.min_size:
            raise err(errno.EINVAL, f"size {user_size} below minimum {op.min_size}")
        if user_size > len(buf):
            raise err(errno.EFAULT, f"size {user_size} runs past the {len(buf)}-byte buffer")
        struct = op.struct
        ksize = struct.SIZE
        if user_size > ksize and any(buf[ksize:user_size]):
            raise err(errno.E2BIG, "non-zero bytes past the struct the model understands")
        if user_size >= ksize:
            decoded = struct.unpack_from(buf)
        else:
            decoded = struct.unpack_from(bytes(buf[:user_size]).ljust(ksize, b"\0"))
        ucmd = Ucmd(self, decoded, buf, user_size, caller)
        op.handler(ucmd)
        return ucmd.retval

    def mmap(
        self,
        offset: int,
        length: int,
        prot: int = PROT_READ | PROT_WRITE,
        flags: int = MAP_SHARED,
    ) -> IommufdVma:
        """``mmap(NULL, length, prot, flags, iommufd, offset)``: map a region a driver
        registered (e.g. the vIOMMU's ``out_mmap_offset``); ``close()`` the result to munmap.

        See core/mmap.py for the kernel's checks and errnos.
        """
        return self._guard(lambda: fops_mmap(self, offset, length, prot, flags))  # type: ignore[no-any-return]

    # -- VFIO-style entry points (the device side of the binding) ------------------------
    def bind(self, dev: PciDevice) -> int:
        """``VFIO_DEVICE_BIND_IOMMUFD``: bind ``dev`` to this iommufd; returns ``dev_id``."""
        return int(self._guard(lambda: device_bind(self, dev)))

    def unbind(self, dev_id: int) -> None:
        """Close the VFIO device fd: detach everything and drop the device object."""
        self._guard(lambda: device_unbind(self, self.device(dev_id)))

    def attach(self, dev_id: int, pt_id: int, *, pasid: int | None = None) -> int:
        """``VFIO_DEVICE_ATTACH_IOMMUFD_PT``: attach or replace; returns the HWPT id used."""
        return int(
            self._guard(lambda: device_attach(self.device(dev_id), pt_id, pasid, replace=True))
        )

    def detach(self, dev_id: int, *, pasid: int | None = None) -> None:
        """``VFIO_DEVICE_DETACH_IOMMUFD_PT``."""
        self._guard(lambda: device_detach(self.device(dev_id), pasid))

    def device(self, dev_id: int) -> Device:
        """The bound device object ``dev_id`` (ENOENT if there is none)."""
        # VFIO holds the iommufd_device itself: no iommufd_get_object(), nothing to inject.
        return self.objects.get_device(dev_id, held=True)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        """Run one uAPI entry point: only OSError leaves; a model bug is EIO (recorded in
        ``internal_errors``) unless strict mode lets it through."""
        try:
            return fn()
        except OSError:
            raise
        except Exception as exc:
            raise self._internal(exc) from exc

    def _internal(self, exc: Exception) -> Exception:
        """What a model bug ``exc`` leaves the uAPI as: itself in strict mode, else EIO
        (recorded in ``internal_errors``)."""
        if strict_mode():
            return exc
        self.internal_errors.append(exc)
        return err(errno.EIO, f"internal model error: {type(exc).__name__}: {exc}")

    # -- teardown -------------------------------------------------------------------------
    def release(self) -> None:
        """Last close of the fd: destroy every object, leaves first, as the kernel does."""
        if self.closed:
            return
        if self.file_refs:
            self._release_pending = True
            return
        for obj in list(self.objects):
            if isinstance(obj, Device):
                device_unbind(self, obj)
        while True:
            progress = False
            for obj in list(self.objects):
                if obj.users == 1:
                    self.objects.remove(obj)
                    progress = True
            if not progress:
                break
        self.objects.clear_tombstones()
        leftovers = list(self.objects)
        self.closed = True
        if leftovers:
            raise RuntimeError(f"objects left with users after close: {leftovers}")

    def put_file_ref(self) -> None:
        """A file holding this context closed; finish a release deferred for it."""
        self.file_refs -= 1
        if self._release_pending and not self.file_refs:
            self._release_pending = False
            self.release()

    def close(self) -> None:
        """Close the fd in the owning process."""
        self.proc.close(self.fd)

    def destroy_object(self, obj: IommufdObject) -> None:
        """Remove ``obj`` from the table as IOMMU_DESTROY does (the core's own teardowns)."""
        if self.vfio_ioas is obj:
            self.vfio_ioas = None
        self.objects.destroy_by_id(obj.id)


# -- commands owned by main.c -------------------------------------------------------------
@ioctl_op(U.IOMMU_DESTROY, U.IommuDestroy, "id")
def _destroy(ucmd: Ucmd) -> None:
    ictx = ucmd.ictx
    obj = ictx.objects.get(ucmd.cmd.id)
    ictx.destroy_object(obj)


@ioctl_op(U.IOMMU_OPTION, U.IommuOption, "val64")
def _option(ucmd: Ucmd) -> None:
    cmd = ucmd.zeroed("reserved")
    ictx = ucmd.ictx
    if cmd.option_id == U.IOMMU_OPTION_RLIMIT_MODE:
        if cmd.object_id:
            raise err(errno.EOPNOTSUPP, "RLIMIT_MODE is global: object_id must be 0")
        if cmd.op == U.IOMMU_OPTION_OP_GET:
            cmd.val64 = int(ictx.account_mode == 1)
        elif cmd.op == U.IOMMU_OPTION_OP_SET:
            if not ucmd.caller.capable_sys_resource:
                raise err(errno.EPERM, "RLIMIT_MODE needs CAP_SYS_RESOURCE")
            if len(ictx.objects):
                raise err(errno.EBUSY, "RLIMIT_MODE can change only with no objects")
            if cmd.val64 not in (0, 1):
                raise err(errno.EINVAL, "RLIMIT_MODE is 0 or 1")
            ictx.account_mode = cmd.val64
        else:
            raise err(errno.EOPNOTSUPP, f"unknown option op {cmd.op}")
    elif cmd.option_id == U.IOMMU_OPTION_HUGE_PAGES:
        ioas_option_huge_pages(ucmd)
    else:
        raise err(errno.EOPNOTSUPP, f"unknown option {cmd.option_id}")
    # Only val64 goes back to the user, as the kernel copies just that field.
    off = U.IommuOption.offsetof("val64")
    ucmd._buf[off : off + 8] = cmd.val64.to_bytes(8, "little")


@ioctl_op(U.IOMMU_VFIO_IOAS, U.IommuVfioIoas, "reserved")
def _vfio_ioas(ucmd: Ucmd) -> None:
    cmd = ucmd.zeroed("reserved")
    ictx = ucmd.ictx
    if cmd.op == U.IOMMU_VFIO_IOAS_GET:
        if ictx.vfio_ioas is None:
            raise err(errno.ENODEV, "no VFIO compatibility IOAS")
        cmd.ioas_id = ictx.vfio_ioas.id
        ucmd.respond()
    elif cmd.op == U.IOMMU_VFIO_IOAS_SET:
        ictx.vfio_ioas = ictx.objects.get_ioas(cmd.ioas_id)
    elif cmd.op == U.IOMMU_VFIO_IOAS_CLEAR:
        ictx.vfio_ioas = None
    else:
        raise err(errno.EOPNOTSUPP, f"unknown vfio_ioas op {cmd.op}")
