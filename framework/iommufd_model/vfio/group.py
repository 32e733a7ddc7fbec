"""``/dev/vfio/N``: the group file of drivers/vfio/group.c (Linux 7.2), with iommufd as the
container (CONFIG_VFIO_CONTAINER=n, CONFIG_IOMMUFD_VFIO_CONTAINER=y: ``/dev/vfio/vfio`` is
an iommufd).

- open: ENODEV without a device, EBUSY while a device of the group is bound through its cdev
  or the group is already open (one open file at a time);
- GET_STATUS: VIABLE | CONTAINER_SET once a container is set; else VIABLE unless the group's
  DMA is owned (a cdev bound);
- SET_CONTAINER (an ``int`` fd): EBADF for no file, EINVAL if one is set, EBADFD if the file
  is not an iommufd; else the iommufd's compat IOAS is created if missing
  (iommufd_vfio_compat_ioas_create) and the group holds the iommufd;
- UNSET_CONTAINER: EINVAL without one; drops the iommufd;
- GET_DEVICE_FD (a string, ``"<bdf>"`` or ``"<bdf> vf_token=<uuid>"``): ENODEV for no match,
  EINVAL without a container; the device is bound to the iommufd and, at its first open,
  attached to the compat IOAS; the new fd is returned;
- the group file outlives its fd while device files opened through it are open.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from iommufd_model.errors import err
from iommufd_model.locking import serialized
from iommufd_model.uapi import vfio as V
from iommufd_model.vfio.uarg import copy_from, ioctl_caller, struct_from, struct_to, user_buffer

if TYPE_CHECKING:
    from iommufd_model.core.main import IommuFd
    from iommufd_model.process import Process
    from iommufd_model.vfio.pci_core import VfioPciDevice

PAGE_SIZE = 4096


class VfioGroup:
    """``struct vfio_group``: one per function in the model."""

    def __init__(self, group_id: int) -> None:
        self.id = group_id
        self.device: VfioPciDevice | None = None
        self.opened_file: VfioGroupFile | None = None
        self.iommufd: IommuFd | None = None
        self.cdev_device_open_cnt = 0
        self.device_files = 0  # device files opened through the group file

    def has_iommu(self) -> bool:
        return self.iommufd is not None

    def drop_iommufd(self) -> None:
        if self.iommufd is not None:
            ictx, self.iommufd = self.iommufd, None
            ictx.put_file_ref()


@serialized()
class VfioGroupFile:
    """An open ``/dev/vfio/N``."""

    def __init__(self, group: VfioGroup) -> None:
        self.group = group
        self.closed = False
        self._release_pending = False

    @classmethod
    def open(cls, group: VfioGroup) -> VfioGroupFile:
        """vfio_group_fops_open()."""
        if group.device is None or group.device.unregistered:
            raise err(errno.ENODEV, f"group {group.id} has no device")
        if group.cdev_device_open_cnt:
            raise err(errno.EBUSY, f"a device of group {group.id} is open through its cdev")
        if group.opened_file is not None:
            raise err(errno.EBUSY, f"group {group.id} is already open")
        file = cls(group)
        group.opened_file = file
        return file

    def ioctl(self, cmd: int, arg: Any, caller: Process | None = None) -> int:
        caller = ioctl_caller(self.closed, "group", caller)
        if cmd == V.VFIO_GROUP_GET_STATUS:
            return self._get_status(arg)
        if cmd == V.VFIO_GROUP_SET_CONTAINER:
            return self._set_container(arg, caller)
        if cmd == V.VFIO_GROUP_UNSET_CONTAINER:
            if not self.group.has_iommu():
                raise err(errno.EINVAL, "no container set")
            self.group.drop_iommufd()
            return 0
        if cmd == V.VFIO_GROUP_GET_DEVICE_FD:
            return self._get_device_fd(arg, caller)
        raise err(errno.ENOTTY, f"unknown VFIO group ioctl {cmd:#x}")

    def _get_status(self, arg: Any) -> int:
        minsz = V.VfioGroupStatus.offsetofend("flags")
        status = struct_from(arg, V.VfioGroupStatus, minsz)
        if status.argsz < minsz:
            raise err(errno.EINVAL, "argsz below the minimum")
        status.flags = 0
        dev = self.group.device
        if self.group.has_iommu():
            status.flags = V.VFIO_GROUP_FLAGS_CONTAINER_SET | V.VFIO_GROUP_FLAGS_VIABLE
        elif dev is None or dev.fn.bound_to is None:
            status.flags = V.VFIO_GROUP_FLAGS_VIABLE
        struct_to(arg, status, minsz)
        return 0

    def _set_container(self, arg: Any, caller: Process) -> int:
        from iommufd_model.core.main import IommuFd
        from iommufd_model.core.vfio_compat import compat_ioas_create

        fd = int.from_bytes(copy_from(arg, 4), "little", signed=True)
        file = caller.files.get(fd) if fd >= 0 else None
        if file is None:
            raise err(errno.EBADF, f"fd {fd} is not open")
        if self.group.has_iommu():
            raise err(errno.EINVAL, "a container is already set")
        if not isinstance(file, IommuFd):
            raise err(errno.EBADFD, "not a VFIO container or iommufd")
        compat_ioas_create(file)
        file.file_refs += 1
        self.group.iommufd = file
        return 0

    def _get_device_fd(self, arg: Any, caller: Process) -> int:
        from iommufd_model.vfio.device_file import VfioDeviceFile

        raw = bytes(user_buffer(arg)[:PAGE_SIZE])
        end = raw.find(b"\0")
        if end < 0:
            # strndup_user(): no NUL within a page is EINVAL, an unreadable string EFAULT
            raise err(errno.EINVAL if len(raw) >= PAGE_SIZE else errno.EFAULT, "bad name")
        name = raw[:end].decode("latin-1")
        dev = self.group.device
        if dev is None or dev.unregistered or not dev.match_name(name):
            raise err(errno.ENODEV, f"no device {name!r} in group {self.group.id}")
        if not self.group.has_iommu():
            raise err(errno.EINVAL, "no container set")
        df = VfioDeviceFile(dev, group_file=self)
        df.group_open()
        try:
            fd = caller.install_file(df)
        except OSError:
            df.release()
            raise
        return fd

    # -- release ------------------------------------------------------------------------
    def device_file_closed(self) -> None:
        self.group.device_files -= 1
        if self._release_pending and not self.group.device_files:
            self._release_pending = False
            self.release()

    def release(self) -> None:
        """vfio_group_fops_release(): only once no device file opened through it is open
        (each holds a reference on the group file)."""
        if self.closed:
            return
        if self.group.device_files:
            self._release_pending = True
            return
        self.closed = True
        self.group.drop_iommufd()
        self.group.opened_file = None
