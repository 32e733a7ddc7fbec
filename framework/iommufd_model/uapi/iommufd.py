"""``include/uapi/linux/iommufd.h``: command numbers, enums and every struct, byte-exact.

Names follow the header (``IOMMU_IOAS_MAP``, ``struct iommu_ioas_map`` -> ``IommuIoasMap``);
``__reserved`` fields are spelled ``reserved`` because attrs strips leading underscores.
Values checked against the newest upstream header (IOMMUFD_CMD_HW_QUEUE_ALLOC = 0x94).
"""

from __future__ import annotations

import attrs

from iommufd_model.uapi.codec import UStruct, raw, s32, u8, u16, u32, u64, ustruct

IOMMUFD_TYPE = ord(";")
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1


def _IO(type_: int, nr: int) -> int:  # noqa: N802 - the kernel's macro name
    """``_IO(type, nr)``: no direction and no size bits, as every iommufd command."""
    return (type_ << 8) | nr


IOMMUFD_CMD_BASE = 0x80
IOMMUFD_CMD_DESTROY = 0x80
IOMMUFD_CMD_IOAS_ALLOC = 0x81
IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82
IOMMUFD_CMD_IOAS_COPY = 0x83
IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84
IOMMUFD_CMD_IOAS_MAP = 0x85
IOMMUFD_CMD_IOAS_UNMAP = 0x86
IOMMUFD_CMD_OPTION = 0x87
IOMMUFD_CMD_VFIO_IOAS = 0x88
IOMMUFD_CMD_HWPT_ALLOC = 0x89
IOMMUFD_CMD_GET_HW_INFO = 0x8A
IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING = 0x8B
IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP = 0x8C
IOMMUFD_CMD_HWPT_INVALIDATE = 0x8D
IOMMUFD_CMD_FAULT_QUEUE_ALLOC = 0x8E
IOMMUFD_CMD_IOAS_MAP_FILE = 0x8F
IOMMUFD_CMD_VIOMMU_ALLOC = 0x90
IOMMUFD_CMD_VDEVICE_ALLOC = 0x91
IOMMUFD_CMD_IOAS_CHANGE_PROCESS = 0x92
IOMMUFD_CMD_VEVENTQ_ALLOC = 0x93
IOMMUFD_CMD_HW_QUEUE_ALLOC = 0x94

IOMMU_DESTROY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY)
IOMMU_IOAS_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC)
IOMMU_IOAS_ALLOW_IOVAS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOW_IOVAS)
IOMMU_IOAS_COPY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_COPY)
IOMMU_IOAS_IOVA_RANGES = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES)
IOMMU_IOAS_MAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP)
IOMMU_IOAS_UNMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)
IOMMU_OPTION = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_OPTION)
IOMMU_VFIO_IOAS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VFIO_IOAS)
IOMMU_HWPT_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC)
IOMMU_GET_HW_INFO = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO)
IOMMU_HWPT_SET_DIRTY_TRACKING = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING)
IOMMU_HWPT_GET_DIRTY_BITMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP)
IOMMU_HWPT_INVALIDATE = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_INVALIDATE)
IOMMU_FAULT_QUEUE_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_FAULT_QUEUE_ALLOC)
IOMMU_IOAS_MAP_FILE = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP_FILE)
IOMMU_VIOMMU_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VIOMMU_ALLOC)
IOMMU_VDEVICE_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VDEVICE_ALLOC)
IOMMU_IOAS_CHANGE_PROCESS = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_CHANGE_PROCESS)
IOMMU_VEVENTQ_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VEVENTQ_ALLOC)
IOMMU_HW_QUEUE_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HW_QUEUE_ALLOC)

# enum iommufd_ioas_map_flags
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2

# enum iommufd_option / iommufd_option_ops
IOMMU_OPTION_RLIMIT_MODE = 0
IOMMU_OPTION_HUGE_PAGES = 1
IOMMU_OPTION_OP_SET = 0
IOMMU_OPTION_OP_GET = 1

# enum iommufd_vfio_ioas_op
IOMMU_VFIO_IOAS_GET = 0
IOMMU_VFIO_IOAS_SET = 1
IOMMU_VFIO_IOAS_CLEAR = 2

# enum iommufd_hwpt_alloc_flags
IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
IOMMU_HWPT_FAULT_ID_VALID = 1 << 2
IOMMU_HWPT_ALLOC_PASID = 1 << 3

