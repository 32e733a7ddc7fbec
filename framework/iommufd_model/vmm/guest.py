"""The vendor-neutral guest IOMMU API: what a scenario asks of "the guest's IOMMU driver".

A vendor's implementation plays two parts: the guest driver (it writes the vendor's guest
structures -- gDTE + v2 tables + guest commands, vSTE + CD + stage-1 tables + CMDQ commands,
PASID entry + first-stage tables + QI descriptors -- into guest RAM) and the VMM's vIOMMU
emulation behind it (it traps what the vendor's design must trap and turns it into iommufd
calls). Every trap is counted with :meth:`Vm.trap`, so a scenario sees what each design costs.
"""

from __future__ import annotations

import abc
import errno
from typing import TYPE_CHECKING, Any

import attrs

from iommufd_model.errors import err
from iommufd_model.locking import SerializedSubclasses, locked

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.vmm.vm import Vm


@attrs.define(eq=False)
class GuestDevice:
    """A passthrough device as the VM sees it."""

    dev: PciDevice
    dev_id: int  # iommufd DEVICE id in the VMM's iommufd
    virt_id: int  # the guest's ID for it (vSID, guest DevID, vRID)
    vdevice_id: int = 0  # iommufd vDEVICE, when the vendor design has one


@attrs.define(eq=False)
class GuestDomain:
    """A guest stage-1 address space and where it is installed."""

    dev: GuestDevice
    pasid: int | None
    hwpt_id: int  # the nested HWPT (or paging HWPT) the VMM attached for it
    root_gpa: int  # the guest table root, in guest-physical space
    tag: int = 0  # the guest's cache tag (gDomID, ASID, DID)
    vendor: Any = None  # vendor-private guest state


class GuestIommu(SerializedSubclasses, abc.ABC):
    """One vIOMMU of one VM on one host IOMMU instance, with the guest driver using it."""

    def __init__(self, vm: Vm, iommu: IommuHw, *, accelerated: bool) -> None:
        self.vm = vm
        self.iommu = iommu
        self.accelerated = accelerated
        self.viommu_id = 0  # for designs with an iommufd vIOMMU: see :meth:`bind_vdevice`

    def close(self) -> None:
        """Release what this guest IOMMU holds outside the iommufd's objects (mappings of
        iommufd pages, say) before :meth:`Vm.close` closes the VMM's files. The base has
        nothing of its own to release."""
        return None

    @locked
    def create_viommu(self, dev_id: int) -> int:
        """Allocate this guest's iommufd vIOMMU through device ``dev_id``; return its id.

        Designs that have one override it; :meth:`bind_vdevice` calls it for the first device.
        """
        raise err(errno.EOPNOTSUPP, "this guest IOMMU model has no vIOMMU")

    @locked
    def bind_vdevice(self, dev: PciDevice, virt_id: int) -> GuestDevice:
        """The VMM side of passing ``dev`` through in a vIOMMU design: bind it, create the
        vIOMMU with the first device, and give the device its virtual ID (a vDEVICE). A
        failure leaves the device unbound."""
        fd = self.vm.fd
        dev_id = fd.bind(dev)
        try:
            if not self.viommu_id:
                self.viommu_id = self.create_viommu(dev_id)
            vdevice = fd.vdevice_alloc(self.viommu_id, dev_id, virt_id)
        except OSError:
            fd.unbind(dev_id)
            raise
        return GuestDevice(dev, dev_id, virt_id, vdevice)

    @abc.abstractmethod
    def add_device(self, dev: PciDevice, virt_id: int) -> GuestDevice:
        """Pass ``dev`` through to the guest as ``virt_id`` (bind, vDEVICE as the design has)."""

    @abc.abstractmethod
    def attach(self, gdev: GuestDevice, *, pasid: int | None = None) -> GuestDomain:
        """The guest gives the device (or one PASID) a fresh, empty stage-1 domain."""

    @abc.abstractmethod
    def map(self, dom: GuestDomain, iova: int, gpa: int, size: int, *, write: bool = True) -> None:
        """The guest maps ``iova -> gpa`` in its own tables (guest RAM only: no trap)."""

    @abc.abstractmethod
    def unmap(self, dom: GuestDomain, iova: int, size: int) -> None:
        """The guest clears its tables (and issues no invalidation: see :meth:`invalidate`)."""

    @abc.abstractmethod
    def invalidate(self, dom: GuestDomain, iova: int | None = None, size: int = 0) -> None:
        """The guest invalidates one range (``iova``, ``size``) or all of ``dom``, the way
        its driver would, through its command queue; the VMM traps where the design says."""

    @abc.abstractmethod
    def detach(self, dom: GuestDomain) -> None:
        """The guest points the device (or PASID) back at a blocking configuration."""
