"""Port of the ``iommufd_mock_domain`` fixture tests of tools/testing/selftests/iommu/iommufd.c.

Variants one_domain and two_domains are ported; the *_hugepage variants need MAP_HUGETLB
(compound pages), which the model's memory does not have yet (see docs/selftest-parity.md).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from kutil import BUFFER_SIZE, MOCK_APERTURE_START, MOCK_PAGE_SIZE, PAGE_SIZE, Kfd, teardown_iommufd

from iommufd_model.mock import selftest as T
from iommufd_model.uapi import iommufd as U


@attrs.define
class MockDomainFixture:
    """FIXTURE(iommufd_mock_domain)."""

    k: Kfd
    mock_domains: int
    ioas_id: int
    hwpt_ids: list[int]
    stdev_ids: list[int]
    idev_ids: list[int]
    mmap_buf_size: int = PAGE_SIZE * 8

    @property
    def hwpt_id(self) -> int:
        return self.hwpt_ids[0]

    def check_mock_iova(self, ptr: int, iova: int, length: int) -> None:
        """The ``check_mock_iova`` macro: every mock domain maps ``iova`` to ``ptr``."""
        assert self.k.check_map(self.hwpt_ids[0], iova, length, ptr) == 0
        if self.hwpt_ids[1]:
            assert self.k.check_map(self.hwpt_ids[1], iova, length, ptr) == 0


@pytest.fixture(params=[1, 2], ids=["one_domain", "two_domains"])
def iommufd_mock_domain(request: pytest.FixtureRequest, machine: Any) -> Iterator[Any]:
    k = Kfd(machine)
    t = MockDomainFixture(k, request.param, k.ioas_alloc(), [0, 0], [0, 0], [0, 0])
    for i in range(t.mock_domains):
        t.stdev_ids[i], t.hwpt_ids[i], t.idev_ids[i] = k.mock_domain_ok(t.ioas_id)
    yield t
    teardown_iommufd(k)


def test_iommufd_mock_domain__basic(iommufd_mock_domain: MockDomainFixture) -> None:
    t, k = iommufd_mock_domain, iommufd_mock_domain.k
    iova = k.map_ok(t.ioas_id, k.buffer, PAGE_SIZE)
    t.check_mock_iova(k.buffer, iova, PAGE_SIZE)
    size = t.mmap_buf_size
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
    buf = k.proc.mmap(size)
    assert k.check_refs(buf, size, 0) == 0
    for start in range(0, size, MOCK_PAGE_SIZE):
        for end in range(start + MOCK_PAGE_SIZE, size, MOCK_PAGE_SIZE):
            length = end - start
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
    assert k.check_refs(buf, size, 0) == 0
    k.proc.munmap(buf, size)


def test_iommufd_mock_domain__all_aligns(iommufd_mock_domain: MockDomainFixture) -> None:
    _all_aligns(iommufd_mock_domain, with_extra_domain=False)


def test_iommufd_mock_domain__all_aligns_copy(iommufd_mock_domain: MockDomainFixture) -> None:
    _all_aligns(iommufd_mock_domain, with_extra_domain=True)


def test_iommufd_mock_domain__user_copy(iommufd_mock_domain: MockDomainFixture) -> None:
    t, k = iommufd_mock_domain, iommufd_mock_domain.k
    # Pin the pages in an IOAS with no domains, then copy to an IOAS with domains
    ioas_id = k.ioas_alloc()
    src_iova = k.map_ok(ioas_id, k.buffer, BUFFER_SIZE)
    access = k.create_access(ioas_id, T.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)
    assert k.access_pages(access, src_iova, BUFFER_SIZE, k.buffer)[0] == 0
    assert k.copy(t.ioas_id, ioas_id, BUFFER_SIZE, MOCK_APERTURE_START, src_iova) == 0
    t.check_mock_iova(k.buffer, MOCK_APERTURE_START, BUFFER_SIZE)
    # Now replace the ioas with a new one
    new_ioas_id = k.ioas_alloc()
    src_iova = k.map_ok(new_ioas_id, k.buffer, BUFFER_SIZE)
    assert k.access_replace_ioas(access, new_ioas_id) == 0
    # Destroy the old ioas and clean up the copied mapping
    k.unmap_ok(t.ioas_id, MOCK_APERTURE_START, BUFFER_SIZE)
    assert k.destroy(ioas_id) == 0
    # Then run the same test again with the new ioas
    rc, item = k.access_pages(access, src_iova, BUFFER_SIZE, k.buffer)
    assert rc == 0
    assert k.copy(t.ioas_id, new_ioas_id, BUFFER_SIZE, MOCK_APERTURE_START, src_iova) == 0
    t.check_mock_iova(k.buffer, MOCK_APERTURE_START, BUFFER_SIZE)
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