# enum iommu_hwpt_vtd_s1_flags
IOMMU_VTD_S1_SRE = 1 << 0
IOMMU_VTD_S1_EAFE = 1 << 1
IOMMU_VTD_S1_WPE = 1 << 2

# enum iommu_hwpt_data_type
IOMMU_HWPT_DATA_NONE = 0
IOMMU_HWPT_DATA_VTD_S1 = 1
IOMMU_HWPT_DATA_ARM_SMMUV3 = 2
IOMMU_HWPT_DATA_AMD_GUEST = 3

# enum iommu_hw_info_vtd_flags
IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17 = 1 << 0

# enum iommu_hw_info_type
IOMMU_HW_INFO_TYPE_NONE = 0
IOMMU_HW_INFO_TYPE_DEFAULT = 0
IOMMU_HW_INFO_TYPE_INTEL_VTD = 1
IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = 2
IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV = 3
IOMMU_HW_INFO_TYPE_AMD = 4

# enum iommufd_hw_capabilities
IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0
IOMMU_HW_CAP_PCI_PASID_EXEC = 1 << 1
IOMMU_HW_CAP_PCI_PASID_PRIV = 1 << 2
IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED = 1 << 3

# enum iommufd_hw_info_flags
IOMMU_HW_INFO_FLAG_INPUT_TYPE = 1 << 0

# enum iommufd_hwpt_set_dirty_tracking_flags / get_dirty_bitmap_flags
IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1
IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1

# enum iommu_hwpt_invalidate_data_type
IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 = 0
IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3 = 1
# Model-defined (not upstream): an array of raw 128-bit AMD guest commands on an AMD vIOMMU,
# the VMM-mediated invalidation path (docs/amd-hw-viommu.md). 2 is the next free value.
IOMMU_VIOMMU_INVALIDATE_DATA_AMD = 2

# enum iommu_hwpt_vtd_s1_invalidate_flags
IOMMU_VTD_INV_FLAGS_LEAF = 1 << 0

# enum iommu_hwpt_pgfault_flags / perm
IOMMU_PGFAULT_FLAGS_PASID_VALID = 1 << 0
IOMMU_PGFAULT_FLAGS_LAST_PAGE = 1 << 1
IOMMU_PGFAULT_PERM_READ = 1 << 0
IOMMU_PGFAULT_PERM_WRITE = 1 << 1
IOMMU_PGFAULT_PERM_EXEC = 1 << 2
IOMMU_PGFAULT_PERM_PRIV = 1 << 3

# enum iommufd_page_response_code
IOMMUFD_PAGE_RESP_SUCCESS = 0
IOMMUFD_PAGE_RESP_INVALID = 1

# enum iommu_viommu_type
IOMMU_VIOMMU_TYPE_DEFAULT = 0
IOMMU_VIOMMU_TYPE_ARM_SMMUV3 = 1
IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV = 2
IOMMU_VIOMMU_TYPE_AMD = 3

# enum iommu_veventq_flag / type
IOMMU_VEVENTQ_FLAG_LOST_EVENTS = 1 << 0
IOMMU_VEVENTQ_TYPE_DEFAULT = 0
IOMMU_VEVENTQ_TYPE_ARM_SMMUV3 = 1
IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV = 2
# Model-defined (not upstream): struct iommu_vevent_amd { __aligned_le64 evt[2]; }, one AMD
# event log entry with the guest DeviceID (docs/amd-hw-viommu.md). 3 is the next free value.
IOMMU_VEVENTQ_TYPE_AMD = 3

# enum iommu_hw_queue_type
IOMMU_HW_QUEUE_TYPE_DEFAULT = 0
IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV = 1
# AMD HW-vIOMMU guest buffers (AMD's tree: iommufd.c amd_iommufd_get_hw_queue_size(), uAPI
# header values 2/3/4 after TEGRA241_CMDQV). AMD_VIOMMU is the model's alias of the command buffer.
IOMMU_HW_QUEUE_TYPE_AMD_CMD = 2
IOMMU_HW_QUEUE_TYPE_AMD_EVT = 3
IOMMU_HW_QUEUE_TYPE_AMD_PPR = 4
IOMMU_HW_QUEUE_TYPE_AMD_VIOMMU = IOMMU_HW_QUEUE_TYPE_AMD_CMD


