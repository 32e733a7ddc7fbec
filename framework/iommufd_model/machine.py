"""A machine: physical memory, IOMMU instances from driver plugins, PCI devices, processes."""

from __future__ import annotations

import errno
from typing import Any

from iommufd_model.core.process import Process
from iommufd_model.errors import err
from iommufd_model.hw.iommu import IommuHw
from iommufd_model.hw.memory import PhysicalMemory
from iommufd_model.hw.pci import PciDevice
from iommufd_model.locking import serialized
from iommufd_model.plugins import DriverRegistry, default_registry

DEFAULT_MEMORY = 1 << 36  # 64 GiB of sparse physical memory


@serialized(unlocked=("hooks",))
class Machine:
    """Everything below the uAPI. Build one with :meth:`build`.

    Attributes:
        memory: the sparse :class:`~iommufd_model.hw.memory.PhysicalMemory` of the machine.
        registry: the driver plugins IOMMU instances are probed from.
        iommus: the IOMMU hardware instances, in probe order (``add_pci_device(iommu=i)``).
        processes: every process :meth:`new_process` created.
    """

    def __init__(
        self, memory_size: int = DEFAULT_MEMORY, registry: DriverRegistry | None = None
    ) -> None:
        self.memory = PhysicalMemory(memory_size)
        self.registry = registry if registry is not None else default_registry()
        self.iommus: list[IommuHw] = []
        self.processes: list[Process] = []
        self._next_pid = 100

    @classmethod
    def build(
        cls,
        iommus: list[str] | tuple[str, ...] = ("mock",),
        *,
        memory_size: int = DEFAULT_MEMORY,
        registry: DriverRegistry | None = None,
        options: dict[str, dict[str, Any]] | None = None,
    ) -> Machine:
        """A machine with one IOMMU instance per entry of ``iommus`` (driver names)."""
        machine = cls(memory_size, registry)
        for name in iommus:
            machine.add_iommu(name, **((options or {}).get(name, {})))
        return machine

    def hooks(self, driver: str) -> Any:
        """The hook relay routed to ``driver`` only."""
        return self.registry.route(driver)

    def add_iommu(self, driver: str, **options: Any) -> IommuHw:
        """Probe a new hardware instance of ``driver``."""
        index = len(self.iommus)
        hw = self.hooks(driver).probe(machine=self, index=index, options=dict(options))
        if not isinstance(hw, IommuHw):
            raise err(errno.ENODEV, f"driver {driver!r} did not return an IommuHw from probe")
        hw.driver_name = driver
        self.iommus.append(hw)
        return hw

    def add_pci_device(
        self, iommu: int = 0, *, rid: int | None = None, pasid_bits: int = 20, ats: bool = False
    ) -> PciDevice:
        """Plug a DMA-capable PCI function behind IOMMU instance ``iommu``."""
        if not 0 <= iommu < len(self.iommus):
            raise err(errno.ENODEV, f"no IOMMU instance {iommu}")
        hw = self.iommus[iommu]
        if rid is None:
            rid = 0x100 + len(hw.devices) * 8  # bus 1, one function per slot
        if rid in hw.devices:
            raise err(errno.EEXIST, f"RID {rid:#x} already present behind {hw.name}")
        dev = PciDevice(hw, rid, pasid_bits=pasid_bits, ats=ats)
        priv = self.hooks(hw.driver_name).probe_device(iommu=hw, dev=dev)
        dev.iommu_priv = priv
        hw.devices[rid] = dev
        return dev

    def new_process(self) -> Process:
        """A new user process with an empty address space."""
        proc = Process(self, self._next_pid)
        self._next_pid += 1
        self.processes.append(proc)
        return proc
