"""The guest side of AMD: what a guest's amd_iommu driver writes.

Guest structures live in guest RAM (:class:`~iommufd_model.vmm.GuestMemory`): a guest device
table of gDTEs, one GCR3 table per device, x86-64 (v2) stage-1 tables built with the
framework's radix engine, the guest command buffer, the guest event log and a completion-wait
semaphore. Guest IDs: the guest DevID is the vDEVICE's virt_id; the guest DomainID is the one
the guest driver gives each device's GCR3 table.

:class:`GuestAmd` is the framework's :class:`~iommufd_model.vmm.GuestIommu` for AMD: the guest
driver, with the VMM's emulation it talks to, :class:`iommufd_amd.vamd.VirtualAmd`
(``GuestAmd.vmm``), reached only through the guest's register stores. With the HW-vIOMMU
(``accelerated=True``) a guest invalidation is a few stores to guest RAM and a tail store to
the VF MMIO page the VMM mapped for it: **no trap**; VMM-mediated, every CMD_TAIL store exits.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from iommufd_amd import commands as C
from iommufd_amd import events as E
from iommufd_amd import regs as R
from iommufd_amd.dte import DTE_SIZE, Dte
from iommufd_amd.gcr3 import GCR3_VALID
from iommufd_amd.vamd import RING, RING_LOG2, GuestVfPage, VirtualAmd
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.x86_64 import X86_64Format
from iommufd_model.vmm.guest import GuestDevice, GuestDomain, GuestIommu

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.vmm.vm import Vm

GUEST_DEVTAB_PAGES = 2  # guest DevIDs 0..255
MAX_GDEVID = GUEST_DEVTAB_PAGES * PAGE_SIZE // DTE_SIZE - 1
MAX_PASID = 511  # GLX 0: a one-level GCR3 table
#: CONTROL as the guest driver runs its IOMMU: translation, command buffer, event log, GT.
CONTROL_ON = R.CTRL_IOMMU_EN | R.CTRL_CMDBUF_EN | R.CTRL_EVT_LOG_EN | R.CTRL_GT_EN


class _Dev:
    """The guest driver's state for one device: its gDTE fields and GCR3 table."""

    def __init__(self, gdev: GuestDevice, gcr3: int, gdom: int) -> None:
        self.gdev = gdev
        self.gcr3 = gcr3
        self.gdom = gdom
        self.giov = False
        self.slots: dict[int, GuestDomain] = {}  # GCR3 slot (PASID, 0 for the RID) -> domain


