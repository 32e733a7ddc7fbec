"""The cdev path /dev/vfio/devices/vfioN: the cases of the kernel's vfio_iommufd_setup_test
(Linux 7.2 tools/testing/selftests/vfio) and the errnos of drivers/vfio/device_cdev.c."""

from __future__ import annotations

import errno

from iommufd_model import vfio
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import vfio as V

from .conftest import VfioSetup, call


def _info(df: object, proc: object) -> V.VfioDeviceInfo:
    return call(df, V.VFIO_DEVICE_GET_INFO, V.VfioDeviceInfo(argsz=V.VfioDeviceInfo.SIZE), proc)


def test_bind_then_get_info(setup: VfioSetup) -> None:
    df = setup.open_cdev()
    dev_id = setup.bind(df)
    assert setup.iommufd.device(dev_id).dev is setup.fn
    info = _info(df, setup.proc)
    assert info.flags == V.VFIO_DEVICE_FLAGS_PCI | V.VFIO_DEVICE_FLAGS_RESET
    assert (info.num_regions, info.num_irqs) == (9, 5)


def test_get_info_without_bind_fails(setup: VfioSetup) -> None:
    df = setup.open_cdev()
    assert_errno(errno.EINVAL, lambda: _info(df, setup.proc))
    assert_errno(errno.EINVAL, lambda: df.read(4, 7 << 40))
    assert_errno(errno.EINVAL, lambda: df.mmap_region(0, 4096))


def test_bind_bad_iommufd_fails(setup: VfioSetup) -> None:
    df = setup.open_cdev()
    assert_errno(errno.EINVAL, lambda: setup.bind(df, iommufd=-2))
    assert_errno(errno.EBADF, lambda: setup.bind(df, iommufd=99))
    other = setup.proc.memfd_create(4096)
    assert_errno(errno.EBADFD, lambda: setup.bind(df, iommufd=other))
    assert setup.fn.bound_to is None
    setup.bind(df)  # nothing was left half done


def test_bind_argsz_and_flags(setup: VfioSetup) -> None:
    df = setup.open_cdev()
    base = V.VfioDeviceBindIommufd(argsz=12, iommufd=setup.iommufd.fd)
    assert_errno(errno.EINVAL, lambda: call(df, V.VFIO_DEVICE_BIND_IOMMUFD, base, setup.proc))
    big = V.VfioDeviceBindIommufd(argsz=32, iommufd=setup.iommufd.fd)
    assert_errno(
        errno.E2BIG,
        lambda: call(df, V.VFIO_DEVICE_BIND_IOMMUFD, big, setup.proc, b"\1" + bytes(7)),
    )
    flags = V.VfioDeviceBindIommufd(argsz=24, flags=2, iommufd=setup.iommufd.fd)
    assert_errno(errno.EINVAL, lambda: call(df, V.VFIO_DEVICE_BIND_IOMMUFD, flags, setup.proc))
    # a token for a function that is neither PF nor VF
    va = setup.proc.mmap(4096)
    tok = V.VfioDeviceBindIommufd(
        argsz=24, flags=V.VFIO_DEVICE_BIND_FLAG_TOKEN, iommufd=setup.iommufd.fd, token_uuid_ptr=va
    )
    assert_errno(errno.EINVAL, lambda: call(df, V.VFIO_DEVICE_BIND_IOMMUFD, tok, setup.proc))
    # 16 bytes of zero past a 16-byte struct are fine (copy_struct_from_user)
    ok = V.VfioDeviceBindIommufd(argsz=32, iommufd=setup.iommufd.fd)
    out = call(df, V.VFIO_DEVICE_BIND_IOMMUFD, ok, setup.proc, bytes(8))
    assert out.out_devid


def test_repeated_bind_fails(setup: VfioSetup) -> None:
    df = setup.open_cdev()
    setup.bind(df)
    assert_errno(errno.EINVAL, lambda: setup.bind(df))
    # a second cdev file of the same device cannot bind while the first is open
    df2 = setup.open_cdev()
    assert_errno(errno.EINVAL, lambda: setup.bind(df2))


