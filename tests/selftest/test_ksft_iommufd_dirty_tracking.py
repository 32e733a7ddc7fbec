"""Port of the ``iommufd_dirty_tracking`` fixture tests of Linux 7.2's
tools/testing/selftests/iommu/iommufd.c.

The *_huge variants map MAP_HUGETLB memory (``Process.mmap(hugetlb=True)``: physically
contiguous 2 MiB pages) into a MOCK_IOMMUPT_HUGE page table, whose leaves are 1 MiB: one
dirty IOVA marks a whole 1 MiB leaf.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from kutil import HUGEPAGE_SIZE, MOCK_APERTURE_START, MOCK_PAGE_SIZE, PAGE_SIZE, Kfd, pack
from kutil import teardown_iommufd as _teardown

from iommufd_model.mock import selftest as T
from iommufd_model.uapi import iommufd as U

DIRTY_VARIANTS = {  # name: (buffer_size, hugepages)
    "domain_dirty8k": (8 * 1024, False),
    "domain_dirty16k": (16 * 1024, False),
    "domain_dirty64k": (64 * 1024, False),
    "domain_dirty128k": (128 * 1024, False),
    "domain_dirty320k": (320 * 1024, False),
    "domain_dirty64M": (64 * 1024 * 1024, False),
    "domain_dirty64M_huge": (64 * 1024 * 1024, True),
    "domain_dirty128M": (128 * 1024 * 1024, False),
    "domain_dirty128M_huge": (128 * 1024 * 1024, True),
}


@attrs.define
class DirtyFixture:
    k: Kfd
    buffer_size: int
    hugepages: bool
    buffer: int
    bitmap: int
    bitmap_size: int
    ioas_id: int
    stdev_id: int
    hwpt_id: int
    idev_id: int
    page_size: int = MOCK_PAGE_SIZE


@pytest.fixture(params=list(DIRTY_VARIANTS))
def iommufd_dirty_tracking(request: pytest.FixtureRequest, machine: Any) -> Iterator[Any]:
    size, huge = DIRTY_VARIANTS[request.param]
    k = Kfd(machine)
    # posix_memalign(HUGEPAGE_SIZE) + mmap(MAP_SHARED | MAP_ANONYMOUS [| MAP_HUGETLB])
    buffer = k.proc.mmap(size, align=HUGEPAGE_SIZE, hugetlb=huge)
    bitmap_size = size // MOCK_PAGE_SIZE
    # One extra PAGE_SIZE for the unaligned-bitmap cases
    bitmap = k.proc.mmap(-(-bitmap_size // 8) + PAGE_SIZE)
    ioas_id = k.ioas_alloc()
    # The page size fed to the mock page table must be the one the dirty logic expects
    if not huge:
        assert k.option(U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_SET, ioas_id, 0)[0] == 0
    stdev, hwpt, idev = k.mock_domain_ok(ioas_id)
    yield DirtyFixture(k, size, huge, buffer, bitmap, bitmap_size, ioas_id, stdev, hwpt, idev)
    _teardown(k)


def _set_dirty_tracking(k: Kfd, hwpt_id: int, enable: bool) -> int:
    flags = U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE if enable else 0
    return k.ioctl(U.IOMMU_HWPT_SET_DIRTY_TRACKING, pack("IIII", 16, flags, hwpt_id, 0))


def _get_dirty_bitmap(
    k: Kfd, hwpt_id: int, length: int, iova: int, page_size: int, bitmap: int, flags: int
) -> int:
    buf = pack("IIIIQQQQ", 48, hwpt_id, flags, 0, iova, length, page_size, bitmap)
    return k.ioctl(U.IOMMU_HWPT_GET_DIRTY_BITMAP, buf)


def _mock_set_dirty(
    k: Kfd, hwpt_id: int, length: int, iova: int, page_size: int, bitmap: int
) -> tuple[int, int]:
    payload = pack("IIQQQQQ", 0, 0, iova, length, page_size, bitmap, 0)
    rc, buf = k.test_cmd(T.IOMMU_TEST_OP_DIRTY, hwpt_id, payload)
    return rc, struct.unpack_from("<Q", buf, 16 + 40)[0]


def _bits(k: Kfd, bitmap: int, nbits: int) -> int:
    return int.from_bytes(k.proc.read(bitmap, (nbits + 7) // 8), "little")


def _test_mock_dirty_bitmaps(
    k: Kfd,
    hwpt_id: int,
    length: int,
    iova: int,
    page_size: int,
    pte_page_size: int,
    bitmap: int,
    flags: int,
) -> None:
    """``_test_mock_dirty_bitmaps()``: dirty the first bit of every pair of PTEs; the whole
    first PTE reads back dirty (``npte`` bits), then nothing (or the same with NO_CLEAR)."""
    nbits = length // page_size
    nbytes = (nbits + 7) // 8
    npte = pte_page_size // page_size
    pteset = 2 * npte
    marks = sum(1 << i for i in range(0, nbits, pteset))
    k.proc.write(bitmap, marks.to_bytes(nbytes, "little"))
    rc, nr_dirty = _mock_set_dirty(k, hwpt_id, length, iova, page_size, bitmap)
    assert (rc, nr_dirty) == (0, nbits // pteset or 1)
    k.proc.write(bitmap, bytes(nbytes))
    assert _get_dirty_bitmap(k, hwpt_id, length, iova, page_size, bitmap, flags) == 0
    first_ptes = sum(((1 << npte) - 1) << i for i in range(0, nbits, pteset))
    first_ptes &= (1 << nbits) - 1
    assert _bits(k, bitmap, nbits) == first_ptes
    # Read a second time: cleared unless NO_CLEAR
    k.proc.write(bitmap, bytes(nbytes))
    assert _get_dirty_bitmap(k, hwpt_id, length, iova, page_size, bitmap, flags) == 0
    expect = first_ptes if flags & U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR else 0
    assert _bits(k, bitmap, nbits) == expect


def test_iommufd_dirty_tracking__enforce_dirty(iommufd_dirty_tracking: DirtyFixture) -> None:
    t, k = iommufd_dirty_tracking, iommufd_dirty_tracking.k
    no_dirty = T.MOCK_FLAGS_DEVICE_NO_DIRTY
    rc, hwpt = k.hwpt_alloc(t.idev_id, t.ioas_id, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    assert rc == 0
    stdev, _, _ = k.mock_domain_ok(hwpt)
    assert k.mock_domain(hwpt, no_dirty)[0] == errno.EINVAL
    assert k.destroy(stdev) == 0
    assert k.destroy(hwpt) == 0
    # The IOMMU device does not support dirty tracking
    ioas_id = k.ioas_alloc()
    stdev, _, idev = k.mock_domain_ok(ioas_id, no_dirty)
    rc, _ = k.hwpt_alloc(idev, ioas_id, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    assert rc == errno.EOPNOTSUPP
    assert k.destroy(stdev) == 0


def test_iommufd_dirty_tracking__set_dirty_tracking(
    iommufd_dirty_tracking: DirtyFixture,
) -> None:
    t, k = iommufd_dirty_tracking, iommufd_dirty_tracking.k
    rc, hwpt = k.hwpt_alloc(t.idev_id, t.ioas_id, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    assert rc == 0
    stdev, _, _ = k.mock_domain_ok(hwpt)
    assert _set_dirty_tracking(k, hwpt, True) == 0
    assert _set_dirty_tracking(k, hwpt, False) == 0
    assert k.destroy(stdev) == 0
    assert k.destroy(hwpt) == 0


def test_iommufd_dirty_tracking__device_dirty_capability(
    iommufd_dirty_tracking: DirtyFixture,
) -> None:
    t, k = iommufd_dirty_tracking, iommufd_dirty_tracking.k
    rc, hwpt = k.hwpt_alloc(t.idev_id, t.ioas_id, 0)
    assert rc == 0
    stdev, _, _ = k.mock_domain_ok(hwpt)
    buf = pack("IIIIQIBBBBQ", 40, 0, t.idev_id, 0, 0, 0, 0, 0, 0, 0, 0)
    assert k.ioctl(U.IOMMU_GET_HW_INFO, buf) == 0
    caps = struct.unpack_from("<Q", buf, 32)[0]
    assert caps & U.IOMMU_HW_CAP_DIRTY_TRACKING
    assert k.destroy(stdev) == 0
    assert k.destroy(hwpt) == 0


def test_iommufd_dirty_tracking__pasid_set_dirty_tracking(
    iommufd_dirty_tracking: DirtyFixture,
) -> None:
    t, k = iommufd_dirty_tracking, iommufd_dirty_tracking.k
    pasid, dev_flags = 100, T.MOCK_FLAGS_DEVICE_PASID
    flags = U.IOMMU_HWPT_ALLOC_PASID | U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    rc, hwpt = k.hwpt_alloc(t.idev_id, t.ioas_id, flags)
    assert rc == 0
    stdev, _, _ = k.mock_domain_ok(hwpt, dev_flags)
    assert k.pasid_attach(stdev, pasid, hwpt) == 0
    assert _set_dirty_tracking(k, hwpt, True) == 0
    assert _set_dirty_tracking(k, hwpt, False) == 0
    assert k.pasid_detach(stdev, pasid) == 0
    assert k.destroy(stdev) == 0
    # A device without dirty tracking cannot take the domain on a PASID
    ioas_id = k.ioas_alloc()
    stdev, _, _ = k.mock_domain_ok(ioas_id, dev_flags | T.MOCK_FLAGS_DEVICE_NO_DIRTY)
    assert k.pasid_attach(stdev, pasid, hwpt) == errno.EINVAL
    assert k.destroy(stdev) == 0
    assert k.destroy(hwpt) == 0


def _get_dirty_bitmap_test(t: DirtyFixture, flags: int) -> None:
    k = t.k
    pte_size = T.MOCK_HUGE_PAGE_SIZE if t.hugepages else MOCK_PAGE_SIZE
    k.map_ok(t.ioas_id, t.buffer, t.buffer_size, MOCK_APERTURE_START, fixed=True)
    # test_cmd_hwpt_alloc_iommupt(): iommu_hwpt_selftest {iotlb 0, pagetable_type}
    pagetable = T.MOCK_IOMMUPT_HUGE if t.hugepages else T.MOCK_IOMMUPT_DEFAULT
    rc, hwpt = k.hwpt_alloc(
        t.idev_id,
        t.ioas_id,
        U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
        T.IOMMU_HWPT_DATA_SELFTEST,
        pack("II", 0, pagetable),
    )
    assert rc == 0
    assert _set_dirty_tracking(k, hwpt, True) == 0
    size, ps = t.buffer_size, t.page_size
    for bitmap in (t.bitmap, t.bitmap + MOCK_PAGE_SIZE, t.bitmap + 0xFF1):
        # aligned, PAGE_SIZE unaligned, u64 unaligned
        _test_mock_dirty_bitmaps(k, hwpt, size, MOCK_APERTURE_START, ps, pte_size, bitmap, flags)
    assert k.destroy(hwpt) == 0


def test_iommufd_dirty_tracking__get_dirty_bitmap(iommufd_dirty_tracking: DirtyFixture) -> None:
    _get_dirty_bitmap_test(iommufd_dirty_tracking, 0)


def test_iommufd_dirty_tracking__get_dirty_bitmap_no_clear(
    iommufd_dirty_tracking: DirtyFixture,
) -> None:
    _get_dirty_bitmap_test(iommufd_dirty_tracking, U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR)
