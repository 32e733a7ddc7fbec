"""Port of the ``iommufd`` fixture tests of tools/testing/selftests/iommu/iommufd.c."""

from __future__ import annotations

import errno

from kutil import Kfd, pack

from iommufd_model.uapi import iommufd as U


def test_iommufd__simple_close(iommufd: Kfd) -> None:
    # Open and close only; the fixture's teardown checks that nothing stays pinned.
    assert iommufd.ictx.objects.ids() == []


def test_iommufd__cmd_fail(iommufd: Kfd) -> None:
    assert iommufd.destroy(0) == errno.ENOENT
    assert iommufd.ioctl(U.IOMMU_DESTROY, None) == errno.EFAULT
    unknown = U._IO(U.IOMMUFD_TYPE, U.IOMMUFD_CMD_BASE - 1)
    assert iommufd.ioctl(unknown, pack("II", 8, 0)) == errno.ENOTTY


# (struct size, ioctl, offsetofend of the last mandatory field): the TEST_LENGTH rows.
LENGTHS = {
    "iommu_destroy": (8, U.IOMMU_DESTROY, 8),
    "iommu_hw_info": (40, U.IOMMU_GET_HW_INFO, 32),
    "iommu_hwpt_alloc": (48, U.IOMMU_HWPT_ALLOC, 24),
    "iommu_ioas_alloc": (12, U.IOMMU_IOAS_ALLOC, 12),
    "iommu_ioas_iova_ranges": (32, U.IOMMU_IOAS_IOVA_RANGES, 32),
    "iommu_ioas_allow_iovas": (24, U.IOMMU_IOAS_ALLOW_IOVAS, 24),
    "iommu_ioas_map": (40, U.IOMMU_IOAS_MAP, 40),
    "iommu_ioas_copy": (40, U.IOMMU_IOAS_COPY, 40),
    "iommu_ioas_unmap": (24, U.IOMMU_IOAS_UNMAP, 24),
    "iommu_option": (24, U.IOMMU_OPTION, 24),
    "iommu_vfio_ioas": (12, U.IOMMU_VFIO_IOAS, 12),
}


def test_iommufd__cmd_length(iommufd: Kfd) -> None:
    for name, (size, ioctl, min_size) in LENGTHS.items():
        # struct { struct _struct cmd; uint8_t extra; } with extra = 0xff
        buf = bytearray(size + 1)
        buf[size] = 0xFF
        buf[0:4] = (min_size - 1).to_bytes(4, "little")
        assert iommufd.ioctl(ioctl, buf) == errno.EINVAL, name
        buf[0:4] = (size + 1).to_bytes(4, "little")
        assert iommufd.ioctl(ioctl, buf) == errno.E2BIG, name
        exact = bytearray(size + 1)
        exact[size] = 0xFF
        exact[0:4] = size.to_bytes(4, "little")
        rc = iommufd.ioctl(ioctl, exact)
        longer = bytearray(size + 1)
        longer[0:4] = (size + 1).to_bytes(4, "little")
        assert iommufd.ioctl(ioctl, longer) == rc, name


def test_iommufd__cmd_ex_fail(iommufd: Kfd) -> None:
    buf = pack("IIQ", 16, 0, 0)  # struct iommu_destroy + a __u64 future field
    assert iommufd.ioctl(U.IOMMU_DESTROY, buf) == errno.ENOENT
    buf[8:16] = (1).to_bytes(8, "little")
    assert iommufd.ioctl(U.IOMMU_DESTROY, buf) == errno.E2BIG
    buf[0:4] = (8).to_bytes(4, "little")
    assert iommufd.ioctl(U.IOMMU_DESTROY, buf) == errno.ENOENT
    buf[0:4] = (7).to_bytes(4, "little")
    assert iommufd.ioctl(U.IOMMU_DESTROY, buf) == errno.EINVAL


def test_iommufd__global_options(iommufd: Kfd) -> None:
    k, rl, hp = iommufd, U.IOMMU_OPTION_RLIMIT_MODE, U.IOMMU_OPTION_HUGE_PAGES
    get, set_ = U.IOMMU_OPTION_OP_GET, U.IOMMU_OPTION_OP_SET
    assert k.option(rl, get, 0, 1) == (0, 0)
    assert k.option(rl, set_, 0, 1)[0] == 0  # needs root, which the model's process is
    assert k.option(rl, set_, 0, 2)[0] == errno.EINVAL
    assert k.option(rl, get, 0, 0) == (0, 1)
    assert k.option(rl, set_, 0, 0)[0] == 0
    assert k.option(hp, get, 0, 0)[0] == errno.ENOENT
    assert k.option(hp, set_, 0, 0)[0] == errno.ENOENT


def test_iommufd__vfio_ioas(iommufd: Kfd) -> None:
    def vfio_ioas(op: int, ioas_id: int = 0) -> tuple[int, int]:
        buf = pack("IIHH", 12, ioas_id, op, 0)
        rc = iommufd.ioctl(U.IOMMU_VFIO_IOAS, buf)
        return rc, int.from_bytes(buf[4:8], "little")

    assert vfio_ioas(U.IOMMU_VFIO_IOAS_GET)[0] == errno.ENODEV
    assert vfio_ioas(U.IOMMU_VFIO_IOAS_SET)[0] == errno.ENOENT
    ioas_id = iommufd.ioas_alloc()
    assert vfio_ioas(U.IOMMU_VFIO_IOAS_SET, ioas_id)[0] == 0
    assert vfio_ioas(U.IOMMU_VFIO_IOAS_GET) == (0, ioas_id)
    assert vfio_ioas(U.IOMMU_VFIO_IOAS_CLEAR)[0] == 0
    assert vfio_ioas(U.IOMMU_VFIO_IOAS_GET)[0] == errno.ENODEV
