"""``iommufd_test.h``: the self-test ioctl's numbers and structs (Linux 7.2
drivers/iommu/iommufd/iommufd_test.h), apart from the handlers that answer them
(:mod:`iommufd_model.mock.selftest`, the kernel's selftest.c).

Layout::

    struct iommu_test_cmd { u32 size; u32 op; u32 id; u32 __reserved;
                            union { ... 48 bytes, 8-aligned ... }; u32 last; }   // sizeof 72

The minimum size is ``offsetofend(last)`` = 68, as ``IOCTL_OP(IOMMU_TEST_CMD, ..., last)``.
Each op decodes its own member of the union (the ``_Payload`` subclasses) and, when it
answers, packs it back before the whole struct is copied out.
"""

from __future__ import annotations

from typing import Any

import attrs

from iommufd_model.mock import iommupt
from iommufd_model.mock.domain import MOCK_IO_PAGE_SIZE
from iommufd_model.uapi import iommufd as U
from iommufd_model.uapi.codec import UStruct, raw, u32, u64, ustruct

# -- constants of iommufd_test.h ----------------------------------------------------------
IOMMU_TEST_OP_ADD_RESERVED = 1
IOMMU_TEST_OP_MOCK_DOMAIN = 2
IOMMU_TEST_OP_MD_CHECK_MAP = 3
IOMMU_TEST_OP_MD_CHECK_REFS = 4
IOMMU_TEST_OP_CREATE_ACCESS = 5
IOMMU_TEST_OP_DESTROY_ACCESS_PAGES = 6
IOMMU_TEST_OP_ACCESS_PAGES = 7
IOMMU_TEST_OP_ACCESS_RW = 8
IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT = 9
IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE = 10
IOMMU_TEST_OP_ACCESS_REPLACE_IOAS = 11
IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS = 12
IOMMU_TEST_OP_DIRTY = 13
IOMMU_TEST_OP_MD_CHECK_IOTLB = 14
IOMMU_TEST_OP_TRIGGER_IOPF = 15
IOMMU_TEST_OP_DEV_CHECK_CACHE = 16
IOMMU_TEST_OP_TRIGGER_VEVENT = 17
IOMMU_TEST_OP_PASID_ATTACH = 18
IOMMU_TEST_OP_PASID_REPLACE = 19
IOMMU_TEST_OP_PASID_DETACH = 20
IOMMU_TEST_OP_PASID_CHECK_HWPT = 21
IOMMU_TEST_OP_DMABUF_GET = 22
IOMMU_TEST_OP_DMABUF_REVOKE = 23

MOCK_FLAGS_ACCESS_WRITE = 1 << 0
MOCK_FLAGS_ACCESS_SYZ = 1 << 16
MOCK_ACCESS_RW_WRITE = 1 << 0
MOCK_ACCESS_RW_SLOW_PATH = 1 << 2
MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES = 1 << 0
MOCK_FLAGS_DEVICE_NO_DIRTY = 1 << 0
MOCK_FLAGS_DEVICE_PASID = 1 << 2  # (1 << 1, HUGE_IOVA, is gone in Linux 7.2)
MOCK_NESTED_DOMAIN_IOTLB_ID_MAX = 3
MOCK_NESTED_DOMAIN_IOTLB_NUM = 4
MOCK_DEV_CACHE_ID_MAX = 3
MOCK_DEV_CACHE_NUM = 4
IOMMU_TEST_PASID_RESERVED = 1024
# iommu_hwpt_selftest.pagetable_type, for paging HWPTs
MOCK_IOMMUPT_DEFAULT = iommupt.MOCK_IOMMUPT_DEFAULT
MOCK_IOMMUPT_HUGE = iommupt.MOCK_IOMMUPT_HUGE
MOCK_PAGE_SIZE = MOCK_IO_PAGE_SIZE
MOCK_HUGE_PAGE_SIZE = iommupt.MOCK_HUGE_PAGE_SIZE
DIRTY_MAX_BITS = (16 << 20) * 8  # SZ_16M * BITS_PER_BYTE

IOMMU_HW_INFO_TYPE_SELFTEST = 0xFEEDBEEF
IOMMU_HW_INFO_SELFTEST_REGVAL = 0xDEADBEEF
MOCK_PASID_WIDTH = 20
IOMMU_HWPT_DATA_SELFTEST = 0xDEAD
IOMMU_TEST_IOTLB_DEFAULT = 0xBADBEEF
IOMMU_TEST_DEV_CACHE_DEFAULT = 0xBADDAD
IOMMU_HWPT_INVALIDATE_DATA_SELFTEST = 0xDEADBEEF
IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID = 0xDADBEEF
IOMMU_TEST_INVALIDATE_FLAG_ALL = 1 << 0
IOMMU_VIOMMU_TYPE_SELFTEST = 0xDEADBEEF
IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST = 0xDEADBEEF
IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST_INVALID = 0xDADBEEF
IOMMU_VEVENTQ_TYPE_SELFTEST = 0xBEEFBEEF
IOMMU_HW_QUEUE_TYPE_SELFTEST = 0xDEADBEEF
IOMMU_TEST_HW_QUEUE_MAX = 2
IOMMU_NO_PASID = 0

