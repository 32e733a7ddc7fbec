"""vIOMMU, vDEVICE and HW queue objects (the kernel's viommu.c).

A vIOMMU is the VM's slice of one IOMMU instance over a nest-parent HWPT; vDEVICEs give its
devices their virtual IDs; HW queues hand guest queue memory (an IOVA range of the nest
parent, pinned for the queue's lifetime so it cannot be unmapped: EBUSY) to the hardware.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from iommufd_model.core.hw_pagetable import HwptPaging
from iommufd_model.core.mmap import MmapOwner
from iommufd_model.core.objects import IommufdObject, ObjType
from iommufd_model.core.ucmd import Ucmd, ioctl_op
from iommufd_model.driver import HwQueueBase, VdeviceBase, ViommuBase
from iommufd_model.errors import err
from iommufd_model.failnth import failpoint
from iommufd_model.hooks import DriverHooks
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_model.core.device import Device
    from iommufd_model.core.eventq import Veventq
    from iommufd_model.core.main import IommuFd


class Viommu(IommufdObject):
    TYPE = ObjType.VIOMMU

    def __init__(self, ictx: IommuFd, drv: ViommuBase, hwpt: HwptPaging, mmap: MmapOwner) -> None:
        super().__init__(ictx)
        self.drv = drv
        self.mmap = mmap
        drv.core = self
        self.hwpt = hwpt
        self.hooks: DriverHooks = drv.owner.machine.hooks(drv.owner.driver_name)
        self.vdevs: dict[int, Vdevice] = {}
        self.veventqs: dict[int, Veventq] = {}
        self.hw_queues: dict[tuple[int, int], HwQueue] = {}

    def report_event(self, type_: int, data: bytes) -> bool:
        """``iommufd_viommu_report_event``: False when no vEVENTQ of ``type_`` exists (7.2's
        EOPNOTSUPP), True when the record was queued or accounted as lost to a full queue
        (7.2's 0); OSError(ENOMEM) when the record could not be allocated (the failpoint
        ``veventq.report_event``), after the queue got its LOST_EVENTS header."""
        q = self.veventqs.get(type_)
        if q is None:
            return False
        q.report(data)
        return True

    def find_vdev(self, virt_id: int) -> Vdevice | None:
        return self.vdevs.get(virt_id)

    def destroy(self) -> None:
        self.hooks.viommu_destroy(viommu=self.drv)
        self.mmap.release()  # its regions die with it, whatever the driver left


class Vdevice(IommufdObject):
    TYPE = ObjType.VDEVICE

    def __init__(self, ictx: IommuFd, drv: VdeviceBase, viommu: Viommu, idev: Device) -> None:
        super().__init__(ictx)
        self.drv = drv
        self.viommu = viommu
        self.idev = idev
        self.virt_id = drv.virt_id

    def destroy(self) -> None:
        self.viommu.hooks.vdevice_destroy(vdev=self.drv)
        self.viommu.vdevs.pop(self.virt_id, None)
        self.idev.vdev = None


class HwQueue(IommufdObject):
    TYPE = ObjType.HW_QUEUE

    def __init__(self, ictx: IommuFd, drv: HwQueueBase, viommu: Viommu) -> None:
        super().__init__(ictx)
        self.drv = drv
        self.viommu = viommu

    def destroy(self) -> None:
        viommu = self.viommu
        viommu.hooks.hw_queue_destroy(queue=self.drv)
        self.drv.undepend()
        viommu.hw_queues.pop((self.drv.queue_type, self.drv.index), None)
        viommu.hwpt.ioas.iopt.access_unpin(
            *_page_span(self.drv.base_iova, self.drv.length), lock=True
        )


def _page_span(iova: int, length: int) -> tuple[int, int]:
    """The whole pages under ``[iova, iova + length)``: the kernel pins a queue by pages
    (``iommufd_hw_queue_alloc_phys``), so a queue may start and end inside a page."""
    first = iova & ~(PAGE_SIZE - 1)
    end = (iova + length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    return first, end - first


def vdevice_force_destroy(vdev: Vdevice) -> None:
    """The device went away under its vDEVICE: destroy it and leave a tombstone id."""
    vdev.ictx.objects.remove(vdev, tombstone=True)


@ioctl_op(U.IOMMU_VIOMMU_ALLOC, U.IommuViommuAlloc, "out_viommu_id")
def _viommu_alloc(ucmd: Ucmd) -> None:

    cmd = ucmd.cmd
    objs = ucmd.ictx.objects
    if cmd.flags or cmd.type == U.IOMMU_VIOMMU_TYPE_DEFAULT:
        raise err(errno.EOPNOTSUPP, "bad viommu flags or type")
    idev = objs.get_device(cmd.dev_id)
    # iommufd_viommu_alloc_ioctl(): the driver's get_viommu_size() before the nest parent is
    # looked up; __reserved is not checked (7.2 reads neither it nor any other padding here).
    if not idev.hooks.get_viommu_size(iommu=idev.hw, dev=idev.dev, viommu_type=cmd.type):
        raise err(errno.EOPNOTSUPP, f"no vIOMMU of type {cmd.type:#x} for this device")
    hwpt = objs.get_hwpt_paging(cmd.hwpt_id)
    if not hwpt.nest_parent:
        raise err(errno.EINVAL, "a vIOMMU needs a nest-parent HWPT")
    data = ucmd.caller.read(cmd.data_uptr, cmd.data_len) if cmd.data_len else b""
    failpoint("hook.viommu_alloc")
    # The driver registers mmap regions through ``mmap`` (iommufd_viommu_alloc_mmap); any
    # left registered when the allocation fails are erased with it.
    mmap = MmapOwner(ucmd.ictx)
    try:
        drv = idev.hooks.viommu_alloc(
            iommu=idev.hw,
            dev=idev.dev,
            parent=hwpt.domain,
            viommu_type=cmd.type,
            data=data,
            mmap=mmap,
        )
    except OSError:
        mmap.release()
        raise
    out = getattr(drv, "out_data", b"")
    try:
        if out and cmd.data_len:
            ucmd.caller.write(cmd.data_uptr, out[: cmd.data_len])
        viommu = Viommu(ucmd.ictx, drv, hwpt, mmap)
        cmd.out_viommu_id = objs.alloc_id(viommu)
    except OSError:
        idev.hooks.viommu_destroy(viommu=drv)
        mmap.release()
        raise
    mmap.bind(viommu)
    viommu.hold(hwpt)
    ucmd.respond()


@ioctl_op(U.IOMMU_VDEVICE_ALLOC, U.IommuVdeviceAlloc, "virt_id")
def _vdevice_alloc(ucmd: Ucmd) -> None:

    cmd = ucmd.cmd
    objs = ucmd.ictx.objects
    idev = objs.get_device(cmd.dev_id)
    viommu = objs.get_viommu(cmd.viommu_id)
    if viommu.drv.owner is not idev.hw:
        raise err(errno.EINVAL, "device sits behind another IOMMU instance")
    if idev.vdev is not None:
        raise err(errno.EEXIST, "device already has a vDEVICE")
    if cmd.virt_id in viommu.vdevs:
        raise err(errno.EEXIST, f"virtual id {cmd.virt_id:#x} is taken")
    failpoint("hook.vdevice_alloc")
    drv = viommu.hooks.vdevice_alloc(viommu=viommu.drv, dev=idev.dev, virt_id=cmd.virt_id)
    vdev = Vdevice(ucmd.ictx, drv, viommu, idev)
    try:
        cmd.out_vdevice_id = objs.alloc_id(vdev)
    except OSError:
        viommu.hooks.vdevice_destroy(vdev=drv)
        raise
    vdev.hold(viommu)
    vdev.hold(idev)
    viommu.vdevs[cmd.virt_id] = vdev
    idev.vdev = vdev
    ucmd.respond()


@ioctl_op(U.IOMMU_HW_QUEUE_ALLOC, U.IommuHwQueueAlloc, "length")
def _hw_queue_alloc(ucmd: Ucmd) -> None:
    cmd = ucmd.cmd
    objs = ucmd.ictx.objects
    if cmd.flags or cmd.type == U.IOMMU_HW_QUEUE_TYPE_DEFAULT:
        raise err(errno.EOPNOTSUPP, "bad hw_queue flags or type")
    if not cmd.length:
        raise err(errno.EINVAL, "hw_queue length must be positive")
    if cmd.nesting_parent_iova + cmd.length - 1 > U.U64_MAX:
        raise err(errno.EOVERFLOW)
    viommu = objs.get_viommu(cmd.viommu_id)
    # get_hw_queue_size(): the type is the driver's to judge, before anything is pinned. A
    # driver without the hook is asked by hw_queue_alloc itself, after the pin.
    if not viommu.hooks.hw_queue_supported(viommu=viommu.drv, queue_type=cmd.type):
        raise err(errno.EOPNOTSUPP, f"the vIOMMU takes no HW queue of type {cmd.type:#x}")
    if (cmd.type, cmd.index) in viommu.hw_queues:
        raise err(errno.EEXIST, "a queue with that type and index exists")
    iopt = viommu.hwpt.ioas.iopt
    pin_iova, pin_len = _page_span(cmd.nesting_parent_iova, cmd.length)
    pfns = iopt.access_pin(pin_iova, pin_len, True, lock=True)
    try:
        first = pfns[0]
        if any(p != first + i for i, p in enumerate(pfns)):
            raise err(errno.EFAULT, "queue memory must be physically contiguous")
        failpoint("hook.hw_queue_alloc")
        drv = viommu.hooks.hw_queue_alloc(
            viommu=viommu.drv,
            queue_type=cmd.type,
            index=cmd.index,
            base_iova=cmd.nesting_parent_iova,
            length=cmd.length,
            pfns=pfns,
        )
    except OSError:
        iopt.access_unpin(pin_iova, pin_len, lock=True)
        raise
    drv.pfns = pfns
    q = HwQueue(ucmd.ictx, drv, viommu)
    try:
        cmd.out_hw_queue_id = objs.alloc_id(q)
    except OSError:
        viommu.hooks.hw_queue_destroy(queue=drv)
        drv.undepend()
        iopt.access_unpin(pin_iova, pin_len, lock=True)
        raise
    drv.core = q
    q.hold(viommu)
    viommu.hw_queues[(cmd.type, cmd.index)] = q
    ucmd.respond()


def report_event_from_irq(viommu: Viommu, type_: int, data: bytes) -> bool:
    """A driver's interrupt thread calling ``iommufd_viommu_report_event``: whether the
    record reached a vEVENTQ (queued, or counted as lost to a full one). A failed record
    allocation (7.2's -ENOMEM; the queue has its LOST_EVENTS header) is False, as the 7.2
    drivers treat a non-zero return (the event stays unhandled: logged)."""
    try:
        return viommu.report_event(type_, data)
    except OSError:
        return False