class GuestAmd(GuestIommu):
    """One AMD vIOMMU of a VM (the VMM side, :attr:`vmm`) with the guest's amd_iommu driver
    using it."""

    def __init__(self, vm: Vm, iommu: IommuHw, *, accelerated: bool) -> None:
        if accelerated and getattr(iommu, "vi", None) is None:
            raise err(errno.EOPNOTSUPP, "this AMD IOMMU has no HW-vIOMMU (EFR VIOMMU)")
        super().__init__(vm, iommu, accelerated=accelerated)
        mem = vm.memory
        first = mem.alloc_frame()
        for i in range(1, GUEST_DEVTAB_PAGES):
            if mem.alloc_frame() != first + i:
                raise err(errno.ENOMEM, "guest device table pages are not contiguous")
        self.devtab = first << PAGE_SHIFT
        #: the VMM's emulated AMD IOMMU behind the guest's registers
        self.vmm = VirtualAmd(vm, iommu, accelerated=accelerated, devtab=self.devtab)
        self.cmd = mem.alloc_frame() << PAGE_SHIFT
        self.evt = mem.alloc_frame() << PAGE_SHIFT
        self.sem = mem.alloc_frame() << PAGE_SHIFT
        self.sem_val = 0
        self.cmd_tail = 0  # the guest driver's copy of its tail
        self.evt_head = 0  # the guest driver's event log consumer index
        self.window: GuestVfPage | None = None  # the VF MMIO page as the guest sees it
        self.devs: dict[int, _Dev] = {}
        self.next_gdom = 1

    @property
    def stopped(self) -> bool:
        """Whether the guest's (emulated) command processor halted on an error."""
        return self.vmm.stopped

    # -- the VMM side of the GuestIommu API -----------------------------------------------------
    def add_device(self, dev: PciDevice, virt_id: int) -> GuestDevice:
        if not 0 <= virt_id <= MAX_GDEVID:
            raise err(errno.EINVAL, f"guest DevID {virt_id:#x} beyond the guest device table")
        gdev = self.bind_vdevice(dev, virt_id)
        self.vmm.plug(gdev)
        self.devs[virt_id] = _Dev(gdev, 0, 0)
        return gdev

    def create_viommu(self, dev_id: int) -> int:
        """The VMM creates the vIOMMU (and maps the VF MMIO page into the guest); the guest
        driver then boots its IOMMU: base registers and CONTROL (first MMIO page)."""
        self.viommu_id = self.vmm.create_viommu(dev_id)
        self.window = self.vmm.window
        self.vmm.mmio_write(R.CMD_BUF_BASE, R.base_value(self.cmd, RING_LOG2))
        self.vmm.mmio_write(R.EVT_LOG_BASE, R.base_value(self.evt, RING_LOG2))
        self.vmm.mmio_write(R.CONTROL, CONTROL_ON)
        return self.viommu_id

    # -- the guest driver -----------------------------------------------------------------------
    def _cmd_head(self) -> int:
        if self.window is not None:
            return self.window.read(R.VF_CMD_HEAD) // R.ENTRY_SIZE
        return self.vmm.cmd_head  # the emulated CMD_HEAD (a load: the model counts none)

    def submit(self, raws: list[bytes]) -> None:
        """Queue raw commands in the guest command buffer and move the tail."""
        first = self.cmd_tail
        tail = first
        mem = self.vm.memory
        for raw in raws:
            if (tail + 1) % RING == self._cmd_head():
                raise err(errno.EIO, "guest command buffer full")
            mem.write(self.cmd + tail * R.ENTRY_SIZE, raw)
            tail = (tail + 1) % RING
        self.cmd_tail = tail
        if self.window is not None:
            self.window.write(R.VF_CMD_TAIL, tail * R.ENTRY_SIZE)  # VF MMIO page: no trap
        else:
            self.vmm.cmd_tail_write(tail)

    def sync(self, raws: list[bytes]) -> None:
        """``raws`` then COMPLETION_WAIT, and wait for the semaphore like the guest driver."""
        self.sem_val += 1
        self.submit([*raws, C.completion_wait(self.sem, self.sem_val)])
        if self.vm.memory.read_u64(self.sem) != self.sem_val:
            raise err(errno.EIO, "AMD-Vi (guest): Completion-Wait loop timed out")

    def _write_gdte(self, d: _Dev) -> None:
        """The guest writes the device's gDTE, then INVALIDATE_DEVTAB_ENTRY."""
        gv = bool(d.slots)
        dte = Dte(
            v=True,
            tv=True,
            gv=gv,
            giov=d.giov and gv,
            glx=0,
            gcr3=d.gcr3 if gv else 0,
            domain_id=d.gdom,
        )
        self.vm.memory.write(self.devtab + d.gdev.virt_id * DTE_SIZE, dte.to_bytes())
        if self.accelerated:
            self.vmm.gdte_store(d.gdev.virt_id)  # the table is write-protected: an exit
        self.sync([C.inv_devtab_entry(d.gdev.virt_id)])

    def attach(self, gdev: GuestDevice, *, pasid: int | None = None) -> GuestDomain:
        if pasid is not None and not 0 < pasid <= MAX_PASID:
            raise err(errno.EINVAL, f"guest PASID {pasid} beyond a one-level GCR3 table")
        d = self.devs[gdev.virt_id]
        mem = self.vm.memory
        if not d.gcr3:
            d.gcr3 = mem.alloc_frame() << PAGE_SHIFT
            d.gdom = self.next_gdom
            self.next_gdom += 1
        slot = 0 if pasid is None else pasid
        s1 = RadixPageTable(mem, X86_64Format(4))
        old = d.slots.get(slot)
        mem.write_u64(d.gcr3 + slot * 8, s1.root | GCR3_VALID)
        dom = GuestDomain(gdev, pasid, 0, s1.root, d.gdom, s1)
        need_dte = not d.slots or (pasid is None and not d.giov)
        d.slots[slot] = dom
        if pasid is None:
            d.giov = True
        if need_dte:
            self._write_gdte(d)
        else:
            self.sync([C.inv_iommu_all_pages(d.gdom, pasid=slot, gn=True)])
        if old is not None:
            old.vendor.free()
        dom.hwpt_id = self.vmm.hwpts.get(gdev.virt_id, 0)
        return dom

    def map(self, dom: GuestDomain, iova: int, gpa: int, size: int, *, write: bool = True) -> None:
        prot = IOMMU_READ | (IOMMU_WRITE if write else 0)
        dom.vendor.map(iova, gpa, size, prot)

    def unmap(self, dom: GuestDomain, iova: int, size: int) -> None:
        dom.vendor.unmap(iova, size)

    def invalidate(self, dom: GuestDomain, iova: int | None = None, size: int = 0) -> None:
        slot = 0 if dom.pasid is None else dom.pasid
        if iova is None:
            raws = [C.inv_iommu_all_pages(dom.tag, pasid=slot, gn=True)]
            iova, size = 0, 1 << 64
        else:
            raws = [C.inv_iommu_pages(dom.tag, iova, size, pasid=slot, gn=True)]
        if dom.dev.dev.ats:
            raws.append(C.inv_iotlb_pages(dom.dev.virt_id, iova, size, pasid=slot, gn=True))
        self.sync(raws)

    def detach(self, dom: GuestDomain) -> None:
        d = self.devs[dom.dev.virt_id]
        slot = 0 if dom.pasid is None else dom.pasid
        if d.slots.get(slot) is not dom:
            return
        self.vm.memory.write_u64(d.gcr3 + slot * 8, 0)
        del d.slots[slot]
        if dom.pasid is None:
            d.giov = False
        if dom.pasid is None or not d.slots:
            self._write_gdte(d)
        self.sync([C.inv_iommu_all_pages(d.gdom, pasid=slot, gn=True)])
        dom.vendor.free()

    def reset_cmd_buffer(self, base_gpa: int | None = None) -> None:
        """The guest driver's amd_iommu_reset_cmd_buffer(): disable, (re)write the base
        register (trapped: the VMM re-allocates the HW queue, which starts empty), enable."""
        gpa = (self.cmd if base_gpa is None else base_gpa) & R.BASE_ADDR_MASK
        self.vmm.mmio_write(R.CONTROL, CONTROL_ON & ~R.CTRL_CMDBUF_EN)
        self.vmm.mmio_write(R.CMD_BUF_BASE, R.base_value(gpa, RING_LOG2))
        self.cmd = gpa
        self.cmd_tail = 0
        self.vmm.mmio_write(R.CONTROL, CONTROL_ON)

    def events(self) -> list[E.Event]:
        """What the guest driver finds in its event log (and consumes)."""
        if self.window is None:
            return self.vmm.emulated_events()
        tail = self.window.read(R.VF_EVT_TAIL) // R.ENTRY_SIZE
        out = []
        while self.evt_head != tail:
            raw = self.vm.memory.read(self.evt + self.evt_head * R.ENTRY_SIZE, R.ENTRY_SIZE)
            out.append(E.Event.from_bytes(raw))
            self.evt_head = (self.evt_head + 1) % RING
        self.window.write(R.VF_EVT_HEAD, self.evt_head * R.ENTRY_SIZE)
        return out

    def close(self) -> None:
        """The VMM tears the vIOMMU down (:meth:`VirtualAmd.close`)."""
        self.vmm.close()
        self.viommu_id = 0
        self.window = None
