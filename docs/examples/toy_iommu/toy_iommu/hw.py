"""The toy IOMMU as hardware: a context table (RID -> domain) and one-level page tables.

Each domain's table maps an IOVA page number to ``pa | prot``; the hardware walks it on every
DMA (one memory reference per walk, no IOTLB), exactly what the driver programmed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE, Domain, DomainType
from iommufd_model.hw.iommu import IommuHw, page_run
from iommufd_model.hw.memory import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.machine import Machine

APERTURE_LAST = (1 << 32) - 1  # a 32-bit IOVA space
PROT_MASK = IOMMU_READ | IOMMU_WRITE


class ToyDomain(Domain):
    """A paging domain: ``table[iova >> 12] = pa | prot``."""

    def __init__(self, owner: ToyIommu) -> None:
        super().__init__(
            owner, DomainType.PAGING, pgsize_bitmap=PAGE_SIZE, aperture_end=APERTURE_LAST
        )
        self.table: dict[int, int] = {}


class ToyIommu(IommuHw):
    """One toy IOMMU instance: per-RID context pointers, no PASID, no caches."""

    def __init__(self, machine: Machine, index: int) -> None:
        super().__init__(machine, index)
        self.context: dict[int, ToyDomain | None] = {}

    def translate(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        self.stats.translations += 1
        domain = self.context.get(dev.rid) if pasid is None else None
        if domain is None:
            raise self.fault(dev, iova, write, pasid, "blocked")
        self.stats.walk_mem_refs += 1
        entry = domain.table.get(iova >> PAGE_SHIFT)
        if entry is None:
            raise self.fault(dev, iova, write, pasid, "not mapped")
        if not entry & (IOMMU_WRITE if write else IOMMU_READ):
            raise self.fault(dev, iova, write, pasid, "permission")
        return (entry & ~PAGE_MASK) + (iova & PAGE_MASK), page_run(iova)
