"""Hook implementations of the mock driver (the kernel's ``mock_ops`` and domain ops)."""

from __future__ import annotations

import errno
from typing import Any

from iommufd_model.core.mmap import MmapOwner, PhysicalRegion
from iommufd_model.driver import (
    Domain,
    DriverInfo,
    Feature,
    HwInfo,
    HwQueueBase,
    InvalidateResult,
    UserData,
    VdeviceBase,
    ViommuBase,
    iommu_copy_struct_from_user,
)
from iommufd_model.errors import err
from iommufd_model.hookspecs import hookimpl
from iommufd_model.hw.memory import PAGE_SIZE, PhysicalMemory
from iommufd_model.hw.pci import PciDevice
from iommufd_model.machine import Machine

# Importing selftest registers IOMMU_TEST_CMD: loading the mock driver turns the test ioctl on,
# as building the kernel with CONFIG_IOMMUFD_TEST does.
from iommufd_model.mock import selftest
from iommufd_model.mock.domain import (
    MockDomain,
    MockHwQueue,
    MockNestedDomain,
    MockVdevice,
    MockViommu,
)
from iommufd_model.mock.hw import MOCK_DEV_CACHE_NUM, MOCK_PASID_WIDTH, MockIommu
from iommufd_model.mock.iommupt import MOCK_IOMMUPT_DEFAULT, MOCK_IOMMUPT_HUGE
from iommufd_model.paging import PagingDomainOps, paging_domain
from iommufd_model.uapi import iommufd as U

# iommufd_test.h: struct iommu_test_hw_info, reported as IOMMU_HW_INFO_TYPE_SELFTEST
IOMMU_HW_INFO_TYPE_SELFTEST = selftest.IOMMU_HW_INFO_TYPE_SELFTEST
IOMMU_HW_INFO_SELFTEST_REGVAL = selftest.IOMMU_HW_INFO_SELFTEST_REGVAL
PAGING_FLAGS = (
    U.IOMMU_HWPT_ALLOC_NEST_PARENT | U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING | U.IOMMU_HWPT_ALLOC_PASID
)


def _mock(iommu: Any) -> MockIommu:
    """The mock instance ``iommu``: the mock keeps no driver state apart from its hardware
    (the kernel's ``mock_iommu_device`` holds nothing the model needs); another driver's
    instance is EINVAL, as :func:`iommufd_model.driver.driver_state` answers."""
    if not isinstance(iommu, MockIommu):
        raise err(errno.EINVAL, f"{iommu.name} is not a mock IOMMU")
    return iommu


def _u32(data: bytes, off: int) -> int:
    return int.from_bytes(data[off : off + 4], "little")


def _domain(domain: Domain) -> MockDomain:
    if not isinstance(domain, MockDomain):
        raise err(errno.EINVAL, "not a mock paging domain")
    return domain


