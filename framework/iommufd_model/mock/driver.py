"""Hook implementations of the mock driver (the kernel's ``mock_ops`` and domain ops)."""

from __future__ import annotations

import errno
from typing import Any

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE, Domain, DriverInfo, Feature, HwInfo
from iommufd_model.errors import err
from iommufd_model.hookspecs import hookimpl
from iommufd_model.hw.pci import PciDevice
from iommufd_model.machine import Machine

# Importing selftest registers IOMMU_TEST_CMD: loading the mock driver turns the test ioctl on,
# as building the kernel with CONFIG_IOMMUFD_TEST does.
from iommufd_model.mock import selftest
from iommufd_model.mock.hw import (
    ENTRY_DIRTY,
    ENTRY_FLAGS,
    MOCK_IO_PAGE_SHIFT,
    MOCK_IO_PAGE_SIZE,
    MOCK_PASID_WIDTH,
    MockDomain,
    MockIommu,
)
from iommufd_model.uapi import iommufd as U

# iommufd_test.h: struct iommu_test_hw_info, reported as IOMMU_HW_INFO_TYPE_SELFTEST
IOMMU_HW_INFO_TYPE_SELFTEST = selftest.IOMMU_HW_INFO_TYPE_SELFTEST
IOMMU_HW_INFO_SELFTEST_REGVAL = selftest.IOMMU_HW_INFO_SELFTEST_REGVAL
PAGING_FLAGS = (
    U.IOMMU_HWPT_ALLOC_NEST_PARENT | U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING | U.IOMMU_HWPT_ALLOC_PASID
)


def _mock(iommu: Any) -> MockIommu:
    assert isinstance(iommu, MockIommu)
    return iommu


def _domain(domain: Domain) -> MockDomain:
    if not isinstance(domain, MockDomain):
        raise err(errno.EINVAL, "not a mock paging domain")
    return domain


