"""HWPT objects (paging and nested) and their ioctls: alloc, invalidate, dirty tracking.

A paging HWPT wraps a driver domain that mirrors an IOAS; a nested HWPT wraps a driver
domain built from user vendor data over a nest parent (or a vIOMMU). The core reaches the
driver only through hooks routed to the domain's owner.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from iommufd_model.core.failnth import failpoint
from iommufd_model.core.main import Ucmd, ioctl_op
from iommufd_model.core.objects import IommufdObject, ObjType
from iommufd_model.driver import Domain, InvalidateResult
from iommufd_model.errors import err
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_model.core.device import Device
    from iommufd_model.core.eventq import Fault
    from iommufd_model.core.ioas import Ioas
    from iommufd_model.core.main import IommuFd
    from iommufd_model.core.viommu import Viommu

PAGING_FLAGS = (
    U.IOMMU_HWPT_ALLOC_NEST_PARENT
    | U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    | U.IOMMU_HWPT_FAULT_ID_VALID
    | U.IOMMU_HWPT_ALLOC_PASID
)
NESTED_FLAGS = U.IOMMU_HWPT_FAULT_ID_VALID | U.IOMMU_HWPT_ALLOC_PASID


def hooks_of(domain: Domain) -> Any:
    """The hook relay of the driver that built ``domain``."""
    return domain.owner.machine.hooks(domain.owner.driver_name)


def require(result: Any, what: str) -> Any:
    """A hook answering ``None`` means the driver lacks the operation."""
    if result is None:
        raise err(errno.EOPNOTSUPP, f"driver does not implement {what}")
    return result


class DomainAdapter:
    """Presents a driver domain to the IoPagetable as its ``IoDomain`` (map/unmap via hooks)."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self._hooks = hooks_of(domain)

    @property
    def pgsize_bitmap(self) -> int:
        return self.domain.pgsize_bitmap

    @property
    def aperture_start(self) -> int:
        return self.domain.aperture_start

    @property
    def aperture_end(self) -> int:
        return self.domain.aperture_end

    def map(self, iova: int, pa: int, size: int, prot: int) -> None:
        failpoint("hook.domain_map")  # iommu_map(): page-table allocations
        self._map(iova, pa, size, prot)

    def _map(self, iova: int, pa: int, size: int, prot: int) -> None:
        require(
            self._hooks.domain_map(domain=self.domain, iova=iova, pa=pa, size=size, prot=prot),
            "domain_map",
        )

    def map_pages(self, iova: int, pa: int, pgsize: int, pgcount: int, prot: int) -> None:
        failpoint("hook.domain_map")
        if (
            self._hooks.domain_map_pages(
                domain=self.domain, iova=iova, pa=pa, pgsize=pgsize, pgcount=pgcount, prot=prot
            )
            is not None
        ):
            return
        # A driver without the batched op: one domain_map per page, undone on failure.
        done = 0
        try:
            while done < pgcount:
                self._map(iova + done * pgsize, pa + done * pgsize, pgsize, prot)
                done += 1
        except OSError:
            if done:
                self.unmap(iova, done * pgsize)
            raise

    def unmap(self, iova: int, size: int) -> int:
        return int(
            require(
                self._hooks.domain_unmap(domain=self.domain, iova=iova, size=size), "domain_unmap"
            )
        )


class Hwpt(IommufdObject):
    """Common part of both HWPT kinds (``struct iommufd_hw_pagetable``)."""

    def __init__(self, ictx: IommuFd, domain: Domain) -> None:
        super().__init__(ictx)
        self.domain = domain
        domain.hwpt = self
        self.fault: Fault | None = None
        self.devices: list[Device] = []

    @property
    def pasid_compat(self) -> bool:
        return self.domain.pasid_compat

    def destroy(self) -> None:
        hooks_of(self.domain).domain_free(domain=self.domain)


