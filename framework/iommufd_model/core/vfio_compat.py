"""The VFIO type1 container ioctls on /dev/iommu (the kernel's vfio_compat.c).

``IommuFd.ioctl`` sends every command whose number is outside iommufd's own range here, as
``iommufd_fops_ioctl()`` does; what is not a VFIO command is ENOTTY. The commands act on the
*compat IOAS* (``IOMMU_VFIO_IOAS`` SET, or ENODEV when there is none). Unlike iommufd's
commands they follow VFIO's conventions: ``argsz`` instead of ``size``, a plain integer
argument for VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU, and a result in the return value.

``arg`` is the user memory at the ioctl argument (a writable buffer, as for the iommufd
commands) or, for the integer-argument commands, an ``int``.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Any

from iommufd_model.core.ioas import Ioas
from iommufd_model.driver import IOMMU_CACHE, IOMMU_READ, IOMMU_WRITE
from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.uapi import iommufd as U
from iommufd_model.uapi.vfio import (
    VFIO_API_VERSION,
    VFIO_CHECK_EXTENSION,
    VFIO_DMA_CC_IOMMU,
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    VFIO_GET_API_VERSION,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_INFO_PGSIZES,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_SET_IOMMU,
    VFIO_TYPE1_IOMMU,
    VFIO_UNMAP_ALL,
    VFIO_TYPE1v2_IOMMU,
)

if TYPE_CHECKING:
    from iommufd_model.core.main import IommuFd
    from iommufd_model.process import Process

INFO_SIZE = 24  # struct vfio_iommu_type1_info {argsz, flags, iova_pgsizes, cap_offset, pad}
INFO_MINSZ = 16  # offsetofend(iova_pgsizes)
MAP_MINSZ = 32  # offsetofend(struct vfio_iommu_type1_dma_map, size)
UNMAP_MINSZ = 24  # offsetofend(struct vfio_iommu_type1_dma_unmap, size)
DMA_AVAIL_SIZE = 12  # struct vfio_iommu_type1_info_dma_avail {header, avail}
IOVA_CAP_SIZE = 16  # struct vfio_iommu_type1_info_cap_iova_range without its ranges
IOVA_RANGE_SIZE = 16  # struct vfio_iova_range {start, end}
U32_MAX = (1 << 32) - 1
ULONG_MAX = U.U64_MAX

# run/server.py and the tests take the VFIO numbers from here too
__all__ = [
    "VFIO_API_VERSION",
    "VFIO_CHECK_EXTENSION",
    "VFIO_DMA_CC_IOMMU",
    "VFIO_DMA_MAP_FLAG_READ",
    "VFIO_DMA_MAP_FLAG_WRITE",
    "VFIO_DMA_UNMAP_FLAG_ALL",
    "VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP",
    "VFIO_GET_API_VERSION",
    "VFIO_IOMMU_GET_INFO",
    "VFIO_IOMMU_INFO_CAPS",
    "VFIO_IOMMU_INFO_PGSIZES",
    "VFIO_IOMMU_MAP_DMA",
    "VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE",
    "VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL",
    "VFIO_IOMMU_UNMAP_DMA",
    "VFIO_SET_IOMMU",
    "VFIO_TYPE1_IOMMU",
    "VFIO_UNMAP_ALL",
    "VFIO_TYPE1v2_IOMMU",
    "compat_ioas",
    "compat_ioas_create",
    "vfio_ioctl",
]

VFIO_COMMANDS = frozenset(
    {
        VFIO_GET_API_VERSION,
        VFIO_CHECK_EXTENSION,
        VFIO_SET_IOMMU,
        VFIO_IOMMU_GET_INFO,
        VFIO_IOMMU_MAP_DMA,
        VFIO_IOMMU_UNMAP_DMA,
    }
)


def compat_ioas(ictx: IommuFd) -> Ioas:
    """``get_compat_ioas()``: the IOAS set with IOMMU_VFIO_IOAS, else ENODEV."""
    if ictx.vfio_ioas is None:
        raise err(errno.ENODEV, "no VFIO compatibility IOAS")
    return ictx.vfio_ioas


def compat_ioas_create(ictx: IommuFd) -> Ioas:
    """``iommufd_vfio_compat_ioas_create()``: a VFIO group set to this iommufd as its
    container makes the compat IOAS if there is none; it is an ordinary IOAS (its id from
    IOMMU_VFIO_IOAS GET, destroyed at close)."""
    if ictx.vfio_ioas is not None:
        return ictx.vfio_ioas
    ioas = Ioas(ictx)
    ictx.objects.alloc_id(ioas)
    ictx.vfio_ioas = ioas
    return ioas


def vfio_ioctl(ictx: IommuFd, cmd: int, arg: Any, caller: Process) -> int:
    """``iommufd_vfio_ioctl()``; an unknown command is ENOTTY (ENOIOCTLCMD)."""
    if cmd == VFIO_GET_API_VERSION:
        return VFIO_API_VERSION
    if cmd == VFIO_CHECK_EXTENSION:
        return _check_extension(ictx, _int_arg(arg))
    if cmd == VFIO_SET_IOMMU:
        return _set_iommu(ictx, _int_arg(arg))
    if cmd in (VFIO_IOMMU_GET_INFO, VFIO_IOMMU_MAP_DMA, VFIO_IOMMU_UNMAP_DMA):
        if not isinstance(arg, (bytearray, memoryview)) or (
            isinstance(arg, memoryview) and arg.readonly
        ):
            raise err(errno.EFAULT, "ioctl argument must be a writable buffer")
        if cmd == VFIO_IOMMU_GET_INFO:
            return _get_info(ictx, arg)
        if cmd == VFIO_IOMMU_MAP_DMA:
            return _map_dma(ictx, arg, caller)
        return _unmap_dma(ictx, arg)
    # VFIO_IOMMU_DIRTY_PAGES and anything else
    raise err(errno.ENOTTY, f"unknown iommufd / VFIO ioctl {cmd:#x}")


def _int_arg(arg: Any) -> int:
    if isinstance(arg, int):
        return arg & ULONG_MAX
    raise err(errno.EINVAL, "this VFIO ioctl takes an integer argument")


def _copy_from(arg: Any, n: int) -> bytes:
    if len(arg) < n:
        raise err(errno.EFAULT, f"argument shorter than the {n} bytes VFIO reads")
    return bytes(arg[:n])


def _copy_to(arg: Any, offset: int, data: bytes) -> None:
    if offset + len(data) > len(arg):
        raise err(errno.EFAULT, "argument shorter than what VFIO writes")
    arg[offset : offset + len(data)] = data


def _check_extension(ictx: IommuFd, ext: int) -> int:
    if ext in (VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU, VFIO_UNMAP_ALL):
        return 1
    if ext == VFIO_DMA_CC_IOMMU:
        # every mapping iommufd makes carries IOMMU_CACHE; asks for a compat IOAS first
        compat_ioas(ictx)
        return 1
    # VFIO_NOIOMMU_IOMMU (no CONFIG_VFIO_NOIOMMU in the model), the reserved nesting type,
    # VFIO_UPDATE_VADDR (deliberately never supported) and unknown extensions
    return 0


def _set_iommu(ictx: IommuFd, type_: int) -> int:
    if type_ not in (VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU):
        raise err(errno.EINVAL, f"VFIO iommu type {type_} not emulated")
    ioas = compat_ioas(ictx)  # VFIO fails SET_IOMMU without a group
    if type_ == VFIO_TYPE1_IOMMU:
        # type1 may unmap inside a mapping: emulated by forbidding large IOPTEs
        ioas.iopt.allow_large_pages = False
    return 0


def _pagesizes(ioas: Ioas) -> int:
    """``iommufd_get_pagesizes()``: the domains' common sizes, at least PAGE_SIZE."""
    bitmap = ULONG_MAX
    for domain in ioas.iopt.domains:
        bitmap &= domain.pgsize_bitmap
    if bitmap & (PAGE_SIZE - 1):  # see vfio_update_pgsize_bitmap()
        bitmap = (bitmap & ~(PAGE_SIZE - 1)) | PAGE_SIZE
    return max(bitmap, ioas.iopt.iova_alignment)


