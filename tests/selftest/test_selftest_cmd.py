"""IOMMU_TEST_CMD itself: struct-size rules, bad input per op, and the model's definitions.

Not ports of kernel tests: these pin down the errno each op of selftest.c returns for bad
input, that a failed op leaves the state as it was, and what MD_CHECK_REFS counts.
"""

from __future__ import annotations

import errno

import pytest
from kutil import BUFFER_SIZE, MOCK_APERTURE_START, MOCK_PAGE_SIZE, PAGE_SIZE, Kfd, pack

from iommufd_model.mock import selftest as T
from iommufd_model.uapi import iommufd as U


def _snapshot(k: Kfd) -> tuple[list[int], list[int], list[int]]:
    hw = k.machine.iommus[0]
    return k.ictx.objects.ids(), sorted(hw.devices), sorted(k.proc.files)


def test_selftest_cmd__sizes(iommufd: Kfd) -> None:
    limit = pack("I", T.DEFAULT_MEMORY_LIMIT)
    buf = pack("IIII", 67, T.IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT, 0, 0) + limit.ljust(48, b"\0")
    buf += pack("II", 0, 0)
    assert iommufd.ioctl(T.IOMMU_TEST_CMD, buf) == errno.EINVAL  # below offsetofend(last)
    buf[0:4] = (68).to_bytes(4, "little")
    assert iommufd.ioctl(T.IOMMU_TEST_CMD, buf) == 0
    longer = buf + pack("Q", 1)
    longer[0:4] = (80).to_bytes(4, "little")
    assert iommufd.ioctl(T.IOMMU_TEST_CMD, longer) == errno.E2BIG
    longer[72:80] = bytes(8)
    assert iommufd.ioctl(T.IOMMU_TEST_CMD, longer) == 0


@pytest.mark.parametrize("op", [0, 0xFFFF_FFFF])
def test_selftest_cmd__unknown_op(iommufd: Kfd, op: int) -> None:
    assert iommufd.test_cmd(op, 0)[0] == errno.EOPNOTSUPP


def test_selftest_cmd__mock_domain_bad_input_leaves_no_trace(iommufd: Kfd) -> None:
    k = iommufd
    ioas = k.ioas_alloc()
    before = _snapshot(k)
    assert k.mock_domain(ioas + 100)[0] == errno.ENOENT
    assert k.mock_domain(ioas, dev_flags=1 << 5)[0] == errno.EINVAL
    assert k.mock_domain(ioas, dev_flags=1 << 1)[0] == errno.EINVAL  # HUGE_IOVA: gone in 7.2
    assert _snapshot(k) == before
    # A good one takes ids in the kernel's order: selftest object, device, HWPT.
    stdev, hwpt, idev = k.mock_domain_ok(ioas)
    assert (stdev, idev, hwpt) == (ioas + 1, ioas + 2, ioas + 3)
    assert k.destroy(idev) == errno.EBUSY  # the selftest object holds the binding
    assert k.destroy(hwpt) == errno.EBUSY
    assert k.mock_domain_replace(ioas, ioas) == errno.ENOENT  # not a selftest object
    assert k.mock_domain_replace(stdev, ioas + 100) == errno.ENOENT
    assert k.destroy(stdev) == 0
    assert _snapshot(k) == before  # device unbound and unplugged, auto HWPT gone


def test_selftest_cmd__pasid_flag_gives_pasid_capable_device(iommufd: Kfd) -> None:
    k = iommufd
    ioas = k.ioas_alloc()
    _, _, plain = k.mock_domain_ok(ioas)
    _, _, pasid = k.mock_domain_ok(ioas, dev_flags=T.MOCK_FLAGS_DEVICE_PASID)
    assert k.ictx.device(plain).dev.pasid_bits == 0
    assert k.ictx.device(pasid).dev.pasid_bits == T.MOCK_PASID_WIDTH


