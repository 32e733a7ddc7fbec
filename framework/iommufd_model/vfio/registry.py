"""Which VFIO devices and groups a machine has: every modelled PCI function is bound to
vfio-pci (the model's choice), each alone in its own IOMMU group.

Numbers are handed out as the kernel's IDAs do (lowest free): ``/dev/vfio/devices/vfioN``
(``vfio.device_ida`` in drivers/vfio/vfio_main.c) and ``/dev/vfio/N`` (the iommu_group id).
They are given in BDF order the first time the machine's functions are looked at, and a VF
created later gets the lowest free ones; a removed VF gives its numbers back.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from iommufd_model.ida import Ida

if TYPE_CHECKING:
    from iommufd_model.devices import PciFunction
    from iommufd_model.machine import Machine
    from iommufd_model.vfio.group import VfioGroup
    from iommufd_model.vfio.pci_core import VfioPciDevice

MINORMASK = (1 << 20) - 1  # the cdev minors of "vfio-dev"


class VfioRegistry:
    """The VFIO devices and groups of one machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.devices: dict[int, VfioPciDevice] = {}  # id(function) -> device
        self.device_ida = Ida("vfio device", 0, MINORMASK)
        self.group_ida = Ida("iommu group", 0, (1 << 31) - 1)
        # Host addresses of BARs (model): 32-bit BARs from 0xc0000000, 64-bit ones from
        # 256 GiB, each aligned to its size, never reused.
        self._next32 = 0xC000_0000
        self._next64 = 0x40_0000_0000

    def place_bars(self, fn: PciFunction) -> dict[int, int]:
        """Give ``fn``'s memory BARs host addresses (what firmware / the PCI core does)."""
        out: dict[int, int] = {}
        for i, bar in enumerate(fn.bars):
            if bar is None:
                continue
            if bar.mem64:
                base = -(-self._next64 // bar.size) * bar.size
                self._next64 = base + bar.size
            else:
                base = -(-self._next32 // bar.size) * bar.size
                self._next32 = base + bar.size
            out[i] = base
        return out

    def sync(self) -> list[VfioPciDevice]:
        """Register the functions plugged since the last look, unregister the unplugged."""
        from iommufd_model.vfio.group import VfioGroup
        from iommufd_model.vfio.pci_core import VfioPciDevice

        present = self.machine.pci_functions()
        keys = {id(fn) for fn in present}
        for key, vdev in list(self.devices.items()):
            if key not in keys:
                del self.devices[key]
                self.device_ida.free(vdev.index)
                self.group_ida.free(vdev.group.id)
                vdev.unregistered = True
        for fn in present:
            if id(fn) not in self.devices:
                group = VfioGroup(self.group_ida.alloc())
                vdev = VfioPciDevice(self, fn, self.device_ida.alloc(), group)
                group.device = vdev
                self.devices[id(fn)] = vdev
        return sorted(self.devices.values(), key=lambda d: d.fn.rid)

    def by_function(self, fn: PciFunction) -> VfioPciDevice | None:
        self.sync()
        return self.devices.get(id(fn))

    def by_index(self, index: int) -> VfioPciDevice | None:
        return next((d for d in self.sync() if d.index == index), None)

    def group(self, group_id: int) -> VfioGroup | None:
        return next((d.group for d in self.sync() if d.group.id == group_id), None)


_REGISTRIES: weakref.WeakKeyDictionary[Machine, VfioRegistry] = weakref.WeakKeyDictionary()


def registry(machine: Machine) -> VfioRegistry:
    """The machine's VFIO registry (created on first use)."""
    reg = _REGISTRIES.get(machine)
    if reg is None:
        reg = _REGISTRIES[machine] = VfioRegistry(machine)
    return reg
