"""IOAS objects and their ioctls (the kernel's ioas.c); the address space is an IoPagetable."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from iommufd_model.core.accounting import (
    ACCOUNT_MM,
    ACCOUNT_MODE_NUM,
    charge_current,
    update_pinned,
)
from iommufd_model.core.io_pagetable import IoPagetable
from iommufd_model.core.objects import IommufdObject, ObjType
from iommufd_model.core.ucmd import Ucmd, ioctl_op
from iommufd_model.driver import IOMMU_CACHE, IOMMU_READ, IOMMU_WRITE
from iommufd_model.errors import err
from iommufd_model.process import MemFile
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_model.core.hw_pagetable import HwptPaging
    from iommufd_model.core.main import IommuFd
    from iommufd_model.core.pages import Pages
    from iommufd_model.process import Process

MAP_FLAGS = U.IOMMU_IOAS_MAP_FIXED_IOVA | U.IOMMU_IOAS_MAP_WRITEABLE | U.IOMMU_IOAS_MAP_READABLE
ULONG_MAX = U.U64_MAX
RANGE_SIZE = U.IommuIovaRange.SIZE


class Ioas(IommufdObject):
    """An IO address space: IOVA -> user memory, mirrored into every attached paging domain."""

    TYPE = ObjType.IOAS

    def __init__(self, ictx: IommuFd) -> None:
        super().__init__(ictx)
        self.iopt = IoPagetable(ictx.machine.memory)
        self.hwpt_list: list[HwptPaging] = []

    def destroy(self) -> None:
        self.iopt.unmap_all()


def conv_prot(flags: int) -> int:
    """``conv_iommu_prot()``: iommufd requires coherent DMA, so IOMMU_CACHE is always set."""
    prot = IOMMU_CACHE
    if flags & U.IOMMU_IOAS_MAP_WRITEABLE:
        prot |= IOMMU_WRITE
    if flags & U.IOMMU_IOAS_MAP_READABLE:
        prot |= IOMMU_READ
    return prot


def _check_map_flags(flags: int) -> None:
    if not flags & (U.IOMMU_IOAS_MAP_WRITEABLE | U.IOMMU_IOAS_MAP_READABLE):
        raise err(errno.EINVAL, "a mapping must be readable or writeable")


def _map_cmd(ucmd: Ucmd, *zero: str) -> Any:
    """The struct of IOAS_MAP, IOAS_MAP_FILE or IOAS_COPY once its first check passed: its
    flags are map flags and its ``zero`` fields are zero (EOPNOTSUPP otherwise)."""
    cmd = ucmd.zeroed(*zero)
    if cmd.flags & ~MAP_FLAGS:
        raise err(errno.EOPNOTSUPP, f"unknown map flags {cmd.flags & ~MAP_FLAGS:#x}")
    return cmd


def _map_target(ucmd: Ucmd) -> Ioas:
    """What IOAS_MAP and IOAS_MAP_FILE check, in the kernel's order, once their flags passed:
    ``iova`` and ``length`` fit an unsigned long (EOVERFLOW), the mapping is readable or
    writeable (EINVAL), then the IOAS they map into."""
    cmd = ucmd.cmd
    if cmd.iova >= ULONG_MAX or cmd.length >= ULONG_MAX:
        raise err(errno.EOVERFLOW)
    _check_map_flags(cmd.flags)
    return ucmd.ictx.objects.get_ioas(cmd.ioas_id)


def _placement(ucmd: Ucmd) -> tuple[int | None, int, bool]:
    """How an IOAS_MAP / IOAS_MAP_FILE mapping is placed and charged: the fixed IOVA (None
    to let the IOAS choose), the IOMMU protection, and whether pinned pages count against the
    mm (IOMMU_OPTION_RLIMIT_MODE 1) rather than the user."""
    cmd = ucmd.cmd
    fixed = cmd.iova if cmd.flags & U.IOMMU_IOAS_MAP_FIXED_IOVA else None
    return fixed, conv_prot(cmd.flags), ucmd.ictx.account_mode == 1


@ioctl_op(U.IOMMU_IOAS_ALLOC, U.IommuIoasAlloc, "out_ioas_id")
def _ioas_alloc(ucmd: Ucmd) -> None:
    cmd = ucmd.zeroed("flags")
    ioas = Ioas(ucmd.ictx)
    cmd.out_ioas_id = ucmd.ictx.objects.alloc_id(ioas)
    ucmd.respond()


@ioctl_op(U.IOMMU_IOAS_IOVA_RANGES, U.IommuIoasIovaRanges, "out_iova_alignment")
def _iova_ranges(ucmd: Ucmd) -> None:
    cmd = ucmd.zeroed("reserved")
    ioas = ucmd.ictx.objects.get_ioas(cmd.ioas_id)
    ranges = ioas.iopt.iova_ranges()
    max_iovas = cmd.num_iovas
    # One copy_to_user per range, as the kernel: a fault leaves the earlier ranges written.
    for i, (s, last) in enumerate(ranges[:max_iovas]):
        ucmd.caller.write(cmd.allowed_iovas + i * RANGE_SIZE, U.IommuIovaRange(s, last).pack())
    cmd.num_iovas = len(ranges)
    cmd.out_iova_alignment = ioas.iopt.iova_alignment
    ucmd.respond()
    if len(ranges) > max_iovas:
        raise err(errno.EMSGSIZE, f"{len(ranges)} ranges, room for {max_iovas}")


@ioctl_op(U.IOMMU_IOAS_ALLOW_IOVAS, U.IommuIoasAllowIovas, "allowed_iovas")
def _allow_iovas(ucmd: Ucmd) -> None:
    cmd = ucmd.zeroed("reserved")
    ioas = ucmd.ictx.objects.get_ioas(cmd.ioas_id)
    ranges: list[tuple[int, int]] = []
    for i in range(cmd.num_iovas):
        r = U.IommuIovaRange.unpack(
            ucmd.caller.read(cmd.allowed_iovas + i * RANGE_SIZE, RANGE_SIZE)
        )
        if r.start >= r.last:
            raise err(errno.EINVAL, f"allowed range {i} is empty or inverted")
        if any(not (r.last < s or r.start > last) for s, last in ranges):
            raise err(errno.EINVAL, f"allowed range {i} overlaps another")
        ranges.append((r.start, r.last))
    ioas.iopt.set_allowed(ranges)


@ioctl_op(U.IOMMU_IOAS_MAP, U.IommuIoasMap, "iova")
def _ioas_map(ucmd: Ucmd) -> None:
    cmd = _map_cmd(ucmd, "reserved")
    ioas = _map_target(ucmd)
    fixed, prot, account_mm = _placement(ucmd)
    cmd.iova = ioas.iopt.map_user(
        ucmd.caller, cmd.user_va, cmd.length, fixed, prot, account_mm=account_mm
    )
    ucmd.respond()


@ioctl_op(U.IOMMU_IOAS_MAP_FILE, U.IommuIoasMapFile, "iova")
def _ioas_map_file(ucmd: Ucmd) -> None:
    cmd = _map_cmd(ucmd)
    ioas = _map_target(ucmd)
    file = ucmd.caller.files.get(cmd.fd)
    if file is None:
        raise err(errno.EBADF, f"fd {cmd.fd} is not open")
    if not isinstance(file, MemFile):
        raise err(errno.EINVAL, "IOAS_MAP_FILE needs a memfd")
    # A dma-buf (a MemFile that exports a physical range) is checked when mapped, as
    # iopt_map_dmabuf(): its range must fit (EINVAL) and it must not be revoked (ENODEV).
    check_map = getattr(file, "check_map", None)
    if check_map is not None:
        check_map(cmd.start, cmd.length)
    fixed, prot, account_mm = _placement(ucmd)
    cmd.iova = ioas.iopt.map_file(
        file, cmd.start, cmd.length, fixed, prot, ucmd.caller, account_mm=account_mm
    )
    ucmd.respond()


@ioctl_op(U.IOMMU_IOAS_COPY, U.IommuIoasCopy, "src_iova")
def _ioas_copy(ucmd: Ucmd) -> None:
    cmd = _map_cmd(ucmd)
    if cmd.length >= ULONG_MAX or cmd.src_iova >= ULONG_MAX or cmd.dst_iova >= ULONG_MAX:
        raise err(errno.EOVERFLOW)
    _check_map_flags(cmd.flags)
    objs = ucmd.ictx.objects
    src = objs.get_ioas(cmd.src_ioas_id)
    # The kernel takes the source pages first, so a bad source is reported before the dest.
    src.iopt.check_copy_source(cmd.src_iova, cmd.length)
    dst = objs.get_ioas(cmd.dst_ioas_id)
    fixed = cmd.dst_iova if cmd.flags & U.IOMMU_IOAS_MAP_FIXED_IOVA else None
    cmd.dst_iova = dst.iopt.copy_from(
        src.iopt, cmd.src_iova, cmd.length, fixed, conv_prot(cmd.flags)
    )
    ucmd.respond()


@ioctl_op(U.IOMMU_IOAS_UNMAP, U.IommuIoasUnmap, "length")
def _ioas_unmap(ucmd: Ucmd) -> None:
    cmd = ucmd.cmd
    ioas = ucmd.ictx.objects.get_ioas(cmd.ioas_id)
    if cmd.iova == 0 and cmd.length == U.U64_MAX:
        unmapped = ioas.iopt.unmap_all()
    else:
        if cmd.iova >= ULONG_MAX or cmd.length >= ULONG_MAX:
            raise err(errno.EOVERFLOW)
        unmapped = ioas.iopt.unmap(cmd.iova, cmd.length)
    cmd.length = unmapped
    ucmd.respond()


@ioctl_op(U.IOMMU_IOAS_CHANGE_PROCESS, U.IommuIoasChangeProcess, "reserved")
def _change_process(ucmd: Ucmd) -> None:
    ucmd.zeroed("reserved")
    ioases = [o for o in ucmd.ictx.objects if isinstance(o, Ioas)]
    change_process([ioas.iopt for ioas in ioases], ucmd.caller)


def change_process(iopts: Sequence[IoPagetable], proc: Process) -> None:
    """``iommufd_ioas_change_process()`` (Linux 7.2 ioas.c) over every IOAS of a context:
    the caller ``proc`` becomes the source of every area's pages.

    EINVAL unless every area maps a memfd (IOAS_MAP_FILE; a dma-buf is refused too). The
    charges move as there: what every pages needing it (``need_charge_update()``) has
    charged is charged to the caller first, per account mode (``charge_current()``: ENOMEM
    over the caller's limits, nothing changed), then uncharged from the old source, and
    every pages takes the caller as its source (``change_mm()``). Pages of ACCOUNT_NONE
    (mapped by a caller with CAP_IPC_LOCK) move without their charge: their pins stay in the
    old mm's ``pinned_vm`` and are later unpinned from the new one's, as 7.2 does."""
    for iopt in iopts:
        if not iopt.all_areas_from_files():
            raise err(errno.EINVAL, "only IOAS_MAP_FILE mappings can change process")
    seen: dict[int, Pages] = {}
    for iopt in iopts:
        for area in iopt.area_objects():
            seen.setdefault(id(area.pages), area.pages)
    npinned = [0] * ACCOUNT_MODE_NUM
    for pages in seen.values():
        if pages.need_charge_update(proc):
            npinned[pages.account_mode] += pages.last_npinned
            pages.last_npinned = 0
    try:
        charge_current(proc, npinned)
    except OSError:
        for pages in seen.values():
            pages.last_npinned = pages.npinned
        raise
    old_mm_gone = False
    for pages in seen.values():
        old = pages.proc
        if old is not None and pages.need_charge_update(proc):  # uncharge the old source
            if pages.account_mode == ACCOUNT_MM and old.gone:
                # update_mm_locked_vm(): mmget_not_zero() of the old mm fails: EINVAL, and
                # last_npinned stays 0 (7.2 WARNs; the moved charge is never given back)
                old_mm_gone = True
            else:
                update_pinned(pages.account_mode, old, pages.source_user, pages.npinned, False)
                pages.last_npinned = pages.npinned
        pages.change_mm(proc)
    if old_mm_gone:
        raise err(errno.EINVAL, "the old mm is gone: its locked_vm could not be uncharged")


def ioas_option_huge_pages(ucmd: Ucmd) -> None:
    """IOMMU_OPTION_HUGE_PAGES on one IOAS (object_id)."""
    cmd = ucmd.cmd
    ioas = ucmd.ictx.objects.get_ioas(cmd.object_id)
    if cmd.op == U.IOMMU_OPTION_OP_GET:
        cmd.val64 = int(ioas.iopt.allow_large_pages)
    elif cmd.op == U.IOMMU_OPTION_OP_SET:
        if cmd.val64 not in (0, 1):
            raise err(errno.EINVAL, "HUGE_PAGES is 0 or 1")
        ioas.iopt.set_large_pages(bool(cmd.val64))
    else:
        raise err(errno.EOPNOTSUPP, f"unknown option op {cmd.op}")