@ustruct
@attrs.define
class IommuDestroy(UStruct):
    """``struct iommu_destroy`` (IOMMU_DESTROY): destroy the object ``id`` of any type; EBUSY while
    something still uses it."""

    size: int = u32()
    id: int = u32()


@ustruct
@attrs.define
class IommuIoasAlloc(UStruct):
    """``struct iommu_ioas_alloc`` (IOMMU_IOAS_ALLOC): a new, empty I/O address space; its id
    comes back in ``out_ioas_id``."""

    size: int = u32()
    flags: int = u32()
    out_ioas_id: int = u32()


@ustruct
@attrs.define
class IommuIovaRange(UStruct):
    """``struct iommu_iova_range``: one inclusive IOVA range ``[start, last]``, the element of
    the ``allowed_iovas`` arrays."""

    start: int = u64()
    last: int = u64()


@ustruct
@attrs.define
class IommuIoasIovaRanges(UStruct):
    """``struct iommu_ioas_iova_ranges`` (IOMMU_IOAS_IOVA_RANGES): the IOVA ranges the IOAS can
    map, written to the user array ``allowed_iovas`` of ``num_iovas`` entries (EMSGSIZE and
    the needed count when it is too small), with the required ``out_iova_alignment``."""

    size: int = u32()
    ioas_id: int = u32()
    num_iovas: int = u32()
    reserved: int = u32()
    allowed_iovas: int = u64()
    out_iova_alignment: int = u64()


@ustruct
@attrs.define
class IommuIoasAllowIovas(UStruct):
    """``struct iommu_ioas_allow_iovas`` (IOMMU_IOAS_ALLOW_IOVAS): restrict automatic IOVA
    allocation to the ``num_iovas`` ranges at user address ``allowed_iovas``."""

    size: int = u32()
    ioas_id: int = u32()
    num_iovas: int = u32()
    reserved: int = u32()
    allowed_iovas: int = u64()


@ustruct
@attrs.define
class IommuIoasMap(UStruct):
    """``struct iommu_ioas_map`` (IOMMU_IOAS_MAP): map ``length`` bytes of the caller's memory at
    ``user_va`` into IOAS ``ioas_id``; ``flags`` READABLE / WRITEABLE give the permissions,
    FIXED_IOVA takes ``iova`` as given, otherwise the kernel picks it and returns it there."""

    size: int = u32()
    flags: int = u32()
    ioas_id: int = u32()
    reserved: int = u32()
    user_va: int = u64()
    length: int = u64()
    iova: int = u64()


@ustruct
@attrs.define
class IommuIoasMapFile(UStruct):
    """``struct iommu_ioas_map_file`` (IOMMU_IOAS_MAP_FILE): like IOMMU_IOAS_MAP, the pages
    being ``length`` bytes of the memfd ``fd`` from offset ``start``."""

    size: int = u32()
    flags: int = u32()
    ioas_id: int = u32()
    fd: int = s32()
    start: int = u64()
    length: int = u64()
    iova: int = u64()


@ustruct
@attrs.define
class IommuIoasCopy(UStruct):
    """``struct iommu_ioas_copy`` (IOMMU_IOAS_COPY): map into ``dst_ioas_id`` the pages that
    ``src_iova`` .. ``src_iova + length`` of ``src_ioas_id`` map (the same pins);
    ``dst_iova`` is in/out as ``iova`` of IOMMU_IOAS_MAP."""

    size: int = u32()
    flags: int = u32()
    dst_ioas_id: int = u32()
    src_ioas_id: int = u32()
    length: int = u64()
    dst_iova: int = u64()
    src_iova: int = u64()


@ustruct
@attrs.define
class IommuIoasUnmap(UStruct):
    """``struct iommu_ioas_unmap`` (IOMMU_IOAS_UNMAP): unmap whole areas inside ``iova`` ..
    ``iova + length - 1`` (``iova=0, length=U64_MAX``: everything); ``length`` returns the
    bytes unmapped."""

    size: int = u32()
    ioas_id: int = u32()
    iova: int = u64()
    length: int = u64()


