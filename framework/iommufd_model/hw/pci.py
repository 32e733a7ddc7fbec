"""Simulated PCI devices: a requester ID behind one IOMMU instance, able to issue DMA and
PCIe page requests (PRI), with the configuration space the IOMMU drivers read (its Page
Request capability: devices/pri.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from iommufd_model.devices.config import ConfigSpace
    from iommufd_model.hw.iommu import IommuHw

PRG_INDEX_MASK = 0x1FF  # the Page Request Group Index: 9 bits in the message
PASID_MASK = 0xF_FFFF  # the PASID TLP prefix: 20 bits
PAGE_ADDR_MASK = ((1 << 64) - 1) & ~0xFFF  # the message carries address bits 63:12


def _page_addr(addr: int) -> int:
    return addr & PAGE_ADDR_MASK


def _pasid(pasid: int | None) -> int | None:
    return None if pasid is None else pasid & PASID_MASK


def _grpid(grpid: int) -> int:
    return grpid & PRG_INDEX_MASK


@attrs.frozen
class PageRequest:
    """A PCIe Page Request Message as it leaves the device (PCIe Base spec, Page Request
    Interface): the page address, the PASID TLP prefix (None: no prefix) with its Execute and
    Privileged Mode Requested bits, Read/Write Access Requested, the Page Request Group Index
    and Last Request in PRG. The fields hold only what the message can carry (the
    constructor truncates to the wire widths), so every vendor's queue format sees the same
    request. Vendors' own names: AMD's PPR log ``GN``/``US``/tag, VT-d's ``PRGI``/``LPIG``,
    SMMUv3's PRI queue ``SSV``/``PRGIndex``/``L``."""

    addr: int = attrs.field(converter=_page_addr)
    pasid: int | None = attrs.field(default=None, converter=_pasid)
    read: bool = True
    write: bool = False
    exe: bool = False
    priv: bool = False
    grpid: int = attrs.field(default=0, converter=_grpid)
    last: bool = True


class PciDevice:
    """A DMA-capable PCI function. ``rid`` is bus<<8 | devfn (the AMD DevID, SMMU StreamID).

    Its DMA methods only hand over to the IOMMU's DMA engine, which takes the model lock
    (docs/concurrency.md): one acquisition per DMA.

    ``config`` is its PCIe configuration space. This bare device carries only what the IOMMU
    drivers read there: the Page Request (PRI) capability at 0x100 when ``pri`` (by default a
    device has PRI exactly when it has ATS: the model's own default), with its "PRG Response
    PASID Required" bit (``prg_resp_pasid_required``) and Outstanding Page Request Capacity
    (``pri_capacity``). :class:`~iommufd_model.devices.PciFunction` builds a full one."""

    def __init__(
        self,
        iommu: IommuHw,
        rid: int,
        *,
        pasid_bits: int = 20,
        ats: bool = False,
        pri: bool | None = None,
        prg_resp_pasid_required: bool = True,
        pri_capacity: int | None = None,
    ) -> None:
        # devices/ imports this module (PciFunction derives from PciDevice): import here.
        from iommufd_model.devices.pri import PRI_CAPACITY

        self.iommu = iommu
        self.rid = rid
        self.pasid_bits = pasid_bits
        self.ats = ats
        self.pri = ats if pri is None else pri
        self.prg_resp_pasid_required = prg_resp_pasid_required
        self.pri_capacity = PRI_CAPACITY if pri_capacity is None else pri_capacity
        self.config = self._bare_config()
        # Driver per-device data from the probe_device hook.
        self.iommu_priv: Any = None
        # The iommufd that has bound this device (VFIO allows one at a time).
        self.bound_to: Any = None

    def _bare_config(self) -> ConfigSpace:
        from iommufd_model.devices.config import PCI_EXT_CAP_START, PCIE_CONFIG_SIZE, ConfigSpace

        cfg = ConfigSpace(PCIE_CONFIG_SIZE)
        if self.pri:
            self.add_pri_cap(cfg, PCI_EXT_CAP_START)
        return cfg

    def add_pri_cap(self, cfg: ConfigSpace, pos: int) -> None:
        """Chain this device's PRI capability at ``pos`` of ``cfg``."""
        from iommufd_model.devices.pri import add_pri_cap

        add_pri_cap(
            cfg, pos, capacity=self.pri_capacity, pasid_required=self.prg_resp_pasid_required
        )

    def physical_function(self) -> PciDevice:
        """``pci_physfn()``: the function whose PRI capability this one uses (itself)."""
        return self

    def config_read(self, offset: int, size: int) -> int:
        """A configuration read of ``size`` (1, 2, 4) bytes; EINVAL outside the space."""
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A configuration write: masks per bit, then the PRI capability's side effect."""
        from iommufd_model.devices.pri import pri_control_written

        self.config.write(offset, size, value)
        pri_control_written(self.config)

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

    def page_request(
        self,
        addr: int,
        *,
        pasid: int | None = None,
        read: bool = True,
        write: bool = False,
        exe: bool = False,
        priv: bool = False,
        grpid: int = 0,
        last: bool = True,
    ) -> bool:
        """Send a PCIe Page Request (PRI) for the page at ``addr`` to the IOMMU: whether the
        IOMMU took it into its queue (see :meth:`IommuHw.page_request`). The answer comes
        later, as a page group response the IOMMU hands back."""
        req = PageRequest(addr, pasid, read, write, exe, priv, grpid, last)
        return self.iommu.page_request(self, req)

    def __repr__(self) -> str:
        return f"<PciDevice {self.name}>"
