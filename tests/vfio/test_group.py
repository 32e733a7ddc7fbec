"""The legacy path: /dev/vfio/vfio (iommufd's VFIO container) and /dev/vfio/N groups, as
lib/vfio_pci_device.c of the 7.2 selftests drives them (vfio_pci_container_setup) and as
drivers/vfio/group.c answers."""

from __future__ import annotations

import errno
import struct
from typing import Any

from iommufd_model import vfio
from iommufd_model.core import vfio_compat as C
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import vfio as V

from .conftest import VfioSetup, call


def _group_path(setup: VfioSetup) -> str:
    vdev = vfio.registry(setup.machine).by_function(setup.fn)
    assert vdev is not None
    return f"/dev/vfio/{vdev.group.id}"


def _status(group: Any, proc: Any) -> int:
    return int(call(group, V.VFIO_GROUP_GET_STATUS, V.VfioGroupStatus(argsz=8), proc).flags)


def _int(value: int) -> bytearray:
    return bytearray(struct.pack("<i", value))


def _name(text: str) -> bytearray:
    return bytearray(text.encode() + b"\0" + bytes(64))


def test_container_setup_and_dma(setup: VfioSetup) -> None:
    """vfio_pci_container_setup(): group, SET_CONTAINER, SET_IOMMU, GET_DEVICE_FD, MAP_DMA;
    then the function's DMA goes through the container's mappings."""
    p = setup.proc
    cfd = vfio.open_fd(p, vfio.CONTAINER_PATH)
    container = p.files[cfd]
    assert container.ioctl(V.VFIO_GET_API_VERSION, 0) == V.VFIO_API_VERSION
    gfd = vfio.open_fd(p, _group_path(setup))
    group = p.files[gfd]
    assert _status(group, p) == V.VFIO_GROUP_FLAGS_VIABLE
    group.ioctl(V.VFIO_GROUP_SET_CONTAINER, _int(cfd), p)
    assert _status(group, p) == V.VFIO_GROUP_FLAGS_VIABLE | V.VFIO_GROUP_FLAGS_CONTAINER_SET
    assert_errno(errno.EINVAL, lambda: group.ioctl(V.VFIO_GROUP_SET_CONTAINER, _int(cfd), p))
    assert container.ioctl(V.VFIO_CHECK_EXTENSION, V.VFIO_TYPE1v2_IOMMU) == 1
    container.ioctl(V.VFIO_SET_IOMMU, V.VFIO_TYPE1v2_IOMMU)
    assert_errno(
        errno.ENODEV, lambda: group.ioctl(V.VFIO_GROUP_GET_DEVICE_FD, _name("0000:09:00.0"), p)
    )
    dfd = group.ioctl(V.VFIO_GROUP_GET_DEVICE_FD, _name(setup.fn.bdf), p)
    df = p.files[dfd]
    info = call(df, V.VFIO_DEVICE_GET_INFO, V.VfioDeviceInfo(argsz=24), p)
    assert info.flags & V.VFIO_DEVICE_FLAGS_PCI
    # a group-opened device neither binds nor attaches through the cdev ioctls
    bind = V.VfioDeviceBindIommufd(argsz=24, iommufd=cfd)
    assert_errno(errno.EINVAL, lambda: call(df, V.VFIO_DEVICE_BIND_IOMMUFD, bind, p))
    att = V.VfioDeviceAttachIommufdPt(argsz=16, pt_id=1)
    assert_errno(errno.ENOTTY, lambda: call(df, V.VFIO_DEVICE_ATTACH_IOMMUFD_PT, att, p))
    # map through the container and let the function DMA
    va = p.mmap(1 << 16)
    p.write(va, b"through the container")
    m = struct.pack(
        "<IIQQQ", 32, C.VFIO_DMA_MAP_FLAG_READ | C.VFIO_DMA_MAP_FLAG_WRITE, va, 1 << 24, 1 << 16
    )
    container.ioctl(V.VFIO_IOMMU_MAP_DMA, bytearray(m))
    cmd = setup.fn.config_read(4, 2)
    setup.fn.config_write(4, 2, cmd | 0x4)  # bus master
    assert setup.fn.dma_read(1 << 24, 21) == b"through the container"
    # the cdev cannot bind while the group file is open
    cdev = setup.open_cdev()
    assert_errno(errno.EBUSY, lambda: setup.bind(cdev))
    # the group file outlives its fd while the device file is open
    p.close(gfd)
    assert not group.closed
    p.close(dfd)
    assert group.closed and setup.fn.bound_to is None
    p.close(cfd)


