"""The paging domain every driver shares: a :class:`Domain` that owns an IO page table and
implements map, map_pages, unmap and iova_to_phys once (what Linux 7.2's generic_pt gives
every driver built on it: ``iommu_domain_ops.map_pages`` / ``unmap_pages`` /
``iova_to_phys``, drivers/iommu/generic_pt/iommu_pt.h).

A vendor's paging domain derives from :class:`PagingDomain` and adds only what differs: the
table's format (a :class:`~iommufd_model.hw.radix.PtFormat` given to the
:class:`~iommufd_model.hw.radix.RadixPageTable` it passes in: PTE encoding, levels, page
sizes), checks a map must pass first (:meth:`PagingDomain.check_map`) and the IOTLB flush of
an unmap (:meth:`PagingDomain.iotlb_sync`, given the :class:`IotlbGather` the table filled).
A driver plugin class that inherits :class:`PagingDomainOps` has the four domain hooks
routed to those methods.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import attrs

from iommufd_model.driver import Domain, DomainType
from iommufd_model.errors import err
from iommufd_model.hookspecs import hookimpl

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw


@attrs.define
class IotlbGather:
    """``struct iommu_iotlb_gather`` of one unmap: the range asked for and the leaves the
    table cleared, as ``(iova, bytes, page size)`` runs of one page size in IOVA order."""

    first: int
    last: int
    runs: list[tuple[int, int, int]] = attrs.Factory(list)

    def add(self, iova: int, size: int, pgsize: int) -> None:
        self.runs.append((iova, size, pgsize))

    @property
    def size(self) -> int:
        """Bytes unmapped."""
        return sum(size for _iova, size, _pgsize in self.runs)


class IoPageTable(Protocol):
    """What a paging domain's table does (:class:`~iommufd_model.hw.radix.RadixPageTable`;
    the mock's logical table, ``mock/iommupt.py``)."""

    def map(self, iova: int, pa: int, size: int, prot: int, pgsize: int = 0) -> None: ...

    def unmap(self, iova: int, size: int, gather: IotlbGather | None = None) -> int: ...

    def iova_to_phys(self, iova: int) -> int: ...

    def free(self) -> None: ...


PT = TypeVar("PT", bound=IoPageTable)


class PagingDomain(Domain, Generic[PT]):
    """A kernel-managed paging domain over the IO page table ``pt`` it owns."""

    def __init__(
        self,
        owner: IommuHw,
        pt: PT,
        *,
        pgsize_bitmap: int,
        aperture_start: int = 0,
        aperture_end: int,
        nest_parent: bool = False,
        dirty_tracking: bool = False,
        pasid_compat: bool = False,
    ) -> None:
        super().__init__(
            owner,
            DomainType.PAGING,
            pgsize_bitmap=pgsize_bitmap,
            aperture_start=aperture_start,
            aperture_end=aperture_end,
            nest_parent=nest_parent,
            dirty_tracking=dirty_tracking,
            pasid_compat=pasid_compat,
        )
        self.pt = pt

    # -- what a vendor may add --------------------------------------------------------------
    def check_map(self, iova: int, size: int, prot: int) -> None:
        """The driver's checks before a map touches the table (raise OSError); none here."""

    def iotlb_sync(self, gather: IotlbGather) -> None:
        """``iotlb_sync``: flush what ``gather`` says an unmap cleared; nothing here (a
        domain whose hardware caches nothing)."""

    # -- the ops, once ----------------------------------------------------------------------
    def map(self, iova: int, pa: int, size: int, prot: int, pgsize: int = 0) -> None:
        """``iommu_map()``: ``[iova, iova+size)`` to ``pa``, no leaf larger than ``pgsize``
        when it is set; all-or-nothing."""
        self.check_map(iova, size, prot)
        self.pt.map(iova, pa, size, prot, pgsize)

    def map_pages(self, iova: int, pa: int, pgsize: int, pgcount: int, prot: int) -> None:
        """``map_pages(pgsize, pgcount)``: the leaves ``pgcount`` maps of ``pgsize`` build."""
        self.map(iova, pa, pgsize * pgcount, prot, pgsize)

    def unmap(self, iova: int, size: int) -> int:
        """``iommu_unmap()``: clear the leaves into a gather, then :meth:`iotlb_sync` it;
        returns the bytes unmapped."""
        gather = IotlbGather(iova, iova + size - 1)
        done = self.pt.unmap(iova, size, gather)
        self.iotlb_sync(gather)
        return done

    def iova_to_phys(self, iova: int) -> int:
        return self.pt.iova_to_phys(iova)

    def free(self) -> None:
        """Give the table's memory back (the domain is gone)."""
        self.pt.free()


def paging_domain(domain: Domain) -> PagingDomain[Any]:
    """``domain`` as a :class:`PagingDomain`; EINVAL for any other kind (a nested domain has
    no table of its own to map into)."""
    if not isinstance(domain, PagingDomain):
        raise err(errno.EINVAL, "not a paging domain")
    return domain


class PagingDomainOps:
    """The domain hooks of a driver whose paging domains are :class:`PagingDomain`: a driver
    plugin class inherits them (pluggy finds inherited ``@hookimpl`` methods) and may
    override any of them."""

    @hookimpl
    def domain_map(self, domain: Domain, iova: int, pa: int, size: int, prot: int) -> None:
        paging_domain(domain).map(iova, pa, size, prot)

    @hookimpl
    def domain_map_pages(
        self, domain: Domain, iova: int, pa: int, pgsize: int, pgcount: int, prot: int
    ) -> None:
        paging_domain(domain).map_pages(iova, pa, pgsize, pgcount, prot)

    @hookimpl
    def domain_unmap(self, domain: Domain, iova: int, size: int) -> int:
        return paging_domain(domain).unmap(iova, size)

    @hookimpl
    def domain_iova_to_phys(self, domain: Domain, iova: int) -> int:
        return paging_domain(domain).iova_to_phys(iova)
