"""Struct layouts, command numbers and minimum sizes against include/uapi/linux/iommufd.h.

The expected tables are written out by hand from the C header (offsets are what a C compiler
gives with the header's explicit padding), not derived from the model's own declarations.
"""

from __future__ import annotations

import itertools

import pytest

from iommufd_model import uapi as U
from iommufd_model.core.main import registered_ops
from iommufd_model.uapi.codec import UStruct

# struct -> (sizeof, {field: offsetof}) ; every field of the C struct is listed.
LAYOUTS: dict[type[UStruct], tuple[int, dict[str, int]]] = {
    U.IommuDestroy: (8, {"size": 0, "id": 4}),
    U.IommuIoasAlloc: (12, {"size": 0, "flags": 4, "out_ioas_id": 8}),
    U.IommuIovaRange: (16, {"start": 0, "last": 8}),
    U.IommuIoasIovaRanges: (
        32,
        {
            "size": 0,
            "ioas_id": 4,
            "num_iovas": 8,
            "reserved": 12,
            "allowed_iovas": 16,
            "out_iova_alignment": 24,
        },
    ),
    U.IommuIoasAllowIovas: (
        24,
        {"size": 0, "ioas_id": 4, "num_iovas": 8, "reserved": 12, "allowed_iovas": 16},
    ),
    U.IommuIoasMap: (
        40,
        {
            "size": 0,
            "flags": 4,
            "ioas_id": 8,
            "reserved": 12,
            "user_va": 16,
            "length": 24,
            "iova": 32,
        },
    ),
    U.IommuIoasMapFile: (
        40,
        {"size": 0, "flags": 4, "ioas_id": 8, "fd": 12, "start": 16, "length": 24, "iova": 32},
    ),
    U.IommuIoasCopy: (
        40,
        {
            "size": 0,
            "flags": 4,
            "dst_ioas_id": 8,
            "src_ioas_id": 12,
            "length": 16,
            "dst_iova": 24,
            "src_iova": 32,
        },
    ),
    U.IommuIoasUnmap: (24, {"size": 0, "ioas_id": 4, "iova": 8, "length": 16}),
    U.IommuOption: (
        24,
        {"size": 0, "option_id": 4, "op": 8, "reserved": 10, "object_id": 12, "val64": 16},
    ),
    U.IommuVfioIoas: (12, {"size": 0, "ioas_id": 4, "op": 8, "reserved": 10}),
    U.IommuHwptAlloc: (
        48,
        {
            "size": 0,
            "flags": 4,
            "dev_id": 8,
            "pt_id": 12,
            "out_hwpt_id": 16,
            "reserved": 20,
            "data_type": 24,
            "data_len": 28,
            "data_uptr": 32,
            "fault_id": 40,
            "reserved2": 44,
        },
    ),
    U.IommuHwptVtdS1: (24, {"flags": 0, "pgtbl_addr": 8, "addr_width": 16, "reserved": 20}),
    U.IommuHwptArmSmmuv3: (16, {"ste0": 0, "ste1": 8}),
    U.IommuHwptAmdGuest: (32, {"dte0": 0, "dte1": 8, "dte2": 16, "dte3": 24}),
    U.IommuHwInfoVtd: (24, {"flags": 0, "reserved": 4, "cap_reg": 8, "ecap_reg": 16}),
    U.IommuHwInfoArmSmmuv3: (
        40,
        {
            "flags": 0,
            "reserved": 4,
            "idr0": 8,
            "idr1": 12,
            "idr2": 16,
            "idr3": 20,
            "idr4": 24,
            "idr5": 28,
            "iidr": 32,
            "aidr": 36,
        },
    ),
    U.IommuHwInfoTegra241Cmdqv: (
        8,
        {"flags": 0, "version": 4, "log2vcmdqs": 5, "log2vsids": 6, "reserved": 7},
    ),
    U.IommuHwInfoAmd: (16, {"efr": 0, "efr2": 8}),
    # 40 bytes: the min size (offsetofend __reserved) is 32, the struct is 40.
    U.IommuHwInfo: (
        40,
        {
            "size": 0,
            "flags": 4,
            "dev_id": 8,
            "data_len": 12,
            "data_uptr": 16,
            "data_type": 24,
            "out_max_pasid_log2": 28,
            "reserved": 29,
            "out_capabilities": 32,
        },
    ),
    U.IommuHwptSetDirtyTracking: (16, {"size": 0, "flags": 4, "hwpt_id": 8, "reserved": 12}),
    U.IommuHwptGetDirtyBitmap: (
        48,
        {
            "size": 0,
            "hwpt_id": 4,
            "flags": 8,
            "reserved": 12,
            "iova": 16,
            "length": 24,
            "page_size": 32,
            "data": 40,
        },
    ),
    U.IommuHwptVtdS1Invalidate: (24, {"addr": 0, "npages": 8, "flags": 16, "reserved": 20}),
    U.IommuViommuArmSmmuv3Invalidate: (16, {"cmd0": 0, "cmd1": 8}),
    U.IommuHwptInvalidate: (
        32,
        {
            "size": 0,
            "hwpt_id": 4,
            "data_uptr": 8,
            "data_type": 16,
            "entry_len": 20,
            "entry_num": 24,
            "reserved": 28,
        },
    ),
    U.IommuHwptPgfault: (
        40,
        {
            "flags": 0,
            "dev_id": 4,
            "pasid": 8,
            "grpid": 12,
            "perm": 16,
            "reserved": 20,
            "addr": 24,
            "length": 32,
            "cookie": 36,
        },
    ),
    U.IommuHwptPageResponse: (8, {"cookie": 0, "code": 4}),
    U.IommuFaultAlloc: (16, {"size": 0, "flags": 4, "out_fault_id": 8, "out_fault_fd": 12}),
    U.IommuViommuTegra241Cmdqv: (16, {"out_vintf_mmap_offset": 0, "out_vintf_mmap_length": 8}),
    U.IommuViommuAlloc: (
        40,
        {
            "size": 0,
            "flags": 4,
            "type": 8,
            "dev_id": 12,
            "hwpt_id": 16,
            "out_viommu_id": 20,
            "data_len": 24,
            "reserved": 28,
            "data_uptr": 32,
        },
    ),
    U.IommuVdeviceAlloc: (
        24,
        {"size": 0, "viommu_id": 4, "dev_id": 8, "out_vdevice_id": 12, "virt_id": 16},
    ),
    U.IommuIoasChangeProcess: (8, {"size": 0, "reserved": 4}),
    U.IommufdVeventHeader: (8, {"flags": 0, "sequence": 4}),
    U.IommuVeventqAlloc: (
        32,
        {
            "size": 0,
            "flags": 4,
            "viommu_id": 8,
            "type": 12,
            "veventq_depth": 16,
            "out_veventq_id": 20,
            "out_veventq_fd": 24,
            "reserved": 28,
        },
    ),
    U.IommuHwQueueAlloc: (
        40,
        {
            "size": 0,
            "flags": 4,
            "viommu_id": 8,
            "type": 12,
            "index": 16,
            "out_hw_queue_id": 20,
            "nesting_parent_iova": 24,
            "length": 32,
        },
    ),
}