class HwptPaging(Hwpt):
    TYPE = ObjType.HWPT_PAGING

    def __init__(self, ictx: IommuFd, domain: Domain, ioas: Ioas, *, auto_domain: bool) -> None:
        super().__init__(ictx, domain)
        self.ioas = ioas
        self.auto_domain = auto_domain
        self.nest_parent = domain.nest_parent
        self.adapter = DomainAdapter(domain)

    def destroy(self) -> None:
        self.ioas.iopt.remove_domain(self.adapter)
        self.ioas.hwpt_list.remove(self)
        super().destroy()


class HwptNested(Hwpt):
    TYPE = ObjType.HWPT_NESTED

    def __init__(
        self, ictx: IommuFd, domain: Domain, parent: HwptPaging, viommu: Viommu | None
    ) -> None:
        super().__init__(ictx, domain)
        self.parent = parent
        self.viommu = viommu

    @property
    def ioas(self) -> Ioas:
        return self.parent.ioas


def hwpt_paging_alloc(
    ictx: IommuFd, ioas: Ioas, idev: Device, flags: int, *, auto_domain: bool
) -> HwptPaging:
    """Allocate a paging domain for ``idev`` and fill it from ``ioas`` (all-or-nothing).

    The new object is not yet in the table; the caller installs it.
    """
    if flags & ~PAGING_FLAGS:
        raise err(errno.EOPNOTSUPP, f"unknown hwpt flags {flags:#x}")
    if flags & U.IOMMU_HWPT_FAULT_ID_VALID and flags & U.IOMMU_HWPT_ALLOC_NEST_PARENT:
        raise err(errno.EOPNOTSUPP, "a nest parent cannot take IOPF")
    hooks = idev.hooks
    failpoint("hook.domain_alloc_paging")
    domain = require(
        hooks.domain_alloc_paging(
            iommu=idev.hw, dev=idev.dev, flags=flags & ~U.IOMMU_HWPT_FAULT_ID_VALID
        ),
        "domain_alloc_paging",
    )
    hwpt = HwptPaging(ictx, domain, ioas, auto_domain=auto_domain)
    try:
        ioas.iopt.add_domain(hwpt.adapter)
    except OSError:
        hooks.domain_free(domain=domain)
        raise
    ioas.hwpt_list.append(hwpt)
    hwpt.hold(ioas)
    return hwpt


def hwpt_nested_alloc(
    ictx: IommuFd,
    parent: HwptPaging,
    viommu: Viommu | None,
    idev: Device,
    flags: int,
    data_type: int,
    data: bytes,
) -> HwptNested:
    if flags & ~NESTED_FLAGS or not data:
        raise err(errno.EOPNOTSUPP, "bad flags or no vendor data for a nested HWPT")
    if parent.auto_domain or not parent.nest_parent or parent.domain.owner is not idev.hw:
        raise err(errno.EINVAL, "parent must be a nest-parent HWPT of the device's IOMMU")
    failpoint("hook.domain_alloc_nested")
    domain = require(
        idev.hooks.domain_alloc_nested(
            iommu=idev.hw,
            dev=idev.dev,
            parent=parent.domain,
            viommu=viommu.drv if viommu is not None else None,
            flags=flags & ~U.IOMMU_HWPT_FAULT_ID_VALID,
            data_type=data_type,
            data=data,
        ),
        "domain_alloc_nested",
    )
    hwpt = HwptNested(ictx, domain, parent, viommu)
    hwpt.hold(viommu if viommu is not None else parent)
    return hwpt


