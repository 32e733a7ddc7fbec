"""Port of the ``iommufd`` fixture tests of tools/testing/selftests/iommu/iommufd.c."""

from __future__ import annotations

import errno
import struct

from kutil import MOCK_APERTURE_START, PAGE_SIZE, Kfd, pack

from iommufd_model.core import vfio_compat as V
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
    "iommu_hwpt_invalidate": (32, U.IOMMU_HWPT_INVALIDATE, 32),
    "iommu_ioas_map_file": (40, U.IOMMU_IOAS_MAP_FILE, 40),
    "iommu_viommu_alloc": (40, U.IOMMU_VIOMMU_ALLOC, 24),
    "iommu_vdevice_alloc": (24, U.IOMMU_VDEVICE_ALLOC, 24),
    "iommu_ioas_change_process": (8, U.IOMMU_IOAS_CHANGE_PROCESS, 8),
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


# -- VFIO compatibility ioctls (core/vfio_compat.py) --------------------------------------
def test_iommufd__simple_ioctls(iommufd: Kfd) -> None:
    assert iommufd.ioctl_value(V.VFIO_GET_API_VERSION, 0) == (0, V.VFIO_API_VERSION)
    assert iommufd.ioctl_value(V.VFIO_CHECK_EXTENSION, V.VFIO_TYPE1v2_IOMMU) == (0, 1)


def test_iommufd__unmap_cmd(iommufd: Kfd) -> None:
    # struct vfio_iommu_type1_dma_unmap {argsz, flags, iova, size}
    unmap = pack("IIQQ", 1, 0, MOCK_APERTURE_START, PAGE_SIZE)
    assert iommufd.ioctl_value(V.VFIO_IOMMU_UNMAP_DMA, unmap)[0] == errno.EINVAL
    unmap[0:8] = struct.pack("<II", 24, 1 << 31)
    assert iommufd.ioctl_value(V.VFIO_IOMMU_UNMAP_DMA, unmap)[0] == errno.EINVAL
    unmap[4:8] = bytes(4)
    assert iommufd.ioctl_value(V.VFIO_IOMMU_UNMAP_DMA, unmap)[0] == errno.ENODEV


def test_iommufd__map_cmd(iommufd: Kfd) -> None:
    # struct vfio_iommu_type1_dma_map {argsz, flags, vaddr, iova, size}
    map_cmd = pack("IIQQQ", 1, 0, iommufd.buffer, MOCK_APERTURE_START, PAGE_SIZE)
    assert iommufd.ioctl_value(V.VFIO_IOMMU_MAP_DMA, map_cmd)[0] == errno.EINVAL
    map_cmd[0:8] = struct.pack("<II", 32, 1 << 31)
    assert iommufd.ioctl_value(V.VFIO_IOMMU_MAP_DMA, map_cmd)[0] == errno.EINVAL
    # Requires a domain to be attached
    flags = V.VFIO_DMA_MAP_FLAG_READ | V.VFIO_DMA_MAP_FLAG_WRITE
    map_cmd[4:8] = struct.pack("<I", flags)
    assert iommufd.ioctl_value(V.VFIO_IOMMU_MAP_DMA, map_cmd)[0] == errno.ENODEV


def test_iommufd__info_cmd(iommufd: Kfd) -> None:
    info = pack("IIQII", 1, 0, 0, 0, 0)  # struct vfio_iommu_type1_info
    assert iommufd.ioctl_value(V.VFIO_IOMMU_GET_INFO, info)[0] == errno.EINVAL
    info[0:4] = struct.pack("<I", 24)
    assert iommufd.ioctl_value(V.VFIO_IOMMU_GET_INFO, info)[0] == errno.ENODEV


def test_iommufd__set_iommu_cmd(iommufd: Kfd) -> None:
    # Requires a domain to be attached
    assert iommufd.ioctl_value(V.VFIO_SET_IOMMU, V.VFIO_TYPE1v2_IOMMU)[0] == errno.ENODEV
    assert iommufd.ioctl_value(V.VFIO_SET_IOMMU, V.VFIO_TYPE1_IOMMU)[0] == errno.ENODEV