# IOMMUFD_CMD_* number -> (command, struct, the IOCTL_OP "last" field, min_size by hand)
COMMANDS: dict[int, tuple[int, type[UStruct], str, int]] = {
    0x80: (U.IOMMU_DESTROY, U.IommuDestroy, "id", 8),
    0x81: (U.IOMMU_IOAS_ALLOC, U.IommuIoasAlloc, "out_ioas_id", 12),
    0x82: (U.IOMMU_IOAS_ALLOW_IOVAS, U.IommuIoasAllowIovas, "allowed_iovas", 24),
    0x83: (U.IOMMU_IOAS_COPY, U.IommuIoasCopy, "src_iova", 40),
    0x84: (U.IOMMU_IOAS_IOVA_RANGES, U.IommuIoasIovaRanges, "out_iova_alignment", 32),
    0x85: (U.IOMMU_IOAS_MAP, U.IommuIoasMap, "iova", 40),
    0x86: (U.IOMMU_IOAS_UNMAP, U.IommuIoasUnmap, "length", 24),
    0x87: (U.IOMMU_OPTION, U.IommuOption, "val64", 24),
    0x88: (U.IOMMU_VFIO_IOAS, U.IommuVfioIoas, "reserved", 12),
    0x89: (U.IOMMU_HWPT_ALLOC, U.IommuHwptAlloc, "reserved", 24),
    0x8A: (U.IOMMU_GET_HW_INFO, U.IommuHwInfo, "reserved", 32),
    0x8B: (U.IOMMU_HWPT_SET_DIRTY_TRACKING, U.IommuHwptSetDirtyTracking, "reserved", 16),
    0x8C: (U.IOMMU_HWPT_GET_DIRTY_BITMAP, U.IommuHwptGetDirtyBitmap, "data", 48),
    0x8D: (U.IOMMU_HWPT_INVALIDATE, U.IommuHwptInvalidate, "reserved", 32),
    0x8E: (U.IOMMU_FAULT_QUEUE_ALLOC, U.IommuFaultAlloc, "out_fault_fd", 16),
    0x8F: (U.IOMMU_IOAS_MAP_FILE, U.IommuIoasMapFile, "iova", 40),
    0x90: (U.IOMMU_VIOMMU_ALLOC, U.IommuViommuAlloc, "out_viommu_id", 24),
    0x91: (U.IOMMU_VDEVICE_ALLOC, U.IommuVdeviceAlloc, "virt_id", 24),
    0x92: (U.IOMMU_IOAS_CHANGE_PROCESS, U.IommuIoasChangeProcess, "reserved", 8),
    0x93: (U.IOMMU_VEVENTQ_ALLOC, U.IommuVeventqAlloc, "out_veventq_fd", 28),
    0x94: (U.IOMMU_HW_QUEUE_ALLOC, U.IommuHwQueueAlloc, "length", 40),
}