@ustruct
@attrs.define
class IommuOption(UStruct):
    """``struct iommu_option`` (IOMMU_OPTION): set or get (``op``) option ``option_id``
    (RLIMIT_MODE, HUGE_PAGES) globally or on object ``object_id``; the value is ``val64``."""

    size: int = u32()
    option_id: int = u32()
    op: int = u16()
    reserved: int = u16()
    object_id: int = u32()
    val64: int = u64()


@ustruct
@attrs.define
class IommuVfioIoas(UStruct):
    """``struct iommu_vfio_ioas`` (IOMMU_VFIO_IOAS): get, set or clear (``op``) the IOAS the
    VFIO container compatibility layer uses."""

    size: int = u32()
    ioas_id: int = u32()
    op: int = u16()
    reserved: int = u16()


@ustruct
@attrs.define
class IommuHwptVtdS1(UStruct):
    """``struct iommu_hwpt_vtd_s1`` (IOMMU_HWPT_DATA_VTD_S1): a VT-d guest first-stage table
    (``pgtbl_addr``, ``addr_width``, SRE/WPE/EAFE ``flags``) for a nested HWPT."""

    flags: int = u64()
    pgtbl_addr: int = u64()
    addr_width: int = u32()
    reserved: int = u32()


@ustruct
@attrs.define
class IommuHwptArmSmmuv3(UStruct):
    """``struct iommu_hwpt_arm_smmuv3`` (IOMMU_HWPT_DATA_ARM_SMMUV3): the guest's STE words 0
    and 1 for a nested HWPT."""

    ste0: int = u64()
    ste1: int = u64()


@ustruct
@attrs.define
class IommuHwptAmdGuest(UStruct):
    """``struct iommu_hwpt_amd_guest`` (IOMMU_HWPT_DATA_AMD_GUEST): the guest's 256-bit DTE
    (``dte0`` .. ``dte3``) for a nested HWPT."""

    dte0: int = u64()
    dte1: int = u64()
    dte2: int = u64()
    dte3: int = u64()


@ustruct
@attrs.define
class IommuHwptAlloc(UStruct):
    """``struct iommu_hwpt_alloc`` (IOMMU_HWPT_ALLOC): a HWPT for device ``dev_id`` on ``pt_id``
    (an IOAS: a paging HWPT, ``flags`` NEST_PARENT / DIRTY_TRACKING / PASID; a nest parent
    or vIOMMU: a nested HWPT from ``data_type`` vendor data of ``data_len`` bytes at
    ``data_uptr``); ``fault_id`` attaches a fault queue (FAULT_ID_VALID). The id comes back
    in ``out_hwpt_id``."""

    size: int = u32()
    flags: int = u32()
    dev_id: int = u32()
    pt_id: int = u32()
    out_hwpt_id: int = u32()
    reserved: int = u32()
    data_type: int = u32()
    data_len: int = u32()
    data_uptr: int = u64()
    fault_id: int = u32()
    reserved2: int = u32()


@ustruct
@attrs.define
class IommuHwInfoVtd(UStruct):
    """``struct iommu_hw_info_vtd`` (IOMMU_HW_INFO_TYPE_INTEL_VTD): the VT-d ``cap_reg`` and
    ``ecap_reg`` values a VMM exposes to the guest."""

    flags: int = u32()
    reserved: int = u32()
    cap_reg: int = u64()
    ecap_reg: int = u64()


@ustruct
@attrs.define
class IommuHwInfoArmSmmuv3(UStruct):
    """``struct iommu_hw_info_arm_smmuv3`` (IOMMU_HW_INFO_TYPE_ARM_SMMUV3): the SMMU's ID
    registers IDR0-5, IIDR and AIDR."""

    flags: int = u32()
    reserved: int = u32()
    idr0: int = u32()
    idr1: int = u32()
    idr2: int = u32()
    idr3: int = u32()
    idr4: int = u32()
    idr5: int = u32()
    iidr: int = u32()
    aidr: int = u32()


@ustruct
@attrs.define
class IommuHwInfoTegra241Cmdqv(UStruct):
    """``struct iommu_hw_info_tegra241_cmdqv`` (IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV): the CMDQV
    ``version`` and the log2 counts of VCMDQs and SIDs per VINTF."""

    flags: int = u32()
    version: int = u8()
    log2vcmdqs: int = u8()
    log2vsids: int = u8()
    reserved: int = u8()


