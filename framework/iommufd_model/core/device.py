"""DEVICE objects: binding, attach / replace / detach (RID and PASID), and GET_HW_INFO.

Kernel rules kept (device.c): attaching to an IOAS reuses a compatible automatic domain or
creates one that dies with its last device; attaching reserves the device's reserved IOVA
regions in the IOAS for as long as any attachment of that device uses it; replace is
all-or-nothing; a PASID attachment needs a PASID-compatible HWPT, and while PASIDs are
attached the RID may only use PASID-compatible HWPTs.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import attrs

from iommufd_model.core.hw_pagetable import Hwpt, HwptNested, HwptPaging, hwpt_paging_alloc
from iommufd_model.core.ioas import Ioas
from iommufd_model.core.objects import IommufdObject, ObjType
from iommufd_model.core.ucmd import Ucmd, ioctl_op
from iommufd_model.core.viommu import vdevice_force_destroy
from iommufd_model.errors import err
from iommufd_model.failnth import failpoint
from iommufd_model.hooks import DriverHooks
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_model.core.main import IommuFd
    from iommufd_model.core.viommu import Vdevice
    from iommufd_model.hw.pci import PciDevice


@attrs.define(eq=False)
class AttachHandle:
    """``struct iommufd_attach_handle``: one attachment of ``idev`` at one PASID (``None``:
    the RID) to ``hwpt``. Linux 7.2 allocates a new one at every attach and replace
    (``iommufd_hwpt_attach_device`` / ``_replace_device``) and frees it at detach or after
    the replace; page request groups remember the handle they were delivered through, and
    ``iommufd_auto_response_faults`` answers only the groups of the handle that goes away
    (compared by identity: a later attachment of the same HWPT is another handle). The
    model has one device per group, so the handle's device is the faulting device."""

    idev: Device
    hwpt: Hwpt
    pasid: int | None


class Device(IommufdObject):
    """A PCI device bound to this iommufd (``struct iommufd_device``)."""

    TYPE = ObjType.DEVICE

    def __init__(self, ictx: IommuFd, dev: PciDevice) -> None:
        super().__init__(ictx)
        self.dev = dev
        self.hw = dev.iommu
        self.hooks: DriverHooks = ictx.machine.hooks(self.hw.driver_name)
        # The attach handles by PASID (None: the RID), as the group's pasid_attach holds them.
        self.handles: dict[int | None, AttachHandle] = {}
        self.vdev: Vdevice | None = None
        self._resv: dict[int, int] = {}  # id(ioas) -> attachments using its reservation

    @property
    def hwpt(self) -> Hwpt | None:
        """The HWPT attached at the RID."""
        handle = self.handles.get(None)
        return None if handle is None else handle.hwpt

    @property
    def pasid_hwpts(self) -> dict[int, Hwpt]:
        """The HWPTs attached at PASIDs (a snapshot)."""
        return {p: h.hwpt for p, h in self.handles.items() if p is not None}

    def fault_handle(self, hwpt: Hwpt, pasid: int | None) -> AttachHandle | None:
        """The attach handle of ``hwpt`` a page request at ``pasid`` is delivered through:
        the PASID's own, else the RID's (io-pgfault.c ``find_fault_handler()`` with a
        user-managed PASID table falls back to the RID's nested domain); None when neither
        is ``hwpt``'s."""
        for key in (pasid, None):
            handle = self.handles.get(key)
            if handle is not None and handle.hwpt is hwpt:
                return handle
        return None

    # -- reserved regions -----------------------------------------------------------------
    def reserve_regions(self, ioas: Ioas) -> None:
        key = id(ioas)
        if key in self._resv:
            self._resv[key] += 1
            return
        failpoint("device.reserve_regions")  # iopt_table_enforce_dev_resv_regions()
        regions = self.hooks.dev_reserved_regions(iommu=self.hw, dev=self.dev)
        done = False
        try:
            for start, last in regions:
                ioas.iopt.reserve(self, start, last)
            done = True
        finally:
            if not done:
                ioas.iopt.unreserve_owner(self)
        self._resv[key] = 1

    def unreserve_regions(self, ioas: Ioas) -> None:
        key = id(ioas)
        self._resv[key] -= 1
        if not self._resv[key]:
            del self._resv[key]
            ioas.iopt.unreserve_owner(self)

    def destroy(self) -> None:
        self.dev.bound_to = None


