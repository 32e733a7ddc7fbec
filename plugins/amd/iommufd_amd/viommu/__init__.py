"""The AMD vIOMMU object (kernel ``amd_iommufd_viommu_init`` / ``struct amd_iommu_viommu``).

Upstream today a vIOMMU of type IOMMU_VIOMMU_TYPE_AMD holds no hardware resource: it pins
the nest parent and maps guest DomainIDs to host DomainIDs (``gdomid_array``) so that every
nested domain with the same gDomID shares one hDomID (one IOTLB tag), and so that a change
of the parent's stage 2 can be flushed for every hDomID. The HW-vIOMMU (issue 6) extends this
package with the guest ID, the private address space, guest MMIO and the mapping tables.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from iommufd_model.driver import Domain, ViommuBase
from iommufd_model.errors import err

if TYPE_CHECKING:
    from iommufd_amd.hw import AmdIommu


class GdomInfo:
    """``guest_domain_mapping_info``: one gDomID's host DomainID and its users."""

    def __init__(self, hdom_id: int) -> None:
        self.hdom_id = hdom_id
        self.users = 0


class AmdViommu(ViommuBase):
    def __init__(self, owner: AmdIommu, parent: Domain, viommu_type: int) -> None:
        super().__init__(owner, parent, viommu_type)
        self.hw = owner
        self.gdomids: dict[int, GdomInfo] = {}

    def get_hdom(self, gdom_id: int) -> GdomInfo:
        """The gDomID's mapping, allocating a host DomainID on first use (ENOSPC if none)."""
        info = self.gdomids.get(gdom_id)
        if info is None:
            hdom = self.hw.kernel.domids.alloc()
            if hdom <= 0:
                raise err(errno.ENOSPC, "no host DomainID left")
            info = self.gdomids[gdom_id] = GdomInfo(hdom)
        info.users += 1
        return info

    def put_hdom(self, gdom_id: int) -> None:
        info = self.gdomids[gdom_id]
        info.users -= 1
        if not info.users:
            del self.gdomids[gdom_id]
            self.hw.kernel.domids.free(info.hdom_id)

    def hdom_ids(self) -> list[int]:
        return [info.hdom_id for info in self.gdomids.values()]