class MockDriver:
    """The mock driver plugin object (entry point ``mock``)."""

    @hookimpl
    def driver_info(self) -> DriverInfo:
        return DriverInfo(
            name="mock",
            description="iommufd self-test mock IOMMU (kernel selftest.c)",
            features=frozenset(
                {Feature.PAGING, Feature.NEST_PARENT, Feature.PASID, Feature.DIRTY_TRACKING}
            ),
            hw_info_type=IOMMU_HW_INFO_TYPE_SELFTEST,
        )

    @hookimpl
    def probe(self, machine: Machine, index: int, options: dict[str, Any]) -> MockIommu:
        if options:
            raise err(errno.EINVAL, f"unknown mock options: {sorted(options)}")
        return MockIommu(machine, index)

    @hookimpl
    def probe_device(self, iommu: Any, dev: PciDevice) -> object:
        _mock(iommu).context[dev.rid] = None
        return {"no_dirty": False}

    @hookimpl
    def dev_reserved_regions(self, iommu: Any, dev: PciDevice) -> list[tuple[int, int]]:
        return []

    @hookimpl
    def hw_info(self, iommu: Any, dev: PciDevice, data_type: int) -> HwInfo:
        if data_type not in (U.IOMMU_HW_INFO_TYPE_DEFAULT, IOMMU_HW_INFO_TYPE_SELFTEST):
            raise err(errno.EOPNOTSUPP, f"mock reports no hw_info type {data_type:#x}")
        data = (0).to_bytes(4, "little") + IOMMU_HW_INFO_SELFTEST_REGVAL.to_bytes(4, "little")
        caps = 0 if dev.iommu_priv["no_dirty"] else U.IOMMU_HW_CAP_DIRTY_TRACKING
        return HwInfo(IOMMU_HW_INFO_TYPE_SELFTEST, data, caps, MOCK_PASID_WIDTH)

    @hookimpl
    def domain_alloc_paging(self, iommu: Any, dev: PciDevice | None, flags: int) -> MockDomain:
        if flags & ~PAGING_FLAGS:
            raise err(errno.EOPNOTSUPP, f"mock paging flags {flags:#x}")
        dirty = bool(flags & U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
        if dirty and dev is not None and dev.iommu_priv["no_dirty"]:
            raise err(errno.EOPNOTSUPP, "device cannot track dirty pages")
        return MockDomain(
            _mock(iommu),
            flags,
            nest_parent=bool(flags & U.IOMMU_HWPT_ALLOC_NEST_PARENT),
            dirty=dirty,
            pasid=bool(flags & U.IOMMU_HWPT_ALLOC_PASID),
        )

    @hookimpl
    def domain_free(self, domain: Domain) -> bool:
        if isinstance(domain, MockDomain):
            domain.entries.clear()
        return True

    @hookimpl
    def domain_map(self, domain: Domain, iova: int, pa: int, size: int, prot: int) -> bool:
        d = _domain(domain)
        if (iova | pa | size) & (MOCK_IO_PAGE_SIZE - 1):
            raise err(errno.EINVAL, "mock maps whole 2 KiB pages")
        first = iova >> MOCK_IO_PAGE_SHIFT
        count = size >> MOCK_IO_PAGE_SHIFT
        entries = d.entries
        if any((first + i) in entries for i in range(count)):
            raise err(errno.EEXIST, "mock IOVA already mapped")
        flags = prot & (IOMMU_READ | IOMMU_WRITE)
        for i in range(count):
            entries[first + i] = (pa + (i << MOCK_IO_PAGE_SHIFT)) | flags
        return True

    @hookimpl
    def domain_unmap(self, domain: Domain, iova: int, size: int) -> int:
        d = _domain(domain)
        first = iova >> MOCK_IO_PAGE_SHIFT
        done = 0
        for i in range(size >> MOCK_IO_PAGE_SHIFT):
            if d.entries.pop(first + i, None) is not None:
                done += MOCK_IO_PAGE_SIZE
        return done

    @hookimpl
    def domain_iova_to_phys(self, domain: Domain, iova: int) -> int:
        entry = _domain(domain).entries.get(iova >> MOCK_IO_PAGE_SHIFT)
        if entry is None:
            return -1
        return (entry & ~ENTRY_FLAGS) + (iova & (MOCK_IO_PAGE_SIZE - 1))

    @hookimpl
    def attach_dev(self, iommu: Any, dev: PciDevice, domain: Domain | None) -> bool:
        if domain is not None:
            _domain(domain)
            # mock_domain_nop_attach(): a device without dirty tracking refuses such a domain.
            if domain.dirty_tracking and dev.iommu_priv["no_dirty"]:
                raise err(errno.EINVAL, "device cannot attach to a dirty-tracking domain")
        _mock(iommu).context[dev.rid] = domain
        return True

    @hookimpl
    def set_dev_pasid(self, iommu: Any, dev: PciDevice, pasid: int, domain: Domain) -> bool:
        _mock(iommu).pasid_context[(dev.rid, pasid)] = _domain(domain)
        return True

    @hookimpl
    def remove_dev_pasid(self, iommu: Any, dev: PciDevice, pasid: int) -> bool:
        _mock(iommu).pasid_context.pop((dev.rid, pasid), None)
        return True

    @hookimpl
    def set_dirty_tracking(self, domain: Domain, enable: bool) -> bool:
        _domain(domain).dirty_enabled = enable
        return True

    @hookimpl
    def read_and_clear_dirty(
        self, domain: Domain, iova: int, length: int, clear: bool
    ) -> list[tuple[int, int]]:
        d = _domain(domain)
        runs: list[tuple[int, int]] = []
        first = iova >> MOCK_IO_PAGE_SHIFT
        last = (iova + length - 1) >> MOCK_IO_PAGE_SHIFT
        dirty = (i for i, e in d.entries.items() if first <= i <= last and e & ENTRY_DIRTY)
        for index in sorted(dirty):
            runs.append((index << MOCK_IO_PAGE_SHIFT, MOCK_IO_PAGE_SIZE))
            if clear:
                d.entries[index] &= ~ENTRY_DIRTY
        return runs


plugin = MockDriver()