def _fill_dma_avail(ioas: Ioas, arg: Any, offset: int | None, avail: int) -> int:
    if offset is not None and avail >= DMA_AVAIL_SIZE:
        header = struct.pack("<HHI", VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1, 0)
        _copy_to(arg, offset, header + struct.pack("<I", U32_MAX))
    return DMA_AVAIL_SIZE


def _fill_iova(ioas: Ioas, arg: Any, offset: int | None, avail: int) -> int:
    ranges = ioas.iopt.iova_ranges()  # the holes between reserved ranges
    n = 0
    for start, last in ranges:
        if offset is not None and avail >= IOVA_CAP_SIZE + IOVA_RANGE_SIZE * (n + 1):
            pos = offset + IOVA_CAP_SIZE + IOVA_RANGE_SIZE * n
            _copy_to(arg, pos, struct.pack("<QQ", start, last))
        n += 1
    size = IOVA_CAP_SIZE + IOVA_RANGE_SIZE * n
    if offset is not None and avail >= size:
        header = struct.pack("<HHI", VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0)
        _copy_to(arg, offset, header + struct.pack("<II", n, 0))
    return size


def _get_info(ictx: IommuFd, arg: Any) -> int:
    """``iommufd_vfio_iommu_get_info()``: the info struct, then a capability chain.

    The chain (DMA_AVAIL, then IOVA_RANGE, each 8-byte aligned) is written only as far as
    ``argsz`` reaches; ``argsz`` comes back as the size that holds it all, and
    ``cap_offset`` is set only when the whole chain fit. Nothing past ``argsz`` is written.
    """
    argsz, _flags, _pgsizes = struct.unpack("<IIQ", _copy_from(arg, INFO_MINSZ))
    if argsz < INFO_MINSZ:
        raise err(errno.EINVAL, "argsz below the minimum")
    minsz = min(argsz, INFO_SIZE)
    ioas = compat_ioas(ictx)
    flags = VFIO_IOMMU_INFO_PGSIZES
    pgsizes = _pagesizes(ioas)
    total = INFO_SIZE
    last_cap: int | None = None
    for fill in (_fill_dma_avail, _fill_iova):
        room = argsz > total
        size = fill(ioas, arg, total if room else None, argsz - total if room else 0)
        size = (size + 7) & ~7
        if last_cap is not None and argsz >= total:
            _copy_to(arg, last_cap + 4, struct.pack("<I", total))  # the previous cap's next
        last_cap = total
        total += size
    cap_offset = INFO_SIZE if argsz >= total else 0
    info = struct.pack("<IIQII", total, flags | VFIO_IOMMU_INFO_CAPS, pgsizes, cap_offset, 0)
    _copy_to(arg, 0, info[:minsz])
    return 0