def test_attach_detach_pt(setup: VfioSetup) -> None:
    df = setup.open_cdev()
    dev_id = setup.bind(df)
    ioas = setup.iommufd.ioas_alloc()
    a = V.VfioDeviceAttachIommufdPt(argsz=V.VfioDeviceAttachIommufdPt.SIZE, pt_id=ioas)
    got = call(df, V.VFIO_DEVICE_ATTACH_IOMMUFD_PT, a, setup.proc)
    idev = setup.iommufd.device(dev_id)
    assert idev.hwpt is not None and got.pt_id == idev.hwpt.id != ioas  # the auto domain
    d = V.VfioDeviceDetachIommufdPt(argsz=V.VfioDeviceDetachIommufdPt.SIZE)
    call(df, V.VFIO_DEVICE_DETACH_IOMMUFD_PT, d, setup.proc)
    assert idev.hwpt is None
    call(df, V.VFIO_DEVICE_DETACH_IOMMUFD_PT, d, setup.proc)  # detach never fails


def test_attach_invalid_pt_fails(setup: VfioSetup) -> None:
    df = setup.open_cdev()
    setup.bind(df)
    a = V.VfioDeviceAttachIommufdPt(argsz=16, pt_id=0xFFFFFFFF)
    assert_errno(errno.ENOENT, lambda: call(df, V.VFIO_DEVICE_ATTACH_IOMMUFD_PT, a, setup.proc))
    short = V.VfioDeviceAttachIommufdPt(argsz=8, pt_id=1)
    assert_errno(errno.EINVAL, lambda: call(df, V.VFIO_DEVICE_ATTACH_IOMMUFD_PT, short, setup.proc))
    flags = V.VfioDeviceAttachIommufdPt(argsz=16, flags=2, pt_id=1)
    assert_errno(errno.EINVAL, lambda: call(df, V.VFIO_DEVICE_ATTACH_IOMMUFD_PT, flags, setup.proc))
    # the PASID form needs the pasid field inside argsz
    p = V.VfioDeviceAttachIommufdPt(argsz=12, flags=V.VFIO_DEVICE_ATTACH_PASID, pt_id=1)
    assert_errno(errno.EINVAL, lambda: call(df, V.VFIO_DEVICE_ATTACH_IOMMUFD_PT, p, setup.proc))


def test_pasid_attach_detach(setup: VfioSetup) -> None:
    if setup.fn.iommu.driver_name != "mock":
        return  # the mock driver takes PASID attachments of any paging HWPT it allocated
    df = setup.open_cdev()
    dev_id = setup.bind(df)
    ioas = setup.iommufd.ioas_alloc()
    hwpt = setup.iommufd.hwpt_alloc(dev_id, ioas, flags=1 << 3)  # IOMMU_HWPT_ALLOC_PASID
    a = V.VfioDeviceAttachIommufdPt(argsz=16, flags=V.VFIO_DEVICE_ATTACH_PASID, pt_id=hwpt, pasid=5)
    call(df, V.VFIO_DEVICE_ATTACH_IOMMUFD_PT, a, setup.proc)
    idev = setup.iommufd.device(dev_id)
    assert idev.pasid_hwpts[5].id == hwpt
    d = V.VfioDeviceDetachIommufdPt(argsz=12, flags=V.VFIO_DEVICE_DETACH_PASID, pasid=5)
    call(df, V.VFIO_DEVICE_DETACH_IOMMUFD_PT, d, setup.proc)
    assert 5 not in idev.pasid_hwpts


def test_close_unbinds_and_iommufd_outlives(setup: VfioSetup) -> None:
    proc = setup.proc
    fd = vfio.open_fd(proc, setup.cdev_path)
    df = proc.files[fd]
    dev_id = setup.bind(df)
    setup.iommufd.attach(dev_id, setup.iommufd.ioas_alloc())
    proc.close(setup.iommufd.fd)  # the bound device file keeps the context alive
    assert not setup.iommufd.closed
    proc.close(fd)
    assert setup.iommufd.closed and setup.fn.bound_to is None


def test_unknown_paths_and_ioctls(setup: VfioSetup) -> None:
    assert vfio.open_path(setup.machine, "/dev/iommu") is None
    assert_errno(errno.ENOENT, lambda: vfio.open_path(setup.machine, "/dev/vfio/devices/vfio9"))
    assert_errno(errno.ENOENT, lambda: vfio.open_path(setup.machine, "/dev/vfio/77"))
    df = setup.open_cdev()
    setup.bind(df)
    assert_errno(errno.ENOTTY, lambda: df.ioctl(V.VFIO_GROUP_GET_STATUS, bytearray(8), setup.proc))
