"""Port of the ``iommufd_mock_domain`` fixture tests of tools/testing/selftests/iommu/iommufd.c.

All six kernel variants run: one_domain, two_domains, one_domain_file (memfd + IOAS_MAP_FILE)
and the *_hugepage ones, whose MAP_HUGETLB buffers (2 x 2 MiB) are modelled by 4 KiB pages
over the same sizes and alignment (see docs/selftest-parity.md). ro_unshare (a MAP_PRIVATE
file mapping written after a read-only pin) is not ported yet.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from kutil import (
    BUFFER_SIZE,
    HUGEPAGE_SIZE,
    MOCK_APERTURE_START,
    MOCK_PAGE_SIZE,
    PAGE_SIZE,
    Kfd,
    pack,
    teardown_iommufd,
)

from iommufd_model.mock import selftest as T
from iommufd_model.process import MemFile
from iommufd_model.uapi import iommufd as U

VARIANTS = {  # name: (mock_domains, hugepages, file)
    "one_domain": (1, False, False),
    "two_domains": (2, False, False),
    "one_domain_hugepage": (1, True, False),
    "two_domains_hugepage": (2, True, False),
    "one_domain_file": (1, False, True),
    "one_domain_file_hugepage": (1, True, True),
}


@attrs.define
class MockDomainFixture:
    """FIXTURE(iommufd_mock_domain)."""

    k: Kfd
    mock_domains: int
    hugepages: bool
    file: bool
    ioas_id: int
    hwpt_ids: list[int]
    stdev_ids: list[int]
    idev_ids: list[int]
    mmap_buf_size: int = PAGE_SIZE * 8
    mfd: int = -1  # the kernel test's global memfd and its mapping, mfd_buffer
    mfd_buffer: int = 0

    @property
    def hwpt_id(self) -> int:
        return self.hwpt_ids[0]

    def check_mock_iova(self, ptr: int, iova: int, length: int) -> None:
        """The ``check_mock_iova`` macro: every mock domain maps ``iova`` to ``ptr``."""
        assert self.k.check_map(self.hwpt_ids[0], iova, length, ptr) == 0
        if self.hwpt_ids[1]:
            assert self.k.check_map(self.hwpt_ids[1], iova, length, ptr) == 0

    def memfd_mmap(self, size: int) -> tuple[int, int]:
        """``memfd_mmap()``: a memfd of ``size`` mapped MAP_SHARED; (va, fd)."""
        fd = self.k.proc.memfd_create(size)
        return self.k.proc.mmap(size, fd=fd), fd

    def map_file(self, ioas_id: int, fd: int, start: int, length: int) -> tuple[int, int]:
        flags = U.IOMMU_IOAS_MAP_WRITEABLE | U.IOMMU_IOAS_MAP_READABLE
        buf = pack("IIIiQQQ", 40, flags, ioas_id, fd, start, length, 0)
        return self.k.ioctl(U.IOMMU_IOAS_MAP_FILE, buf), int.from_bytes(buf[32:40], "little")

    def map_file_ok(self, ioas_id: int, fd: int, start: int, length: int) -> int:
        rc, iova = self.map_file(ioas_id, fd, start, length)
        assert rc == 0, f"map_file failed with errno {rc}"
        return iova


@pytest.fixture(params=list(VARIANTS))
def iommufd_mock_domain(request: pytest.FixtureRequest, machine: Any) -> Iterator[Any]:
    domains, huge, file = VARIANTS[request.param]
    k = Kfd(machine)
    t = MockDomainFixture(k, domains, huge, file, k.ioas_alloc(), [0, 0], [0, 0], [0, 0])
    t.mfd_buffer, t.mfd = t.memfd_mmap(BUFFER_SIZE)
    for i in range(t.mock_domains):
        t.stdev_ids[i], t.hwpt_ids[i], t.idev_ids[i] = k.mock_domain_ok(t.ioas_id)
        k.check_dev_cache_all(t.idev_ids[0], T.IOMMU_TEST_DEV_CACHE_DEFAULT)
    if huge:
        t.mmap_buf_size = HUGEPAGE_SIZE * 2
    yield t
    teardown_iommufd(k)


def _ftruncate(k: Kfd, fd: int, size: int) -> None:
    """ftruncate() of a memfd nobody pinned: its frames go, its size changes."""
    f = k.proc.files[fd]
    assert isinstance(f, MemFile)
    f.release()
    f.size = size


def test_iommufd_mock_domain__basic(iommufd_mock_domain: MockDomainFixture) -> None:
    t, k = iommufd_mock_domain, iommufd_mock_domain.k
    size = t.mmap_buf_size
    if t.file:
        iova = t.map_file_ok(t.ioas_id, t.mfd, 0, PAGE_SIZE)
        t.check_mock_iova(t.mfd_buffer, iova, PAGE_SIZE)
        _, fd = t.memfd_mmap(size)
        assert t.map_file(t.ioas_id, fd, 0, size + 1)[0] == errno.EINVAL
        _ftruncate(k, fd, 0)
        assert t.map_file(t.ioas_id, fd, 0, size)[0] == errno.EINVAL
        k.proc.close(fd)
        return
    iova = k.map_ok(t.ioas_id, k.buffer, PAGE_SIZE)
    t.check_mock_iova(k.buffer, iova, PAGE_SIZE)
    buf = k.proc.mmap(size)
    # EFAULT half way through mapping
    k.proc.munmap(buf + size // 2, size // 2)
    assert k.map(t.ioas_id, buf, size)[0] == errno.EFAULT
    # EFAULT on first page
    k.proc.munmap(buf, size // 2)
    assert k.map(t.ioas_id, buf, size)[0] == errno.EFAULT


def _all_aligns(t: MockDomainFixture, with_extra_domain: bool) -> None:
    k = t.k
    size = t.mmap_buf_size
    step = size // 16 if t.hugepages else MOCK_PAGE_SIZE
    fd = -1
    if t.file:
        buf, fd = t.memfd_mmap(size)
    else:
        buf = k.proc.mmap(size, align=HUGEPAGE_SIZE if t.hugepages else PAGE_SIZE)
    assert k.check_refs(buf, size, 0) == 0
    # Every combination of length and alignment (fewer for the hugepage buffers)
    for start in range(0, size, step):
        end = size if t.hugepages else start + MOCK_PAGE_SIZE
        while end < size:
            length = end - start
            if t.file:
                iova = t.map_file_ok(t.ioas_id, fd, start, length)
            else:
                iova = k.map_ok(t.ioas_id, buf + start, length)
            stdev = 0
            if with_extra_domain:
                # Add and destroy a domain while the area exists
                old = t.hwpt_ids[1]
                stdev, t.hwpt_ids[1], _ = k.mock_domain_ok(t.ioas_id)
            t.check_mock_iova(buf + start, iova, length)
            first_page = start // PAGE_SIZE * PAGE_SIZE
            assert k.check_refs(buf + first_page, end // PAGE_SIZE * PAGE_SIZE - first_page, 1) == 0
            if with_extra_domain:
                assert k.destroy(stdev) == 0
                t.hwpt_ids[1] = old
            k.unmap_ok(t.ioas_id, iova, length)
            end += MOCK_PAGE_SIZE
    assert k.check_refs(buf, size, 0) == 0
    k.proc.munmap(buf, size)
    if t.file:
        k.proc.close(fd)


def test_iommufd_mock_domain__all_aligns(iommufd_mock_domain: MockDomainFixture) -> None:
    _all_aligns(iommufd_mock_domain, with_extra_domain=False)


def test_iommufd_mock_domain__all_aligns_copy(iommufd_mock_domain: MockDomainFixture) -> None:
    _all_aligns(iommufd_mock_domain, with_extra_domain=True)


def test_iommufd_mock_domain__user_copy(iommufd_mock_domain: MockDomainFixture) -> None:
    t, k = iommufd_mock_domain, iommufd_mock_domain.k
    buf = t.mfd_buffer if t.file else k.buffer

    def map_buf(ioas_id: int) -> int:
        if t.file:
            return t.map_file_ok(ioas_id, t.mfd, 0, BUFFER_SIZE)
        return k.map_ok(ioas_id, buf, BUFFER_SIZE)

    # Pin the pages in an IOAS with no domains, then copy to an IOAS with domains
    ioas_id = k.ioas_alloc()
    src_iova = map_buf(ioas_id)
    access = k.create_access(ioas_id, T.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)
    assert k.access_pages(access, src_iova, BUFFER_SIZE, buf)[0] == 0
    assert k.copy(t.ioas_id, ioas_id, BUFFER_SIZE, MOCK_APERTURE_START, src_iova) == 0
    t.check_mock_iova(buf, MOCK_APERTURE_START, BUFFER_SIZE)
    # Now replace the ioas with a new one
    new_ioas_id = k.ioas_alloc()
    src_iova = map_buf(new_ioas_id)
    assert k.access_replace_ioas(access, new_ioas_id) == 0
    # Destroy the old ioas and clean up the copied mapping
    k.unmap_ok(t.ioas_id, MOCK_APERTURE_START, BUFFER_SIZE)
    assert k.destroy(ioas_id) == 0
    # Then run the same test again with the new ioas
    rc, item = k.access_pages(access, src_iova, BUFFER_SIZE, buf)
    assert rc == 0
    assert k.copy(t.ioas_id, new_ioas_id, BUFFER_SIZE, MOCK_APERTURE_START, src_iova) == 0
    t.check_mock_iova(buf, MOCK_APERTURE_START, BUFFER_SIZE)
    assert k.destroy_access_pages(access, item) == 0
    k.destroy_access(access)
    assert k.destroy(new_ioas_id) == 0


def test_iommufd_mock_domain__replace(iommufd_mock_domain: MockDomainFixture) -> None:
    t, k = iommufd_mock_domain, iommufd_mock_domain.k
    ioas_id = k.ioas_alloc()
    assert k.mock_domain_replace(t.stdev_ids[0], ioas_id) == 0
    # Replacing the IOAS freed the prior automatic HWPT: it is gone (ENOENT).
    if t.mock_domains == 1:
        assert k.mock_domain_replace(t.stdev_ids[0], t.hwpt_ids[0]) == errno.ENOENT
    assert k.mock_domain_replace(t.stdev_ids[0], ioas_id) == 0
    if t.mock_domains >= 2:
        assert k.mock_domain_replace(t.stdev_ids[0], t.hwpt_ids[1]) == 0
        assert k.mock_domain_replace(t.stdev_ids[0], t.hwpt_ids[1]) == 0
        assert k.mock_domain_replace(t.stdev_ids[0], t.hwpt_ids[0]) == 0
    assert k.mock_domain_replace(t.stdev_ids[0], t.ioas_id) == 0
    assert k.destroy(ioas_id) == 0


def test_iommufd_mock_domain__alloc_hwpt(iommufd_mock_domain: MockDomainFixture) -> None:
    t, k = iommufd_mock_domain, iommufd_mock_domain.k
    for i in range(t.mock_domains):
        bad = ~U.IOMMU_HWPT_ALLOC_NEST_PARENT & 0xFFFF_FFFF
        assert k.hwpt_alloc(t.idev_ids[i], t.ioas_id, bad)[0] == errno.EOPNOTSUPP
        rc, hwpt0 = k.hwpt_alloc(t.idev_ids[i], t.ioas_id, 0)
        assert rc == 0
        rc, hwpt1 = k.hwpt_alloc(t.idev_ids[i], t.ioas_id, U.IOMMU_HWPT_ALLOC_NEST_PARENT)
        assert rc == 0
        # A hw_pagetable rotation
        assert k.mock_domain_replace(t.stdev_ids[i], hwpt0) == 0
        assert k.destroy(hwpt0) == errno.EBUSY
        assert k.mock_domain_replace(t.stdev_ids[i], hwpt1) == 0
        assert k.destroy(hwpt1) == errno.EBUSY
        assert k.mock_domain_replace(t.stdev_ids[i], t.ioas_id) == 0
        assert k.destroy(hwpt1) == 0
        stdev, _, _ = k.mock_domain_ok(hwpt0)
        assert k.destroy(stdev) == 0
        assert k.destroy(hwpt0) == 0
