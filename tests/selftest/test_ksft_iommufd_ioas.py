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


def _get_hw_info(k: Kfd, dev_id: int, data_len: int) -> int:
    """``_test_cmd_get_hw_info()`` with its checks on the returned data."""
    uptr = k.proc.mmap(PAGE_SIZE) if data_len else 0
    if data_len:
        k.proc.write(uptr, b"\xff" * data_len)
    buf = pack("IIIIQIBBBBQ", 40, 0, dev_id, data_len, uptr, 0, 0, 0, 0, 0, 0)
    rc = k.ioctl(U.IOMMU_GET_HW_INFO, buf)
    if rc:
        return rc
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
    return 0


def test_iommufd_ioas__get_hw_info(iommufd_ioas: IoasFixture) -> None:
    t = iommufd_ioas
    if t.device_id:
        for data_len in (0, 8, 16, 4):  # none, exact, larger, smaller
            assert _get_hw_info(t.k, t.device_id, data_len) == 0
    else:
        assert _get_hw_info(t.k, t.device_id, 8) == errno.ENOENT
        assert _get_hw_info(t.k, t.device_id, 16) == errno.ENOENT


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
        rc, _ = k.map(t.ioas_id, buf, PAGE_SIZE * length, t.base_iova + page * PAGE_SIZE,
                      fixed=True)
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
    rc, _ = k.map(t.ioas_id, k.buffer + MOCK_PAGE_SIZE, PAGE_SIZE,
                  MOCK_APERTURE_START + PAGE_SIZE, fixed=True)
    assert rc == errno.EINVAL
    assert k.option(hp, set_, t.ioas_id, 0)[0] == 0
    # Reduce alignment
    assert k.option(hp, set_, t.ioas_id, 1)[0] == 0
    # Misalignment is rejected during the alignment upgrade
    k.map_ok(t.ioas_id, k.buffer + MOCK_PAGE_SIZE, PAGE_SIZE, MOCK_APERTURE_START + PAGE_SIZE,
             fixed=True)
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
    k.map_ok(t.ioas_id, k.buffer, last_iova - MOCK_APERTURE_START + 1, MOCK_APERTURE_START,
             fixed=True)
    for iova in range(MOCK_APERTURE_START - PAGE_SIZE, last_iova + 1, 511):
        rc = k.copy(dst, t.ioas_id, MOCK_PAGE_SIZE, MOCK_APERTURE_START, iova)
        if iova < MOCK_APERTURE_START or iova + MOCK_PAGE_SIZE - 1 > last_iova:
            assert rc == errno.ENOENT, hex(iova)
        else:
            assert rc == 0, (hex(iova), rc)
            k.unmap_ok(dst, MOCK_APERTURE_START, MOCK_PAGE_SIZE)
    assert k.destroy(dst) == 0
