"""The guest side: what a guest's amd_iommu driver writes, and the VMM's AMD vIOMMU emulation.

Guest structures live in guest RAM (:class:`~iommufd_model.vmm.GuestMemory`): a guest device
table of gDTEs, one GCR3 table per device, x86-64 (v2) stage-1 tables built with the
framework's radix engine, the guest command buffer, the guest event log and a completion-wait
semaphore. Guest IDs: the guest DevID is the vDEVICE's virt_id; the guest DomainID is the one
the guest driver gives each device's GCR3 table.

:class:`GuestAmd` is the framework's :class:`~iommufd_model.vmm.GuestIommu` for AMD.

* ``accelerated=True`` (HW-vIOMMU): the VMM hands the guest command buffer and event log to
  the hardware as IOMMU_HW_QUEUE_ALLOC(AMD_CMD / AMD_EVT) and maps the guest's VF MMIO page
  (head/tail registers) for it. A guest invalidation is a few stores to guest RAM and a tail
  store to the VF page: **no trap**. Only configuration traps: the guest's MMIO base/control
  registers (first MMIO page) and stores to its write-protected device table (a new gDTE
  becomes a nested HWPT). Commands the hardware will not virtualise stall the guest's
  command processor and interrupt the VMM, which emulates them (a counted trap).
* ``accelerated=False`` (VMM-mediated): every guest store to the emulated CMD_TAIL traps; the
  VMM reads the new commands from guest RAM, installs nested HWPTs for
  INVALIDATE_DEVTAB_ENTRY, re-issues invalidations through IOMMU_HWPT_INVALIDATE on the
  vIOMMU (IOMMU_VIOMMU_INVALIDATE_DATA_AMD, model-defined) and emulates COMPLETION_WAIT.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from typing import TYPE_CHECKING, Any

from iommufd_amd import commands as C
from iommufd_amd import events as E
from iommufd_amd import regs as R
from iommufd_amd.dte import DTE_SIZE, Dte
from iommufd_amd.gcr3 import GCR3_VALID
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.x86_64 import X86_64Format
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm.guest import GuestDevice, GuestDomain, GuestIommu

if TYPE_CHECKING:
    from iommufd_amd.viommu.hw import GuestSlot
    from iommufd_model.core.mmap import IommufdVma
    from iommufd_model.hw.iommu import IommuHw
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.vmm.vm import Vm

GUEST_DEVTAB_PAGES = 2  # guest DevIDs 0..255
MAX_GDEVID = GUEST_DEVTAB_PAGES * PAGE_SIZE // DTE_SIZE - 1
RING_LOG2 = 8  # 256 entries of 16 bytes: one page each for the command buffer and event log
RING = 1 << RING_LOG2
MAX_PASID = 511  # GLX 0: a one-level GCR3 table
_HDR = struct.Struct("<II")
#: The guest's trapped base registers: their HW queue type and the CONTROL bit that runs them.
BASE_REGS = {
    R.CMD_BUF_BASE: (U.IOMMU_HW_QUEUE_TYPE_AMD_CMD, R.CTRL_CMDBUF_EN),
    R.EVT_LOG_BASE: (U.IOMMU_HW_QUEUE_TYPE_AMD_EVT, R.CTRL_EVT_LOG_EN),
    R.PPR_LOG_BASE: (U.IOMMU_HW_QUEUE_TYPE_AMD_PPR, R.CTRL_PPRLOG_EN),
}


class GuestVfPage:
    """The guest's third MMIO page (VF MMIO) as mapped from the iommufd: 64-bit register
    loads and stores that go straight to the hardware, no exit."""

    def __init__(self, vma: IommufdVma) -> None:
        self.vma = vma

    def read(self, offset: int) -> int:
        return int.from_bytes(self.vma.read(offset, 8), "little")

    def write(self, offset: int, value: int) -> None:
        self.vma.write(offset, value.to_bytes(8, "little"))


class _Dev:
    """The guest driver's state for one device: its gDTE fields and GCR3 table."""

    def __init__(self, gdev: GuestDevice, gcr3: int, gdom: int) -> None:
        self.gdev = gdev
        self.gcr3 = gcr3
        self.gdom = gdom
        self.giov = False
        self.slots: dict[int, GuestDomain] = {}  # GCR3 slot (PASID, 0 for the RID) -> domain


