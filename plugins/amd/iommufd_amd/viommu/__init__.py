"""The AMD vIOMMU object (kernel ``amd_iommufd_viommu_init`` / ``struct amd_iommu_viommu``).

It pins the nest parent and maps guest DomainIDs to host DomainIDs (``gdomid_array``) so that
every nested domain with the same gDomID shares one hDomID (one IOTLB tag), and so that a
change of the parent's stage 2 can be flushed for every hDomID. On hardware with the
HW-vIOMMU (EFR VIOMMU) it also owns a guest ID and its slice of the IOMMU Private Address
space (guest MMIO, DevID and DomID mapping tables): :mod:`iommufd_amd.viommu.kernel` sets them
up, :mod:`iommufd_amd.viommu.hw` is the hardware that uses them.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from iommufd_model.driver import Domain, HwQueueBase, ViommuBase
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
        # HW-vIOMMU resources (gid 0: none -- no hardware support or an implicit vIOMMU)
        self.gid = 0
        self.trans_devid = 0
        self.trans_domid = 0
        self.table_frames: list[int] = []  # DevID + DomID mapping tables (PAS-mapped)
        self.gdevids: dict[int, int] = {}  # gDevID -> hDevID (vDEVICEs)
        self.window: object = None  # the VF MMIO page the VMM mmaps (VfMmioWindow)

    def _map_domid(self, gdom_id: int, hdom_id: int, valid: bool) -> None:
        if self.gid:
            from iommufd_amd.viommu.kernel import map_command

            map_command(self.hw, self.gid, domain=True, gid_=gdom_id, hid=hdom_id, valid=valid)

    def get_hdom(self, gdom_id: int) -> GdomInfo:
        """The gDomID's mapping, allocating a host DomainID on first use (ENOSPC if none)."""
        info = self.gdomids.get(gdom_id)
        if info is None:
            hdom = self.hw.kernel.domids.alloc()
            if hdom <= 0:
                raise err(errno.ENOSPC, "no host DomainID left")
            info = self.gdomids[gdom_id] = GdomInfo(hdom)
            self._map_domid(gdom_id, hdom, True)
        info.users += 1
        return info

    def put_hdom(self, gdom_id: int) -> None:
        info = self.gdomids[gdom_id]
        info.users -= 1
        if not info.users:
            del self.gdomids[gdom_id]
            self._map_domid(gdom_id, 0, False)
            self.hw.kernel.domids.free(info.hdom_id)

    def hdom_ids(self) -> list[int]:
        """Host DomainIDs that cache translations through the parent's stage 2."""
        ids = [info.hdom_id for info in self.gdomids.values()]
        if self.trans_domid:
            ids.append(self.trans_domid)
        return ids


class AmdHwQueue(HwQueueBase):
    """A guest command buffer or event log the hardware reads/writes in guest RAM."""