@ustruct
@attrs.define
class IommuHwInfoAmd(UStruct):
    """``struct iommu_hw_info_amd`` (IOMMU_HW_INFO_TYPE_AMD): the IOMMU's extended feature
    registers EFR and EFR2."""

    efr: int = u64()
    efr2: int = u64()


@ustruct
@attrs.define
class IommuHwInfo(UStruct):
    """``struct iommu_hw_info`` (IOMMU_GET_HW_INFO): the vendor data of ``data_type`` for device
    ``dev_id``, written to ``data_uptr`` (at most ``data_len`` bytes; the full length and
    type come back), with ``out_capabilities`` and ``out_max_pasid_log2``."""

    size: int = u32()
    flags: int = u32()
    dev_id: int = u32()
    data_len: int = u32()
    data_uptr: int = u64()
    data_type: int = u32()  # union { in_data_type; out_data_type; }
    out_max_pasid_log2: int = u8()
    reserved: bytes = raw(3)
    out_capabilities: int = u64()


@ustruct
@attrs.define
class IommuHwptSetDirtyTracking(UStruct):
    """``struct iommu_hwpt_set_dirty_tracking`` (IOMMU_HWPT_SET_DIRTY_TRACKING): start or
    stop (``flags`` ENABLE) dirty tracking on paging HWPT ``hwpt_id``."""

    size: int = u32()
    flags: int = u32()
    hwpt_id: int = u32()
    reserved: int = u32()


@ustruct
@attrs.define
class IommuHwptGetDirtyBitmap(UStruct):
    """``struct iommu_hwpt_get_dirty_bitmap`` (IOMMU_HWPT_GET_DIRTY_BITMAP): a bit per
    ``page_size`` page of ``iova`` .. ``iova + length`` set in the user bitmap at ``data``
    where the hardware saw a write (cleared unless ``flags`` NO_CLEAR)."""

    size: int = u32()
    hwpt_id: int = u32()
    flags: int = u32()
    reserved: int = u32()
    iova: int = u64()
    length: int = u64()
    page_size: int = u64()
    data: int = u64()


@ustruct
@attrs.define
class IommuHwptVtdS1Invalidate(UStruct):
    """``struct iommu_hwpt_vtd_s1_invalidate`` (IOMMU_HWPT_INVALIDATE_DATA_VTD_S1): flush
    ``npages`` from ``addr`` (``U64_MAX`` pages: all) of a nested HWPT's first stage."""

    addr: int = u64()
    npages: int = u64()
    flags: int = u32()
    reserved: int = u32()


@ustruct
@attrs.define
class IommuViommuArmSmmuv3Invalidate(UStruct):
    """``struct iommu_viommu_arm_smmuv3_invalidate`` (IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3):
    one guest CMDQ command, ``cmd0`` and ``cmd1``, for the vIOMMU to execute."""

    cmd0: int = u64()
    cmd1: int = u64()


@ustruct
@attrs.define
class IommuHwptInvalidate(UStruct):
    """``struct iommu_hwpt_invalidate`` (IOMMU_HWPT_INVALIDATE): ``entry_num`` entries of
    ``entry_len`` bytes and type ``data_type`` at ``data_uptr`` for a nested HWPT or a vIOMMU
    ``hwpt_id``; ``entry_num`` returns how many were handled."""

    size: int = u32()
    hwpt_id: int = u32()
    data_uptr: int = u64()
    data_type: int = u32()
    entry_len: int = u32()
    entry_num: int = u32()
    reserved: int = u32()


@ustruct
@attrs.define
class IommuHwptPgfault(UStruct):
    """``struct iommu_hwpt_pgfault``: one I/O page fault read from a fault queue fd (device,
    PASID, page request group, permissions, address, and the ``cookie`` to respond with)."""

    flags: int = u32()
    dev_id: int = u32()
    pasid: int = u32()
    grpid: int = u32()
    perm: int = u32()
    reserved: int = u32()
    addr: int = u64()
    length: int = u32()
    cookie: int = u32()


@ustruct
@attrs.define
class IommuHwptPageResponse(UStruct):
    """``struct iommu_hwpt_page_response``: written to a fault queue fd to answer the fault
    group ``cookie`` with ``code`` (SUCCESS or INVALID)."""

    cookie: int = u32()
    code: int = u32()


