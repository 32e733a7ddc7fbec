"""Simulated PCI devices: a requester ID behind one IOMMU instance, able to issue DMA."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw


class PciDevice:
    """A DMA-capable PCI function. ``rid`` is bus<<8 | devfn (the AMD DevID, SMMU StreamID).

    Its DMA methods only hand over to the IOMMU's DMA engine, which takes the model lock
    (docs/concurrency.md): one acquisition per DMA."""

    def __init__(
        self, iommu: IommuHw, rid: int, *, pasid_bits: int = 20, ats: bool = False
    ) -> None:
        self.iommu = iommu
        self.rid = rid
        self.pasid_bits = pasid_bits
        self.ats = ats
        # Driver per-device data from the probe_device hook.
        self.iommu_priv: Any = None
        # The iommufd that has bound this device (VFIO allows one at a time).
        self.bound_to: Any = None

    @property
    def name(self) -> str:
        bus, devfn = self.rid >> 8, self.rid & 0xFF
        return f"{bus:02x}:{devfn >> 3:02x}.{devfn & 7}@{self.iommu.name}"

    def dma_read(self, iova: int, n: int, pasid: int | None = None) -> bytes:
        """Read ``n`` bytes at ``iova`` through the IOMMU; raises ``DmaFault``."""
        return self.iommu.dma_read(self, iova, n, pasid)

    def dma_write(
        self, iova: int, data: bytes | bytearray | memoryview, pasid: int | None = None
    ) -> None:
        """Write ``data`` at ``iova`` through the IOMMU; all or nothing; raises ``DmaFault``."""
        self.iommu.dma_write(self, iova, data, pasid)

    def __repr__(self) -> str:
        return f"<PciDevice {self.name}>"
