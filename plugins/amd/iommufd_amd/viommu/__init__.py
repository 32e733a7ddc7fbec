"""The AMD vIOMMU object (kernel ``amd_iommufd_viommu_init`` / ``struct amd_iommu_viommu``).

It pins the nest parent and maps guest DomainIDs to host DomainIDs (``gdomid_array``) so that
every nested domain with the same gDomID shares one hDomID (one IOTLB tag), and so that a
change of the parent's stage 2 can be flushed for every hDomID. On hardware with the
HW-vIOMMU (EFR VIOMMU) it also owns a guest ID and its slice of the IOMMU Private Address
space (guest MMIO, DevID and DomID mapping tables): :mod:`iommufd_amd.viommu.kernel` sets them
up, :mod:`iommufd_amd.viommu.hw` is the hardware that uses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommufd_model.driver import Domain, HwQueueBase, ViommuBase

if TYPE_CHECKING:
    from iommufd_amd.hw import AmdIommu
    from iommufd_model.core.mmap import MmapOwner


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
        # HW-vIOMMU resources (gid 0: none -- hardware without EFR VIOMMU, the Linux 7.2 path)
        self.gid = 0
        self.trans_devid = -1  # the translate DeviceID (-1: none)
        self.table_frames: list[int] = []  # DevID + DomID mapping tables (PAS-mapped)
        self.gdevids: dict[int, int] = {}  # gDevID -> hDevID (vDEVICEs)
        self.window: object = None  # the VF MMIO page (VfMmioWindow)
        self.vfmmio_mmap_offset = 0  # its iommufd mmap offset (struct iommu_viommu_amd)
        self.out_data = b""  # struct iommu_viommu_amd as returned to the user
        self.mmap: MmapOwner | None = None  # the iommufd mmap the VF MMIO page is registered in

    def get_hdom(self, gdom_id: int) -> GdomInfo:
        """nested.c: the gDomID's mapping, allocating a host DomainID on first use (ENOSPC if
        none). The DomID mapping table is written at nested attach, not here."""
        info = self.gdomids.get(gdom_id)
        if info is None:
            hdom = self.hw.driver_state.domids.alloc()  # ENOSPC when none is left
            info = self.gdomids[gdom_id] = GdomInfo(hdom)
        info.users += 1
        return info

    def put_hdom(self, gdom_id: int) -> None:
        """nested_domain_free(): the last user frees the host DomainID. The DomID mapping-table
        entry is left as it is (AMD's tree does not clear it either)."""
        info = self.gdomids[gdom_id]
        info.users -= 1
        if not info.users:
            del self.gdomids[gdom_id]
            self.hw.driver_state.domids.free(info.hdom_id)

    def hdom_ids(self) -> list[int]:
        """Host DomainIDs that cache translations through the parent's stage 2."""
        return [info.hdom_id for info in self.gdomids.values()]


class AmdHwQueue(HwQueueBase):
    """A guest command buffer or event log the hardware reads/writes in guest RAM."""
