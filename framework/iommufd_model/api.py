"""One import surface for driver and test authors: ``from iommufd_model.api import ...``.

Everything a driver plugin builds on (the hook marker, the records it returns, the bases it
subclasses) and the shared tools that keep a driver small (the radix page-table engine, the
IOTLB, the ID allocator, physical memory), plus what a test needs to drive a machine. The
names live in their own modules (listed in ``docs/writing-a-driver.md``); this module only
gathers them, so a driver's imports do not follow the framework's internal layout.
"""

from iommufd_model import uapi
from iommufd_model.driver import (
    IOMMU_CACHE,
    IOMMU_READ,
    IOMMU_WRITE,
    Domain,
    DomainType,
    DriverInfo,
    Feature,
    HwInfo,
    HwQueueBase,
    InvalidateResult,
    OptionSet,
    UserData,
    VdeviceBase,
    ViommuBase,
    copy_struct_from_user,
    driver_state,
    iommu_copy_struct_from_user,
)
from iommufd_model.errors import check, err
from iommufd_model.hookspecs import hookimpl
from iommufd_model.hw.iommu import DmaFault, FastPath, HwStats, IommuHw, page_run
from iommufd_model.hw.iotlb import Iotlb, TlbEntry
from iommufd_model.hw.memory import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, FrameMemory, PhysicalMemory
from iommufd_model.hw.pci import PciDevice
from iommufd_model.hw.radix import (
    INVALID,
    LEAF,
    TABLE,
    PtFormat,
    RadixPageTable,
    WalkFault,
    WalkResult,
    walk,
)
from iommufd_model.ida import Ida
from iommufd_model.machine import Machine
from iommufd_model.paging import IotlbGather, PagingDomain, PagingDomainOps, paging_domain
from iommufd_model.plugins import DriverRegistry
from iommufd_model.vmm import GuestIommu, Vm

__all__ = [
    "INVALID",
    "IOMMU_CACHE",
    "IOMMU_READ",
    "IOMMU_WRITE",
    "LEAF",
    "PAGE_MASK",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "TABLE",
    "DmaFault",
    "Domain",
    "DomainType",
    "DriverInfo",
    "DriverRegistry",
    "FastPath",
    "Feature",
    "FrameMemory",
    "GuestIommu",
    "HwInfo",
    "HwQueueBase",
    "HwStats",
    "Ida",
    "InvalidateResult",
    "IommuHw",
    "Iotlb",
    "IotlbGather",
    "Machine",
    "OptionSet",
    "PagingDomain",
    "PagingDomainOps",
    "PciDevice",
    "PhysicalMemory",
    "PtFormat",
    "RadixPageTable",
    "TlbEntry",
    "UserData",
    "VdeviceBase",
    "ViommuBase",
    "Vm",
    "WalkFault",
    "WalkResult",
    "check",
    "copy_struct_from_user",
    "driver_state",
    "err",
    "hookimpl",
    "iommu_copy_struct_from_user",
    "page_run",
    "paging_domain",
    "uapi",
    "walk",
]
