"""The VMM side: a VM whose RAM is VMM memory mapped at IOVA = GPA, and its guest IOMMU.

Each vendor implements :class:`GuestIommu` (its guest driver writing guest structures into
guest RAM, and the VMM emulation that traps what the vendor's design must trap) through the
``guest_iommu_alloc`` hook.
"""

from iommufd_model.vmm.guest import GuestDevice, GuestDomain, GuestIommu
from iommufd_model.vmm.memory import GuestMemory
from iommufd_model.vmm.vm import Vm, VmmStats

__all__ = ["GuestDevice", "GuestDomain", "GuestIommu", "GuestMemory", "Vm", "VmmStats"]