@ioctl_op(U.IOMMU_HWPT_ALLOC, U.IommuHwptAlloc, "reserved")
def _hwpt_alloc(ucmd: Ucmd) -> None:
    from iommufd_model.core.device import Device
    from iommufd_model.core.eventq import Fault
    from iommufd_model.core.ioas import Ioas
    from iommufd_model.core.viommu import Viommu

    cmd = ucmd.cmd
    ictx = ucmd.ictx
    objs = ictx.objects
    if cmd.reserved or cmd.reserved2:
        raise err(errno.EOPNOTSUPP, "hwpt_alloc __reserved must be 0")
    none = cmd.data_type == U.IOMMU_HWPT_DATA_NONE
    if (none and cmd.data_len) or (not none and not cmd.data_len):
        raise err(errno.EINVAL, "data_len must be 0 exactly when data_type is NONE")
    idev = objs.get_as(cmd.dev_id, Device)
    try:
        pt_obj = objs.get(cmd.pt_id)
    except OSError:
        raise err(errno.EINVAL, f"pt_id {cmd.pt_id} does not exist") from None
    if not isinstance(pt_obj, (Ioas, HwptPaging, Viommu)):
        raise err(errno.EINVAL, f"pt_id {cmd.pt_id} is a {pt_obj.TYPE.value}")

    def user_data() -> bytes:
        # The kernel's driver copies the vendor data itself, once the pt type is known.
        return ucmd.caller.read(cmd.data_uptr, cmd.data_len) if cmd.data_len else b""

    hwpt: Hwpt
    if isinstance(pt_obj, Ioas):
        if not none:
            raise err(errno.EOPNOTSUPP, "paging HWPTs take no vendor data")
        hwpt = hwpt_paging_alloc(ictx, pt_obj, idev, cmd.flags, auto_domain=False)
    elif isinstance(pt_obj, HwptPaging):
        hwpt = hwpt_nested_alloc(ictx, pt_obj, None, idev, cmd.flags, cmd.data_type, user_data())
    else:
        hwpt = hwpt_nested_alloc(
            ictx, pt_obj.hwpt, pt_obj, idev, cmd.flags, cmd.data_type, user_data()
        )
    if cmd.flags & U.IOMMU_HWPT_FAULT_ID_VALID:
        # As the kernel: the fault object is looked up only after the HWPT exists.
        try:
            fault = objs.get_as(cmd.fault_id, Fault)
        except OSError:
            hwpt.destroy()
            hwpt.release_holds()
            raise
        hwpt.fault = fault
        hwpt.hold(fault)
    try:
        cmd.out_hwpt_id = objs.alloc_id(hwpt)
    except OSError:
        # iommufd_object_abort_and_destroy(): the domain leaves the IOAS and is freed.
        hwpt.destroy()
        hwpt.release_holds()
        raise
    ucmd.respond()


@ioctl_op(U.IOMMU_HWPT_INVALIDATE, U.IommuHwptInvalidate, "reserved")
def _hwpt_invalidate(ucmd: Ucmd) -> None:
    from iommufd_model.core.viommu import Viommu

    cmd = ucmd.cmd
    requested = cmd.entry_num
    result = InvalidateResult(0)
    try:
        if cmd.reserved:
            raise err(errno.EOPNOTSUPP, "hwpt_invalidate __reserved must be 0")
        if requested and (not cmd.data_uptr or not cmd.entry_len):
            raise err(errno.EINVAL, "entries given without data_uptr or entry_len")
        target = ucmd.ictx.objects.get(cmd.hwpt_id)
        if isinstance(target, HwptNested):
            drv_target: Any = target.domain
            owner = target.domain.owner
        elif isinstance(target, Viommu):
            drv_target = target.drv
            owner = target.drv.owner
        else:
            raise err(errno.EINVAL, f"object {cmd.hwpt_id} cannot be invalidated")
        hooks = owner.machine.hooks(owner.driver_name)
        # The array is read only once the target is known to take one (the driver reads it).
        entries = [
            ucmd.caller.read(cmd.data_uptr + i * cmd.entry_len, cmd.entry_len)
            for i in range(requested)
        ]
        failpoint("hook.cache_invalidate_user")
        result = require(
            hooks.cache_invalidate_user(
                target=drv_target, data_type=cmd.data_type, entries=entries
            ),
            "cache_invalidate_user",
        )
    finally:
        cmd.entry_num = result.handled
        ucmd.respond()
    if result.error:
        raise err(result.error, f"invalidation stopped at entry {result.handled}")


