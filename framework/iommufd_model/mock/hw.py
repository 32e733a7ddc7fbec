"""The mock IOMMU as hardware: per-device (and per-PASID) context pointers, and a walk of the
mock paging domain's table (mock/iommupt.py: one entry per MOCK_IO_PAGE_SIZE of IOVA). The
domains it walks are in :mod:`iommufd_model.mock.domain`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommufd_model.driver import Domain
from iommufd_model.hw.iommu import IommuHw
from iommufd_model.mock.domain import (
    MOCK_IO_PAGE_SHIFT,
    MOCK_IO_PAGE_SIZE,
    MockDomain,
    MockNestedDomain,
)
from iommufd_model.mock.iommupt import (
    ENTRY_FLAGS,
    ENTRY_READ,
    ENTRY_WRITE,
)

if TYPE_CHECKING:
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.machine import Machine

MOCK_PASID_WIDTH = 20
MOCK_DEV_CACHE_NUM = 4


class MockIommu(IommuHw):
    """Context pointers per RID and per (RID, PASID); translation through MockDomain."""

    def __init__(self, machine: Machine, index: int) -> None:
        super().__init__(machine, index)
        self.context: dict[int, Domain | None] = {}
        self.pasid_context: dict[tuple[int, int], Domain] = {}

    def translate(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        stats = self.stats
        stats.translations += 1
        if pasid is None:
            domain = self.context.get(dev.rid)
        else:
            domain = self.pasid_context.get((dev.rid, pasid))
        if domain is None:
            raise self.fault(dev, iova, write, pasid, "blocked: no domain attached")
        if isinstance(domain, MockNestedDomain):
            domain = domain.stage2
        if not isinstance(domain, MockDomain):
            raise self.fault(dev, iova, write, pasid, "domain type cannot translate")
        index = iova >> MOCK_IO_PAGE_SHIFT
        stats.walk_mem_refs += 1
        entry = domain.entries.get(index)
        if entry is None:
            raise self.fault(dev, iova, write, pasid, "not mapped")
        need = ENTRY_WRITE if write else ENTRY_READ
        if not entry & need:
            raise self.fault(dev, iova, write, pasid, "permission")
        if write and domain.dirty_enabled:
            domain.pt.set_dirty(iova)  # the model's hardware sets D as AMDv1 hardware does
        offset = iova & (MOCK_IO_PAGE_SIZE - 1)
        return (entry & ~ENTRY_FLAGS) + offset, MOCK_IO_PAGE_SIZE - offset
