"""The toy driver's hook implementations: the "kernel driver" programming :mod:`toy_iommu.hw`.

It declares only ``Feature.PAGING``; every other hook is absent, so the core answers
EOPNOTSUPP for nesting, PASID, dirty tracking and vIOMMU, and the conformance kit reports
those tests as unsupported.
"""

from __future__ import annotations

import errno
from typing import Any

from iommufd_model.driver import Domain, DriverInfo, Feature
from iommufd_model.errors import err
from iommufd_model.hookspecs import hookimpl
from iommufd_model.hw.iommu import IommuHw
from iommufd_model.hw.memory import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE
from iommufd_model.hw.pci import PciDevice
from iommufd_model.machine import Machine
from toy_iommu.hw import PROT_MASK, ToyDomain, ToyIommu


def _toy(domain: Domain) -> ToyDomain:
    if not isinstance(domain, ToyDomain):
        raise err(errno.EINVAL, "not a toy domain")
    return domain


class ToyDriver:
    """The plugin object; the entry point ``toy`` names :data:`plugin`."""

    @hookimpl
    def driver_info(self) -> DriverInfo:
        return DriverInfo(
            name="toy",
            description="toy IOMMU: one-level dict page table (docs/examples)",
            features=frozenset({Feature.PAGING}),
        )

    @hookimpl
    def probe(self, machine: Machine, index: int, options: dict[str, Any]) -> ToyIommu:
        if options:
            raise err(errno.EINVAL, f"unknown toy options: {sorted(options)}")
        return ToyIommu(machine, index)

    @hookimpl
    def domain_alloc_paging(self, iommu: IommuHw, dev: PciDevice | None, flags: int) -> ToyDomain:
        if flags:
            raise err(errno.EOPNOTSUPP, f"toy supports no HWPT flags ({flags:#x})")
        assert isinstance(iommu, ToyIommu)
        return ToyDomain(iommu)

    @hookimpl
    def domain_free(self, domain: Domain) -> bool:
        _toy(domain).table.clear()
        return True

    @hookimpl
    def domain_map(self, domain: Domain, iova: int, pa: int, size: int, prot: int) -> bool:
        table = _toy(domain).table
        if (iova | pa | size) & PAGE_MASK:
            raise err(errno.EINVAL, "toy maps whole 4 KiB pages")
        pages = range(iova >> PAGE_SHIFT, (iova + size) >> PAGE_SHIFT)
        if any(p in table for p in pages):  # check first: map is all-or-nothing
            raise err(errno.EEXIST, "IOVA already mapped")
        for i, page in enumerate(pages):
            table[page] = (pa + i * PAGE_SIZE) | (prot & PROT_MASK)
        return True

    @hookimpl
    def domain_unmap(self, domain: Domain, iova: int, size: int) -> int:
        table = _toy(domain).table
        pages = range(iova >> PAGE_SHIFT, (iova + size) >> PAGE_SHIFT)
        return sum(PAGE_SIZE for p in pages if table.pop(p, None) is not None)

    @hookimpl
    def domain_iova_to_phys(self, domain: Domain, iova: int) -> int:
        entry = _toy(domain).table.get(iova >> PAGE_SHIFT)
        return -1 if entry is None else (entry & ~PAGE_MASK) + (iova & PAGE_MASK)

    @hookimpl
    def attach_dev(self, iommu: IommuHw, dev: PciDevice, domain: Domain | None) -> bool:
        assert isinstance(iommu, ToyIommu)
        # One store is the whole switch, so replace is hitless and cannot half-fail.
        iommu.context[dev.rid] = None if domain is None else _toy(domain)
        return True


plugin = ToyDriver()