def test_selftest_cmd__check_map_bad_input(iommufd: Kfd) -> None:
    k = iommufd
    ioas = k.ioas_alloc()
    _, hwpt, _ = k.mock_domain_ok(ioas)
    iova = k.map_ok(ioas, k.buffer, BUFFER_SIZE)
    assert k.check_map(hwpt, iova, BUFFER_SIZE, k.buffer) == 0
    assert k.check_map(hwpt, iova + 1, MOCK_PAGE_SIZE, k.buffer) == errno.EINVAL
    assert k.check_map(hwpt, iova, MOCK_PAGE_SIZE + 1, k.buffer) == errno.EINVAL
    assert k.check_map(ioas, iova, MOCK_PAGE_SIZE, k.buffer) == errno.ENOENT  # not a HWPT
    # the mapping is there but from other user memory
    assert k.check_map(hwpt, iova, PAGE_SIZE, k.buffer + PAGE_SIZE) == errno.EINVAL
    assert k.check_map(hwpt, iova, MOCK_PAGE_SIZE, k.buffer + MOCK_PAGE_SIZE) == errno.EINVAL
    other = k.proc.mmap(PAGE_SIZE)
    k.proc.munmap(other, PAGE_SIZE)
    assert k.check_map(hwpt, iova, PAGE_SIZE, other) == errno.EFAULT
    assert k.check_map(hwpt, iova + BUFFER_SIZE, PAGE_SIZE, k.buffer) == errno.EINVAL


def test_selftest_cmd__check_refs_counts_pins(iommufd: Kfd) -> None:
    """MD_CHECK_REFS counts pins: one per page while any domain or access needs it."""
    k = iommufd
    buf, size = k.buffer, BUFFER_SIZE
    assert k.check_refs(buf + 1, PAGE_SIZE, 0) == errno.EINVAL
    assert k.check_refs(buf, PAGE_SIZE + 1, 0) == errno.EINVAL
    ioas = k.ioas_alloc()
    iova = k.map_ok(ioas, buf, size, MOCK_APERTURE_START, fixed=True)
    assert k.check_refs(buf, size, 0) == 0  # no domain, no access: nothing pinned yet
    assert k.check_refs(buf, size, 1) == errno.EIO
    access = k.create_access(ioas, T.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)
    rc, item = k.access_pages(access, iova, PAGE_SIZE, buf)
    assert rc == 0
    assert k.check_refs(buf, PAGE_SIZE, 1) == 0
    assert k.check_refs(buf + PAGE_SIZE, size - PAGE_SIZE, 0) == 0
    stdev1, _, _ = k.mock_domain_ok(ioas)
    stdev2, _, _ = k.mock_domain_ok(ioas)
    assert k.check_refs(buf, size, 1) == 0  # shared by two domains and the access
    assert k.destroy(stdev1) == 0
    assert k.destroy(stdev2) == 0
    assert k.check_refs(buf, PAGE_SIZE, 1) == 0
    assert k.check_refs(buf + PAGE_SIZE, size - PAGE_SIZE, 0) == 0
    assert k.destroy_access_pages(access, item) == 0
    assert k.check_refs(buf, size, 0) == 0
    k.destroy_access(access)


def test_selftest_cmd__access_bad_input(iommufd: Kfd) -> None:
    k = iommufd
    ioas = k.ioas_alloc()
    before = _snapshot(k)
    rc, _ = k.test_cmd(T.IOMMU_TEST_OP_CREATE_ACCESS, ioas, pack("II", 0, 2))
    assert rc == errno.EOPNOTSUPP
    rc, _ = k.test_cmd(T.IOMMU_TEST_OP_CREATE_ACCESS, ioas + 100, pack("II", 0, 0))
    assert rc == errno.ENOENT
    assert _snapshot(k) == before
    iova = k.map_ok(ioas, k.buffer, BUFFER_SIZE)
    plain = k.create_access(ioas, 0)
    pin = k.create_access(ioas, T.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)
    assert k.access_pages(plain, iova, PAGE_SIZE, 0)[0] == errno.EOPNOTSUPP
    assert k.access_pages(k.fd, iova, PAGE_SIZE, 0)[0] == errno.EBADFD  # the iommufd itself
    assert k.access_pages(999, iova, PAGE_SIZE, 0)[0] == errno.EBADFD
    assert k.access_pages(pin, iova, 16 * 1024 * 1024 + 1, 0)[0] == errno.ENOMEM
    assert k.access_pages(pin, iova, PAGE_SIZE, 0, flags=1 << 3)[0] == errno.EOPNOTSUPP
    assert k.access_pages(pin, iova + BUFFER_SIZE, PAGE_SIZE, 0)[0] == errno.ENOENT
    # the user VA check fails after pinning: the pin must be undone
    assert k.access_pages(pin, iova, PAGE_SIZE, k.buffer + PAGE_SIZE)[0] == errno.EBADE
    assert k.check_refs(k.buffer, BUFFER_SIZE, 0) == 0
    assert k.destroy_access_pages(pin, 0) == errno.ENOENT
    assert k.access_rw(plain, iova, 8, k.buffer, 1 << 1) == errno.EOPNOTSUPP
    assert k.access_rw(plain, iova, 16 * 1024 * 1024 + 1, k.buffer, 0) == errno.ENOMEM
    assert k.access_rw(plain, iova + BUFFER_SIZE, 8, k.buffer, 0) == errno.ENOENT
    # The access object is in the table, held by its file; it holds its IOAS.
    access_ids = [i for i in k.ictx.objects.ids() if i not in before[0]]
    assert len(access_ids) == 2
    for access_id in access_ids:
        assert k.destroy(access_id) == errno.EBUSY
    assert k.destroy(ioas) == errno.EBUSY
    assert k.access_replace_ioas(plain, ioas + 100) == errno.ENOENT
    k.destroy_access(plain)
    k.destroy_access(pin)
    k.unmap_ok(ioas, iova, BUFFER_SIZE)
    assert _snapshot(k) == before
    assert k.destroy(ioas) == 0


