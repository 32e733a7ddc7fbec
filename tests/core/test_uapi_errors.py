"""The kernel's errno for each way a command's arguments can be wrong.

Every refusal is checked to leave the complete model state (``snapshot``) unchanged. The
expected values come from drivers/iommu/iommufd/{main,ioas,hw_pagetable,device,vfio_compat}.c.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import attrs
import pytest

from helpers import (
    PAGE,
    RW,
    U32_MAX,
    U64_MAX,
    Scenario,
    check_invariants,
    expect_errno,
    ioas_map,
    ioas_unmap,
    ioctl,
    run,
    snapshot,
    valid_cmd,
)
from iommufd_model import uapi as U

E = errno
FIXED = U.IOMMU_IOAS_MAP_FIXED_IOVA


def _v(cmd: int, **changes: Any) -> Callable[[Scenario], Any]:
    """A valid struct for ``cmd`` with ``changes``; a callable value is applied to ``sc``."""

    def build(sc: Scenario) -> Any:
        vals = {k: (v(sc) if callable(v) else v) for k, v in changes.items()}
        st: Any = valid_cmd(sc, cmd)  # an @ustruct attrs class (their base, UStruct, is not one)
        return attrs.evolve(st, **vals)

    return build


def _ranges(sc: Scenario, *pairs: tuple[int, int], at: int = 0) -> int:
    """Write ``pairs`` as struct iommu_iova_range at ``scratch + at``; return the address."""
    blob = b"".join(U.IommuIovaRange(s, last).pack() for s, last in pairs)
    sc.proc.write(sc.scratch + at, blob)
    return sc.scratch + at


CASES: list[tuple[str, int, Callable[[Scenario], Any], int]] = [
    # IOMMU_DESTROY
    ("destroy-id0", U.IOMMU_DESTROY, _v(U.IOMMU_DESTROY, id=0), E.ENOENT),
    ("destroy-unknown", U.IOMMU_DESTROY, _v(U.IOMMU_DESTROY, id=999), E.ENOENT),
    ("destroy-u32max", U.IOMMU_DESTROY, _v(U.IOMMU_DESTROY, id=U32_MAX), E.ENOENT),
    ("destroy-ioas-in-use", U.IOMMU_DESTROY, _v(U.IOMMU_DESTROY, id=lambda s: s.ioas), E.EBUSY),
    (
        "destroy-attached-hwpt",
        U.IOMMU_DESTROY,
        _v(U.IOMMU_DESTROY, id=lambda s: s.hwpt_auto),
        E.EBUSY,
    ),
    ("destroy-bound-device", U.IOMMU_DESTROY, _v(U.IOMMU_DESTROY, id=lambda s: s.dev_id), E.EBUSY),
    # IOMMU_IOAS_ALLOC
    ("ioas_alloc-flags", U.IOMMU_IOAS_ALLOC, _v(U.IOMMU_IOAS_ALLOC, flags=1), E.EOPNOTSUPP),
    # IOMMU_IOAS_ALLOW_IOVAS
    (
        "allow-reserved",
        U.IOMMU_IOAS_ALLOW_IOVAS,
        _v(U.IOMMU_IOAS_ALLOW_IOVAS, reserved=1),
        E.EOPNOTSUPP,
    ),
    (
        "allow-unknown-ioas",
        U.IOMMU_IOAS_ALLOW_IOVAS,
        _v(U.IOMMU_IOAS_ALLOW_IOVAS, ioas_id=999),
        E.ENOENT,
    ),
    (
        "allow-wrong-type",
        U.IOMMU_IOAS_ALLOW_IOVAS,
        _v(U.IOMMU_IOAS_ALLOW_IOVAS, ioas_id=lambda s: s.hwpt_auto),
        E.ENOENT,
    ),
    (
        "allow-bad-pointer",
        U.IOMMU_IOAS_ALLOW_IOVAS,
        _v(U.IOMMU_IOAS_ALLOW_IOVAS, num_iovas=1, allowed_iovas=0),
        E.EFAULT,
    ),
    (
        "allow-empty-range",
        U.IOMMU_IOAS_ALLOW_IOVAS,
        _v(
            U.IOMMU_IOAS_ALLOW_IOVAS,
            num_iovas=1,
            allowed_iovas=lambda s: _ranges(s, (0x10000, 0x10000)),
        ),
        E.EINVAL,
    ),
    (
        "allow-overlap",
        U.IOMMU_IOAS_ALLOW_IOVAS,
        _v(
            U.IOMMU_IOAS_ALLOW_IOVAS,
            num_iovas=2,
            allowed_iovas=lambda s: _ranges(s, (0x10000, 0x1FFFF), (0x1F000, 0x2FFFF)),
        ),
        E.EINVAL,
    ),
    (
        "allow-second-range-unreadable",
        U.IOMMU_IOAS_ALLOW_IOVAS,
        _v(
            U.IOMMU_IOAS_ALLOW_IOVAS,
            num_iovas=2,
            allowed_iovas=lambda s: _ranges(s, (0, 0xFFF), at=(1 << 16) - 16),
        ),
        E.EFAULT,
    ),
    # IOMMU_IOAS_COPY
    ("copy-flags", U.IOMMU_IOAS_COPY, _v(U.IOMMU_IOAS_COPY, flags=RW | 8), E.EOPNOTSUPP),
    ("copy-length-max", U.IOMMU_IOAS_COPY, _v(U.IOMMU_IOAS_COPY, length=U64_MAX), E.EOVERFLOW),
    ("copy-src-max", U.IOMMU_IOAS_COPY, _v(U.IOMMU_IOAS_COPY, src_iova=U64_MAX), E.EOVERFLOW),
    ("copy-dst-max", U.IOMMU_IOAS_COPY, _v(U.IOMMU_IOAS_COPY, dst_iova=U64_MAX), E.EOVERFLOW),
    ("copy-no-prot", U.IOMMU_IOAS_COPY, _v(U.IOMMU_IOAS_COPY, flags=0), E.EINVAL),
    ("copy-fixed-no-prot", U.IOMMU_IOAS_COPY, _v(U.IOMMU_IOAS_COPY, flags=FIXED), E.EINVAL),
    ("copy-unknown-src", U.IOMMU_IOAS_COPY, _v(U.IOMMU_IOAS_COPY, src_ioas_id=999), E.ENOENT),
    ("copy-unknown-dst", U.IOMMU_IOAS_COPY, _v(U.IOMMU_IOAS_COPY, dst_ioas_id=999), E.ENOENT),
    (
        "copy-src-wrong-type",
        U.IOMMU_IOAS_COPY,
        _v(U.IOMMU_IOAS_COPY, src_ioas_id=lambda s: s.dev_id),
        E.ENOENT,
    ),
    (
        "copy-dst-wrong-type",
        U.IOMMU_IOAS_COPY,
        _v(U.IOMMU_IOAS_COPY, dst_ioas_id=lambda s: s.hwpt_dirty),
        E.ENOENT,
    ),
    (
        "copy-src-unmapped",
        U.IOMMU_IOAS_COPY,
        _v(U.IOMMU_IOAS_COPY, src_iova=lambda s: s.iova + (1 << 20)),
        E.ENOENT,
    ),
    (
        "copy-src-past-area",
        U.IOMMU_IOAS_COPY,
        _v(U.IOMMU_IOAS_COPY, length=(1 << 16) + PAGE),
        E.ENOENT,
    ),
    (
        "copy-fixed-overlap",
        U.IOMMU_IOAS_COPY,
        _v(
            U.IOMMU_IOAS_COPY,
            flags=RW | FIXED,
            dst_ioas_id=lambda s: s.ioas,
            dst_iova=lambda s: s.iova + PAGE,
        ),
        E.EEXIST,
    ),
    # IOMMU_IOAS_IOVA_RANGES
    (
        "ranges-reserved",
        U.IOMMU_IOAS_IOVA_RANGES,
        _v(U.IOMMU_IOAS_IOVA_RANGES, reserved=1),
        E.EOPNOTSUPP,
    ),
    (
        "ranges-unknown",
        U.IOMMU_IOAS_IOVA_RANGES,
        _v(U.IOMMU_IOAS_IOVA_RANGES, ioas_id=999),
        E.ENOENT,
    ),
    (
        "ranges-wrong-type",
        U.IOMMU_IOAS_IOVA_RANGES,
        _v(U.IOMMU_IOAS_IOVA_RANGES, ioas_id=lambda s: s.dev_id),
        E.ENOENT,
    ),
    (
        "ranges-bad-pointer",
        U.IOMMU_IOAS_IOVA_RANGES,
        _v(U.IOMMU_IOAS_IOVA_RANGES, allowed_iovas=8),
        E.EFAULT,
    ),
    # IOMMU_IOAS_MAP
    ("map-flags", U.IOMMU_IOAS_MAP, _v(U.IOMMU_IOAS_MAP, flags=RW | 8), E.EOPNOTSUPP),
    ("map-reserved", U.IOMMU_IOAS_MAP, _v(U.IOMMU_IOAS_MAP, reserved=1), E.EOPNOTSUPP),
    (
        "map-iova-max",
        U.IOMMU_IOAS_MAP,
        _v(U.IOMMU_IOAS_MAP, flags=RW | FIXED, iova=U64_MAX),
        E.EOVERFLOW,
    ),
    ("map-length-max", U.IOMMU_IOAS_MAP, _v(U.IOMMU_IOAS_MAP, length=U64_MAX), E.EOVERFLOW),
    ("map-no-prot", U.IOMMU_IOAS_MAP, _v(U.IOMMU_IOAS_MAP, flags=0), E.EINVAL),
    ("map-fixed-no-prot", U.IOMMU_IOAS_MAP, _v(U.IOMMU_IOAS_MAP, flags=FIXED), E.EINVAL),
    ("map-unknown-ioas", U.IOMMU_IOAS_MAP, _v(U.IOMMU_IOAS_MAP, ioas_id=999), E.ENOENT),
    (
        "map-wrong-type",
        U.IOMMU_IOAS_MAP,
        _v(U.IOMMU_IOAS_MAP, ioas_id=lambda s: s.hwpt_auto),
        E.ENOENT,
    ),
    ("map-zero-length", U.IOMMU_IOAS_MAP, _v(U.IOMMU_IOAS_MAP, length=0), E.EINVAL),
    ("map-bad-user-va", U.IOMMU_IOAS_MAP, _v(U.IOMMU_IOAS_MAP, user_va=PAGE), E.EFAULT),
    (
        "map-user-va-wraps",
        U.IOMMU_IOAS_MAP,
        _v(U.IOMMU_IOAS_MAP, user_va=U64_MAX - PAGE + 1, length=2 * PAGE),
        E.EOVERFLOW,
    ),
    (
        "map-fixed-wraps",
        U.IOMMU_IOAS_MAP,
        _v(U.IOMMU_IOAS_MAP, flags=RW | FIXED, iova=U64_MAX - PAGE + 1, length=2 * PAGE),
        E.EOVERFLOW,
    ),
    (
        "map-fixed-unaligned",
        U.IOMMU_IOAS_MAP,
        _v(U.IOMMU_IOAS_MAP, flags=RW | FIXED, iova=lambda s: s.iova + (1 << 20) + 1),
        E.EINVAL,
    ),
    (
        "map-fixed-reserved",
        U.IOMMU_IOAS_MAP,
        _v(U.IOMMU_IOAS_MAP, flags=RW | FIXED, iova=0),
        E.EINVAL,
    ),
    (
        "map-fixed-overlap",
        U.IOMMU_IOAS_MAP,
        _v(
            U.IOMMU_IOAS_MAP,
            flags=RW | FIXED,
            iova=lambda s: s.iova + (1 << 16) - PAGE,
            length=2 * PAGE,
        ),
        E.EEXIST,
    ),
    # IOMMU_IOAS_UNMAP
    ("unmap-unknown", U.IOMMU_IOAS_UNMAP, _v(U.IOMMU_IOAS_UNMAP, ioas_id=999), E.ENOENT),
    (
        "unmap-wrong-type",
        U.IOMMU_IOAS_UNMAP,
        _v(U.IOMMU_IOAS_UNMAP, ioas_id=lambda s: s.dev_id),
        E.ENOENT,
    ),
    (
        "unmap-iova-max",
        U.IOMMU_IOAS_UNMAP,
        _v(U.IOMMU_IOAS_UNMAP, iova=U64_MAX, length=PAGE),
        E.EOVERFLOW,
    ),
    (
        "unmap-length-max",
        U.IOMMU_IOAS_UNMAP,
        _v(U.IOMMU_IOAS_UNMAP, iova=PAGE, length=U64_MAX),
        E.EOVERFLOW,
    ),
    (
        "unmap-wraps",
        U.IOMMU_IOAS_UNMAP,
        _v(U.IOMMU_IOAS_UNMAP, iova=U64_MAX - PAGE + 1, length=2 * PAGE),
        E.EOVERFLOW,
    ),
    ("unmap-split-head", U.IOMMU_IOAS_UNMAP, _v(U.IOMMU_IOAS_UNMAP, length=PAGE), E.ENOENT),
    (
        "unmap-split-tail",
        U.IOMMU_IOAS_UNMAP,
        _v(U.IOMMU_IOAS_UNMAP, iova=lambda s: s.iova + PAGE, length=(1 << 16) - PAGE),
        E.ENOENT,
    ),
    (
        "unmap-nothing",
        U.IOMMU_IOAS_UNMAP,
        _v(U.IOMMU_IOAS_UNMAP, iova=lambda s: s.iova + (1 << 20)),
        E.ENOENT,
    ),
    # IOMMU_OPTION
    ("option-reserved", U.IOMMU_OPTION, _v(U.IOMMU_OPTION, reserved=1), E.EOPNOTSUPP),
    ("option-unknown", U.IOMMU_OPTION, _v(U.IOMMU_OPTION, option_id=2), E.EOPNOTSUPP),
    ("option-huge-unknown-ioas", U.IOMMU_OPTION, _v(U.IOMMU_OPTION, object_id=999), E.ENOENT),
    (
        "option-huge-wrong-type",
        U.IOMMU_OPTION,
        _v(U.IOMMU_OPTION, object_id=lambda s: s.hwpt_auto),
        E.ENOENT,
    ),
    ("option-huge-bad-op", U.IOMMU_OPTION, _v(U.IOMMU_OPTION, op=2), E.EOPNOTSUPP),
    (
        "option-huge-bad-val",
        U.IOMMU_OPTION,
        _v(U.IOMMU_OPTION, op=U.IOMMU_OPTION_OP_SET, val64=2),
        E.EINVAL,
    ),
    (
        "option-huge-disable-with-maps",
        U.IOMMU_OPTION,
        _v(U.IOMMU_OPTION, op=U.IOMMU_OPTION_OP_SET, val64=0),
        E.EINVAL,
    ),
    (
        "option-rlimit-object",
        U.IOMMU_OPTION,
        _v(U.IOMMU_OPTION, option_id=U.IOMMU_OPTION_RLIMIT_MODE),
        E.EOPNOTSUPP,
    ),
    (
        "option-rlimit-bad-op",
        U.IOMMU_OPTION,
        _v(U.IOMMU_OPTION, option_id=U.IOMMU_OPTION_RLIMIT_MODE, object_id=0, op=2),
        E.EOPNOTSUPP,
    ),
    (
        "option-rlimit-busy",
        U.IOMMU_OPTION,
        _v(
            U.IOMMU_OPTION,
            option_id=U.IOMMU_OPTION_RLIMIT_MODE,
            object_id=0,
            op=U.IOMMU_OPTION_OP_SET,
            val64=1,
        ),
        E.EBUSY,
    ),
    # IOMMU_VFIO_IOAS
    ("vfio-reserved", U.IOMMU_VFIO_IOAS, _v(U.IOMMU_VFIO_IOAS, reserved=1), E.EOPNOTSUPP),
    ("vfio-bad-op", U.IOMMU_VFIO_IOAS, _v(U.IOMMU_VFIO_IOAS, op=3), E.EOPNOTSUPP),
    (
        "vfio-get-unset",
        U.IOMMU_VFIO_IOAS,
        _v(U.IOMMU_VFIO_IOAS, op=U.IOMMU_VFIO_IOAS_GET),
        E.ENODEV,
    ),
    ("vfio-set-unknown", U.IOMMU_VFIO_IOAS, _v(U.IOMMU_VFIO_IOAS, ioas_id=999), E.ENOENT),
    (
        "vfio-set-wrong-type",
        U.IOMMU_VFIO_IOAS,
        _v(U.IOMMU_VFIO_IOAS, ioas_id=lambda s: s.hwpt_auto),
        E.ENOENT,
    ),
    # IOMMU_HWPT_ALLOC
    ("hwpt-reserved", U.IOMMU_HWPT_ALLOC, _v(U.IOMMU_HWPT_ALLOC, reserved=1), E.EOPNOTSUPP),
    ("hwpt-none-with-len", U.IOMMU_HWPT_ALLOC, _v(U.IOMMU_HWPT_ALLOC, data_len=8), E.EINVAL),
    (
        "hwpt-type-without-len",
        U.IOMMU_HWPT_ALLOC,
        _v(U.IOMMU_HWPT_ALLOC, data_type=U.IOMMU_HWPT_DATA_VTD_S1),
        E.EINVAL,
    ),
    ("hwpt-unknown-dev", U.IOMMU_HWPT_ALLOC, _v(U.IOMMU_HWPT_ALLOC, dev_id=999), E.ENOENT),
    (
        "hwpt-dev-wrong-type",
        U.IOMMU_HWPT_ALLOC,
        _v(U.IOMMU_HWPT_ALLOC, dev_id=lambda s: s.ioas),
        E.ENOENT,
    ),
    ("hwpt-unknown-pt", U.IOMMU_HWPT_ALLOC, _v(U.IOMMU_HWPT_ALLOC, pt_id=999), E.EINVAL),
    (
        "hwpt-pt-wrong-type",
        U.IOMMU_HWPT_ALLOC,
        _v(U.IOMMU_HWPT_ALLOC, pt_id=lambda s: s.dev_id),
        E.EINVAL,
    ),
    (
        "hwpt-pt-wrong-type-bad-fault",
        U.IOMMU_HWPT_ALLOC,
        _v(
            U.IOMMU_HWPT_ALLOC,
            pt_id=lambda s: s.dev_id,
            flags=U.IOMMU_HWPT_FAULT_ID_VALID,
            fault_id=999,
        ),
        E.EINVAL,
    ),
    ("hwpt-flags", U.IOMMU_HWPT_ALLOC, _v(U.IOMMU_HWPT_ALLOC, flags=0x10), E.EOPNOTSUPP),
    (
        "hwpt-unknown-fault",
        U.IOMMU_HWPT_ALLOC,
        _v(U.IOMMU_HWPT_ALLOC, flags=U.IOMMU_HWPT_FAULT_ID_VALID, fault_id=999),
        E.ENOENT,
    ),
    (
        "hwpt-fault-wrong-type",
        U.IOMMU_HWPT_ALLOC,
        _v(U.IOMMU_HWPT_ALLOC, flags=U.IOMMU_HWPT_FAULT_ID_VALID, fault_id=lambda s: s.ioas),
        E.ENOENT,
    ),
    (
        "hwpt-nest-parent-with-fault",
        U.IOMMU_HWPT_ALLOC,
        _v(U.IOMMU_HWPT_ALLOC, flags=U.IOMMU_HWPT_FAULT_ID_VALID | U.IOMMU_HWPT_ALLOC_NEST_PARENT),
        E.EOPNOTSUPP,
    ),
    # IOMMU_GET_HW_INFO
    ("hwinfo-flags", U.IOMMU_GET_HW_INFO, _v(U.IOMMU_GET_HW_INFO, flags=2), E.EOPNOTSUPP),
    (
        "hwinfo-reserved",
        U.IOMMU_GET_HW_INFO,
        _v(U.IOMMU_GET_HW_INFO, reserved=b"\0\0\1"),
        E.EOPNOTSUPP,
    ),
    ("hwinfo-unknown-dev", U.IOMMU_GET_HW_INFO, _v(U.IOMMU_GET_HW_INFO, dev_id=999), E.ENOENT),
    (
        "hwinfo-dev-wrong-type",
        U.IOMMU_GET_HW_INFO,
        _v(U.IOMMU_GET_HW_INFO, dev_id=lambda s: s.ioas),
        E.ENOENT,
    ),
    ("hwinfo-bad-pointer", U.IOMMU_GET_HW_INFO, _v(U.IOMMU_GET_HW_INFO, data_uptr=8), E.EFAULT),
    # IOMMU_HWPT_SET_DIRTY_TRACKING
    (
        "dirty-set-flags",
        U.IOMMU_HWPT_SET_DIRTY_TRACKING,
        _v(U.IOMMU_HWPT_SET_DIRTY_TRACKING, flags=2),
        E.EOPNOTSUPP,
    ),
    (
        "dirty-set-unknown",
        U.IOMMU_HWPT_SET_DIRTY_TRACKING,
        _v(U.IOMMU_HWPT_SET_DIRTY_TRACKING, hwpt_id=999),
        E.ENOENT,
    ),
    (
        "dirty-set-wrong-type",
        U.IOMMU_HWPT_SET_DIRTY_TRACKING,
        _v(U.IOMMU_HWPT_SET_DIRTY_TRACKING, hwpt_id=lambda s: s.ioas),
        E.ENOENT,
    ),
    (
        "dirty-set-not-capable",
        U.IOMMU_HWPT_SET_DIRTY_TRACKING,
        _v(U.IOMMU_HWPT_SET_DIRTY_TRACKING, hwpt_id=lambda s: s.hwpt_auto),
        E.EOPNOTSUPP,
    ),
    # IOMMU_HWPT_GET_DIRTY_BITMAP
    (
        "dirty-get-flags",
        U.IOMMU_HWPT_GET_DIRTY_BITMAP,
        _v(U.IOMMU_HWPT_GET_DIRTY_BITMAP, flags=2),
        E.EOPNOTSUPP,
    ),
    (
        "dirty-get-reserved",
        U.IOMMU_HWPT_GET_DIRTY_BITMAP,
        _v(U.IOMMU_HWPT_GET_DIRTY_BITMAP, reserved=1),
        E.EOPNOTSUPP,
    ),
    (
        "dirty-get-unknown",
        U.IOMMU_HWPT_GET_DIRTY_BITMAP,
        _v(U.IOMMU_HWPT_GET_DIRTY_BITMAP, hwpt_id=999),
        E.ENOENT,
    ),
    (
        "dirty-get-wrong-type",
        U.IOMMU_HWPT_GET_DIRTY_BITMAP,
        _v(U.IOMMU_HWPT_GET_DIRTY_BITMAP, hwpt_id=lambda s: s.dev_id),
        E.ENOENT,
    ),
    (
        "dirty-get-wraps",
        U.IOMMU_HWPT_GET_DIRTY_BITMAP,
        _v(U.IOMMU_HWPT_GET_DIRTY_BITMAP, iova=U64_MAX - PAGE + 1, length=2 * PAGE),
        E.EOVERFLOW,
    ),
    (
        "dirty-get-page-size-0",
        U.IOMMU_HWPT_GET_DIRTY_BITMAP,
        _v(U.IOMMU_HWPT_GET_DIRTY_BITMAP, page_size=0),
        E.EINVAL,
    ),
    (
        "dirty-get-unaligned-iova",
        U.IOMMU_HWPT_GET_DIRTY_BITMAP,
        _v(U.IOMMU_HWPT_GET_DIRTY_BITMAP, iova=lambda s: s.iova + 1),
        E.EINVAL,
    ),
    (
        "dirty-get-unaligned-end",
        U.IOMMU_HWPT_GET_DIRTY_BITMAP,
        _v(U.IOMMU_HWPT_GET_DIRTY_BITMAP, length=PAGE + 1),
        E.EINVAL,
    ),
    (
        "dirty-get-bad-range-before-caps",
        U.IOMMU_HWPT_GET_DIRTY_BITMAP,
        _v(U.IOMMU_HWPT_GET_DIRTY_BITMAP, hwpt_id=lambda s: s.hwpt_auto, page_size=0),
        E.EINVAL,
    ),
    (
        "dirty-get-not-capable",
        U.IOMMU_HWPT_GET_DIRTY_BITMAP,
        _v(U.IOMMU_HWPT_GET_DIRTY_BITMAP, hwpt_id=lambda s: s.hwpt_auto),
        E.EOPNOTSUPP,
    ),
    # IOMMU_HWPT_INVALIDATE
    (
        "inval-reserved",
        U.IOMMU_HWPT_INVALIDATE,
        _v(U.IOMMU_HWPT_INVALIDATE, reserved=1),
        E.EOPNOTSUPP,
    ),
    (
        "inval-entries-no-pointer",
        U.IOMMU_HWPT_INVALIDATE,
        _v(U.IOMMU_HWPT_INVALIDATE, entry_num=1, entry_len=16),
        E.EINVAL,
    ),
    (
        "inval-entries-no-len",
        U.IOMMU_HWPT_INVALIDATE,
        _v(U.IOMMU_HWPT_INVALIDATE, entry_num=1, data_uptr=lambda s: s.scratch),
        E.EINVAL,
    ),
    ("inval-unknown", U.IOMMU_HWPT_INVALIDATE, _v(U.IOMMU_HWPT_INVALIDATE, hwpt_id=999), E.ENOENT),
    ("inval-paging", U.IOMMU_HWPT_INVALIDATE, _v(U.IOMMU_HWPT_INVALIDATE), E.EINVAL),
    (
        "inval-ioas",
        U.IOMMU_HWPT_INVALIDATE,
        _v(U.IOMMU_HWPT_INVALIDATE, hwpt_id=lambda s: s.ioas),
        E.EINVAL,
    ),
    # IOMMU_FAULT_QUEUE_ALLOC
    (
        "fault-flags",
        U.IOMMU_FAULT_QUEUE_ALLOC,
        _v(U.IOMMU_FAULT_QUEUE_ALLOC, flags=1),
        E.EOPNOTSUPP,
    ),
    # IOMMU_IOAS_MAP_FILE
    ("mapfile-flags", U.IOMMU_IOAS_MAP_FILE, _v(U.IOMMU_IOAS_MAP_FILE, flags=RW | 8), E.EOPNOTSUPP),
    (
        "mapfile-iova-max",
        U.IOMMU_IOAS_MAP_FILE,
        _v(U.IOMMU_IOAS_MAP_FILE, iova=U64_MAX),
        E.EOVERFLOW,
    ),
    (
        "mapfile-length-max",
        U.IOMMU_IOAS_MAP_FILE,
        _v(U.IOMMU_IOAS_MAP_FILE, length=U64_MAX),
        E.EOVERFLOW,
    ),
    ("mapfile-no-prot", U.IOMMU_IOAS_MAP_FILE, _v(U.IOMMU_IOAS_MAP_FILE, flags=0), E.EINVAL),
    (
        "mapfile-unknown-ioas",
        U.IOMMU_IOAS_MAP_FILE,
        _v(U.IOMMU_IOAS_MAP_FILE, ioas_id=999),
        E.ENOENT,
    ),
    ("mapfile-bad-fd", U.IOMMU_IOAS_MAP_FILE, _v(U.IOMMU_IOAS_MAP_FILE, fd=77), E.EBADF),
    ("mapfile-negative-fd", U.IOMMU_IOAS_MAP_FILE, _v(U.IOMMU_IOAS_MAP_FILE, fd=-1), E.EBADF),
    (
        "mapfile-fixed-overlap",
        U.IOMMU_IOAS_MAP_FILE,
        _v(U.IOMMU_IOAS_MAP_FILE, flags=RW | FIXED, iova=lambda s: s.iova),
        E.EEXIST,
    ),
    # IOMMU_VIOMMU_ALLOC / VDEVICE / VEVENTQ / HW_QUEUE
    ("viommu-flags", U.IOMMU_VIOMMU_ALLOC, _v(U.IOMMU_VIOMMU_ALLOC, flags=1), E.EOPNOTSUPP),
    ("viommu-unknown-dev", U.IOMMU_VIOMMU_ALLOC, _v(U.IOMMU_VIOMMU_ALLOC, dev_id=999), E.ENOENT),
    ("viommu-unknown-hwpt", U.IOMMU_VIOMMU_ALLOC, _v(U.IOMMU_VIOMMU_ALLOC, hwpt_id=999), E.ENOENT),
    (
        "viommu-hwpt-wrong-type",
        U.IOMMU_VIOMMU_ALLOC,
        _v(U.IOMMU_VIOMMU_ALLOC, hwpt_id=lambda s: s.ioas),
        E.ENOENT,
    ),
    ("viommu-not-nest-parent", U.IOMMU_VIOMMU_ALLOC, _v(U.IOMMU_VIOMMU_ALLOC), E.EINVAL),
    # 7.2 asks get_viommu_size() before it looks the HWPT up, and never reads __reserved
    (
        "viommu-type-before-hwpt",
        U.IOMMU_VIOMMU_ALLOC,
        _v(U.IOMMU_VIOMMU_ALLOC, type=U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3, hwpt_id=999),
        E.EOPNOTSUPP,
    ),
    (
        "viommu-reserved-unread",
        U.IOMMU_VIOMMU_ALLOC,
        _v(U.IOMMU_VIOMMU_ALLOC, reserved=1),
        E.EINVAL,
    ),
    ("vdevice-unknown-viommu", U.IOMMU_VDEVICE_ALLOC, _v(U.IOMMU_VDEVICE_ALLOC), E.ENOENT),
    (
        "vdevice-viommu-wrong-type",
        U.IOMMU_VDEVICE_ALLOC,
        _v(U.IOMMU_VDEVICE_ALLOC, viommu_id=lambda s: s.ioas),
        E.ENOENT,
    ),
    ("veventq-flags", U.IOMMU_VEVENTQ_ALLOC, _v(U.IOMMU_VEVENTQ_ALLOC, flags=1), E.EOPNOTSUPP),
    (
        "veventq-reserved",
        U.IOMMU_VEVENTQ_ALLOC,
        _v(U.IOMMU_VEVENTQ_ALLOC, reserved=1),
        E.EOPNOTSUPP,
    ),
    ("veventq-unknown-viommu", U.IOMMU_VEVENTQ_ALLOC, _v(U.IOMMU_VEVENTQ_ALLOC), E.ENOENT),
    ("hwqueue-flags", U.IOMMU_HW_QUEUE_ALLOC, _v(U.IOMMU_HW_QUEUE_ALLOC, flags=1), E.EOPNOTSUPP),
    ("hwqueue-unknown-viommu", U.IOMMU_HW_QUEUE_ALLOC, _v(U.IOMMU_HW_QUEUE_ALLOC), E.ENOENT),
    # IOMMU_IOAS_CHANGE_PROCESS
    (
        "chproc-reserved",
        U.IOMMU_IOAS_CHANGE_PROCESS,
        _v(U.IOMMU_IOAS_CHANGE_PROCESS, reserved=1),
        E.EOPNOTSUPP,
    ),
    (
        "chproc-user-mappings",
        U.IOMMU_IOAS_CHANGE_PROCESS,
        _v(U.IOMMU_IOAS_CHANGE_PROCESS),
        E.EINVAL,
    ),
]


@pytest.mark.parametrize(("name", "cmd", "build", "code"), CASES, ids=[c[0] for c in CASES])
def test_errno(name: str, cmd: int, build: Callable[[Scenario], Any], code: int) -> None:
    sc = Scenario()
    st = build(sc)
    expect_errno(sc.fd, cmd, st, code)
    check_invariants(sc.fd)


def test_every_command_has_error_cases() -> None:
    from iommufd_model.core.main import registered_ops

    covered = {c[1] for c in CASES}
    assert {c for c in registered_ops() if (c & 0xFF) <= 0x94} <= covered


# -- behaviours that return data alongside (or instead of) an error --------------------
def test_iova_ranges_emsgsize_reports_the_real_count() -> None:
    sc = Scenario()
    st = U.IommuIoasIovaRanges(size=32, ioas_id=sc.ioas, num_iovas=0, allowed_iovas=0)
    buf = bytearray(st.pack())
    before = snapshot(sc.fd)
    assert run(sc.fd, U.IOMMU_IOAS_IOVA_RANGES, buf) == errno.EMSGSIZE
    out = U.IommuIoasIovaRanges.unpack(buf)
    assert out.num_iovas == 1  # the mock aperture leaves one usable hole
    assert out.out_iova_alignment == sc.fd.objects.get_ioas(sc.ioas).iopt.iova_alignment
    assert snapshot(sc.fd) == before
    # With room for it, the hole is the mock aperture.
    out = ioctl(
        sc.fd, U.IOMMU_IOAS_IOVA_RANGES, attrs.evolve(out, num_iovas=4, allowed_iovas=sc.scratch)
    )
    assert out.num_iovas == 1
    r = U.IommuIovaRange.unpack(sc.proc.read(sc.scratch, 16))
    assert (r.start, r.last) == (1 << 24, (1 << 31) - 1)


def test_iova_ranges_empty_ioas_is_everything() -> None:
    sc = Scenario()
    out = ioctl(
        sc.fd,
        U.IOMMU_IOAS_IOVA_RANGES,
        U.IommuIoasIovaRanges(ioas_id=sc.ioas2, num_iovas=1, allowed_iovas=sc.scratch),
    )
    assert out.num_iovas == 1 and out.out_iova_alignment == 1
    r = U.IommuIovaRange.unpack(sc.proc.read(sc.scratch, 16))
    assert (r.start, r.last) == (0, U64_MAX)


def test_unmap_all_returns_bytes_unmapped() -> None:
    sc = Scenario()
    ioas_map(sc.fd, sc.ioas, sc.va + (1 << 16), 3 * PAGE)
    assert ioas_unmap(sc.fd, sc.ioas, 0, U64_MAX) == (1 << 16) + 3 * PAGE
    # Unmap-all of an empty IOAS succeeds with 0 bytes (ENOENT is only for ranges).
    assert ioas_unmap(sc.fd, sc.ioas, 0, U64_MAX) == 0
    check_invariants(sc.fd)


def test_unmap_whole_areas_returns_their_length() -> None:
    sc = Scenario()
    second = ioas_map(sc.fd, sc.ioas, sc.va + (1 << 16), 2 * PAGE, iova=sc.iova + (1 << 16))
    assert second == sc.iova + (1 << 16)
    # One call covering both adjacent areas and some empty space around them.
    assert ioas_unmap(sc.fd, sc.ioas, sc.iova - PAGE, (1 << 20)) == (1 << 16) + 2 * PAGE
    check_invariants(sc.fd)


def test_option_huge_pages_get_set() -> None:
    sc = Scenario()

    def opt(op: int, val: int = 0, obj: int = sc.ioas2) -> int:
        st = U.IommuOption(option_id=U.IOMMU_OPTION_HUGE_PAGES, op=op, object_id=obj, val64=val)
        return int(ioctl(sc.fd, U.IOMMU_OPTION, st).val64)

    assert opt(U.IOMMU_OPTION_OP_GET) == 1
    opt(U.IOMMU_OPTION_OP_SET, 0)
    assert opt(U.IOMMU_OPTION_OP_GET) == 0
    opt(U.IOMMU_OPTION_OP_SET, 1)
    assert opt(U.IOMMU_OPTION_OP_GET) == 1


def test_option_rlimit_mode() -> None:
    sc = Scenario()
    fd = sc.proc.open_iommufd()

    def rl(op: int, val: int = 0) -> int:
        st = U.IommuOption(option_id=U.IOMMU_OPTION_RLIMIT_MODE, op=op, val64=val)
        return int(ioctl(fd, U.IOMMU_OPTION, st).val64)

    assert rl(U.IOMMU_OPTION_OP_GET) == 0
    rl(U.IOMMU_OPTION_OP_SET, 1)
    assert rl(U.IOMMU_OPTION_OP_GET) == 1
    bad = U.IommuOption(
        size=24, option_id=U.IOMMU_OPTION_RLIMIT_MODE, op=U.IOMMU_OPTION_OP_SET, val64=2
    )
    expect_errno(fd, U.IOMMU_OPTION, bad, errno.EINVAL)
    sc.proc.capable_sys_resource = False
    expect_errno(fd, U.IOMMU_OPTION, attrs.evolve(bad, val64=0), errno.EPERM)
    sc.proc.capable_sys_resource = True
    # Any object makes the mode immutable.
    ioctl(fd, U.IOMMU_IOAS_ALLOC, U.IommuIoasAlloc())
    expect_errno(fd, U.IOMMU_OPTION, attrs.evolve(bad, val64=0), errno.EBUSY)
    assert rl(U.IOMMU_OPTION_OP_GET) == 1


def test_vfio_ioas_get_set_clear() -> None:
    sc = Scenario()

    def vfio(op: int, ioas_id: int = 0) -> int:
        return int(ioctl(sc.fd, U.IOMMU_VFIO_IOAS, U.IommuVfioIoas(ioas_id=ioas_id, op=op)).ioas_id)

    get = U.IommuVfioIoas(size=12, op=U.IOMMU_VFIO_IOAS_GET)
    expect_errno(sc.fd, U.IOMMU_VFIO_IOAS, get, errno.ENODEV)
    vfio(U.IOMMU_VFIO_IOAS_SET, sc.ioas2)
    assert vfio(U.IOMMU_VFIO_IOAS_GET) == sc.ioas2
    vfio(U.IOMMU_VFIO_IOAS_CLEAR)
    expect_errno(sc.fd, U.IOMMU_VFIO_IOAS, get, errno.ENODEV)
    # Destroying the compat IOAS unsets it.
    vfio(U.IOMMU_VFIO_IOAS_SET, sc.spare)
    ioctl(sc.fd, U.IOMMU_DESTROY, U.IommuDestroy(id=sc.spare))
    expect_errno(sc.fd, U.IOMMU_VFIO_IOAS, get, errno.ENODEV)


def test_destroy_order_ioas_hwpt() -> None:
    """An IOAS is busy while a HWPT references it; free once the HWPT goes."""
    sc = Scenario()
    destroy_ioas = U.IommuDestroy(size=8, id=sc.ioas)
    expect_errno(sc.fd, U.IOMMU_DESTROY, destroy_ioas, errno.EBUSY)
    ioctl(sc.fd, U.IOMMU_DESTROY, U.IommuDestroy(id=sc.hwpt_dirty))
    expect_errno(sc.fd, U.IOMMU_DESTROY, destroy_ioas, errno.EBUSY)  # the auto domain
    sc.fd.detach(sc.dev_id)
    ioctl(sc.fd, U.IOMMU_DESTROY, destroy_ioas)
    assert sc.ioas not in sc.fd.objects.ids()
    check_invariants(sc.fd)


def test_hwpt_invalidate_reports_zero_entries_on_error() -> None:
    sc = Scenario()
    valid = valid_cmd(sc, U.IOMMU_HWPT_INVALIDATE)
    assert isinstance(valid, U.IommuHwptInvalidate)
    st = attrs.evolve(
        valid,
        entry_num=5,
        hwpt_id=999,
        entry_len=16,
        data_uptr=sc.scratch,
    )
    buf = bytearray(st.pack())
    assert run(sc.fd, U.IOMMU_HWPT_INVALIDATE, buf) == errno.ENOENT
    assert U.IommuHwptInvalidate.unpack(buf).entry_num == 0


def test_fault_alloc_then_hwpt_with_fault() -> None:
    sc = Scenario()
    fault = ioctl(sc.fd, U.IOMMU_FAULT_QUEUE_ALLOC, U.IommuFaultAlloc())
    assert fault.out_fault_fd in sc.proc.files
    out = ioctl(
        sc.fd,
        U.IOMMU_HWPT_ALLOC,
        U.IommuHwptAlloc(
            dev_id=sc.dev_id,
            pt_id=sc.ioas,
            flags=U.IOMMU_HWPT_FAULT_ID_VALID,
            fault_id=fault.out_fault_id,
        ),
    )
    check_invariants(sc.fd)
    expect_errno(sc.fd, U.IOMMU_DESTROY, U.IommuDestroy(size=8, id=fault.out_fault_id), errno.EBUSY)
    ioctl(sc.fd, U.IOMMU_DESTROY, U.IommuDestroy(id=out.out_hwpt_id))
    check_invariants(sc.fd)


def test_iova_ranges_ignores_the_allowed_list() -> None:
    """IOVA_RANGES reports the holes of the reserved tree only; ALLOW_IOVAS does not show."""
    sc = Scenario()
    ioctl(
        sc.fd,
        U.IOMMU_IOAS_ALLOW_IOVAS,
        U.IommuIoasAllowIovas(
            ioas_id=sc.ioas2,
            num_iovas=2,
            allowed_iovas=_ranges(sc, (0x10000, 0x1FFFF), (0x40000, 0x4FFFF)),
        ),
    )
    out = ioctl(
        sc.fd,
        U.IOMMU_IOAS_IOVA_RANGES,
        U.IommuIoasIovaRanges(ioas_id=sc.ioas2, num_iovas=4, allowed_iovas=sc.scratch + PAGE),
    )
    assert out.num_iovas == 1
    r = U.IommuIovaRange.unpack(sc.proc.read(sc.scratch + PAGE, 16))
    assert (r.start, r.last) == (0, U64_MAX)
