"""Port of the ``iommufd_ioas`` fixture tests of tools/testing/selftests/iommu/iommufd.c.

Each test runs under the four kernel variants (no_domain, mock_domain, two_mock_domain,
mock_domain_limit) through the parametrised ``iommufd_ioas`` fixture.
"""

from __future__ import annotations

import errno
import random
import struct

from kutil import (
    BUFFER_SIZE,
    HUGEPAGE_SIZE,
    MOCK_APERTURE_LAST,
    MOCK_APERTURE_START,
    MOCK_PAGE_SIZE,
    PAGE_SIZE,
    U64_MAX,
    IoasFixture,
    Kfd,
    pack,
)

from iommufd_model.mock import selftest as T
from iommufd_model.uapi import iommufd as U


def _lowbit(x: int) -> int:
    return x & -x


def test_iommufd_ioas__ioas_auto_destroy(iommufd_ioas: IoasFixture) -> None:
    # Closing the fd with the IOAS (and any mock device) alive frees everything.
    assert iommufd_ioas.ioas_id in iommufd_ioas.k.ictx.objects.ids()


def test_iommufd_ioas__ioas_destroy(iommufd_ioas: IoasFixture) -> None:
    t = iommufd_ioas
    if t.stdev_id:
        assert t.k.destroy(t.ioas_id) == errno.EBUSY  # a device's HWPT uses it
    else:
        assert t.k.destroy(t.ioas_id) == 0


def test_iommufd_ioas__hwpt_attach(iommufd_ioas: IoasFixture) -> None:
    t = iommufd_ioas
    if t.stdev_id:
        t.k.mock_domain_ok(t.hwpt_id)  # a device attached straight to the HWPT
    else:
        assert t.k.mock_domain(t.hwpt_id)[0] == errno.ENOENT


def test_iommufd_ioas__ioas_area_destroy(iommufd_ioas: IoasFixture) -> None:
    t = iommufd_ioas
    t.k.map_ok(t.ioas_id, t.k.buffer, PAGE_SIZE, t.base_iova, fixed=True)
    if t.stdev_id:
        assert t.k.destroy(t.ioas_id) == errno.EBUSY
    else:
        assert t.k.destroy(t.ioas_id) == 0


def test_iommufd_ioas__ioas_area_auto_destroy(iommufd_ioas: IoasFixture) -> None:
    t = iommufd_ioas
    for i in range(10):
        t.k.map_ok(t.ioas_id, t.k.buffer, PAGE_SIZE, t.base_iova + i * PAGE_SIZE, fixed=True)


def _get_hw_info(
    k: Kfd, dev_id: int, data_len: int, data_type: int = U.IOMMU_HW_INFO_TYPE_DEFAULT
) -> tuple[int, int, int]:
    """``_test_cmd_get_hw_info()`` with its checks: (errno, capabilities, max_pasid_log2)."""
    uptr = k.proc.mmap(PAGE_SIZE) if data_len else 0
    if data_len:
        k.proc.write(uptr, b"\xff" * data_len)
    flags = U.IOMMU_HW_INFO_FLAG_INPUT_TYPE if data_type != U.IOMMU_HW_INFO_TYPE_DEFAULT else 0
    buf = pack("IIIIQIBBBBQ", 40, flags, dev_id, data_len, uptr, data_type, 0, 0, 0, 0, 0)
    rc = k.ioctl(U.IOMMU_GET_HW_INFO, buf)
    if rc:
        return rc, 0, 0
    out_len, out_type = struct.unpack_from("<I", buf, 12)[0], struct.unpack_from("<I", buf, 24)[0]
    assert out_type == T.IOMMU_HW_INFO_TYPE_SELFTEST
    assert out_len == 8  # sizeof(struct iommu_test_hw_info)
    if data_len:
        data = k.proc.read(uptr, data_len)
        assert not any(data[out_len:]), "trailing bytes must be zeroed"
        if data_len >= 8:
            assert struct.unpack_from("<I", data, 4)[0] == T.IOMMU_HW_INFO_SELFTEST_REGVAL
        if data_len >= 4:
            assert struct.unpack_from("<I", data, 0)[0] == 0
    return 0, struct.unpack_from("<Q", buf, 32)[0], buf[28]


