"""iommufd-model: Linux iommufd and the IOMMU hardware behind it, modelled in Python.

The public surface is small: :class:`Machine` builds memory, IOMMU instances (from driver
plugins) and PCI devices; a process opens an iommufd and drives it with the same ioctl
numbers and struct bytes as ``/dev/iommu`` (:mod:`iommufd_model.uapi`).
"""

from iommufd_model import uapi
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.machine import Machine

__all__ = ["DmaFault", "Machine", "uapi"]
__version__ = "0.1.0"