class MockDriver(PagingDomainOps):
    """The mock driver plugin object (entry point ``mock``)."""

    @hookimpl
    def driver_info(self) -> DriverInfo:
        return DriverInfo(
            name="mock",
            description="iommufd self-test mock IOMMU (kernel selftest.c)",
            # Every feature but LARGE_PAGES: selftest.c's mock exists to reach each iommufd
            # path, so it declares them all (and new ones are owed a mock implementation).
            features=frozenset(Feature) - {Feature.LARGE_PAGES},
            hwpt_data_types=frozenset({selftest.IOMMU_HWPT_DATA_SELFTEST}),
            viommu_types=frozenset({selftest.IOMMU_VIOMMU_TYPE_SELFTEST}),
            hw_info_type=IOMMU_HW_INFO_TYPE_SELFTEST,
            veventq_types=frozenset({selftest.IOMMU_VEVENTQ_TYPE_SELFTEST}),
            hw_queue_types=frozenset({selftest.IOMMU_HW_QUEUE_TYPE_SELFTEST}),
        )

    @hookimpl
    def probe(self, machine: Machine, index: int, options: dict[str, Any]) -> MockIommu:
        if options:
            raise err(errno.EINVAL, f"unknown mock options: {sorted(options)}")
        return MockIommu(machine, index)

    @hookimpl
    def probe_device(self, iommu: Any, dev: PciDevice) -> object:
        _mock(iommu).context[dev.rid] = None
        # mock_dev: its flags, the per-device mock cache, and the vIOMMU / virtual id it was
        # last attached through (for TRIGGER_VEVENT).
        return {
            "no_dirty": False,
            "flags": 0,
            "cache": [selftest.IOMMU_TEST_DEV_CACHE_DEFAULT] * MOCK_DEV_CACHE_NUM,
            "viommu": None,
            "vdev_id": 0,
            "pasid_1024_fake_error": False,
        }

    @hookimpl
    def dev_reserved_regions(self, iommu: Any, dev: PciDevice) -> list[tuple[int, int]]:
        return []

    @hookimpl
    def hw_info(self, iommu: Any, dev: PciDevice, data_type: int) -> HwInfo:
        if data_type not in (U.IOMMU_HW_INFO_TYPE_DEFAULT, IOMMU_HW_INFO_TYPE_SELFTEST):
            raise err(errno.EOPNOTSUPP, f"mock reports no hw_info type {data_type:#x}")
        data = (0).to_bytes(4, "little") + IOMMU_HW_INFO_SELFTEST_REGVAL.to_bytes(4, "little")
        caps = 0 if dev.iommu_priv["no_dirty"] else U.IOMMU_HW_CAP_DIRTY_TRACKING
        # mock_domain_capable() answers false for IOMMU_CAP_PCI_ATS_SUPPORTED
        return HwInfo(
            IOMMU_HW_INFO_TYPE_SELFTEST, data, caps, MOCK_PASID_WIDTH, ats_supported=False
        )

    @hookimpl
    def domain_alloc_user(
        self,
        iommu: Any,
        dev: PciDevice,
        flags: int,
        parent: Domain | None,
        viommu: ViommuBase | None,
        user_data: UserData | None,
    ) -> Domain:
        """``mock_domain_alloc_paging_flags()`` without ``parent``; ``mock_domain_alloc_nested()``
        / ``mock_viommu_alloc_domain_nested()`` with one."""
        if parent is not None:
            if user_data is None:
                raise err(errno.EOPNOTSUPP, "a nested domain needs iommu_hwpt_selftest data")
            return _alloc_nested(iommu, parent, viommu, flags, user_data.type, user_data.read())
        return _alloc_paging(iommu, dev, flags, user_data)

    @hookimpl
    def domain_free(self, domain: Domain) -> None:
        if isinstance(domain, MockDomain):
            domain.free()

    @hookimpl
    def domain_iova_to_phys(self, domain: Domain, iova: int) -> int:
        """A nested domain answers with its parent's table (it translates nothing itself)."""
        if isinstance(domain, MockNestedDomain):
            domain = domain.stage2
        return paging_domain(domain).iova_to_phys(iova)

    @hookimpl
    def attach(self, iommu: Any, dev: PciDevice, domain: Domain | None) -> None:
        priv = dev.iommu_priv
        viommu: MockViommu | None = None
        vdev_id = 0
        if domain is not None:
            _attachable(domain)
            # mock_domain_nop_attach(): a device without dirty tracking refuses such a domain.
            if domain.dirty_tracking and priv["no_dirty"]:
                raise err(errno.EINVAL, "device cannot attach to a dirty-tracking domain")
            if isinstance(domain, MockNestedDomain) and domain.viommu is not None:
                # iommufd_viommu_get_vdev_id(): a nested domain of a vIOMMU needs the
                # device's vDEVICE in that vIOMMU first.
                viommu = domain.viommu
                vid = viommu.vdevs.get(dev.rid)
                if vid is None:
                    raise err(errno.ENOENT, "no vDEVICE for this device in the vIOMMU")
                vdev_id = vid
        priv["viommu"], priv["vdev_id"] = viommu, vdev_id
        _mock(iommu).context[dev.rid] = domain

    @hookimpl
    def set_dev_pasid(self, iommu: Any, dev: PciDevice, pasid: int, domain: Domain) -> None:
        _attachable(domain)
        priv = dev.iommu_priv
        if pasid == selftest.IOMMU_TEST_PASID_RESERVED:
            # mock_domain_set_dev_pasid_nop(): the first attach of PASID 1024 arms a fake
            # failure that the next attach (a replace) returns, to test the core's rollback.
            if priv["pasid_1024_fake_error"]:
                priv["pasid_1024_fake_error"] = False
                raise err(errno.ENOMEM, "fake failure of the second PASID 1024 attach")
            priv["pasid_1024_fake_error"] = True
        _mock(iommu).pasid_context[(dev.rid, pasid)] = domain

    @hookimpl
    def remove_dev_pasid(self, iommu: Any, dev: PciDevice, pasid: int) -> None:
        if pasid == selftest.IOMMU_TEST_PASID_RESERVED:
            dev.iommu_priv["pasid_1024_fake_error"] = False  # the blocked domain disarms it
        _mock(iommu).pasid_context.pop((dev.rid, pasid), None)

    # -- nested domains, vIOMMU, invalidation -------------------------------------------
    @hookimpl
    def cache_invalidate_user(
        self, target: Domain | ViommuBase, data_type: int, entries: list[bytes]
    ) -> InvalidateResult:
        if isinstance(target, MockNestedDomain):
            return _nested_invalidate(target, data_type, entries)
        if isinstance(target, MockViommu):
            return _viommu_invalidate(target, data_type, entries)
        raise err(errno.EOPNOTSUPP, "target has no mock cache")

    @hookimpl
    def page_response(
        self, iommu: Any, dev: PciDevice, pasid: int | None, grpid: int, code: int
    ) -> None:
        """mock_domain_page_response() does nothing."""

    @hookimpl
    def get_viommu_size(self, iommu: Any, dev: PciDevice, viommu_type: int) -> int:
        """``mock_get_viommu_size()``: only the selftest type."""
        return 1 if viommu_type == selftest.IOMMU_VIOMMU_TYPE_SELFTEST else 0

    @hookimpl
    def viommu_alloc(
        self,
        iommu: Any,
        dev: PciDevice,
        parent: Domain,
        viommu_type: int,
        data: bytes,
        mmap: MmapOwner,
    ) -> MockViommu:
        """``mock_viommu_init()``: with selftest data, two zeroed pages exposed through the
        iommufd mmap, ``in_data`` looped back into the first u32 of the page and into
        ``out_data``, and the region's offset and length returned to the user."""
        if viommu_type != selftest.IOMMU_VIOMMU_TYPE_SELFTEST:
            raise err(errno.EOPNOTSUPP, f"mock vIOMMU type {viommu_type:#x}")
        viommu = MockViommu(_mock(iommu), _domain(parent), viommu_type)
        if data:
            # struct iommu_viommu_selftest { in_data; out_data; out_mmap_offset; _length }
            cfg = iommu_copy_struct_from_user(data, 24, 8)
            in_data = _u32(cfg, 0)
            memory = iommu.machine.memory
            pfn = memory.alloc_contiguous(2)  # __get_free_pages(__GFP_ZERO, order 1)
            try:
                region = PhysicalRegion(memory, pfn * PAGE_SIZE, 2 * PAGE_SIZE)
                viommu.mmap_offset = mmap.alloc(region)
            except OSError:
                _free_pages(memory, pfn, 2)
                raise
            viommu.page_pfn = pfn
            region.write(0, in_data.to_bytes(4, "little"))
            viommu.out_data = (
                in_data.to_bytes(4, "little") * 2
                + viommu.mmap_offset.to_bytes(8, "little")
                + (2 * PAGE_SIZE).to_bytes(8, "little")
            )[: len(data)]
        viommu.mmap = mmap
        return viommu

    @hookimpl
    def viommu_destroy(self, viommu: ViommuBase) -> None:
        """``mock_viommu_destroy()``: erase the mmap region, free the two pages."""
        assert isinstance(viommu, MockViommu)
        if viommu.page_pfn is not None and viommu.mmap is not None:
            viommu.mmap.destroy(viommu.mmap_offset)
            _free_pages(viommu.owner.machine.memory, viommu.page_pfn, 2)
            viommu.page_pfn = None

    @hookimpl
    def vdevice_alloc(self, viommu: ViommuBase, dev: PciDevice, virt_id: int) -> VdeviceBase:
        assert isinstance(viommu, MockViommu)
        viommu.vdevs[dev.rid] = virt_id
        return MockVdevice(viommu, dev, virt_id)

    @hookimpl
    def vdevice_destroy(self, vdev: VdeviceBase) -> None:
        viommu = vdev.viommu
        assert isinstance(viommu, MockViommu)
        if viommu.vdevs.get(vdev.dev.rid) == vdev.virt_id:
            del viommu.vdevs[vdev.dev.rid]

    @hookimpl
    def hw_queue_supported(self, viommu: ViommuBase, queue_type: int) -> bool:
        """mock_get_hw_queue_size(): only the selftest type."""
        return queue_type == selftest.IOMMU_HW_QUEUE_TYPE_SELFTEST

    @hookimpl
    def hw_queue_alloc(
        self,
        viommu: ViommuBase,
        queue_type: int,
        index: int,
        base_iova: int,
        length: int,
        pfns: list[int],
    ) -> HwQueueBase:
        assert isinstance(viommu, MockViommu)
        if queue_type != selftest.IOMMU_HW_QUEUE_TYPE_SELFTEST:
            raise err(errno.EOPNOTSUPP, f"mock HW queue type {queue_type:#x}")
        # mock_hw_queue_init_phys()
        if index >= len(viommu.hw_queue):
            raise err(errno.EINVAL, f"mock HW queue index {index} out of range")
        if viommu.hw_queue[index] is not None:
            raise err(errno.EEXIST, f"mock HW queue {index} exists")
        prev = viommu.hw_queue[index - 1] if index else None
        if index and prev is None:
            raise err(errno.EIO, f"mock HW queue {index} needs queue {index - 1} first")
        parent = _domain(viommu.parent)
        pa = self.domain_iova_to_phys(parent, base_iova)
        if pfns and pa != pfns[0] * 4096 + base_iova % 4096:
            raise err(errno.EFAULT, "queue base does not translate to its pinned page")
        queue = MockHwQueue(viommu, queue_type, index, base_iova, length)
        if prev is not None:
            queue.depend(prev)  # the earlier queue cannot be destroyed first (EBUSY)
            queue.prev = prev
        viommu.hw_queue[index] = queue
        return queue

    @hookimpl
    def hw_queue_destroy(self, queue: HwQueueBase) -> None:
        assert isinstance(queue, MockHwQueue)
        viommu = queue.viommu
        assert isinstance(viommu, MockViommu)
        viommu.hw_queue[queue.index] = None

    @hookimpl
    def set_dirty_tracking(self, domain: Domain, enable: bool) -> None:
        _domain(domain).dirty_enabled = enable

    @hookimpl
    def read_and_clear_dirty(
        self, domain: Domain, iova: int, length: int, clear: bool, report: bool
    ) -> list[tuple[int, int]]:
        """generic_pt's ``read_and_clear_dirty()``: whether tracking is on does not matter."""
        return _domain(domain).pt.read_and_clear_dirty(iova, length, clear)