def device_bind(ictx: IommuFd, dev: PciDevice) -> int:
    """Bind ``dev``: one iommufd at a time (EBUSY otherwise)."""
    if dev.bound_to is not None:
        raise err(errno.EBUSY, f"{dev.name} is already bound to an iommufd")
    idev = Device(ictx, dev)
    ictx.objects.alloc_id(idev)
    idev.users += 1  # the VFIO device file holds it; IOMMU_DESTROY of a bound device is EBUSY
    dev.bound_to = ictx
    return idev.id


def device_unbind(ictx: IommuFd, idev: Device) -> None:
    """Close of the VFIO device: detach all, force the vDEVICE away, free the object."""
    for pasid in sorted(idev.pasid_hwpts):
        device_detach(idev, pasid)
    device_detach(idev, None)
    if idev.vdev is not None:
        vdevice_force_destroy(idev.vdev)
    idev.users -= 1
    ictx.objects.remove(idev)


def _check_pasid(idev: Device, hwpt: Hwpt, pasid: int | None) -> None:
    if pasid is None:
        if idev.pasid_hwpts and not hwpt.pasid_compat:
            raise err(errno.EINVAL, "PASIDs are attached: the RID needs a PASID-compatible HWPT")
        return
    if idev.dev.pasid_bits == 0 or not 0 < pasid < (1 << idev.dev.pasid_bits):
        raise err(errno.EINVAL, f"PASID {pasid} not supported by {idev.dev.name}")
    if not hwpt.pasid_compat:
        raise err(errno.EINVAL, "HWPT was not allocated with IOMMU_HWPT_ALLOC_PASID")
    if idev.hwpt is not None and not idev.hwpt.pasid_compat:
        raise err(errno.EINVAL, "the RID's HWPT is not PASID-compatible")


def _release(idev: Device, handle: AttachHandle) -> None:
    """Drop one attachment's references on its HWPT; an unused auto domain dies. The page
    request groups the HWPT's fault queue still holds for this handle are answered (7.2
    ``iommufd_auto_response_faults``, after the hardware left the HWPT)."""
    hwpt = handle.hwpt
    if hwpt.fault is not None:
        hwpt.fault.auto_respond(handle)
    hwpt.users -= 1
    hwpt.devices.remove(idev)
    idev.unreserve_regions(hwpt_ioas(hwpt))
    if isinstance(hwpt, HwptPaging) and hwpt.auto_domain and hwpt.users == 1:
        idev.ictx.objects.remove(hwpt)


def hwpt_ioas(hwpt: Hwpt) -> Ioas:
    if isinstance(hwpt, (HwptPaging, HwptNested)):
        return hwpt.ioas
    raise err(errno.EINVAL, "HWPT has no IOAS")


def attach_hwpt(idev: Device, hwpt: Hwpt, pasid: int | None, *, replace: bool) -> None:
    """Point the device (or one PASID) at ``hwpt``; all-or-nothing."""
    old = idev.handles.get(pasid)
    if old is not None and old.hwpt is hwpt:
        return
    if old is not None and not replace:
        raise err(errno.EINVAL, "device is already attached")
    if hwpt.domain.owner is not idev.hw:
        raise err(errno.EINVAL, "HWPT belongs to another IOMMU instance")
    _check_pasid(idev, hwpt, pasid)
    ioas = hwpt_ioas(hwpt)
    idev.reserve_regions(ioas)
    try:
        if pasid is None:
            failpoint("hook.attach")
            idev.hooks.attach(iommu=idev.hw, dev=idev.dev, domain=hwpt.domain)
        else:
            failpoint("hook.set_dev_pasid")
            idev.hooks.set_dev_pasid(iommu=idev.hw, dev=idev.dev, pasid=pasid, domain=hwpt.domain)
    except OSError:
        idev.unreserve_regions(ioas)
        raise
    hwpt.users += 1
    hwpt.devices.append(idev)
    idev.handles[pasid] = AttachHandle(idev, hwpt, pasid)
    if old is not None:
        _release(idev, old)


