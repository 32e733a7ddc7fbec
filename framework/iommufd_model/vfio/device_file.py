"""An open VFIO device: ``/dev/vfio/devices/vfioN`` (cdev) or a fd from GET_DEVICE_FD.

drivers/vfio/vfio_main.c, device_cdev.c and iommufd.c (Linux 7.2):

- a cdev file grants nothing until VFIO_DEVICE_BIND_IOMMUFD: every other ioctl, read, write
  and mmap is EINVAL before it; a group-opened file has access at once and refuses BIND
  (EINVAL); ATTACH / DETACH_IOMMUFD_PT exist only on cdev files (ENOTTY otherwise, as
  vfio-pci answers unknown commands);
- BIND: argsz from ``get_user`` (EINVAL below 16; bytes past the struct must be zero, E2BIG),
  iommufd < 0 or unknown flags EINVAL, EBUSY while the group file is open, EINVAL if this file
  is bound or the device is open elsewhere, then the VF token (VFIO_DEVICE_BIND_FLAG_TOKEN and
  ``token_uuid_ptr``), then the iommufd (EBADF for no file, EBADFD for another file); the
  device is bound to the iommufd (which the file keeps alive) and opened; ``out_devid``;
- ATTACH / DETACH (and their PASID forms): attach or replace (the HWPT id used is written
  back to ``pt_id``), detach never fails;
- closing the file closes the device (vfio-pci disables it) and then unbinds it.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from iommufd_model.errors import err
from iommufd_model.locking import serialized
from iommufd_model.uapi import vfio as V
from iommufd_model.vfio.uarg import (
    argsz_struct_from,
    copy_to,
    ioctl_caller,
    struct_from,
    struct_to,
)

if TYPE_CHECKING:
    from iommufd_model.core.main import IommuFd
    from iommufd_model.devices import PciFunction
    from iommufd_model.process import Process
    from iommufd_model.vfio.group import VfioGroupFile
    from iommufd_model.vfio.pci_core import VfioPciDevice

MAP_SHARED = 0x01
PROT_READ, PROT_WRITE = 0x1, 0x2


@serialized()
class VfioDeviceFile:
    """``struct vfio_device_file``: one open of a VFIO device."""

    def __init__(self, vdev: VfioPciDevice, group_file: VfioGroupFile | None = None) -> None:
        self.vdev = vdev
        self.group_file = group_file
        self.access_granted = False
        self.iommufd: IommuFd | None = None
        self.devid = 0
        self.closed = False

    @property
    def device(self) -> PciFunction:
        """The function behind the file (the run's BAR mappings reach its MMIO)."""
        return self.vdev.fn

    # -- the group path -----------------------------------------------------------------
    def group_open(self) -> None:
        """vfio_df_group_open(): bind to the group's iommufd, attach the compat IOAS at the
        first open; access is granted at once."""
        from iommufd_model.core.vfio_compat import compat_ioas

        assert self.group_file is not None
        group = self.group_file.group
        ictx = group.iommufd
        assert ictx is not None
        vdev = self.vdev
        self.iommufd = ictx
        if vdev.open_count == 0:
            self._first_open(ictx)
            try:
                ioas = compat_ioas(ictx)
                ictx.attach(self.devid, ioas.id)
            except OSError:
                self._last_close()
                raise
        else:
            self.devid = vdev.devid
        vdev.open_count += 1
        group.device_files += 1
        self.access_granted = True

    def _first_open(self, ictx: IommuFd) -> None:
        """vfio_df_device_first_open(): bind to the iommufd, then open_device."""
        vdev = self.vdev
        self.devid = ictx.bind(vdev.fn)
        ictx.file_refs += 1
        try:
            vdev.open_device()
        except OSError:
            ictx.unbind(self.devid)
            ictx.put_file_ref()
            raise
        vdev.devid = self.devid
        vdev.iommufd = ictx

    def _last_close(self) -> None:
        """vfio_df_device_last_close(): close_device, then unbind from the iommufd."""
        vdev = self.vdev
        ictx = self.iommufd
        vdev.close_device()
        if ictx is not None:
            ictx.unbind(self.devid)
            ictx.put_file_ref()
        vdev.iommufd = None
        vdev.devid = 0

    # -- ioctl --------------------------------------------------------------------------
    def ioctl(self, cmd: int, arg: Any, caller: Process | None = None) -> int:
        """vfio_device_fops_unl_ioctl()."""
        caller = ioctl_caller(self.closed, "device", caller)
        if cmd == V.VFIO_DEVICE_BIND_IOMMUFD:
            return self._bind(arg, caller)
        if not self.access_granted:
            raise err(errno.EINVAL, "bind the device to an iommufd first")
        if self.group_file is None:
            if cmd == V.VFIO_DEVICE_ATTACH_IOMMUFD_PT:
                return self._attach(arg)
            if cmd == V.VFIO_DEVICE_DETACH_IOMMUFD_PT:
                return self._detach(arg)
        if cmd == V.VFIO_DEVICE_FEATURE:
            return self._feature(arg)
        if cmd == V.VFIO_DEVICE_GET_REGION_INFO:
            return self.vdev.region_info(arg)
        if cmd == V.VFIO_DEVICE_GET_INFO:
            return self._get_info(arg)
        if cmd == V.VFIO_DEVICE_GET_IRQ_INFO:
            return self.vdev.irqs.info(arg)
        if cmd == V.VFIO_DEVICE_SET_IRQS:
            return self.vdev.irqs.set_irqs(arg, caller)
        if cmd == V.VFIO_DEVICE_RESET:
            if not self.vdev.reset_works:
                raise err(errno.EINVAL, "the device cannot be reset")
            self.vdev.try_reset_function()
            return 0
        if cmd == V.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO:
            return self._hot_reset_info(arg)
        raise err(errno.ENOTTY, f"unknown VFIO device ioctl {cmd:#x}")

    def _bind(self, arg: Any, caller: Process) -> int:
        """vfio_df_ioctl_bind_iommufd()."""
        from iommufd_model.core.main import IommuFd

        minsz = V.VfioDeviceBindIommufd.offsetofend("out_devid")
        bind = argsz_struct_from(arg, V.VfioDeviceBindIommufd, minsz)
        if bind.iommufd < 0 or bind.flags & ~V.VFIO_DEVICE_BIND_FLAG_TOKEN:
            raise err(errno.EINVAL, "bad iommufd or flags")
        if self.group_file is not None:
            raise err(errno.EINVAL, "BIND_IOMMUFD is for cdev files only")
        vdev = self.vdev
        group = vdev.group
        if group.opened_file is not None:  # vfio_device_block_group()
            raise err(errno.EBUSY, "the device's group file is open")
        if self.access_granted:
            raise err(errno.EINVAL, "the device file is bound already")
        token = None
        if bind.flags & V.VFIO_DEVICE_BIND_FLAG_TOKEN:
            token = caller.read(bind.token_uuid_ptr, 16)
        vdev.match_token(token)
        ictx = caller.files.get(bind.iommufd)
        if ictx is None:
            raise err(errno.EBADF, f"fd {bind.iommufd} is not open")
        if not isinstance(ictx, IommuFd):
            raise err(errno.EBADFD, f"fd {bind.iommufd} is not an iommufd")
        if vdev.open_count:  # vfio_df_open(): the cdev path opens a device once
            raise err(errno.EINVAL, "the device is open already")
        self.iommufd = ictx
        try:
            self._first_open(ictx)
        except OSError:
            self.iommufd = None
            raise
        vdev.open_count = 1
        try:
            copy_to(
                arg, V.VfioDeviceBindIommufd.offsetof("out_devid"), self.devid.to_bytes(4, "little")
            )
        except OSError:
            vdev.open_count = 0
            self._last_close()
            self.iommufd = None
            raise
        group.cdev_device_open_cnt += 1
        vdev.cdev_opened = True
        self.access_granted = True
        return 0

    def _pasid_arg(self, arg: Any, cls: Any, minsz: int, flag: int) -> tuple[Any, int | None]:
        cmd = struct_from(arg, cls, minsz)
        if cmd.argsz < minsz:
            raise err(errno.EINVAL, "argsz below the minimum")
        if cmd.flags & ~flag:
            raise err(errno.EINVAL, "unknown flags")
        if not cmd.flags & flag:
            return cmd, None
        xend = cls.offsetofend("pasid")
        if cmd.argsz < xend:
            raise err(errno.EINVAL, "argsz too small for the PASID")
        cmd = struct_from(arg, cls, xend)
        return cmd, int(cmd.pasid)

    def _attach(self, arg: Any) -> int:
        """vfio_df_ioctl_attach_pt()."""
        cls = V.VfioDeviceAttachIommufdPt
        cmd, pasid = self._pasid_arg(arg, cls, cls.offsetofend("pt_id"), V.VFIO_DEVICE_ATTACH_PASID)
        ictx = self.iommufd
        assert ictx is not None
        hwpt_id = ictx.attach(self.devid, cmd.pt_id, pasid=pasid)
        try:
            copy_to(arg, cls.offsetof("pt_id"), hwpt_id.to_bytes(4, "little"))
        except OSError:
            ictx.detach(self.devid, pasid=pasid)
            raise
        return 0

    def _detach(self, arg: Any) -> int:
        """vfio_df_ioctl_detach_pt()."""
        cls = V.VfioDeviceDetachIommufdPt
        _cmd, pasid = self._pasid_arg(
            arg, cls, cls.offsetofend("flags"), V.VFIO_DEVICE_DETACH_PASID
        )
        ictx = self.iommufd
        assert ictx is not None
        ictx.detach(self.devid, pasid=pasid)
        return 0

    def _get_info(self, arg: Any) -> int:
        """vfio_pci_ioctl_get_info(): no zPCI, and the model's functions do no AtomicOps, so
        no capability chain."""
        minsz = V.VfioDeviceInfo.offsetofend("num_irqs")
        info = struct_from(arg, V.VfioDeviceInfo, minsz)
        if info.argsz < minsz:
            raise err(errno.EINVAL, "argsz below the minimum")
        n = min(info.argsz, V.VfioDeviceInfo.SIZE)
        out = V.VfioDeviceInfo(argsz=info.argsz, flags=V.VFIO_DEVICE_FLAGS_PCI)
        if self.vdev.reset_works:
            out.flags |= V.VFIO_DEVICE_FLAGS_RESET
        out.num_regions = V.VFIO_PCI_NUM_REGIONS
        out.num_irqs = V.VFIO_PCI_NUM_IRQS
        struct_to(arg, out, n)
        return 0

    def _hot_reset_info(self, arg: Any) -> int:
        """vfio_pci_ioctl_get_pci_hot_reset_info(): the model's functions sit alone on their
        slot with no bus reset to offer (model), so there is nothing to reset: ENODEV."""
        minsz = V.VfioPciHotResetInfo.offsetofend("count")
        hdr = struct_from(arg, V.VfioPciHotResetInfo, minsz)
        if hdr.argsz < minsz:
            raise err(errno.EINVAL, "argsz below the minimum")
        raise err(errno.ENODEV, "no slot or bus reset")

    def _feature(self, arg: Any) -> int:
        """vfio_ioctl_device_feature(): vfio-pci has the VF token and the low-power ones."""
        minsz = V.VfioDeviceFeature.offsetofend("flags")
        feature = struct_from(arg, V.VfioDeviceFeature, minsz)
        if feature.argsz < minsz:
            raise err(errno.EINVAL, "argsz below the minimum")
        known = (
            V.VFIO_DEVICE_FEATURE_MASK
            | V.VFIO_DEVICE_FEATURE_SET
            | V.VFIO_DEVICE_FEATURE_GET
            | V.VFIO_DEVICE_FEATURE_PROBE
        )
        flags = feature.flags
        if flags & ~known:
            raise err(errno.EINVAL, "unknown feature flags")
        both = V.VFIO_DEVICE_FEATURE_SET | V.VFIO_DEVICE_FEATURE_GET
        if not flags & V.VFIO_DEVICE_FEATURE_PROBE and flags & both == both:
            raise err(errno.EINVAL, "GET and SET together without PROBE")
        which = flags & V.VFIO_DEVICE_FEATURE_MASK
        argsz = feature.argsz - minsz
        if which == V.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN:
            return self.vdev.feature_token(flags, arg, argsz)
        # migration, dirty logging: no mig_ops / log_ops; the low-power features need
        # runtime PM, which the model does not have (model): ENOTTY as for unknown ones
        raise err(errno.ENOTTY, f"feature {which} not supported")

    # -- read / write / mmap ----------------------------------------------------------
    def read(self, count: int, offset: int) -> bytes:
        """pread(2) of the device fd: a region at ``offset`` (index << 40)."""
        if not self.access_granted:
            raise err(errno.EINVAL, "bind the device to an iommufd first")
        if count <= 0:
            return b""
        out = self.vdev.rw(offset, None, count)
        assert isinstance(out, bytes)
        return out

    def write(self, data: bytes, offset: int) -> int:
        """pwrite(2) of the device fd."""
        if not self.access_granted:
            raise err(errno.EINVAL, "bind the device to an iommufd first")
        if not data:
            return 0
        out = self.vdev.rw(offset, bytes(data), len(data))
        assert isinstance(out, int)
        return out

    def mmap_region(
        self, offset: int, length: int, prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_SHARED
    ) -> tuple[int, int]:
        """mmap(2) of the device fd: ``(bar, offset in the BAR)`` the mapping shows, or
        EINVAL when the region cannot be mapped."""
        if not self.access_granted:
            raise err(errno.EINVAL, "bind the device to an iommufd first")
        return self.vdev.mmap_region(offset, length, bool(flags & MAP_SHARED))

    # -- release ------------------------------------------------------------------------
    def release(self) -> None:
        """vfio_device_fops_release()."""
        if self.closed:
            return
        self.closed = True
        vdev = self.vdev
        if not self.access_granted:
            return
        if self.group_file is None:  # vfio_df_unbind_iommufd()
            vdev.open_count = 0
            self._last_close()
            vdev.cdev_opened = False
            vdev.group.cdev_device_open_cnt -= 1
            return
        vdev.open_count -= 1
        if not vdev.open_count:
            self._last_close()
        self.group_file.device_file_closed()