def test_selftest_cmd__access_replace_moves_pins(iommufd: Kfd) -> None:
    k = iommufd
    a, b = k.ioas_alloc(), k.ioas_alloc()
    iova = k.map_ok(a, k.buffer, BUFFER_SIZE)
    access = k.create_access(a, T.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)
    assert k.access_pages(access, iova, BUFFER_SIZE, k.buffer)[0] == 0
    assert k.access_replace_ioas(access, a) == 0  # same IOAS: nothing happens
    assert k.check_refs(k.buffer, BUFFER_SIZE, 1) == 0
    assert k.access_replace_ioas(access, b) == 0  # old pins are dropped with the old IOAS
    assert k.check_refs(k.buffer, BUFFER_SIZE, 0) == 0
    assert k.destroy(a) == 0
    assert k.destroy(b) == errno.EBUSY
    k.destroy_access(access)
    assert k.destroy(b) == 0


def test_selftest_cmd__memory_limit(iommufd: Kfd) -> None:
    assert iommufd.set_memory_limit(11) == errno.EINVAL
    assert iommufd.set_memory_limit(12) == 0
    assert T.selftest_state(iommufd.machine).memory_limit == 12
    assert iommufd.set_memory_limit(T.DEFAULT_MEMORY_LIMIT) == 0


