"""``include/uapi/linux/vfio.h``: the VFIO command numbers, flags and structs, byte-exact.

Names follow the header (``VFIO_DEVICE_GET_INFO``, ``struct vfio_device_info`` ->
``VfioDeviceInfo``). Every VFIO command is ``_IO(';', 100 + n)``: the type letter is shared
with iommufd, whose numbers start at 0x80, so the two ranges never meet. The structs whose
tail is a flexible array (``vfio_irq_set``, ``vfio_device_feature``) are declared without it.
"""

from __future__ import annotations

import attrs

from iommufd_model.uapi.codec import UStruct, s32, u8, u16, u32, u64, ustruct
from iommufd_model.uapi.iommufd import _IO, IOMMUFD_TYPE

VFIO_API_VERSION = 0
VFIO_TYPE = IOMMUFD_TYPE  # ';'
VFIO_BASE = 100

# extensions (VFIO_CHECK_EXTENSION)
VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_TYPE1v2_IOMMU = 3
VFIO_DMA_CC_IOMMU = 4
VFIO_EEH = 5
VFIO_RESERVED_TYPE1_NESTING_IOMMU = 6
VFIO_SPAPR_TCE_v2_IOMMU = 7
VFIO_NOIOMMU_IOMMU = 8
VFIO_UNMAP_ALL = 9
VFIO_UPDATE_VADDR = 10

# container / group / device commands
VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_DEVICE_PCI_HOT_RESET = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)
VFIO_DEVICE_QUERY_GFX_PLANE = _IO(VFIO_TYPE, VFIO_BASE + 14)
VFIO_DEVICE_GET_GFX_DMABUF = _IO(VFIO_TYPE, VFIO_BASE + 15)
VFIO_DEVICE_IOEVENTFD = _IO(VFIO_TYPE, VFIO_BASE + 16)
VFIO_DEVICE_FEATURE = _IO(VFIO_TYPE, VFIO_BASE + 17)
VFIO_IOMMU_DIRTY_PAGES = _IO(VFIO_TYPE, VFIO_BASE + 17)
VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 20)

# struct vfio_group_status flags
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

# struct vfio_device_info flags
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_CAPS = 1 << 7

# struct vfio_region_info flags and capability ids
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3

# struct vfio_irq_info flags
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

# struct vfio_irq_set flags
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IRQ_SET_DATA_TYPE_MASK = (
    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
)
VFIO_IRQ_SET_ACTION_TYPE_MASK = (
    VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER
)

# vfio-pci region and IRQ indexes (enum in vfio.h)
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5

# hot reset
VFIO_PCI_DEVID_OWNED = 0
VFIO_PCI_DEVID_NOT_OWNED = -1
VFIO_PCI_HOT_RESET_FLAG_DEV_ID = 1 << 0
VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED = 1 << 1

# VFIO_DEVICE_FEATURE
VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18
VFIO_DEVICE_FEATURE_PCI_VF_TOKEN = 0
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY = 3
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP = 4
VFIO_DEVICE_FEATURE_LOW_POWER_EXIT = 5
VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP = 7
VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT = 8
VFIO_DEVICE_FEATURE_MIG_DATA_SIZE = 9
VFIO_DEVICE_FEATURE_BUS_MASTER = 10
VFIO_DEVICE_FEATURE_DMA_BUF = 11
VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 = 12

# the type1 IOMMU (struct vfio_iommu_type1_*): served by iommufd's core/vfio_compat.py
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3

# cdev
VFIO_DEVICE_BIND_FLAG_TOKEN = 1 << 0
VFIO_DEVICE_ATTACH_PASID = 1 << 0
VFIO_DEVICE_DETACH_PASID = 1 << 0

# drivers/vfio/pci/vfio_pci_priv.h: a region's offset in the device fd is index << 40
VFIO_PCI_OFFSET_SHIFT = 40
VFIO_PCI_OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1


def vfio_pci_index_to_offset(index: int) -> int:
    """``VFIO_PCI_INDEX_TO_OFFSET()``."""
    return index << VFIO_PCI_OFFSET_SHIFT


def vfio_pci_offset_to_index(offset: int) -> int:
    """``VFIO_PCI_OFFSET_TO_INDEX()``."""
    return offset >> VFIO_PCI_OFFSET_SHIFT


@ustruct
@attrs.define
class VfioInfoCapHeader(UStruct):
    id: int = u16()
    version: int = u16()
    next: int = u32()


@ustruct
@attrs.define
class VfioGroupStatus(UStruct):
    argsz: int = u32()
    flags: int = u32()


@ustruct
@attrs.define
class VfioDeviceInfo(UStruct):
    argsz: int = u32()
    flags: int = u32()
    num_regions: int = u32()
    num_irqs: int = u32()
    cap_offset: int = u32()
    pad: int = u32()


@ustruct
@attrs.define
class VfioRegionInfo(UStruct):
    argsz: int = u32()
    flags: int = u32()
    index: int = u32()
    cap_offset: int = u32()
    size: int = u64()
    offset: int = u64()


@ustruct
@attrs.define
class VfioRegionSparseMmapArea(UStruct):
    offset: int = u64()
    size: int = u64()


@ustruct
@attrs.define
class VfioIrqInfo(UStruct):
    argsz: int = u32()
    flags: int = u32()
    index: int = u32()
    count: int = u32()


@ustruct
@attrs.define
class VfioIrqSet(UStruct):
    """``struct vfio_irq_set`` without its ``data[]`` tail."""

    argsz: int = u32()
    flags: int = u32()
    index: int = u32()
    start: int = u32()
    count: int = u32()


@ustruct
@attrs.define
class VfioPciDependentDevice(UStruct):
    group_id: int = u32()  # union with devid
    segment: int = u16()
    bus: int = u8()
    devfn: int = u8()


@ustruct
@attrs.define
class VfioPciHotResetInfo(UStruct):
    argsz: int = u32()
    flags: int = u32()
    count: int = u32()


@ustruct
@attrs.define
class VfioDeviceFeature(UStruct):
    """``struct vfio_device_feature`` without its ``data[]`` tail."""

    argsz: int = u32()
    flags: int = u32()


@ustruct
@attrs.define
class VfioDeviceBindIommufd(UStruct):
    argsz: int = u32()
    flags: int = u32()
    iommufd: int = s32()
    out_devid: int = u32()
    token_uuid_ptr: int = u64()


@ustruct
@attrs.define
class VfioDeviceAttachIommufdPt(UStruct):
    argsz: int = u32()
    flags: int = u32()
    pt_id: int = u32()
    pasid: int = u32()


@ustruct
@attrs.define
class VfioDeviceDetachIommufdPt(UStruct):
    argsz: int = u32()
    flags: int = u32()
    pasid: int = u32()