@ustruct
@attrs.define
class IommuFaultAlloc(UStruct):
    """``struct iommu_fault_alloc`` (IOMMU_FAULT_QUEUE_ALLOC): a fault queue object
    (``out_fault_id``) and the fd that reads its faults (``out_fault_fd``)."""

    size: int = u32()
    flags: int = u32()
    out_fault_id: int = u32()
    out_fault_fd: int = u32()


@ustruct
@attrs.define
class IommuViommuTegra241Cmdqv(UStruct):
    """``struct iommu_viommu_tegra241_cmdqv`` (IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV data): where to
    mmap the VINTF page from the iommufd (``out_vintf_mmap_offset`` / ``_length``)."""

    out_vintf_mmap_offset: int = u64()
    out_vintf_mmap_length: int = u64()


# AMD's tree (AMDESE/linux-iommu include/uapi/linux/iommufd.h, iommufd.c): mandatory user data of
# IOMMU_VIOMMU_TYPE_AMD, with the review's changes (input-only IDs and "reserved" dropped, a
# length added): the iommufd mmap offset and length of the guest's 4 KiB VF MMIO page.
@ustruct
@attrs.define
class IommuViommuAmd(UStruct):
    """The AMD HW-vIOMMU's vIOMMU data (AMD's tree; the model's layout): where to mmap the
    guest's VF MMIO page from the iommufd (``out_vfmmio_mmap_offset`` / ``_length``)."""

    out_vfmmio_mmap_offset: int = u64()
    out_vfmmio_mmap_length: int = u64()


@ustruct
@attrs.define
class IommuViommuAlloc(UStruct):
    """``struct iommu_viommu_alloc`` (IOMMU_VIOMMU_ALLOC): a vIOMMU of ``type`` for device
    ``dev_id`` over nest parent ``hwpt_id``, with ``data_len`` bytes of type data at
    ``data_uptr``; the id comes back in ``out_viommu_id``."""

    size: int = u32()
    flags: int = u32()
    type: int = u32()
    dev_id: int = u32()
    hwpt_id: int = u32()
    out_viommu_id: int = u32()
    data_len: int = u32()
    reserved: int = u32()
    data_uptr: int = u64()


@ustruct
@attrs.define
class IommuVdeviceAlloc(UStruct):
    """``struct iommu_vdevice_alloc`` (IOMMU_VDEVICE_ALLOC): device ``dev_id`` as seen inside
    vIOMMU ``viommu_id`` under the guest's ID ``virt_id`` (vSID, vRID, guest DeviceID)."""

    size: int = u32()
    viommu_id: int = u32()
    dev_id: int = u32()
    out_vdevice_id: int = u32()
    virt_id: int = u64()


@ustruct
@attrs.define
class IommuIoasChangeProcess(UStruct):
    """``struct iommu_ioas_change_process`` (IOMMU_IOAS_CHANGE_PROCESS): move every
    file-backed pin to the calling process's accounting."""

    size: int = u32()
    reserved: int = u32()


@ustruct
@attrs.define
class IommufdVeventHeader(UStruct):
    """``struct iommufd_vevent_header``: the header before each vEVENT read from a vEVENTQ fd
    (``sequence`` number; ``flags`` LOST_EVENTS when the queue overflowed)."""

    flags: int = u32()
    sequence: int = u32()


@ustruct
@attrs.define
class IommuVeventqAlloc(UStruct):
    """``struct iommu_veventq_alloc`` (IOMMU_VEVENTQ_ALLOC): a vEVENT queue of ``type`` and
    ``veventq_depth`` on vIOMMU ``viommu_id``: its id and the fd to read it."""

    size: int = u32()
    flags: int = u32()
    viommu_id: int = u32()
    type: int = u32()
    veventq_depth: int = u32()
    out_veventq_id: int = u32()
    out_veventq_fd: int = u32()
    reserved: int = u32()


@ustruct
@attrs.define
class IommuHwQueueAlloc(UStruct):
    """``struct iommu_hw_queue_alloc`` (IOMMU_HW_QUEUE_ALLOC): a HW queue of ``type`` and
    ``index`` that the hardware reads from guest memory at ``nesting_parent_iova`` ..
    ``+ length``; its id comes back in ``out_hw_queue_id``."""

    size: int = u32()
    flags: int = u32()
    viommu_id: int = u32()
    type: int = u32()
    index: int = u32()
    out_hw_queue_id: int = u32()
    nesting_parent_iova: int = u64()
    length: int = u64()