def auto_attach(idev: Device, ioas: Ioas, pasid: int | None, *, replace: bool) -> Hwpt:
    """Attach to an IOAS through a shared automatic paging domain."""
    for hwpt in list(ioas.hwpt_list):
        if not hwpt.auto_domain or hwpt.domain.owner is not idev.hw:
            continue
        if pasid is not None and not hwpt.pasid_compat:
            continue
        try:
            attach_hwpt(idev, hwpt, pasid, replace=replace)
            return hwpt
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    # The kernel allocates automatic domains without IOMMU_HWPT_ALLOC_PASID, so a PASID
    # cannot attach to an IOAS directly (EINVAL): it needs a PASID-compatible HWPT.
    new = hwpt_paging_alloc(idev.ictx, ioas, idev, 0, auto_domain=True)
    try:
        idev.ictx.objects.alloc_id(new)
    except OSError:
        # The domain was filled from the IOAS already: take it out and free it.
        new.destroy()
        new.release_holds()
        raise
    try:
        attach_hwpt(idev, new, pasid, replace=replace)
    except OSError:
        idev.ictx.objects.remove(new)
        raise
    return new


def device_attach(idev: Device, pt_id: int, pasid: int | None, *, replace: bool) -> int:
    """Attach (``replace``: or switch) to an IOAS or HWPT; returns the HWPT id in use."""
    pt = idev.ictx.objects.get(pt_id)
    if isinstance(pt, Ioas):
        return auto_attach(idev, pt, pasid, replace=replace).id
    if isinstance(pt, (HwptPaging, HwptNested)):
        attach_hwpt(idev, pt, pasid, replace=replace)
        return pt.id
    raise err(errno.EINVAL, f"object {pt_id} cannot be attached to")


def device_detach(idev: Device, pasid: int | None) -> None:
    """Block DMA from the device (or one PASID) and drop the attachment."""
    old = idev.handles.get(pasid)
    if old is None:
        return
    if pasid is None:
        idev.hooks.attach(iommu=idev.hw, dev=idev.dev, domain=None)
    else:
        idev.hooks.remove_dev_pasid(iommu=idev.hw, dev=idev.dev, pasid=pasid)
    del idev.handles[pasid]
    _release(idev, old)


@ioctl_op(U.IOMMU_GET_HW_INFO, U.IommuHwInfo, "reserved")
def _get_hw_info(ucmd: Ucmd) -> None:
    cmd = ucmd.cmd
    if cmd.flags & ~U.IOMMU_HW_INFO_FLAG_INPUT_TYPE:
        raise err(errno.EOPNOTSUPP, "unknown hw_info flags")
    if not cmd.flags & U.IOMMU_HW_INFO_FLAG_INPUT_TYPE:
        cmd.data_type = U.IOMMU_HW_INFO_TYPE_DEFAULT
    if any(cmd.reserved):
        raise err(errno.EOPNOTSUPP, "hw_info __reserved must be 0")
    idev = ucmd.ictx.objects.get_device(cmd.dev_id)
    failpoint("hook.hw_info")
    info = idev.hooks.hw_info(iommu=idev.hw, dev=idev.dev, data_type=cmd.data_type)
    data = info.data
    copy_len = min(cmd.data_len, len(data))
    if cmd.data_len:
        ucmd.caller.write(cmd.data_uptr, data[:copy_len] + bytes(cmd.data_len - copy_len))
    cmd.data_len = len(data)
    cmd.data_type = info.data_type
    cmd.out_capabilities = info.capabilities
    ats = idev.dev.ats if info.ats_supported is None else info.ats_supported
    if not ats:
        cmd.out_capabilities |= U.IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED
    cmd.out_max_pasid_log2 = min(info.max_pasid_log2, idev.dev.pasid_bits)
    ucmd.respond()
