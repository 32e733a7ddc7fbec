"""The toy driver's hooks: the "kernel driver" that programs :mod:`toy_iommu.hw`.

A paging domain is a :class:`~iommufd_model.hw.radix.RadixPageTable` in machine memory plus a
domain ID from an :class:`~iommufd_model.ida.Ida`; map, unmap and the software walk are the
engine's. It declares only ``Feature.PAGING``: every other hook is absent, so the core
answers EOPNOTSUPP for nesting, PASID, dirty tracking and vIOMMU, and the conformance kit
reports those tests as unsupported.
"""

from __future__ import annotations

import errno
from typing import Any

from iommufd_model.api import (
    PAGE_SIZE,
    Domain,
    DomainType,
    DriverInfo,
    Feature,
    IommuHw,
    Machine,
    PciDevice,
    RadixPageTable,
    err,
    hookimpl,
)
from toy_iommu.hw import FORMAT, ToyIommu

PGSIZES = PAGE_SIZE | (1 << 21)  # 4 KiB and 2 MiB leaves


class ToyDomain(Domain):
    """A paging domain: its page table and the ID its IOTLB entries are tagged with."""

    def __init__(self, iommu: ToyIommu) -> None:
        super().__init__(
            iommu,
            DomainType.PAGING,
            pgsize_bitmap=PGSIZES,
            aperture_end=(1 << FORMAT.va_bits) - 1,
        )
        self.iommu = iommu
        self.domid = iommu.domain_ids.alloc()  # ENOSPC when all are taken
        try:
            self.pt = RadixPageTable(iommu.memory, FORMAT)  # the root table: one frame
        except OSError:
            iommu.domain_ids.free(self.domid)
            raise


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
            description="toy IOMMU: radix page tables, an IOTLB (docs/examples)",
            features=frozenset({Feature.PAGING}),
        )

    @hookimpl
    def probe(self, machine: Machine, index: int, options: dict[str, Any]) -> ToyIommu:
        if options:
            raise err(errno.EINVAL, f"unknown toy options: {sorted(options)}")
        return ToyIommu(machine, index)

    @hookimpl
    def domain_alloc_user(self, iommu: IommuHw, dev: PciDevice, flags: int) -> ToyDomain:
        # No ``parent`` and no ``user_data`` in the signature: the toy has no nested domains
        # and takes no vendor data, so the core answers EOPNOTSUPP for those by itself.
        if flags:
            raise err(errno.EOPNOTSUPP, f"toy supports no HWPT flags ({flags:#x})")
        if not isinstance(iommu, ToyIommu):
            raise err(errno.EINVAL, "not a toy IOMMU")
        return ToyDomain(iommu)

    @hookimpl
    def domain_free(self, domain: Domain) -> None:
        toy = _toy(domain)
        toy.iommu.invalidate(toy.domid)
        toy.pt.free()
        toy.iommu.domain_ids.free(toy.domid)

    @hookimpl
    def domain_map(self, domain: Domain, iova: int, pa: int, size: int, prot: int) -> None:
        _toy(domain).pt.map(iova, pa, size, prot)  # all-or-nothing, EEXIST on overlap

    @hookimpl
    def domain_unmap(self, domain: Domain, iova: int, size: int) -> int:
        toy = _toy(domain)
        done = toy.pt.unmap(iova, size)
        toy.iommu.invalidate(toy.domid, iova, iova + size - 1)  # the iotlb_sync
        return done

    @hookimpl
    def domain_iova_to_phys(self, domain: Domain, iova: int) -> int:
        return _toy(domain).pt.iova_to_phys(iova)

    @hookimpl
    def attach(self, iommu: IommuHw, dev: PciDevice, domain: Domain | None) -> None:
        if not isinstance(iommu, ToyIommu):
            raise err(errno.EINVAL, "not a toy IOMMU")
        if domain is None:
            iommu.context.pop(dev.rid, None)
        else:
            toy = _toy(domain)  # check before any change: a refused replace changes nothing
            # One store is the whole switch, so replace is hitless and cannot half-fail.
            iommu.context[dev.rid] = (toy.pt.root, toy.domid)


plugin = ToyDriver()