def _map_dma(ictx: IommuFd, arg: Any, caller: Process) -> int:
    argsz, flags, vaddr, iova, size = struct.unpack("<IIQQQ", _copy_from(arg, MAP_MINSZ))
    if argsz < MAP_MINSZ or flags & ~(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE):
        raise err(errno.EINVAL, "bad argsz or map flags")
    prot = IOMMU_CACHE
    if flags & VFIO_DMA_MAP_FLAG_READ:
        prot |= IOMMU_READ
    if flags & VFIO_DMA_MAP_FLAG_WRITE:
        prot |= IOMMU_WRITE
    ioas = compat_ioas(ictx)
    # always at the given IOVA; accounted as the iommufd's RLIMIT_MODE says
    ioas.iopt.map_user(caller, vaddr, size, iova, prot, account_mm=ictx.account_mode == 1)
    return 0


def _unmap_dma(ictx: IommuFd, arg: Any) -> int:
    """``iommufd_vfio_unmap_dma()``: the unmapped size is written back even on failure.

    Type1 (large pages disabled) first cuts the areas at the range's ends, as the kernel's
    ``iopt_cut_iova()`` (no cut before IOVA 0), so an unmap inside a mapping succeeds; a
    failing cut fails the call before anything is unmapped or written back. Under type1v2
    such an unmap fails with ENOENT. An unmap that finds nothing mapped succeeds with size 0;
    a zero size (without UNMAP_FLAG_ALL) is EINVAL, a wrapping range EOVERFLOW.
    """
    argsz, flags, iova, size = struct.unpack("<IIQQ", _copy_from(arg, UNMAP_MINSZ))
    if argsz < UNMAP_MINSZ or flags & ~VFIO_DMA_UNMAP_FLAG_ALL:
        raise err(errno.EINVAL, "bad argsz or unmap flags")
    ioas = compat_ioas(ictx)
    unmapped = 0
    failure: OSError | None = None
    if flags & VFIO_DMA_UNMAP_FLAG_ALL:
        if iova or size:
            raise err(errno.EINVAL, "UNMAP_FLAG_ALL takes iova 0 and size 0")
        unmapped = ioas.iopt.unmap_all()
    else:
        if not ioas.iopt.allow_large_pages:
            # The cuts of iommufd_vfio_unmap_dma(): the last byte, then the byte before iova.
            last = (iova + size - 1) & ULONG_MAX
            ioas.iopt.cut_iova([last, iova - 1] if iova else [last])
        try:
            # iopt_unmap_iova(): a zero length is EINVAL and a range past the end of the
            # address space EOVERFLOW (after the type1 cuts above, as the kernel orders them).
            if not size:
                raise err(errno.EINVAL, "unmap of size 0 without UNMAP_FLAG_ALL")
            if iova + size - 1 > ULONG_MAX:
                raise err(errno.EOVERFLOW, "unmap range wraps past the last IOVA")
            if _anything_mapped(ioas, iova, size):
                unmapped = ioas.iopt.unmap(iova, size)
        except OSError as exc:
            failure = exc
    _copy_to(arg, 16, struct.pack("<Q", unmapped))
    if failure is not None:
        raise failure
    return 0


def _anything_mapped(ioas: Ioas, iova: int, size: int) -> bool:
    return ioas.iopt.maps_any(iova, min(iova + size - 1, ULONG_MAX))