@pytest.mark.parametrize("cls", list(LAYOUTS), ids=lambda c: c.__name__)
def test_struct_layout(cls: type[UStruct]) -> None:
    size, offsets = LAYOUTS[cls]
    assert size == cls.SIZE
    assert set(cls._offsets) == set(offsets), "field set differs from the header"
    for name, off in offsets.items():
        assert cls.offsetof(name) == off, name
    # The fields tile the struct: no hole and nothing past the end.
    ends = sorted((cls.offsetof(n), cls.offsetofend(n)) for n in offsets)
    assert ends[0][0] == 0 and ends[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ends))


def test_hw_info_reserved_is_three_bytes() -> None:
    assert U.IommuHwInfo.offsetofend("reserved") - U.IommuHwInfo.offsetof("reserved") == 3


@pytest.mark.parametrize("nr", sorted(COMMANDS), ids=hex)
def test_command_number_and_min_size(nr: int) -> None:
    cmd, cls, last, min_size = COMMANDS[nr]
    # _IO(';', nr): no direction bits, no size bits, type ';' (0x3b).
    assert cmd == (0x3B << 8) | nr
    assert cmd >> 30 == 0 and (cmd >> 16) & 0x3FFF == 0
    op = registered_ops()[cmd]
    assert op.struct is cls
    assert op.last == last
    assert op.min_size == min_size == cls.offsetofend(last)


IOMMU_TEST_CMD = (0x3B << 8) | 0xA0  # the self-test command, registered by the mock driver


def test_every_registered_command_is_in_the_table() -> None:
    assert set(registered_ops()) - {IOMMU_TEST_CMD} == {c for c, *_ in COMMANDS.values()}


def test_pack_unpack_round_trip_is_little_endian() -> None:
    st = U.IommuIoasMap(size=40, flags=6, ioas_id=3, user_va=0x1122334455667788, length=1, iova=2)
    raw = st.pack()
    assert raw[:4] == (40).to_bytes(4, "little")
    assert raw[16:24] == (0x1122334455667788).to_bytes(8, "little")
    assert U.IommuIoasMap.unpack(raw) == st


def test_flag_and_enum_values() -> None:
    assert (U.IOMMU_IOAS_MAP_FIXED_IOVA, U.IOMMU_IOAS_MAP_WRITEABLE, U.IOMMU_IOAS_MAP_READABLE) == (
        1,
        2,
        4,
    )
    assert (U.IOMMU_OPTION_RLIMIT_MODE, U.IOMMU_OPTION_HUGE_PAGES) == (0, 1)
    assert (U.IOMMU_OPTION_OP_SET, U.IOMMU_OPTION_OP_GET) == (0, 1)
    assert (U.IOMMU_VFIO_IOAS_GET, U.IOMMU_VFIO_IOAS_SET, U.IOMMU_VFIO_IOAS_CLEAR) == (0, 1, 2)
    assert (
        U.IOMMU_HWPT_ALLOC_NEST_PARENT,
        U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
        U.IOMMU_HWPT_FAULT_ID_VALID,
        U.IOMMU_HWPT_ALLOC_PASID,
    ) == (1, 2, 4, 8)
    assert (U.IOMMU_HWPT_DATA_NONE, U.IOMMU_HWPT_DATA_VTD_S1, U.IOMMU_HWPT_DATA_ARM_SMMUV3) == (
        0,
        1,
        2,
    )
    assert U.IOMMU_HW_INFO_FLAG_INPUT_TYPE == 1
    assert U.IOMMU_HW_CAP_DIRTY_TRACKING == 1
