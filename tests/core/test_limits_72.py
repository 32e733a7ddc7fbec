"""Linux 7.2's limits and reports the model follows (hw_pagetable.c, eventq.c, ioas.c,
device.c): each is checked before any user memory is read or any object changes."""

from __future__ import annotations

import contextlib
import errno
from functools import partial

import pytest

from helpers import PAGE, World, expect_errno
from iommufd_model.core.eventq import EventFile
from iommufd_model.mock import selftest as T
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import iommufd as U

NEST = U.IOMMU_HWPT_ALLOC_NEST_PARENT


def _nested(w: World) -> int:
    ioas = w.fd.ioas_alloc()
    parent = w.fd.hwpt_alloc(w.dev_id, ioas, flags=NEST)
    return w.fd.hwpt_alloc(
        w.dev_id,
        parent,
        data_type=T.IOMMU_HWPT_DATA_SELFTEST,
        data=T.IOMMU_TEST_IOTLB_DEFAULT.to_bytes(4, "little") + bytes(4),
    )


@pytest.mark.parametrize(
    ("entry_len", "entry_num"),
    [(8, (1 << 19) + 1), (PAGE + 1, 1), (8, 0xFFFF_FFFF)],
)
def test_hwpt_invalidate_bounds_before_reading(entry_len: int, entry_num: int) -> None:
    """entry_num above 1 << 19 or entry_len above PAGE_SIZE: EINVAL, not EFAULT from a
    data_uptr that points nowhere, and entry_num reads back 0."""
    w = World()
    nested = _nested(w)
    st = U.IommuHwptInvalidate(
        hwpt_id=nested,
        data_uptr=0xDEAD_0000,  # unmapped: reading it would be EFAULT
        data_type=T.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
        entry_len=entry_len,
        entry_num=entry_num,
    )
    expect_errno(w.fd, U.IOMMU_HWPT_INVALIDATE, st, errno.EINVAL)
    buf = bytearray(U.IommuHwptInvalidate(size=U.IommuHwptInvalidate.SIZE, **_fields(st)).pack())
    with contextlib.suppress(OSError):
        w.fd.ioctl(U.IOMMU_HWPT_INVALIDATE, buf)
    assert U.IommuHwptInvalidate.unpack(buf).entry_num == 0


def _fields(st: U.IommuHwptInvalidate) -> dict[str, int]:
    return {
        k: getattr(st, k) for k in ("hwpt_id", "data_uptr", "data_type", "entry_len", "entry_num")
    }


def test_hwpt_invalidate_at_the_limit_reads_the_array() -> None:
    """Exactly 1 << 19 entries is allowed: the bad pointer is then EFAULT."""
    w = World()
    nested = _nested(w)
    st = U.IommuHwptInvalidate(
        hwpt_id=nested,
        data_uptr=0xDEAD_0000,
        data_type=T.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
        entry_len=8,
        entry_num=1 << 19,
    )
    expect_errno(w.fd, U.IOMMU_HWPT_INVALIDATE, st, errno.EFAULT)


def test_veventq_depth_bounds() -> None:
    w = World()
    ioas = w.fd.ioas_alloc()
    parent = w.fd.hwpt_alloc(w.dev_id, ioas, flags=NEST)
    viommu = w.fd.viommu_alloc(w.dev_id, parent, T.IOMMU_VIOMMU_TYPE_SELFTEST)
    for depth in (0, (1 << 19) + 1):
        st = U.IommuVeventqAlloc(
            viommu_id=viommu, type=T.IOMMU_VEVENTQ_TYPE_SELFTEST, veventq_depth=depth
        )
        expect_errno(w.fd, U.IOMMU_VEVENTQ_ALLOC, st, errno.EINVAL)
    q, qfd = w.fd.veventq_alloc(viommu, T.IOMMU_VEVENTQ_TYPE_SELFTEST, 1 << 19)
    assert q and qfd


@pytest.mark.parametrize("cmd", ["map", "map_file", "copy"])
def test_map_needs_read_or_write(cmd: str) -> None:
    """ioas.c: a map, map_file or copy with neither READABLE nor WRITEABLE is EINVAL."""
    w = World()
    ioas = w.fd.ioas_alloc()
    fixed = U.IOMMU_IOAS_MAP_FIXED_IOVA
    st: object
    if cmd == "map":
        st = U.IommuIoasMap(flags=fixed, ioas_id=ioas, user_va=w.va, length=PAGE, iova=1 << 24)
        expect_errno(w.fd, U.IOMMU_IOAS_MAP, st, errno.EINVAL)
    elif cmd == "map_file":
        mfd = w.proc.memfd_create(PAGE)
        st = U.IommuIoasMapFile(flags=fixed, ioas_id=ioas, fd=mfd, length=PAGE, iova=1 << 24)
        expect_errno(w.fd, U.IOMMU_IOAS_MAP_FILE, st, errno.EINVAL)
    else:
        st = U.IommuIoasCopy(
            flags=fixed, dst_ioas_id=ioas, src_ioas_id=ioas, length=PAGE, dst_iova=1 << 24
        )
        expect_errno(w.fd, U.IOMMU_IOAS_COPY, st, errno.EINVAL)


@pytest.mark.parametrize(("driver", "ats"), [("mock", True), ("amd", False), ("amd", True)])
def test_hw_info_reports_ats_not_supported(driver: str, ats: bool) -> None:
    """device.c: IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED unless ``capable(ATS_SUPPORTED)``: the
    mock never is (mock_domain_capable); a driver that does not say follows the device."""
    import iommufd_model as im

    machine = im.Machine.build(iommus=[driver])
    dev = machine.add_pci_device(iommu=0, ats=ats)
    fd = machine.new_process().open_iommufd()
    caps = fd.hw_info(fd.bind(dev)).capabilities
    supported = ats and driver != "mock"
    assert bool(caps & U.IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED) is not supported


def test_event_fd_read_sizes() -> None:
    """eventq.c: a vEVENTQ read below one header is EINVAL even when empty; a fault-queue
    read that is not whole iommu_hwpt_pgfault records is ESPIPE."""
    w = World()
    ioas = w.fd.ioas_alloc()
    parent = w.fd.hwpt_alloc(w.dev_id, ioas, flags=NEST)
    viommu = w.fd.viommu_alloc(w.dev_id, parent, T.IOMMU_VIOMMU_TYPE_SELFTEST)
    _, qfd = w.fd.veventq_alloc(viommu, T.IOMMU_VEVENTQ_TYPE_SELFTEST, 2)
    vq = w.proc.files[qfd]
    assert isinstance(vq, EventFile)
    for count in (0, 7):  # struct iommufd_vevent_header is 8 bytes
        assert_errno(errno.EINVAL, partial(vq.read, count))
    assert vq.read(8) == b""
    _, ffd = w.fd.fault_queue_alloc()
    fq = w.proc.files[ffd]
    assert isinstance(fq, EventFile)
    assert_errno(errno.ESPIPE, lambda: fq.read(1))
    assert fq.read(0) == b""