def _free_pages(memory: PhysicalMemory, pfn: int, count: int) -> None:
    for i in range(count):
        memory.put_frame(pfn + i)


def _alloc_paging(iommu: Any, dev: PciDevice, flags: int, user_data: UserData | None) -> MockDomain:
    """``mock_domain_alloc_paging_flags()``: optional ``iommu_hwpt_selftest`` data (minimum
    ``iotlb``) chooses the page table (``pagetable_type``)."""
    if flags & ~PAGING_FLAGS:
        raise err(errno.EOPNOTSUPP, f"mock paging flags {flags:#x}")
    dirty = bool(flags & U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    if dirty and dev is not None and dev.iommu_priv["no_dirty"]:
        raise err(errno.EOPNOTSUPP, "device cannot track dirty pages")
    pagetable_type = MOCK_IOMMUPT_DEFAULT
    if user_data is not None:
        data_type, data = user_data.type, user_data.read()
        if data_type not in (selftest.IOMMU_HWPT_DATA_SELFTEST, U.IOMMU_HWPT_DATA_NONE):
            raise err(errno.EOPNOTSUPP, f"mock paging data type {data_type:#x}")
        if data_type != selftest.IOMMU_HWPT_DATA_SELFTEST:
            raise err(errno.EINVAL, "iommu_copy_struct_from_user: type mismatch")
        pagetable_type = _u32(iommu_copy_struct_from_user(data, 8, 4), 4)
    if pagetable_type not in (MOCK_IOMMUPT_DEFAULT, MOCK_IOMMUPT_HUGE):
        raise err(errno.EOPNOTSUPP, f"mock pagetable_type {pagetable_type}")
    return MockDomain(
        _mock(iommu),
        flags,
        nest_parent=bool(flags & U.IOMMU_HWPT_ALLOC_NEST_PARENT),
        dirty=dirty,
        pasid=bool(flags & U.IOMMU_HWPT_ALLOC_PASID),
        pagetable_type=pagetable_type,
    )


def _alloc_nested(
    iommu: Any,
    parent: Domain,
    viommu: ViommuBase | None,
    flags: int,
    data_type: int,
    data: bytes,
) -> MockNestedDomain:
    if flags & ~U.IOMMU_HWPT_ALLOC_PASID:
        raise err(errno.EOPNOTSUPP, f"mock nested flags {flags:#x}")
    if not isinstance(parent, MockDomain):
        raise err(errno.EINVAL, "parent is not a mock paging domain")
    if data_type != selftest.IOMMU_HWPT_DATA_SELFTEST:
        raise err(errno.EOPNOTSUPP, f"mock nested data type {data_type:#x}")
    # struct iommu_hwpt_selftest { __u32 iotlb; __u32 pagetable_type; }, min: iotlb
    cfg = iommu_copy_struct_from_user(data, 8, 4)
    mock_viommu = viommu if isinstance(viommu, MockViommu) else None
    return MockNestedDomain(
        _mock(iommu),
        parent,
        _u32(cfg, 0),
        pasid=bool(flags & U.IOMMU_HWPT_ALLOC_PASID),
        viommu=mock_viommu,
    )


def _attachable(domain: Domain) -> None:
    if not isinstance(domain, (MockDomain, MockNestedDomain)):
        raise err(errno.EINVAL, "not a mock domain")


def _nested_invalidate(
    nested: MockNestedDomain, data_type: int, entries: list[bytes]
) -> InvalidateResult:
    """``mock_domain_cache_invalidate_user()``: one entry at a time, stop at the first bad.

    Each entry is copied with ``iommu_copy_struct_from_user_array()`` (struct
    iommu_hwpt_invalidate_selftest {flags, iotlb_id}, minimum iotlb_id): an entry_len other
    than 8 is EINVAL, unknown flags EOPNOTSUPP, an iotlb_id above the maximum EINVAL.
    """
    if data_type != selftest.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST:
        return InvalidateResult(0, errno.EINVAL)
    done = 0
    for raw in entries:
        try:
            inv = iommu_copy_struct_from_user(raw, 8, 8)
        except OSError as exc:
            return InvalidateResult(done, exc.errno or errno.EINVAL)
        flags, iotlb_id = _u32(inv, 0), _u32(inv, 4)
        if flags & ~selftest.IOMMU_TEST_INVALIDATE_FLAG_ALL:
            return InvalidateResult(done, errno.EOPNOTSUPP)
        if iotlb_id > selftest.MOCK_NESTED_DOMAIN_IOTLB_ID_MAX:
            return InvalidateResult(done, errno.EINVAL)
        if flags & selftest.IOMMU_TEST_INVALIDATE_FLAG_ALL:
            nested.iotlb = [0] * len(nested.iotlb)
        else:
            nested.iotlb[iotlb_id] = 0
        done += 1
    return InvalidateResult(done)


def _viommu_invalidate(
    viommu: MockViommu, data_type: int, entries: list[bytes]
) -> InvalidateResult:
    """``mock_viommu_cache_invalidate()``: the whole array is copied first, then handled.

    The array copy (``iommu_copy_struct_from_full_user_array``) zero-fills short entries and
    refuses long ones whose extra bytes are not zero (E2BIG); an empty array of the right
    type is a type probe. Per entry: unknown flags EOPNOTSUPP, cache_id above the maximum
    EINVAL, a vdev_id with no vDEVICE EINVAL.
    """
    if not entries and data_type == selftest.IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST:
        return InvalidateResult(0)
    if data_type != selftest.IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST:
        return InvalidateResult(0, errno.EINVAL)
    cmds = []
    for raw in entries:
        if len(raw) > 12 and any(raw[12:]):
            return InvalidateResult(0, errno.E2BIG)
        cmds.append(raw[:12].ljust(12, b"\0"))
    by_virt_id = {vid: rid for rid, vid in viommu.vdevs.items()}
    devices = viommu.owner.devices
    done = 0
    for cmd in cmds:
        flags, vdev_id, cache_id = _u32(cmd, 0), _u32(cmd, 4), _u32(cmd, 8)
        if flags & ~selftest.IOMMU_TEST_INVALIDATE_FLAG_ALL:
            return InvalidateResult(done, errno.EOPNOTSUPP)
        if cache_id > selftest.MOCK_DEV_CACHE_ID_MAX:
            return InvalidateResult(done, errno.EINVAL)
        rid = by_virt_id.get(vdev_id)
        dev = devices.get(rid) if rid is not None else None
        if dev is None:
            return InvalidateResult(done, errno.EINVAL)
        cache = dev.iommu_priv["cache"]
        if flags & selftest.IOMMU_TEST_INVALIDATE_FLAG_ALL:
            cache[:] = [0] * len(cache)
        else:
            cache[cache_id] = 0
        done += 1
    return InvalidateResult(done)


plugin = MockDriver()