def test_iommufd_ioas__get_hw_info(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    if t.device_id:
        for data_len in (0, 8):  # none, exact
            assert _get_hw_info(k, t.device_id, data_len)[0] == 0
        # a wrong data_type, then the right one
        bad = T.IOMMU_HW_INFO_TYPE_SELFTEST + 1
        assert _get_hw_info(k, t.device_id, 8, bad)[0] == errno.EOPNOTSUPP
        assert _get_hw_info(k, t.device_id, 8, T.IOMMU_HW_INFO_TYPE_SELFTEST)[0] == 0
        for data_len in (16, 4):  # larger (trailing bytes zeroed), smaller (up to flags)
            assert _get_hw_info(k, t.device_id, data_len)[0] == 0
        assert _get_hw_info(k, t.device_id, 0)[2] == 0
        if t.variant.pasid_capable:
            assert _get_hw_info(k, t.device_pasid_id, 0)[2] == T.MOCK_PASID_WIDTH
    else:
        assert _get_hw_info(k, t.device_id, 8)[0] == errno.ENOENT
        assert _get_hw_info(k, t.device_id, 16)[0] == errno.ENOENT


def test_iommufd_ioas__area(iommufd_ioas: IoasFixture) -> None:
    t, k, buf = iommufd_ioas, iommufd_ioas.k, iommufd_ioas.k.buffer
    for i in range(10):
        assert k.unmap(t.ioas_id, i * PAGE_SIZE, PAGE_SIZE)[0] == errno.ENOENT
    for i in range(10):
        k.map_ok(t.ioas_id, buf, PAGE_SIZE, t.base_iova + i * PAGE_SIZE, fixed=True)
    for i in range(10):
        k.unmap_ok(t.ioas_id, t.base_iova + i * PAGE_SIZE, PAGE_SIZE)
    # Split fails
    k.map_ok(t.ioas_id, buf, PAGE_SIZE * 2, t.base_iova + 16 * PAGE_SIZE, fixed=True)
    assert k.unmap(t.ioas_id, t.base_iova + 16 * PAGE_SIZE, PAGE_SIZE)[0] == errno.ENOENT
    assert k.unmap(t.ioas_id, t.base_iova + 17 * PAGE_SIZE, PAGE_SIZE)[0] == errno.ENOENT
    # Over map fails
    for length, page in ((2, 16), (1, 16), (1, 17), (2, 15), (3, 15)):
        rc, _ = k.map(
            t.ioas_id, buf, PAGE_SIZE * length, t.base_iova + page * PAGE_SIZE, fixed=True
        )
        assert rc == errno.EEXIST, (length, page)
    k.unmap_ok(t.ioas_id, 0, U64_MAX)  # unmap all works
    k.unmap_ok(t.ioas_id, 0, U64_MAX)  # and succeeds on an empty IOAS


def test_iommufd_ioas__unmap_fully_contained_areas(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    base = t.base_iova + 4 * PAGE_SIZE
    for i in range(4):
        k.map_ok(t.ioas_id, k.buffer, 8 * PAGE_SIZE, base + i * 16 * PAGE_SIZE, fixed=True)
    assert k.unmap(t.ioas_id, base - 4 * PAGE_SIZE, 8 * PAGE_SIZE)[0] == errno.ENOENT
    partial_tail = base + 3 * 16 * PAGE_SIZE + 8 * PAGE_SIZE - 4 * PAGE_SIZE
    assert k.unmap(t.ioas_id, partial_tail, 8 * PAGE_SIZE)[0] == errno.ENOENT
    rc, unmapped = k.unmap(
        t.ioas_id, base - 4 * PAGE_SIZE, 3 * 16 * PAGE_SIZE + 8 * PAGE_SIZE + 4 * PAGE_SIZE
    )
    assert (rc, unmapped) == (0, 32 * PAGE_SIZE)


def test_iommufd_ioas__area_auto_iova(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    resv_start, resv_len = PAGE_SIZE * 4, PAGE_SIZE * 100
    iovas = [k.map_ok(t.ioas_id, k.buffer, PAGE_SIZE) for _ in range(10)]
    for iova in iovas:
        k.unmap_ok(t.ioas_id, iova, PAGE_SIZE)
    # The kernel aligns automatic IOVAs to the length's lowest set bit.
    lengths = [PAGE_SIZE * (i + 1) for i in range(10)]
    va = k.buffer if t.stdev_id else 1 << 31  # without a domain nothing is pinned
    iovas = [k.map_ok(t.ioas_id, va, length) for length in lengths]
    for iova, length in zip(iovas, lengths, strict=True):
        assert iova % _lowbit(length) == 0
    for iova, length in zip(iovas, lengths, strict=True):
        k.unmap_ok(t.ioas_id, iova, length)
    # Avoids a reserved region
    assert k.add_reserved(t.ioas_id, resv_start, resv_len) == 0
    iovas = [k.map_ok(t.ioas_id, k.buffer, length) for length in lengths]
    for iova, length in zip(iovas, lengths, strict=True):
        assert iova % _lowbit(length) == 0
        assert not resv_start < iova < resv_start + resv_len
    for iova, length in zip(iovas, lengths, strict=True):
        k.unmap_ok(t.ioas_id, iova, length)
    # Allowed region intersects with a reserved region
    assert k.allow_iovas(t.ioas_id, [(PAGE_SIZE, PAGE_SIZE * 600)]) == errno.EADDRINUSE
    # Allocate from an allowed region
    if t.stdev_id:
        start, last = MOCK_APERTURE_START + PAGE_SIZE, MOCK_APERTURE_START + PAGE_SIZE * 600 - 1
    else:
        start, last = PAGE_SIZE * 200, PAGE_SIZE * 600 - 1
    assert k.allow_iovas(t.ioas_id, [(start, last)]) == 0
    iovas = [k.map_ok(t.ioas_id, k.buffer, length) for length in lengths]
    for iova, length in zip(iovas, lengths, strict=True):
        assert iova % _lowbit(length) == 0
        assert start <= iova <= last and iova + length <= last + 1
    for iova, length in zip(iovas, lengths, strict=True):
        k.unmap_ok(t.ioas_id, iova, length)


def test_iommufd_ioas__area_allowed(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    start = t.base_iova
    # Reserved intersects an allowed
    assert k.allow_iovas(t.ioas_id, [(start, start + PAGE_SIZE * 600)]) == 0
    assert k.add_reserved(t.ioas_id, start + PAGE_SIZE, PAGE_SIZE) == errno.EADDRINUSE
    assert k.allow_iovas(t.ioas_id, []) == 0
    # Allowed intersects a reserved
    assert k.add_reserved(t.ioas_id, start + PAGE_SIZE, PAGE_SIZE) == 0
    assert k.allow_iovas(t.ioas_id, [(start, start + PAGE_SIZE * 600)]) == errno.EADDRINUSE


def test_iommufd_ioas__copy_area(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    k.map_ok(t.ioas_id, k.buffer, PAGE_SIZE, t.base_iova, fixed=True)
    # Copy inside a single IOAS
    assert k.copy(t.ioas_id, t.ioas_id, PAGE_SIZE, t.base_iova + PAGE_SIZE, t.base_iova) == 0
    # Copy between IOAS's
    dst = k.ioas_alloc()
    assert k.copy(dst, t.ioas_id, PAGE_SIZE, 0, t.base_iova) == 0


def _iova_ranges(k: Kfd, ioas_id: int, num: int, uptr: int) -> tuple[int, int, int]:
    buf = pack("IIIIQQ", 32, ioas_id, num, 0, uptr, 0)
    rc = k.ioctl(U.IOMMU_IOAS_IOVA_RANGES, buf)
    return rc, struct.unpack_from("<I", buf, 8)[0], struct.unpack_from("<Q", buf, 24)[0]


def test_iommufd_ioas__iova_ranges(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    ranges = k.buffer  # struct iommu_iova_range *ranges = buffer

    def read_range(i: int) -> tuple[int, int]:
        start, last = struct.unpack("<QQ", k.proc.read(ranges + 16 * i, 16))
        return start, last

    rc, num, align = _iova_ranges(k, t.ioas_id, BUFFER_SIZE // 16, ranges)
    assert (rc, num) == (0, 1)
    if not t.stdev_id:
        assert read_range(0) == (0, U64_MAX) and align == 1
    else:
        assert read_range(0) == (MOCK_APERTURE_START, MOCK_APERTURE_LAST)
        assert align == MOCK_PAGE_SIZE
    # Buffer too small
    k.proc.write(ranges, bytes(BUFFER_SIZE))
    rc, num, _ = _iova_ranges(k, t.ioas_id, 0, ranges)
    assert (rc, num) == (errno.EMSGSIZE, 1)
    assert read_range(0) == (0, 0)
    # 2 ranges
    assert k.add_reserved(t.ioas_id, PAGE_SIZE, PAGE_SIZE) == 0
    rc, num, _ = _iova_ranges(k, t.ioas_id, BUFFER_SIZE // 16, ranges)
    assert rc == 0
    if not t.stdev_id:
        assert num == 2
        assert read_range(0) == (0, PAGE_SIZE - 1)
        assert read_range(1) == (PAGE_SIZE * 2, U64_MAX)
    else:
        assert num == 1
        assert read_range(0) == (MOCK_APERTURE_START, MOCK_APERTURE_LAST)
    # Buffer too small
    k.proc.write(ranges, bytes(BUFFER_SIZE))
    rc, num, _ = _iova_ranges(k, t.ioas_id, 1, ranges)
    if not t.stdev_id:
        assert (rc, num) == (errno.EMSGSIZE, 2)
        assert read_range(0) == (0, PAGE_SIZE - 1)
    else:
        assert (rc, num) == (0, 1)
        assert read_range(0) == (MOCK_APERTURE_START, MOCK_APERTURE_LAST)
    assert read_range(1) == (0, 0)


def test_iommufd_ioas__access_domain_destory(iommufd_ioas: IoasFixture) -> None:
    # The kernel maps 2 MAP_HUGETLB pages; the model has no huge pages, so this runs on
    # 4 KiB pages spanning the same 2 MiB boundary.
    t, k = iommufd_ioas, iommufd_ioas.k
    buf_size = 2 * HUGEPAGE_SIZE
    buf = k.proc.mmap(buf_size, align=HUGEPAGE_SIZE)
    k.map_ok(t.ioas_id, buf, buf_size, t.base_iova, fixed=True)
    access = k.create_access(t.ioas_id, T.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)
    rc, item = k.access_pages(access, t.base_iova + PAGE_SIZE, PAGE_SIZE, buf + PAGE_SIZE)
    assert rc == 0
    if t.stdev_id:
        assert k.destroy(t.stdev_id) == 0  # unpins across the (huge) page boundary
    assert k.destroy_access_pages(access, item) == 0
    k.destroy_access(access)
    k.proc.munmap(buf, buf_size)


def test_iommufd_ioas__access_pin(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    access = k.create_access(t.ioas_id, T.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)
    for npages in range(1, BUFFER_SIZE // PAGE_SIZE):
        length = npages * PAGE_SIZE
        # Single map/unmap
        k.map_ok(t.ioas_id, k.buffer, BUFFER_SIZE, MOCK_APERTURE_START, fixed=True)
        rc, item = k.access_pages(access, MOCK_APERTURE_START, length, k.buffer)
        assert rc == 0
        assert k.destroy_access_pages(access, item) == 0
        # Double user
        rc, first = k.access_pages(access, MOCK_APERTURE_START, length, k.buffer)
        assert rc == 0
        rc, second = k.access_pages(access, MOCK_APERTURE_START, length, k.buffer)
        assert rc == 0
        assert k.destroy_access_pages(access, second) == 0
        assert k.destroy_access_pages(access, first) == 0
        # Add/remove a domain with a user
        rc, item = k.access_pages(access, MOCK_APERTURE_START, length, k.buffer)
        assert rc == 0
        stdev, hwpt, _ = k.mock_domain_ok(t.ioas_id)
        assert k.check_map(hwpt, MOCK_APERTURE_START, BUFFER_SIZE, k.buffer) == 0
        assert k.destroy(stdev) == 0
        assert k.destroy_access_pages(access, item) == 0
        k.unmap_ok(t.ioas_id, MOCK_APERTURE_START, BUFFER_SIZE)
    k.destroy_access(access)


def test_iommufd_ioas__access_pin_unmap(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    access = k.create_access(t.ioas_id, T.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)
    k.map_ok(t.ioas_id, k.buffer, BUFFER_SIZE, MOCK_APERTURE_START, fixed=True)
    rc, item = k.access_pages(access, MOCK_APERTURE_START, BUFFER_SIZE, k.buffer)
    assert rc == 0
    k.unmap_ok(t.ioas_id, MOCK_APERTURE_START, BUFFER_SIZE)  # triggers the unmap op
    assert k.destroy_access_pages(access, item) == errno.ENOENT  # the item went with it
    k.destroy_access(access)


def check_access_rw(k: Kfd, access: int, iova: int, def_flags: int) -> None:
    """``check_access_rw()``: byte-exact reads and writes around a page boundary."""
    rng = random.Random(iova ^ def_flags)
    k.proc.write(k.buffer, rng.randbytes(BUFFER_SIZE))
    tmp = k.proc.mmap(PAGE_SIZE)  # uint16_t tmp[32]: 64 bytes
    for cur in range(iova + PAGE_SIZE - 50, iova + PAGE_SIZE + 50):
        for length in range(1, 64):
            assert k.access_rw(access, cur, length, tmp, def_flags) == 0
            expect = k.proc.read(k.buffer + (cur - iova), length)
            assert k.proc.read(tmp, length) == expect
            k.proc.write(tmp, rng.randbytes(64))
            flags = def_flags | T.MOCK_ACCESS_RW_WRITE
            assert k.access_rw(access, cur, length, tmp, flags) == 0
            assert k.proc.read(k.buffer + (cur - iova), length) == k.proc.read(tmp, length)
    # Multi-page
    tmp2 = k.proc.mmap(BUFFER_SIZE)
    assert k.access_rw(access, iova, BUFFER_SIZE, tmp2, def_flags) == 0
    assert k.proc.read(tmp2, BUFFER_SIZE) == k.proc.read(k.buffer, BUFFER_SIZE)


def test_iommufd_ioas__access_rw(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    access = k.create_access(t.ioas_id, 0)
    iova = k.map_ok(t.ioas_id, k.buffer, BUFFER_SIZE)
    check_access_rw(k, access, iova, 0)
    check_access_rw(k, access, iova, T.MOCK_ACCESS_RW_SLOW_PATH)
    k.unmap_ok(t.ioas_id, iova, BUFFER_SIZE)
    k.destroy_access(access)


def test_iommufd_ioas__access_rw_unaligned(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    access = k.create_access(t.ioas_id, 0)
    iova = t.base_iova + MOCK_PAGE_SIZE
    k.map_ok(t.ioas_id, k.buffer, BUFFER_SIZE, iova, fixed=True)
    check_access_rw(k, access, iova, 0)
    k.unmap_ok(t.ioas_id, iova, BUFFER_SIZE)
    k.destroy_access(access)


def test_iommufd_ioas__ioas_option_huge_pages(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    hp, get, set_ = U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_GET, U.IOMMU_OPTION_OP_SET
    assert k.option(hp, get, t.ioas_id, 3) == (0, 1)
    assert k.option(hp, set_, t.ioas_id, 0)[0] == 0
    assert k.option(hp, get, t.ioas_id, 3) == (0, 0)
    assert k.option(hp, set_, t.ioas_id, 2)[0] == errno.EINVAL
    assert k.option(hp, set_, t.ioas_id, 1)[0] == 0


def test_iommufd_ioas__ioas_iova_alloc(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    for length in range(1, PAGE_SIZE * 2):
        if t.variant.mock_domains and length % MOCK_PAGE_SIZE:
            assert k.map(t.ioas_id, k.buffer, length)[0] == errno.EINVAL
        else:
            iova = k.map_ok(t.ioas_id, k.buffer, length)
            k.unmap_ok(t.ioas_id, iova, length)


def test_iommufd_ioas__ioas_align_change(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    hp, set_ = U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_SET
    if t.variant.mock_domains:
        return  # the kernel test has nothing to check with a domain and map present
    # Upgrade to PAGE_SIZE alignment when things are aligned right
    k.map_ok(t.ioas_id, k.buffer, PAGE_SIZE, MOCK_APERTURE_START, fixed=True)
    assert k.option(hp, set_, t.ioas_id, 0)[0] == 0
    # Misalignment is rejected at map time
    rc, _ = k.map(
        t.ioas_id, k.buffer + MOCK_PAGE_SIZE, PAGE_SIZE, MOCK_APERTURE_START + PAGE_SIZE, fixed=True
    )
    assert rc == errno.EINVAL
    assert k.option(hp, set_, t.ioas_id, 0)[0] == 0
    # Reduce alignment
    assert k.option(hp, set_, t.ioas_id, 1)[0] == 0
    # Misalignment is rejected during the alignment upgrade
    k.map_ok(
        t.ioas_id, k.buffer + MOCK_PAGE_SIZE, PAGE_SIZE, MOCK_APERTURE_START + PAGE_SIZE, fixed=True
    )
    assert k.option(hp, set_, t.ioas_id, 0)[0] == errno.EADDRINUSE
    k.unmap_ok(t.ioas_id, MOCK_APERTURE_START + PAGE_SIZE, PAGE_SIZE)
    k.unmap_ok(t.ioas_id, MOCK_APERTURE_START, PAGE_SIZE)


def test_iommufd_ioas__copy_sweep(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    dst = k.ioas_alloc()
    if t.variant.mock_domains:
        last_iova = MOCK_APERTURE_START + BUFFER_SIZE - 1
    else:
        last_iova = MOCK_APERTURE_START + BUFFER_SIZE - 2
    k.map_ok(
        t.ioas_id, k.buffer, last_iova - MOCK_APERTURE_START + 1, MOCK_APERTURE_START, fixed=True
    )
    for iova in range(MOCK_APERTURE_START - PAGE_SIZE, last_iova + 1, 511):
        rc = k.copy(dst, t.ioas_id, MOCK_PAGE_SIZE, MOCK_APERTURE_START, iova)
        if iova < MOCK_APERTURE_START or iova + MOCK_PAGE_SIZE - 1 > last_iova:
            assert rc == errno.ENOENT, hex(iova)
        else:
            assert rc == 0, (hex(iova), rc)
            k.unmap_ok(dst, MOCK_APERTURE_START, MOCK_PAGE_SIZE)
    assert k.destroy(dst) == 0


def test_iommufd_ioas__reserved_overflow(iommufd_ioas: IoasFixture) -> None:
    # A reserved range ending just below 2^64 leaves no room for a 5-page map (syzbot).
    t, k = iommufd_ioas, iommufd_ioas.k
    assert k.add_reserved(t.ioas_id, 6, 0xFFFF_FFFF_FFFF_8001) == 0
    assert k.map(t.ioas_id, k.buffer, 0x5000)[0] == errno.ENOSPC


def test_iommufd_ioas__alloc_hwpt_nested(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    data = pack("II", T.IOMMU_TEST_IOTLB_DEFAULT, 0)
    sel = T.IOMMU_HWPT_DATA_SELFTEST
    inv_sel = T.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST
    dev = t.device_id
    if not dev:
        assert k.hwpt_alloc(dev, t.ioas_id, 0)[0] == errno.ENOENT
        assert k.hwpt_alloc(dev, 0, 0, sel, data)[0] == errno.ENOENT
        assert k.mock_domain_replace(t.stdev_id, 0) == errno.ENOENT
        return
    nest_parent = U.IOMMU_HWPT_ALLOC_NEST_PARENT
    # Negative tests
    assert k.hwpt_alloc(t.ioas_id, dev, 0)[0] == errno.ENOENT
    assert k.hwpt_alloc(dev, dev, 0)[0] == errno.EINVAL
    flags = nest_parent | U.IOMMU_HWPT_FAULT_ID_VALID
    assert k.hwpt_alloc(dev, t.ioas_id, flags)[0] == errno.EOPNOTSUPP
    parent = k.hwpt_alloc_ok(dev, t.ioas_id, nest_parent)
    parent_not_work = k.hwpt_alloc_ok(dev, t.ioas_id, 0)
    # Negative nested tests
    assert k.hwpt_alloc(dev, parent, 0, U.IOMMU_HWPT_DATA_NONE, data)[0] == errno.EINVAL
    assert k.hwpt_alloc(dev, parent, 0, sel + 1, data)[0] == errno.EOPNOTSUPP
    assert k.hwpt_alloc(dev, parent, 0, sel, data, data_len=3)[0] == errno.EINVAL
    assert k.hwpt_alloc(dev, parent, 0, sel, None, data_len=8)[0] == errno.EFAULT
    assert k.hwpt_alloc(dev, parent, nest_parent, sel, data)[0] == errno.EOPNOTSUPP
    assert k.hwpt_alloc(dev, parent_not_work, 0, sel, data)[0] == errno.EINVAL
    # Two nested HWPTs sharing one parent, and one with a fault queue
    fault_id, fault_fd = k.fault_alloc()
    nested = [k.hwpt_alloc_ok(dev, parent, 0, sel, data) for _ in range(2)]
    fault_valid = U.IOMMU_HWPT_FAULT_ID_VALID
    rc, _ = k.hwpt_alloc(dev, parent, fault_valid, sel, data, fault_id=0xFFFF_FFFF)
    assert rc == errno.ENOENT
    iopf_hwpt = k.hwpt_alloc_ok(dev, parent, fault_valid, sel, data, fault_id=fault_id)
    k.check_iotlb_all(nested[0], T.IOMMU_TEST_IOTLB_DEFAULT)
    k.check_iotlb_all(nested[1], T.IOMMU_TEST_IOTLB_DEFAULT)
    # a nested HWPT over a nested HWPT; the parent is busy now
    assert k.hwpt_alloc(dev, nested[0], 0, sel, data)[0] == errno.EINVAL
    assert k.destroy(parent) == errno.EBUSY

    def inv(
        hwpt: int,
        reqs: bytes | bytearray | None,
        num: int,
        *,
        dtype: int = inv_sel,
        entry_len: int = 8,
    ) -> tuple[int, int]:
        return k.hwpt_invalidate(hwpt, reqs, dtype, entry_len, num)

    zero = bytes(16)
    # hwpt_invalidate does not support a parent hwpt
    assert inv(parent, zero, 1) == (errno.EINVAL, 0)
    # data_type probe with an empty array
    assert inv(nested[0], zero, 0) == (0, 0)
    assert inv(nested[0], zero, 1, dtype=T.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID) == (
        errno.EINVAL,
        0,
    )
    # structure size sanity
    assert inv(nested[0], zero, 1, entry_len=9) == (errno.EINVAL, 0)
    assert inv(nested[0], zero, 1, entry_len=1) == (errno.EINVAL, 0)
    # invalid flags; NULL data_uptr and zero entry_len with a non-empty array
    assert inv(nested[0], pack("II", 0xFFFF_FFFF, 0), 1) == (errno.EOPNOTSUPP, 0)
    assert inv(nested[0], None, 1) == (errno.EINVAL, 0)
    assert inv(nested[0], zero, 1, entry_len=0) == (errno.EINVAL, 0)
    # invalid iotlb_id
    too_big = T.MOCK_NESTED_DOMAIN_IOTLB_ID_MAX + 1
    assert inv(nested[0], pack("II", 0, too_big), 1) == (errno.EINVAL, 0)

    def check(hwpt: int, expected: list[int]) -> None:
        for i, value in enumerate(expected):
            assert k.check_iotlb(hwpt, i, value) == 0, (i, value)

    dflt = T.IOMMU_TEST_IOTLB_DEFAULT
    # the 1st entry is handled, the 2nd fails on its flags, then on its iotlb_id
    assert inv(nested[0], pack("IIII", 0, 0, 0xFFFF_FFFF, 1), 2) == (errno.EOPNOTSUPP, 1)
    check(nested[0], [0, dflt, dflt, dflt])
    assert inv(nested[0], pack("IIII", 0, 0, 0, too_big), 2) == (errno.EINVAL, 1)
    check(nested[0], [0, dflt, dflt, dflt])
    # the 2nd entry, then the 3rd and 4th
    assert inv(nested[0], pack("II", 0, 1), 1) == (0, 1)
    check(nested[0], [0, 0, dflt, dflt])
    assert inv(nested[0], pack("IIII", 0, 2, 0, 3), 2) == (0, 2)
    k.check_iotlb_all(nested[0], 0)
    # all entries of nested[1] at once
    assert inv(nested[1], pack("II", T.IOMMU_TEST_INVALIDATE_FLAG_ALL, 0), 1) == (0, 1)
    k.check_iotlb_all(nested[1], 0)
    # attach nested[0] (busy), switch to nested[1], then to the IOPF-capable one
    assert k.mock_domain_replace(t.stdev_id, nested[0]) == 0
    assert k.destroy(nested[0]) == errno.EBUSY
    assert k.mock_domain_replace(t.stdev_id, nested[1]) == 0
    assert k.destroy(nested[1]) == errno.EBUSY
    assert k.destroy(nested[0]) == 0
    assert k.mock_domain_replace(t.stdev_id, iopf_hwpt) == 0
    assert k.destroy(iopf_hwpt) == errno.EBUSY
    assert k.trigger_iopf(dev, 0x1, fault_fd) == 0
    # back to the parent, then to the IOAS; everything can go
    assert k.mock_domain_replace(t.stdev_id, parent) == 0
    assert k.destroy(nested[1]) == 0
    assert k.destroy(iopf_hwpt) == 0
    assert k.mock_domain_replace(t.stdev_id, t.ioas_id) == 0
    assert k.destroy(parent) == 0
    assert k.destroy(parent_not_work) == 0
    k.proc.close(fault_fd)
    assert k.destroy(fault_id) == 0


def _get_dmabuf(k: Kfd, length: int) -> int:
    """``test_cmd_get_dmabuf()``: the fd comes back as the ioctl's value."""
    buf = pack("IIII", 72, T.IOMMU_TEST_OP_DMABUF_GET, 0, 0)
    buf += pack("II", length, 0o2000000).ljust(48, b"\0") + pack("II", 0, 0)  # O_CLOEXEC
    rc, fd = k.ioctl_value(T.IOMMU_TEST_CMD, buf)
    assert rc == 0 and fd > 0
    return fd


def _revoke_dmabuf(k: Kfd, fd: int, revoked: bool) -> None:
    payload = pack("iI", fd, int(revoked))
    assert k.test_cmd(T.IOMMU_TEST_OP_DMABUF_REVOKE, 0, payload)[0] == 0


def _map_file(
    k: Kfd, ioas_id: int, fd: int, start: int, length: int, iova: int = 0, *, fixed: bool = False
) -> tuple[int, int]:
    flags = U.IOMMU_IOAS_MAP_WRITEABLE | U.IOMMU_IOAS_MAP_READABLE
    if fixed:
        flags |= U.IOMMU_IOAS_MAP_FIXED_IOVA
    buf = pack("IIIiQQQ", 40, flags, ioas_id, fd, start, length, iova)
    return k.ioctl(U.IOMMU_IOAS_MAP_FILE, buf), struct.unpack_from("<Q", buf, 32)[0]


def test_iommufd_ioas__dmabuf_simple(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    size = PAGE_SIZE * 4
    dfd = _get_dmabuf(k, size)
    assert _map_file(k, t.ioas_id, dfd, 0, 0)[0] == errno.EINVAL
    assert _map_file(k, t.ioas_id, dfd, size, size)[0] == errno.EINVAL
    assert _map_file(k, t.ioas_id, dfd, 0, size + 1)[0] == errno.EINVAL
    assert _map_file(k, t.ioas_id, dfd, 0, size)[0] == 0
    k.proc.close(dfd)


def test_iommufd_ioas__dmabuf_revoke(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    size = PAGE_SIZE * 4
    dfd = _get_dmabuf(k, size)
    rc, iova = _map_file(k, t.ioas_id, dfd, 0, size)
    assert rc == 0
    _revoke_dmabuf(k, dfd, True)
    if t.variant.mock_domains:
        assert k.hwpt_alloc(t.device_id, t.ioas_id, 0)[0] == 0
    assert _map_file(k, t.ioas_id, dfd, 0, size)[0] == errno.ENODEV
    _revoke_dmabuf(k, dfd, False)
    assert _map_file(k, t.ioas_id, dfd, 0, size)[0] == 0
    # Restore the iova back
    k.unmap_ok(t.ioas_id, iova, size)
    assert _map_file(k, t.ioas_id, dfd, 0, size, iova, fixed=True)[0] == 0
    k.proc.close(dfd)


def test_iommufd_ioas__dmabuf_refuses_in_kernel_access(iommufd_ioas: IoasFixture) -> None:
    """Not a kernel test: 7.2 maps dma-buf pages into domains but gives in-kernel accesses
    none of them (``iopt_is_dmabuf()`` in ``iopt_pages_rw_access`` and
    ``iopt_area_add_access``): ACCESS_RW and ACCESS_PAGES are EINVAL, and nothing stays
    pinned or recorded."""
    t, k = iommufd_ioas, iommufd_ioas.k
    size = PAGE_SIZE * 4
    dfd = _get_dmabuf(k, size)
    rc, iova = _map_file(k, t.ioas_id, dfd, 0, size)
    assert rc == 0
    plain = k.create_access(t.ioas_id, 0)
    pin = k.create_access(t.ioas_id, T.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)
    for flags in (0, T.MOCK_ACCESS_RW_WRITE, T.MOCK_ACCESS_RW_SLOW_PATH):
        assert k.access_rw(plain, iova, 8, k.buffer, flags) == errno.EINVAL
    assert k.access_pages(pin, iova, PAGE_SIZE, 0)[0] == errno.EINVAL
    assert k.destroy_access_pages(pin, 0) == errno.ENOENT
    k.destroy_access(plain)
    k.destroy_access(pin)
    k.unmap_ok(t.ioas_id, iova, size)
    k.proc.close(dfd)


class _Child:
    """A fork()ed child of the test process, as far as these tests need one.

    The kernel test's ``buffer`` is MAP_SHARED | MAP_ANONYMOUS, i.e. shmem: the port makes it
    a memfd mapping so that parent and child map the same frames. The child shares the
    iommufd file; exiting drops its address space (pinning from it then faults) but not the
    file, which the parent still holds.
    """

    def __init__(self, k: Kfd) -> None:
        self.k = k
        self.memfd = k.proc.memfd_create(BUFFER_SIZE)
        k.buffer = k.proc.mmap(BUFFER_SIZE, fd=self.memfd)  # the parent's view
        self.proc = k.machine.new_process()
        self.proc.files[self.memfd] = k.proc.files[self.memfd]
        self.buffer = self.proc.mmap(BUFFER_SIZE, fd=self.memfd)  # the child's view

    def map_fixed(self, ioas_id: int, iova: int) -> None:
        flags = U.IOMMU_IOAS_MAP_FIXED_IOVA | U.IOMMU_IOAS_MAP_WRITEABLE
        buf = pack(
            "IIIIQQQ",
            40,
            flags | U.IOMMU_IOAS_MAP_READABLE,
            ioas_id,
            0,
            self.buffer,
            BUFFER_SIZE,
            iova,
        )
        self.k.ictx.ioctl(U.IOMMU_IOAS_MAP, buf, caller=self.proc)

    def exit(self) -> None:
        self.proc.munmap(self.buffer, BUFFER_SIZE)
        self.proc.gone = True  # its mm goes with it
        self.proc.files.clear()  # the parent's descriptors keep the files open


def test_iommufd_ioas__fork_gone(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    access = k.create_access(t.ioas_id, 0)
    # Create a mapping with a different mm, which then goes away
    child = _Child(k)
    child.map_fixed(t.ioas_id, MOCK_APERTURE_START)
    child.exit()
    if t.stdev_id:
        # A domain pinned everything within the fork: this copies from domain to domain
        k.mock_domain_ok(t.ioas_id)
        check_access_rw(k, access, MOCK_APERTURE_START, 0)
    else:
        # Otherwise pages must be pinned now, which cannot happen: the mm is gone
        assert k.mock_domain(t.ioas_id)[0] == errno.EFAULT
    k.destroy_access(access)


def test_iommufd_ioas__fork_present(iommufd_ioas: IoasFixture) -> None:
    t, k = iommufd_ioas, iommufd_ioas.k
    access = k.create_access(t.ioas_id, 0)
    # Create a mapping with a different mm, which stays while the parent reads
    child = _Child(k)
    child.map_fixed(t.ioas_id, MOCK_APERTURE_START)
    k.mock_domain_ok(t.ioas_id)
    check_access_rw(k, access, MOCK_APERTURE_START, 0)
    child.exit()
    k.destroy_access(access)
