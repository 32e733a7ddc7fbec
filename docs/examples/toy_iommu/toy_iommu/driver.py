"""The toy driver's hooks: the "kernel driver" that programs :mod:`toy_iommu.hw`.

A paging domain is the framework's :class:`~iommufd_model.paging.PagingDomain` over a
:class:`~iommufd_model.hw.radix.RadixPageTable` in machine memory, plus a domain ID from an
:class:`~iommufd_model.ida.Ida`; map, unmap and the software walk are the base's. It declares
only ``Feature.PAGING``: every other hook is absent, so the core answers EOPNOTSUPP for
nesting, PASID, dirty tracking and vIOMMU, and the conformance kit reports those tests as
unsupported.
"""

from __future__ import annotations

import errno
from typing import Any

from iommufd_model.api import (
    PAGE_SIZE,
    Domain,
    DriverInfo,
    Feature,
    IommuHw,
    IotlbGather,
    Machine,
    PagingDomain,
    PagingDomainOps,
    PciDevice,
    RadixPageTable,
    err,
    hookimpl,
)
from toy_iommu.hw import FORMAT, ToyIommu

PGSIZES = PAGE_SIZE | (1 << 21)  # 4 KiB and 2 MiB leaves


class ToyDomain(PagingDomain[RadixPageTable]):
    """A paging domain: the framework's base owns the page table and does map, unmap and the
    software walk; the toy adds the ID its IOTLB entries are tagged with and the flush."""

    def __init__(self, iommu: ToyIommu) -> None:
        domid = iommu.domain_ids.alloc()  # ENOSPC when all are taken
        try:
            pt = RadixPageTable(iommu.memory, FORMAT)  # the root table: one frame
        except OSError:
            iommu.domain_ids.free(domid)
            raise
        super().__init__(iommu, pt, pgsize_bitmap=PGSIZES, aperture_end=(1 << FORMAT.va_bits) - 1)
        self.iommu = iommu
        self.domid = domid

    def iotlb_sync(self, gather: IotlbGather) -> None:
        """After an unmap: drop the cached translations of the range."""
        self.iommu.invalidate(self.domid, gather.first, gather.last)

    def free(self) -> None:
        """Tables, ID and cached translations all go."""
        self.iommu.invalidate(self.domid)
        super().free()
        self.iommu.domain_ids.free(self.domid)


def _toy(domain: Domain) -> ToyDomain:
    if not isinstance(domain, ToyDomain):
        raise err(errno.EINVAL, "not a toy domain")
    return domain


class ToyDriver(PagingDomainOps):
    """The plugin object; the entry point ``toy`` names :data:`plugin`. ``domain_map``,
    ``domain_map_pages``, ``domain_unmap`` and ``domain_iova_to_phys`` come from
    :class:`~iommufd_model.paging.PagingDomainOps`."""

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
        _toy(domain).free()

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