# IOMMU_TEST_CMD = _IO(';', IOMMUFD_CMD_BASE + 32)
IOMMU_TEST_CMD = U._IO(U.IOMMUFD_TYPE, U.IOMMUFD_CMD_BASE + 32)

UNION_SIZE = 48  # the largest member (dirty) is 48 bytes, 8-byte aligned


@ustruct
@attrs.define
class IommuTestCmd(UStruct):
    """``struct iommu_test_cmd``; ``payload`` is the union, decoded per op."""

    size: int = u32()
    op: int = u32()
    id: int = u32()
    reserved: int = u32()
    payload: bytes = raw(UNION_SIZE)
    last: int = u32()
    tail_pad: int = u32()


# -- the union members -------------------------------------------------------------------
class _Payload(UStruct):
    @classmethod
    def of(cls, cmd: IommuTestCmd) -> Any:
        return cls.unpack(cmd.payload[: cls.SIZE])

    def store(self, cmd: IommuTestCmd) -> None:
        data = self.pack()
        cmd.payload = data + cmd.payload[len(data) :]


@ustruct
@attrs.define
class AddReserved(_Payload):
    start: int = u64()
    length: int = u64()


@ustruct
@attrs.define
class MockDomainArgs(_Payload):
    """``mock_domain`` and ``mock_domain_flags`` (the latter adds ``dev_flags``)."""

    out_stdev_id: int = u32()
    out_hwpt_id: int = u32()
    out_idev_id: int = u32()
    dev_flags: int = u32()


@ustruct
@attrs.define
class MockDomainReplace(_Payload):
    pt_id: int = u32()


@ustruct
@attrs.define
class CheckMap(_Payload):
    iova: int = u64()
    length: int = u64()
    uptr: int = u64()


@ustruct
@attrs.define
class CheckRefs(_Payload):
    length: int = u64()
    uptr: int = u64()
    refs: int = u32()
    pad: int = u32()


@ustruct
@attrs.define
class CreateAccess(_Payload):
    out_access_fd: int = u32()
    flags: int = u32()


@ustruct
@attrs.define
class DestroyAccessPages(_Payload):
    access_pages_id: int = u32()


@ustruct
@attrs.define
class AccessPages(_Payload):
    flags: int = u32()
    out_access_pages_id: int = u32()
    iova: int = u64()
    length: int = u64()
    uptr: int = u64()


@ustruct
@attrs.define
class AccessRw(_Payload):
    iova: int = u64()
    length: int = u64()
    uptr: int = u64()
    flags: int = u32()
    pad: int = u32()


@ustruct
@attrs.define
class MemoryLimit(_Payload):
    limit: int = u32()


@ustruct
@attrs.define
class AccessReplaceIoas(_Payload):
    ioas_id: int = u32()


@ustruct
@attrs.define
class Dirty(_Payload):
    flags: int = u32()
    pad: int = u32()
    iova: int = u64()
    length: int = u64()
    page_size: int = u64()
    uptr: int = u64()
    out_nr_dirty: int = u64()


@ustruct
@attrs.define
class CheckIdValue(_Payload):
    """``check_iotlb`` {id, iotlb} and ``check_dev_cache`` {id, cache}."""

    id: int = u32()
    value: int = u32()


@ustruct
@attrs.define
class TriggerIopf(_Payload):
    dev_id: int = u32()
    pasid: int = u32()
    grpid: int = u32()
    perm: int = u32()
    addr: int = u64()


@ustruct
@attrs.define
class TriggerVevent(_Payload):
    dev_id: int = u32()


@ustruct
@attrs.define
class PasidArgs(_Payload):
    """``pasid_attach`` / ``pasid_replace`` {pasid, pt_id}, ``pasid_detach`` {pasid},
    ``pasid_check`` {pasid, hwpt_id}."""

    pasid: int = u32()
    pt_id: int = u32()


@ustruct
@attrs.define
class DmaBufArgs(_Payload):
    """``dmabuf_get`` {length, open_flags} and ``dmabuf_revoke`` {dmabuf_fd, revoked}."""

    a: int = u32()
    b: int = u32()


assert Dirty.SIZE == UNION_SIZE
assert IommuTestCmd.SIZE == 72 and IommuTestCmd.offsetofend("last") == 68
