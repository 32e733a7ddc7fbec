"""A machine: physical memory, IOMMU instances from driver plugins, PCI devices, processes."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from iommufd_model import creds
from iommufd_model.errors import err
from iommufd_model.hooks import DriverHooks
from iommufd_model.hw.iommu import IommuHw
from iommufd_model.hw.memory import PhysicalMemory
from iommufd_model.hw.pci import PciDevice
from iommufd_model.locking import serialized
from iommufd_model.plugins import DriverRegistry, default_registry
from iommufd_model.process import Process

if TYPE_CHECKING:
    from iommufd_model.devices import PciFunction

DEFAULT_MEMORY = 1 << 36  # 64 GiB of sparse physical memory


@serialized(unlocked=("hooks",))
class Machine:
    """Everything below the uAPI. Build one with :meth:`build`.

    Attributes:
        memory: the sparse :class:`~iommufd_model.hw.memory.PhysicalMemory` of the machine.
        registry: the driver plugins IOMMU instances are probed from.
        iommus: the IOMMU hardware instances, in probe order (``add_pci_device(iommu=i)``).
        processes: every process :meth:`new_process` created.
        granted_caps: capabilities (a set of ``1 << CAP_...`` bits, ``creds.cap_mask``)
            every process of the machine holds in the model's initial user namespace on top
            of its real ones (the model's own knob: ``iommufd-model run --cap``; the
            simulated machine's kernel is the model, so a grant is the program running
            with that capability there, as a selftest run as root in a VM would).
    """

    def __init__(
        self, memory_size: int = DEFAULT_MEMORY, registry: DriverRegistry | None = None
    ) -> None:
        self.memory = PhysicalMemory(memory_size)
        self.registry = registry if registry is not None else default_registry()
        self.iommus: list[IommuHw] = []
        self.processes: list[Process] = []
        self.granted_caps = 0
        self._next_pid = 100

    def grant_caps(self, *names: str) -> None:
        """Count every process of the machine as holding the capabilities ``names``
        (``CAP_SYS_RESOURCE``...) in the model's initial user namespace (``granted_caps``);
        ValueError for a name Linux 7.2 does not have."""
        self.granted_caps |= creds.cap_mask(names)

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

    def hooks(self, driver: str) -> DriverHooks:
        """The typed hooks of ``driver``, reaching that driver only."""
        return self.registry.route(driver)

    def add_iommu(self, driver: str, **options: Any) -> IommuHw:
        """Probe a new hardware instance of ``driver``."""
        index = len(self.iommus)
        hw = self.hooks(driver).probe(machine=self, index=index, options=dict(options))
        hw.driver_name = driver
        self.iommus.append(hw)
        return hw

    def add_pci_device(
        self,
        iommu: int = 0,
        *,
        rid: int | None = None,
        pasid_bits: int = 20,
        ats: bool = False,
        pri: bool | None = None,
        prg_resp_pasid_required: bool = True,
    ) -> PciDevice:
        """Plug a DMA-capable PCI function behind IOMMU instance ``iommu``; ``pri`` and
        ``prg_resp_pasid_required`` shape its PRI capability (``PciDevice``)."""
        if not 0 <= iommu < len(self.iommus):
            raise err(errno.ENODEV, f"no IOMMU instance {iommu}")
        hw = self.iommus[iommu]
        if rid is None:
            rid = 0x100 + len(hw.devices) * 8  # bus 1, one function per slot
        if rid in hw.devices:
            raise err(errno.EEXIST, f"RID {rid:#x} already present behind {hw.name}")
        dev = PciDevice(
            hw,
            rid,
            pasid_bits=pasid_bits,
            ats=ats,
            pri=pri,
            prg_resp_pasid_required=prg_resp_pasid_required,
        )
        priv = self.hooks(hw.driver_name).probe_device(iommu=hw, dev=dev)
        dev.iommu_priv = priv
        hw.devices[rid] = dev
        return dev

    def add_pci_function(
        self, kind: str, iommu: int = 0, *, rid: int | None = None, **opts: Any
    ) -> PciFunction:
        """Plug a modelled PCI function of ``kind`` (``iommufd_model.devices.KINDS``: generic,
        ioat, dsa...) behind IOMMU instance ``iommu``, probed as :meth:`add_pci_device` does.

        Without ``rid`` the function takes the first free slot of bus ``1 + iommu`` (model:
        each IOMMU instance gets its own bus so BDFs are unique machine-wide); Routing IDs an
        SR-IOV PF may give its VFs are skipped. ``opts`` go to the kind's factory."""
        from iommufd_model import devices

        if not 0 <= iommu < len(self.iommus):
            raise err(errno.ENODEV, f"no IOMMU instance {iommu}")
        hw = self.iommus[iommu]
        if rid is None:
            rid = self._free_rid(1 + iommu)
        fn = devices.create(kind, hw, rid, **opts)
        self.plug_pci_function(fn)
        return fn

    def _taken_rids(self) -> set[int]:
        from iommufd_model.devices import PciFunction

        taken: set[int] = set()
        for hw in self.iommus:
            for dev in hw.devices.values():
                taken.add(dev.rid)
                if isinstance(dev, PciFunction) and dev.spec.total_vfs and not dev.is_virtfn:
                    taken.update(dev.vf_rid(i) for i in range(dev.spec.total_vfs))
        return taken

    def _free_rid(self, bus: int) -> int:
        taken = self._taken_rids()
        for slot in range(32):
            rid = (bus << 8) | (slot << 3)
            if rid not in taken:
                return rid
        raise err(errno.ENOSPC, f"bus {bus:#x} is full")

    def plug_pci_function(self, fn: PciFunction) -> None:
        """Put ``fn`` behind its IOMMU (probe_device hook); EEXIST if its BDF is taken."""
        hw = fn.iommu
        for other in self.iommus:
            if fn.rid in other.devices:
                raise err(errno.EEXIST, f"RID {fn.rid:#x} already present behind {other.name}")
        fn.iommu_priv = self.hooks(hw.driver_name).probe_device(iommu=hw, dev=fn)
        hw.devices[fn.rid] = fn

    def unplug_pci_function(self, fn: PciFunction, *, force: bool = False) -> None:
        """Remove ``fn`` (a VF going away with VF Enable); EBUSY while an iommufd binds it,
        unless ``force`` (the hardware dropped it: VF Enable cleared by a config write)."""
        if fn.bound_to is not None and not force:
            raise err(errno.EBUSY, f"{fn.bdf} is bound")
        if fn.iommu.devices.get(fn.rid) is fn:
            del fn.iommu.devices[fn.rid]

    def pci_functions(self) -> list[PciFunction]:
        """Every modelled PCI function, in BDF order."""
        from iommufd_model.devices import PciFunction

        found = [
            dev for hw in self.iommus for dev in hw.devices.values() if isinstance(dev, PciFunction)
        ]
        return sorted(found, key=lambda f: f.rid)

    def new_process(self) -> Process:
        """A new user process with an empty address space."""
        proc = Process(self, self._next_pid)
        self._next_pid += 1
        self.processes.append(proc)
        return proc
