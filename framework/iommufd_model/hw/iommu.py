"""The hardware side every vendor shares: an IOMMU instance that translates device DMA.

A vendor subclasses :class:`IommuHw` and implements :meth:`translate` by walking its own
in-memory structures. The DMA engine here turns translations into memory copies, one
translated page (of whatever size the walk found) at a time, so a 1 GiB page copies in one go.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from iommufd_model.hw.memory import PAGE_SIZE, Frame, PhysicalMemory

if TYPE_CHECKING:
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.machine import Machine


class DmaFault(Exception):
    """A DMA the IOMMU refused; the hardware also logged it in its own fault/event record."""

    def __init__(
        self, dev: PciDevice, iova: int, write: bool, pasid: int | None, reason: str
    ) -> None:
        kind = "write" if write else "read"
        where = f" pasid {pasid}" if pasid is not None else ""
        super().__init__(f"DMA {kind} fault at {iova:#x}{where} from {dev.name}: {reason}")
        self.dev = dev
        self.iova = iova
        self.write = write
        self.pasid = pasid
        self.reason = reason


@attrs.define(slots=True)
class HwStats:
    """Costs the hardware paid; the matrix reports them per scenario."""

    translations: int = 0
    walk_mem_refs: int = 0
    iotlb_hits: int = 0
    iotlb_misses: int = 0
    commands: int = 0
    faults: int = 0

    def snapshot(self) -> dict[str, int]:
        return attrs.asdict(self)


@attrs.define(slots=True)
class FaultRecord:
    """What the hardware logged for a fault, vendor-neutral (vendors log their own too)."""

    dev: str
    iova: int
    write: bool
    pasid: int | None
    reason: str


class IommuHw:
    """One IOMMU instance: owns the devices behind it and translates their DMA."""

    #: entry-point name of the driver that owns this instance (routing key)
    driver_name: str = ""

    def __init__(self, machine: Machine, index: int) -> None:
        self.machine = machine
        self.memory: PhysicalMemory = machine.memory
        self.index = index
        self.devices: dict[int, PciDevice] = {}
        self.stats = HwStats()
        self.fault_log: list[FaultRecord] = []

    @property
    def name(self) -> str:
        return f"{self.driver_name}{self.index}"

    def translate(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        """Translate one access: ``(pa, run)`` where ``run`` bytes from ``pa`` stay contiguous.

        Raise :class:`DmaFault` (after logging it) when the access is not allowed.
        """
        raise NotImplementedError

    def fault(
        self, dev: PciDevice, iova: int, write: bool, pasid: int | None, reason: str
    ) -> DmaFault:
        """Log a fault and build the exception to raise; vendors override to write event logs."""
        self.stats.faults += 1
        self.fault_log.append(FaultRecord(dev.name, iova, write, pasid, reason))
        return DmaFault(dev, iova, write, pasid, reason)

    # -- the DMA engine -----------------------------------------------------------------
    def dma_read(self, dev: PciDevice, iova: int, n: int, pasid: int | None) -> bytes:
        # Runs are copied one by one, as translated: translating the next run may set A/D bits
        # in a frame this access reads. The last run is gathered as zero-copy views of its
        # frames and everything is joined once, so an access within one IOMMU page (a 2 MiB or
        # 1 GiB one included) copies every byte once, as a plain copy does.
        if not n:
            return b""
        parts: list[bytes | Frame | memoryview] = []
        read = self.memory.read
        translate = self.translate
        while True:
            pa, run = translate(dev, iova, pasid, False)
            chunk = min(n, run)
            n -= chunk
            if not n:
                self.memory.gather(pa, chunk, parts)
                return b"".join(parts)
            parts.append(read(pa, chunk))
            iova += chunk

    def dma_write(
        self, dev: PciDevice, iova: int, data: bytes | bytearray | memoryview, pasid: int | None
    ) -> None:
        # Translate everything first: a faulting DMA must not have written a prefix.
        # ``bytes(data)`` (no copy for bytes) freezes the source: it may alias the target memory.
        n = len(data)
        runs: list[tuple[int, int]] = []
        translate = self.translate
        pos = 0
        while pos < n:
            pa, run = translate(dev, iova + pos, pasid, True)
            chunk = min(n - pos, run)
            runs.append((pa, chunk))
            pos += chunk
        view = memoryview(bytes(data))
        write = self.memory.write
        pos = 0
        for pa, chunk in runs:
            write(pa, view[pos : pos + chunk])
            pos += chunk

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "driver": self.driver_name, "devices": len(self.devices)}


def page_run(iova: int, page_size: int = PAGE_SIZE) -> int:
    """Bytes from ``iova`` to the end of its naturally aligned page of ``page_size``."""
    return page_size - (iova & (page_size - 1))