def test_selftest_cmd__dirty_bad_input(iommufd: Kfd) -> None:
    k = iommufd
    ioas = k.ioas_alloc()
    _, _, idev = k.mock_domain_ok(ioas)
    rc, hwpt = k.hwpt_alloc(idev, ioas, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    assert rc == 0
    k.map_ok(ioas, k.buffer, BUFFER_SIZE, MOCK_APERTURE_START, fixed=True)
    bitmap = k.proc.mmap(PAGE_SIZE)
    k.proc.write(bitmap, b"\xff" * 4)

    def dirty(hwpt_id: int, iova: int, length: int, page_size: int, uptr: int) -> tuple[int, int]:
        payload = pack("IIQQQQQ", 0, 0, iova, length, page_size, uptr, 0)
        rc, buf = k.test_cmd(T.IOMMU_TEST_OP_DIRTY, hwpt_id, payload)
        return rc, int.from_bytes(buf[56:64], "little")

    start, mps = MOCK_APERTURE_START, MOCK_PAGE_SIZE
    assert dirty(hwpt, start, 32 * mps, 0, bitmap)[0] == errno.EINVAL
    assert dirty(hwpt, start, 0, mps, bitmap)[0] == errno.EINVAL
    assert dirty(hwpt, start + 1, 32 * mps, mps, bitmap)[0] == errno.EINVAL
    assert dirty(hwpt, start, 32 * mps + 1, mps, bitmap)[0] == errno.EINVAL
    assert dirty(hwpt, start, 32 * mps, mps, 0)[0] == errno.EINVAL
    assert dirty(ioas, start, 32 * mps, mps, bitmap)[0] == errno.ENOENT
    assert dirty(hwpt, start, 32 * mps, mps, bitmap)[0] == errno.EINVAL  # tracking is off
    buf = pack("IIII", 16, U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE, hwpt, 0)
    assert k.ioctl(U.IOMMU_HWPT_SET_DIRTY_TRACKING, buf) == 0
    # 7.2 counts every set bit, mapped or not (BUFFER_SIZE is 32 mock pages)
    assert dirty(hwpt, start, 32 * mps, mps, bitmap) == (0, 32)
    assert dirty(hwpt, start + BUFFER_SIZE, 32 * mps, mps, bitmap) == (0, 32)
    # more than SZ_16M * 8 bits: EOVERFLOW before the HWPT is looked up
    assert dirty(ioas, start, ((16 << 20) * 8 + 1) * mps, mps, bitmap)[0] == errno.EOVERFLOW


def test_selftest_cmd__nested_ops_bad_input(iommufd: Kfd) -> None:
    """MD_CHECK_IOTLB / DEV_CHECK_CACHE / TRIGGER_* / PASID_* refuse bad ids, change nothing."""
    k = iommufd
    ioas = k.ioas_alloc()
    stdev, hwpt, idev = k.mock_domain_ok(ioas)
    parent = k.hwpt_alloc_ok(idev, ioas, U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    data = pack("II", T.IOMMU_TEST_IOTLB_DEFAULT, 0)
    nested = k.hwpt_alloc_ok(idev, parent, 0, T.IOMMU_HWPT_DATA_SELFTEST, data)
    before = _snapshot(k)
    # MD_CHECK_IOTLB: a paging HWPT is the wrong type (ENOENT); id or value mismatch EINVAL
    assert k.check_iotlb(hwpt, 0, T.IOMMU_TEST_IOTLB_DEFAULT) == errno.ENOENT
    assert k.check_iotlb(nested, T.MOCK_NESTED_DOMAIN_IOTLB_ID_MAX + 1, 0) == errno.EINVAL
    assert k.check_iotlb(nested, 0, 0) == errno.EINVAL
    # DEV_CHECK_CACHE
    assert k.check_dev_cache(stdev, 0, T.IOMMU_TEST_DEV_CACHE_DEFAULT) == errno.ENOENT
    assert k.check_dev_cache(idev, T.MOCK_DEV_CACHE_ID_MAX + 1, 0) == errno.EINVAL
    # TRIGGER_VEVENT: no vIOMMU behind the device; TRIGGER_IOPF: not a device
    assert k.trigger_vevents(idev, 1) == errno.ENOENT
    payload = pack("IIIIQ", hwpt, 0, 0, 0, 0)
    assert k.test_cmd(T.IOMMU_TEST_OP_TRIGGER_IOPF, 0, payload)[0] == errno.ENOENT
    # PASID ops need a selftest object and a PASID-capable device
    assert k.pasid_attach(idev, 7, hwpt) == errno.ENOENT
    assert k.pasid_attach(stdev, 7, hwpt) == errno.EINVAL
    assert k.pasid_replace(stdev, 7, hwpt) == errno.EINVAL
    assert k.pasid_check_hwpt(stdev, 7, 0) == 0
    assert k.pasid_check_hwpt(stdev, 7, hwpt) == errno.EINVAL
    assert _snapshot(k) == before


def test_selftest_cmd__dmabuf_bad_input(iommufd: Kfd) -> None:
    k = iommufd
    before = _snapshot(k)
    for length in (0, PAGE_SIZE * 512 + 1):
        payload = pack("II", length, 0)
        assert k.test_cmd(T.IOMMU_TEST_OP_DMABUF_GET, 0, payload)[0] == errno.EINVAL
    assert k.test_cmd(T.IOMMU_TEST_OP_DMABUF_REVOKE, 0, pack("iI", 999, 1))[0] == errno.EBADF
    memfd = k.proc.memfd_create(PAGE_SIZE)
    payload = pack("iI", memfd, 1)
    assert k.test_cmd(T.IOMMU_TEST_OP_DMABUF_REVOKE, 0, payload)[0] == errno.EOPNOTSUPP
    k.proc.close(memfd)
    assert _snapshot(k) == before