@ioctl_op(U.IOMMU_HWPT_SET_DIRTY_TRACKING, U.IommuHwptSetDirtyTracking, "reserved")
def _set_dirty_tracking(ucmd: Ucmd) -> None:
    cmd = ucmd.cmd
    # The kernel ignores __reserved here (only the flags are checked).
    if cmd.flags & ~U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE:
        raise err(errno.EOPNOTSUPP, "unknown dirty tracking flags")
    hwpt = ucmd.ictx.objects.get_as(cmd.hwpt_id, HwptPaging)
    if not hwpt.domain.dirty_tracking:
        raise err(errno.EOPNOTSUPP, "HWPT was not allocated with DIRTY_TRACKING")
    enable = bool(cmd.flags & U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE)
    hooks = hooks_of(hwpt.domain)
    failpoint("hook.set_dirty_tracking")  # before the wipe, so an injected failure changes nothing
    if enable:
        # iopt_set_dirty_tracking(): wipe stale dirty bits first, for a clean snapshot.
        for iova, last, *_rest in hwpt.ioas.iopt.areas():
            hooks.read_and_clear_dirty(
                domain=hwpt.domain, iova=iova, length=last - iova + 1, clear=True, report=False
            )
    require(hooks.set_dirty_tracking(domain=hwpt.domain, enable=enable), "set_dirty_tracking")
    hwpt.domain.dirty_enabled = enable


@ioctl_op(U.IOMMU_HWPT_GET_DIRTY_BITMAP, U.IommuHwptGetDirtyBitmap, "data")
def _get_dirty_bitmap(ucmd: Ucmd) -> None:
    cmd = ucmd.cmd
    if cmd.flags & ~U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR or cmd.reserved:
        raise err(errno.EOPNOTSUPP, "unknown dirty bitmap flags")
    hwpt = ucmd.ictx.objects.get_as(cmd.hwpt_id, HwptPaging)
    iopt = hwpt.ioas.iopt
    page_size = cmd.page_size
    # iommufd_check_iova_range() runs before the domain's dirty ops are looked at.
    if cmd.iova + ((cmd.length - 1) & U.U64_MAX) > U.U64_MAX:
        raise err(errno.EOVERFLOW, "iova + length wraps")
    end = (cmd.iova + cmd.length) & U.U64_MAX  # last_iova + 1
    align = iopt.iova_alignment
    if (
        not page_size
        or page_size & (page_size - 1)
        or not cmd.length
        or cmd.iova & (align - 1)
        or end & (align - 1)
        or cmd.iova & (page_size - 1)
        or end & (page_size - 1)
    ):
        # (no alignment rule on the bitmap address: iova_bitmap takes unaligned user
        # bitmaps, which the kernel self-test checks with a bitmap at +0xff1)
        raise err(errno.EINVAL, "bad dirty bitmap range, page size or bitmap alignment")
    if not hwpt.domain.dirty_tracking:
        raise err(errno.EOPNOTSUPP, "HWPT was not allocated with DIRTY_TRACKING")
    nbits = -(-cmd.length // page_size)
    nbytes = -(-nbits // 64) * 8
    # iova_bitmap_alloc() + pinning the user bitmap: what can fail happens before the
    # dirty bits are read and cleared; the write back goes to the pinned pages.
    bitmap = bytearray(ucmd.caller.read(cmd.data, nbytes))
    failpoint("hook.read_and_clear_dirty")
    runs = require(
        hooks_of(hwpt.domain).read_and_clear_dirty(
            domain=hwpt.domain,
            iova=cmd.iova,
            length=cmd.length,
            clear=not cmd.flags & U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
            report=True,
        ),
        "read_and_clear_dirty",
    )
    for iova, size in runs:
        first = max(iova, cmd.iova)
        last = min(iova + size, cmd.iova + cmd.length) - 1
        for bit in range((first - cmd.iova) // page_size, (last - cmd.iova) // page_size + 1):
            bitmap[bit >> 3] |= 1 << (bit & 7)
    ucmd.caller.write(cmd.data, bytes(bitmap), pinned=True)