class GuestAmd(GuestIommu):
    """One AMD vIOMMU of a VM, with the guest's amd_iommu driver using it."""

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
        self.cmd = mem.alloc_frame() << PAGE_SHIFT
        self.evt = mem.alloc_frame() << PAGE_SHIFT
        self.sem = mem.alloc_frame() << PAGE_SHIFT
        self.sem_val = 0
        self.cmd_tail = 0  # the guest driver's copy of its tail
        self.vmm_cmd_head = 0  # mediated: the emulated head
        self.evt_head = 0  # the guest driver's event log consumer index
        self.window: GuestVfPage | None = None  # the VF MMIO page as the guest sees it
        self.vma: IommufdVma | None = None  # the VMM's mapping of it
        self.irq: Any = None  # the HW-vIOMMU interrupt line (command traps)
        self.viommu_out = b""  # struct iommu_viommu_amd as the kernel returned it
        self.queues: dict[int, int] = {}  # HW queue type -> object id
        self.mmio: dict[int, int] = {}  # the VMM's copy of the guest's trapped registers
        self.veventq: tuple[int, int] | None = None
        self.hwpts: dict[int, int] = {}  # gDevID -> nested HWPT of its gDTE
        self.devs: dict[int, _Dev] = {}
        self.next_gdom = 1
        self.stopped = False  # the guest's command processor halted (error)
        self._pending_events: list[E.Event] = []  # mediated: events the VMM emulated

    # -- the VMM ------------------------------------------------------------------------------
    def add_device(self, dev: PciDevice, virt_id: int) -> GuestDevice:
        if not 0 <= virt_id <= MAX_GDEVID:
            raise err(errno.EINVAL, f"guest DevID {virt_id:#x} beyond the guest device table")
        gdev = self.bind_vdevice(dev, virt_id)
        self.devs[virt_id] = _Dev(gdev, 0, 0)
        return gdev

    def create_viommu(self, dev_id: int) -> int:
        vm = self.vm
        parent = vm.nest_parent(dev_id, self.iommu)
        # struct iommu_viommu_amd: mandatory on HW-vIOMMU hardware, unused by Linux 7.2's path.
        data = bytes(U.IommuViommuAmd.SIZE)
        self.viommu_id, self.viommu_out = vm.fd.viommu_alloc_data(
            dev_id, parent, U.IOMMU_VIOMMU_TYPE_AMD, data
        )
        if self.accelerated:
            # The VMM mmaps the guest's VF MMIO page from the iommufd at the offset the kernel
            # returned (AMD's QEMU prototype: mmap(..., iommufd, out_vfmmio_mmap_offset)) and
            # maps it into the guest at IOMMU base + 0x2000: the guest's accesses never exit.
            info = U.IommuViommuAmd.unpack(self.viommu_out)
            if not info.out_vfmmio_mmap_length:
                raise err(errno.EOPNOTSUPP, "the vIOMMU has no HW-vIOMMU slice")
            self.vma = vm.fd.mmap(info.out_vfmmio_mmap_offset, info.out_vfmmio_mmap_length)
            self.window = GuestVfPage(self.vma)
            # The HW-vIOMMU's interrupt line to the VMM (an eventfd / KVM irqfd in a real VMM;
            # the model's uAPI has none, so the VMM hooks the page's notifier).
            drv: Any = getattr(vm.fd.objects.get(self.viommu_id), "drv", None)
            self.irq = drv.window
            self.irq.set_notify(self._hw_trap)
        # Mediated, the emulated guest event log is fed from the vIOMMU's AMD vEVENTQ once
        # the VMM asks for one (:meth:`alloc_veventq`; its open fd keeps the iommufd alive).
        # The guest driver boots its IOMMU: base registers and CONTROL (first MMIO page).
        self._mmio_trap(R.CMD_BUF_BASE, R.base_value(self.cmd, RING_LOG2))
        self._mmio_trap(R.EVT_LOG_BASE, R.base_value(self.evt, RING_LOG2))
        self._mmio_trap(
            R.CONTROL, R.CTRL_IOMMU_EN | R.CTRL_CMDBUF_EN | R.CTRL_EVT_LOG_EN | R.CTRL_GT_EN
        )
        return self.viommu_id

    def _mmio_trap(self, offset: int, value: int) -> None:
        """A guest store to its trapped first MMIO page: the VMM emulates it. As AMD's QEMU
        prototype: a base register store is recorded; a CONTROL store that turns a buffer on
        allocates its HW queue (IOMMU_HW_QUEUE_ALLOC with the recorded GPA and length), one
        that turns it off destroys the queue; a base store while on re-creates it."""
        self.vm.trap("MMIO")
        if not self.accelerated:
            return
        if offset in BASE_REGS:
            self.mmio[offset] = value
            if self.mmio.get(R.CONTROL, 0) & BASE_REGS[offset][1]:
                self._queue(offset, on=True)
        elif offset == R.CONTROL:
            old = self.mmio.get(R.CONTROL, 0)
            self.mmio[R.CONTROL] = value
            for base, (_qtype, en) in BASE_REGS.items():
                if (old ^ value) & en:
                    self._queue(base, on=bool(value & en))

    def _queue(self, base_reg: int, *, on: bool) -> None:
        """(Re)create or destroy the HW queue of the guest buffer whose base is ``base_reg``."""
        fd = self.vm.fd
        qtype = BASE_REGS[base_reg][0]
        old = self.queues.pop(qtype, None)
        if old is not None:
            fd.destroy(old)
        if on:
            value = self.mmio.get(base_reg, 0)
            length = R.ENTRY_SIZE << ((value >> R.LEN_SHIFT) & R.LEN_MASK)
            self.queues[qtype] = fd.hw_queue_alloc(
                self.viommu_id, qtype, 0, value & R.BASE_ADDR_MASK, length
            )

    def _install_gdte(self, gdevid: int) -> None:
        """A gDTE changed: a nested HWPT from it on the vIOMMU, attached in place of the old
        one (or the device blocked when the gDTE has no guest translation)."""
        d = self.devs.get(gdevid)
        if d is None:
            return
        vm = self.vm
        raw = vm.memory.read(self.devtab + gdevid * DTE_SIZE, DTE_SIZE)
        g = Dte.from_bytes(raw)
        old = self.hwpts.pop(gdevid, None)
        if not self._bound(d):
            # The VMM unplugged the device: the guest's writes go nowhere.
            if old is not None:
                self._destroy(old)
            return
        if g.v and g.gv:
            hwpt = vm.fd.hwpt_alloc(
                d.gdev.dev_id, self.viommu_id, data_type=U.IOMMU_HWPT_DATA_AMD_GUEST, data=raw
            )
            vm.fd.attach(d.gdev.dev_id, hwpt)
            self.hwpts[gdevid] = hwpt
        else:
            vm.fd.detach(d.gdev.dev_id)
        if old is not None:
            vm.fd.destroy(old)

    def _bound(self, d: _Dev) -> bool:
        """Whether the VMM still has the device bound (it may unplug it under the guest)."""
        try:
            self.vm.fd.objects.get(d.gdev.dev_id)
        except OSError:
            return False
        return True

    def _destroy(self, obj_id: int) -> None:
        with contextlib.suppress(OSError):  # already gone with its device or the fd
            self.vm.fd.destroy(obj_id)

    def _forward(self, raws: list[bytes]) -> int:
        if raws:
            self.vm.fd.hwpt_invalidate(self.viommu_id, U.IOMMU_VIOMMU_INVALIDATE_DATA_AMD, raws)
        return len(raws)

    def _emulate_all(self) -> list[bytes]:
        """INVALIDATE_IOMMU_ALL, which no vIOMMU may run on shared hardware: the VMM turns it
        into what it covers for this guest -- every gDomID and gDevID it installed."""
        out = [C.inv_iommu_all_pages(d.gdom) for d in self.devs.values() if d.gdom]
        return out + [C.inv_devtab_entry(g) for g in self.hwpts]

    def _cmd_tail_trap(self, first: int, last: int) -> None:
        """Mediated: the guest wrote CMD_TAIL; emulate the commands in ``[first, last)``."""
        vm = self.vm
        forward: list[bytes] = []
        done = 0
        index = first
        while index != last and not self.stopped:
            gpa = self.cmd + index * R.ENTRY_SIZE
            try:
                raw = vm.memory.read(gpa, R.ENTRY_SIZE)
            except OSError:  # the guest pointed its buffer outside its RAM
                raw = b""
            cmd = C.decode(raw) if raw else None
            if not raw:
                done += self._forward(forward)
                forward = []
                self._inject(E.Event(E.COMMAND_HARDWARE_ERROR, address=gpa))
                self.stopped = True
                break
            if cmd is None:
                done += self._forward(forward)
                forward = []
                self._inject(E.Event(E.ILLEGAL_COMMAND_ERROR, address=gpa))
                self.stopped = True
                break
            op = cmd.opcode
            if op in (C.INVALIDATE_IOMMU_PAGES, C.INVALIDATE_IOTLB_PAGES):
                forward.append(raw)
            elif op == C.INVALIDATE_DEVTAB_ENTRY:
                done += self._forward(forward)
                forward = []
                self._install_gdte(cmd.devid)
            elif op == C.COMPLETION_WAIT:
                done += self._forward(forward)
                forward = []
                if cmd.s:
                    try:
                        vm.memory.write_u64(cmd.address, cmd.data)
                    except OSError:
                        self._inject(E.Event(E.COMMAND_HARDWARE_ERROR, address=gpa))
                        self.stopped = True
                        break
            elif op == C.INVALIDATE_IOMMU_ALL:
                forward += self._emulate_all()
            # INVALIDATE_INTERRUPT_TABLE, PREFETCH, COMPLETE_PPR_REQUEST: emulated as no-ops.
            index = (index + 1) % RING
        done += self._forward(forward)
        self.vmm_cmd_head = index
        vm.trap("CMD_TAIL", forwarded=done)

    def _hw_trap(self, slot: GuestSlot) -> None:
        """HW-vIOMMU: the guest's command processor stalled on a command the hardware leaves
        to the VMM (the interrupt). Emulate it, then let the hardware go on (W1C)."""
        window = self.window
        assert window is not None
        head = window.read(R.VF_CMD_HEAD) // R.ENTRY_SIZE
        cmd = C.decode(self.vm.memory.read(self.cmd + head * R.ENTRY_SIZE, R.ENTRY_SIZE))
        forwarded = 0
        if cmd is not None and cmd.opcode == C.INVALIDATE_IOMMU_ALL:
            forwarded = self._forward(self._emulate_all())
        self.vm.trap("VCMD_TRAP", forwarded=forwarded)
        window.write(R.VF_STATUS, R.GST_CMD_TRAP)

    def _inject(self, ev: E.Event) -> None:
        """Mediated: the VMM writes an event into the emulated guest event log."""
        self._pending_events.append(ev)  # the guest reads it back in :meth:`events`

    def alloc_veventq(self, depth: int = 64) -> tuple[int, int]:
        """The VMM asks for the vIOMMU's AMD vEVENTQ (guest-DevID events)."""
        if self.veventq is None:
            self.veventq = self.vm.fd.veventq_alloc(self.viommu_id, U.IOMMU_VEVENTQ_TYPE_AMD, depth)
        return self.veventq

    def read_veventq(self) -> list[E.Event]:
        """Drain the vEVENTQ file: ``struct iommufd_vevent_header`` + 16-byte AMD events."""
        if self.veventq is None:
            return []
        data = self.vm.vmm.file(self.veventq[1]).read(4096)  # type: ignore[attr-defined]
        out = []
        pos = 0
        while pos + _HDR.size <= len(data):
            flags, _seq = _HDR.unpack_from(data, pos)
            pos += _HDR.size
            if flags & U.IOMMU_VEVENTQ_FLAG_LOST_EVENTS:
                continue
            out.append(E.Event.from_bytes(data[pos : pos + E.EVENT_SIZE]))
            pos += E.EVENT_SIZE
        return out

    # -- the guest driver -----------------------------------------------------------------------
    def _cmd_head(self) -> int:
        if self.window is not None:
            return self.window.read(R.VF_CMD_HEAD) // R.ENTRY_SIZE
        return self.vmm_cmd_head

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
            self._cmd_tail_trap(first, tail)

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
            # The guest device table is write-protected: the store exits to the VMM.
            self.vm.trap("gDTE")
            self._install_gdte(d.gdev.virt_id)
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
        dom.hwpt_id = self.hwpts.get(gdev.virt_id, 0)
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
        self._mmio_trap(R.CONTROL, R.CTRL_IOMMU_EN | R.CTRL_EVT_LOG_EN | R.CTRL_GT_EN)
        self._mmio_trap(R.CMD_BUF_BASE, R.base_value(gpa, RING_LOG2))
        self.cmd = gpa
        self.cmd_tail = self.vmm_cmd_head = 0
        self.stopped = False
        self._mmio_trap(
            R.CONTROL, R.CTRL_IOMMU_EN | R.CTRL_CMDBUF_EN | R.CTRL_EVT_LOG_EN | R.CTRL_GT_EN
        )

    def events(self) -> list[E.Event]:
        """What the guest driver finds in its event log (and consumes)."""
        if self.window is None:
            out = self._pending_events + self.read_veventq()
            self._pending_events = []
            return out
        tail = self.window.read(R.VF_EVT_TAIL) // R.ENTRY_SIZE
        out = []
        while self.evt_head != tail:
            raw = self.vm.memory.read(self.evt + self.evt_head * R.ENTRY_SIZE, R.ENTRY_SIZE)
            out.append(E.Event.from_bytes(raw))
            self.evt_head = (self.evt_head + 1) % RING
        self.window.write(R.VF_EVT_HEAD, self.evt_head * R.ENTRY_SIZE)
        return out

    def close(self) -> None:
        """The VMM tears the vIOMMU down: HWPTs, HW queues, vEVENTQ, vDEVICEs, vIOMMU."""
        fd = self.vm.fd
        for gdevid, hwpt in list(self.hwpts.items()):
            if self._bound(self.devs[gdevid]):
                fd.detach(self.devs[gdevid].gdev.dev_id)
            self._destroy(hwpt)
        self.hwpts.clear()
        for qtype in sorted(self.queues, reverse=True):
            self._destroy(self.queues.pop(qtype))
        if self.veventq is not None:
            self.vm.vmm.close(self.veventq[1])
            self._destroy(self.veventq[0])
            self.veventq = None
        for d in self.devs.values():
            if d.gdev.vdevice_id:
                self._destroy(d.gdev.vdevice_id)
                d.gdev.vdevice_id = 0
        if self.vma is not None:
            self.vma.close()  # munmap: the mapping holds the vIOMMU
            self.vma = None
        if self.viommu_id:
            self._destroy(self.viommu_id)
            self.viommu_id = 0
        self.window = None