def test_group_refusals(setup: VfioSetup) -> None:
    p = setup.proc
    path = _group_path(setup)
    gfd = vfio.open_fd(p, path)
    group = p.files[gfd]
    assert_errno(errno.EBUSY, lambda: vfio.open_fd(p, path))  # one open at a time
    # no container yet
    assert_errno(
        errno.EINVAL, lambda: group.ioctl(V.VFIO_GROUP_GET_DEVICE_FD, _name(setup.fn.bdf), p)
    )
    assert_errno(errno.EINVAL, lambda: group.ioctl(V.VFIO_GROUP_UNSET_CONTAINER, bytearray(), p))
    assert_errno(errno.EBADF, lambda: group.ioctl(V.VFIO_GROUP_SET_CONTAINER, _int(77), p))
    memfd = p.memfd_create(4096)
    assert_errno(errno.EBADFD, lambda: group.ioctl(V.VFIO_GROUP_SET_CONTAINER, _int(memfd), p))
    assert_errno(
        errno.EINVAL, lambda: call(group, V.VFIO_GROUP_GET_STATUS, V.VfioGroupStatus(argsz=4), p)
    )
    # the iommufd of /dev/iommu serves as a container too (iommufd_compat_type1 mode)
    group.ioctl(V.VFIO_GROUP_SET_CONTAINER, _int(setup.iommufd.fd), p)
    assert setup.iommufd.vfio_ioas is not None
    group.ioctl(V.VFIO_GROUP_UNSET_CONTAINER, bytearray(), p)
    assert _status(group, p) == V.VFIO_GROUP_FLAGS_VIABLE
    # bad device names: trailing garbage is no match, unknown options are EINVAL
    group.ioctl(V.VFIO_GROUP_SET_CONTAINER, _int(setup.iommufd.fd), p)
    assert_errno(
        errno.ENODEV, lambda: group.ioctl(V.VFIO_GROUP_GET_DEVICE_FD, _name(setup.fn.bdf + "x"), p)
    )
    assert_errno(
        errno.EINVAL,
        lambda: group.ioctl(V.VFIO_GROUP_GET_DEVICE_FD, _name(setup.fn.bdf + " foo=1"), p),
    )
    p.close(gfd)
    # a bound cdev makes the group not viable and its open EBUSY
    df = setup.open_cdev()
    setup.bind(df)
    assert_errno(errno.EBUSY, lambda: vfio.open_fd(p, path))


def test_two_device_fds_share_one_open(setup: VfioSetup) -> None:
    p = setup.proc
    gfd = vfio.open_fd(p, _group_path(setup))
    group = p.files[gfd]
    group.ioctl(V.VFIO_GROUP_SET_CONTAINER, _int(setup.iommufd.fd), p)
    a = group.ioctl(V.VFIO_GROUP_GET_DEVICE_FD, _name(setup.fn.bdf), p)
    b = group.ioctl(V.VFIO_GROUP_GET_DEVICE_FD, _name(setup.fn.bdf), p)
    vdev = p.files[a].vdev
    assert vdev.open_count == 2
    idev = setup.iommufd.device(vdev.devid)
    assert idev.hwpt is not None and idev.hwpt.ioas is setup.iommufd.vfio_ioas
    p.close(a)
    assert setup.fn.bound_to is setup.iommufd
    p.close(b)
    assert setup.fn.bound_to is None and vdev.open_count == 0
