"""The mock driver's domains (selftest.c ``mock_iommu_domain``, ``mock_iommu_domain_nested``)
and vIOMMU objects (``mock_viommu``, its vDEVICEs and HW queues). The paging domain is the
framework's :class:`~iommufd_model.paging.PagingDomain` over the mock's logical table
(mock/iommupt.py: one entry per MOCK_IO_PAGE_SIZE of IOVA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommufd_model.driver import (
    Domain,
    DomainType,
    HwQueueBase,
    VdeviceBase,
    ViommuBase,
)
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.mock.iommupt import (
    ENTRY_FLAGS,
    MOCK_HUGE_PAGE_SIZE,
    MOCK_IOMMUPT_DEFAULT,
    MOCK_IOMMUPT_HUGE,
    PGSIZE_BITMAP,
    VASZ_LG2,
    MockPageTable,
)
from iommufd_model.paging import PagingDomain

if TYPE_CHECKING:
    from iommufd_model.core.mmap import MmapOwner
    from iommufd_model.mock.hw import MockIommu

MOCK_IO_PAGE_SHIFT = 11
MOCK_IO_PAGE_SIZE = 1 << MOCK_IO_PAGE_SHIFT  # PAGE_SIZE / 2, as the self-test's MOCK_IO_PAGE_SIZE
MOCK_APERTURE_START = 1 << 24
MOCK_APERTURE_LAST = (1 << 31) - 1
MOCK_NESTED_DOMAIN_IOTLB_NUM = 4
IOMMU_TEST_HW_QUEUE_MAX = 2


class MockDomain(PagingDomain[MockPageTable]):
    """A mock paging domain over a generic_pt AMDv1 "mock" table (mock/iommupt.py).

    ``pagetable_type`` is the self-test's ``iommu_hwpt_selftest.pagetable_type``:
    MOCK_IOMMUPT_DEFAULT has every page size of the format and the mock aperture
    (``mock_domain_alloc_pgtable()`` overrides it); MOCK_IOMMUPT_HUGE has only 1 MiB and
    PAGE_SIZE pages and keeps the table's whole 38-bit aperture.
    """

    def __init__(
        self,
        owner: MockIommu,
        flags: int,
        *,
        nest_parent: bool,
        dirty: bool,
        pasid: bool,
        pagetable_type: int = MOCK_IOMMUPT_DEFAULT,
    ) -> None:
        if pagetable_type == MOCK_IOMMUPT_HUGE:
            pgsize, start, last = MOCK_HUGE_PAGE_SIZE | PAGE_SIZE, 0, (1 << VASZ_LG2) - 1
        else:
            pgsize, start, last = PGSIZE_BITMAP, MOCK_APERTURE_START, MOCK_APERTURE_LAST
        super().__init__(
            owner,
            MockPageTable(pgsize, (1 << VASZ_LG2) - 1),
            pgsize_bitmap=pgsize,
            aperture_start=start,
            aperture_end=last,
            nest_parent=nest_parent,
            dirty_tracking=dirty,
            pasid_compat=pasid,
        )
        self.flags = flags
        self.pagetable_type = pagetable_type
        self.entries = self.pt.entries  # one per mapped 2 KiB (see iommupt.py)

    def iova_to_phys(self, iova: int) -> int:
        """-1 where nothing is mapped (the framework's answer; the table's own is 0)."""
        entry = self.entries.get(iova >> MOCK_IO_PAGE_SHIFT)
        if entry is None:
            return -1
        return (entry & ~ENTRY_FLAGS) + (iova & (MOCK_IO_PAGE_SIZE - 1))


class MockNestedDomain(Domain):
    """``struct mock_iommu_domain_nested``: four mock IOTLB slots over a mock nest parent.

    The kernel's mock nested domain translates nothing of its own; the model keeps that (no
    stage-1 table) and lets DMA through it use the parent's entries, as a stage-1 identity.
    ``viommu`` is set when the HWPT was allocated on a mock vIOMMU.
    """

    def __init__(
        self,
        owner: MockIommu,
        parent: MockDomain,
        iotlb: int,
        *,
        pasid: bool,
        viommu: MockViommu | None,
    ) -> None:
        super().__init__(
            owner,
            DomainType.NESTED,
            pgsize_bitmap=parent.pgsize_bitmap,
            aperture_start=parent.aperture_start,
            aperture_end=parent.aperture_end,
            pasid_compat=pasid,
            parent=parent,
        )
        self.iotlb = [iotlb] * MOCK_NESTED_DOMAIN_IOTLB_NUM
        self.viommu = viommu

    @property
    def stage2(self) -> MockDomain:
        assert isinstance(self.parent, MockDomain)
        return self.parent


class MockViommu(ViommuBase):
    """``struct mock_viommu``: vDEVICE ids by device, two HW queue slots, the mmap page."""

    def __init__(self, owner: MockIommu, parent: MockDomain, viommu_type: int) -> None:
        super().__init__(owner, parent, viommu_type)
        self.vdevs: dict[int, int] = {}  # PCI RID -> virt_id
        self.hw_queue: list[MockHwQueue | None] = [None] * IOMMU_TEST_HW_QUEUE_MAX
        # The two zeroed pages the user maps (selftest data only): first PFN and offset.
        self.page_pfn: int | None = None
        self.mmap_offset = 0
        self.mmap: MmapOwner | None = None
        self.out_data = b""


class MockVdevice(VdeviceBase):
    pass


class MockHwQueue(HwQueueBase):
    """``struct mock_hw_queue``: queue ``index`` depends on queue ``index - 1``."""

    def __init__(
        self, viommu: MockViommu, queue_type: int, index: int, base_iova: int, length: int
    ) -> None:
        super().__init__(viommu, queue_type, index, base_iova, length)
        self.prev: MockHwQueue | None = None
