"""The VMM's AMD vIOMMU (QEMU's amd-iommu over iommufd, AMD's HW-vIOMMU prototype), apart
from the guest driver that programs it (:mod:`iommufd_amd.guest`).

The guest reaches it only through what real hardware gives a guest: stores to its trapped
first MMIO page (:meth:`VirtualAmd.mmio_write`), stores to its write-protected device table
(:meth:`VirtualAmd.gdte_store`, HW-vIOMMU) and, VMM-mediated, stores to the emulated
CMD_TAIL (:meth:`VirtualAmd.cmd_tail_write`). Each is a counted trap (:meth:`Vm.trap`).

* ``accelerated=True`` (HW-vIOMMU): the VMM hands the guest command buffer and event log to
  the hardware as IOMMU_HW_QUEUE_ALLOC(AMD_CMD / AMD_EVT) when the guest turns them on, and
  maps the guest's VF MMIO page (head/tail registers) for it from the iommufd. A new gDTE
  becomes a nested HWPT on the vIOMMU. Commands the hardware will not virtualise stall the
  guest's command processor and interrupt the VMM, which emulates them (a counted trap).
* ``accelerated=False`` (VMM-mediated): the VMM reads the new commands from guest RAM,
  installs nested HWPTs for INVALIDATE_DEVTAB_ENTRY, re-issues invalidations through
  IOMMU_HWPT_INVALIDATE on the vIOMMU (IOMMU_VIOMMU_INVALIDATE_DATA_AMD, model-defined) and
  emulates COMPLETION_WAIT; an unreadable or illegal command stops the emulated command
  processor with the event the hardware would log.

The guest device table's base (DEV_TAB_BASE) is given when the VMM is built: the model does
not count that one boot-time store among the traps (the model's choice, as before VT-d and
SMMUv3 grew their register files).
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
from iommufd_model.errors import err
from iommufd_model.locking import SerializedSubclasses
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm.guest import GuestDevice

if TYPE_CHECKING:
    from iommufd_amd.viommu.hw import GuestSlot
    from iommufd_model.core.mmap import IommufdVma
    from iommufd_model.hw.iommu import IommuHw
    from iommufd_model.vmm.vm import Vm

RING_LOG2 = 8  # 256 entries of 16 bytes: one page each for the command buffer and event log
RING = 1 << RING_LOG2
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


class VirtualAmd(SerializedSubclasses):
    """One emulated AMD IOMMU of a VM over host IOMMU ``iommu``: the iommufd vIOMMU behind
    it, the guest registers it traps, and the nested HWPTs it installed for the guest's
    device-table entries. Its public methods hold the model lock, as the guest's do."""

    def __init__(self, vm: Vm, iommu: IommuHw, *, accelerated: bool, devtab: int) -> None:
        self.vm = vm
        self.iommu = iommu
        self.accelerated = accelerated
        self.devtab = devtab  # the guest device table's GPA (its DEV_TAB_BASE)
        self.viommu_id = 0
        self.viommu_out = b""  # struct iommu_viommu_amd as the kernel returned it
        self.window: GuestVfPage | None = None  # the VF MMIO page mapped into the guest
        self.vma: IommufdVma | None = None  # the VMM's mapping of it
        self.irq: Any = None  # the HW-vIOMMU interrupt line (command traps)
        self.mmio: dict[int, int] = {}  # the guest's trapped registers as last stored
        self.queues: dict[int, int] = {}  # HW queue type -> object id
        self.veventq: tuple[int, int] | None = None
        self.devices: dict[int, GuestDevice] = {}  # gDevID -> passed-through device
        self.hwpts: dict[int, int] = {}  # gDevID -> nested HWPT of its gDTE
        self.cmd_head = 0  # mediated: the emulated CMD_HEAD (entry index)
        self.cmd_tail = 0  # mediated: the CMD_TAIL last stored (entry index)
        self.stopped = False  # mediated: the emulated command processor halted (error)
        self._pending_events: list[E.Event] = []  # mediated: events the VMM emulated

    # -- what the VMM sets up -------------------------------------------------------------------
    def create_viommu(self, dev_id: int) -> int:
        """IOMMU_VIOMMU_ALLOC over the nest parent of ``dev_id``; with the HW-vIOMMU, mmap the
        guest's VF MMIO page and hook the vIOMMU's interrupt line."""
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
        return self.viommu_id

    def plug(self, gdev: GuestDevice) -> None:
        """``gdev`` (bound, with its vDEVICE) is the guest's device ``gdev.virt_id``."""
        self.devices[gdev.virt_id] = gdev

    # -- guest stores that exit ---------------------------------------------------------------
    def mmio_write(self, offset: int, value: int) -> None:
        """A guest store to its trapped first MMIO page. As AMD's QEMU prototype: a base
        register store is recorded; a CONTROL store that turns a buffer on allocates its HW
        queue (IOMMU_HW_QUEUE_ALLOC with the recorded GPA and length), one that turns it off
        destroys the queue; a base store while on re-creates it. Mediated, a command-buffer
        base store also restarts the emulated command processor at entry 0 (the guest's
        zero stores to CMD_HEAD/CMD_TAIL around it, folded into it by the model)."""
        self.vm.trap("MMIO")
        if offset in BASE_REGS:
            self.mmio[offset] = value
            if offset == R.CMD_BUF_BASE and not self.accelerated:
                self.cmd_head = self.cmd_tail = 0
                self.stopped = False
        if not self.accelerated:
            return
        if offset in BASE_REGS:
            if self.mmio.get(R.CONTROL, 0) & BASE_REGS[offset][1]:
                self._queue(offset, on=True)
        elif offset == R.CONTROL:
            old = self.mmio.get(R.CONTROL, 0)
            self.mmio[R.CONTROL] = value
            for base, (_qtype, en) in BASE_REGS.items():
                if (old ^ value) & en:
                    self._queue(base, on=bool(value & en))

    def gdte_store(self, gdevid: int) -> None:
        """HW-vIOMMU: the guest device table is write-protected, so a gDTE store exits."""
        self.vm.trap("gDTE")
        self._install_gdte(gdevid)

    def cmd_tail_write(self, tail: int) -> None:
        """Mediated: the guest stored CMD_TAIL = ``tail``; emulate the new commands."""
        first, self.cmd_tail = self.cmd_tail, tail
        self._emulate_commands(first, tail)

    # -- the emulation ------------------------------------------------------------------------
    def _cmd_base(self) -> int:
        return self.mmio.get(R.CMD_BUF_BASE, 0) & R.BASE_ADDR_MASK

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
        gdev = self.devices.get(gdevid)
        if gdev is None:
            return
        vm = self.vm
        raw = vm.memory.read(self.devtab + gdevid * DTE_SIZE, DTE_SIZE)
        g = Dte.from_bytes(raw)
        old = self.hwpts.pop(gdevid, None)
        if not self._bound(gdev):
            # The VMM unplugged the device: the guest's writes go nowhere.
            if old is not None:
                self._destroy(old)
            return
        if g.v and g.gv:
            hwpt = vm.fd.hwpt_alloc(
                gdev.dev_id, self.viommu_id, data_type=U.IOMMU_HWPT_DATA_AMD_GUEST, data=raw
            )
            vm.fd.attach(gdev.dev_id, hwpt)
            self.hwpts[gdevid] = hwpt
        else:
            vm.fd.detach(gdev.dev_id)
        if old is not None:
            vm.fd.destroy(old)

    def _bound(self, gdev: GuestDevice) -> bool:
        """Whether the VMM still has the device bound (it may unplug it under the guest)."""
        try:
            self.vm.fd.objects.get(gdev.dev_id)
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
        into what it covers for this guest -- the gDomID of every gDTE of its devices and
        every gDevID it installed."""
        out = []
        for gdevid in self.devices:
            raw = self.vm.memory.read(self.devtab + gdevid * DTE_SIZE, DTE_SIZE)
            gdte = Dte.from_bytes(raw)
            if gdte.v and gdte.domain_id:
                out.append(C.inv_iommu_all_pages(gdte.domain_id))
        return out + [C.inv_devtab_entry(g) for g in self.hwpts]

    def _emulate_commands(self, first: int, last: int) -> None:
        """Mediated: emulate the guest commands in ``[first, last)``."""
        vm = self.vm
        cmd_base = self._cmd_base()
        forward: list[bytes] = []
        done = 0
        index = first
        while index != last and not self.stopped:
            gpa = cmd_base + index * R.ENTRY_SIZE
            try:
                raw = vm.memory.read(gpa, R.ENTRY_SIZE)
            except OSError:  # the guest pointed its buffer outside its RAM
                raw = b""
            cmd = C.decode(raw) if raw else None
            if cmd is None:
                done += self._forward(forward)
                forward = []
                code = E.ILLEGAL_COMMAND_ERROR if raw else E.COMMAND_HARDWARE_ERROR
                self._pending_events.append(E.Event(code, address=gpa))
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
                        self._pending_events.append(E.Event(E.COMMAND_HARDWARE_ERROR, address=gpa))
                        self.stopped = True
                        break
            elif op == C.INVALIDATE_IOMMU_ALL:
                forward += self._emulate_all()
            # INVALIDATE_INTERRUPT_TABLE, PREFETCH, COMPLETE_PPR_REQUEST: emulated as no-ops.
            index = (index + 1) % RING
        done += self._forward(forward)
        self.cmd_head = index
        vm.trap("CMD_TAIL", forwarded=done)

    def _hw_trap(self, slot: GuestSlot) -> None:
        """HW-vIOMMU: the guest's command processor stalled on a command the hardware leaves
        to the VMM (the interrupt). Emulate it, then let the hardware go on (W1C)."""
        window = self.window
        assert window is not None
        head = window.read(R.VF_CMD_HEAD) // R.ENTRY_SIZE
        raw = self.vm.memory.read(self._cmd_base() + head * R.ENTRY_SIZE, R.ENTRY_SIZE)
        cmd = C.decode(raw)
        forwarded = 0
        if cmd is not None and cmd.opcode == C.INVALIDATE_IOMMU_ALL:
            forwarded = self._forward(self._emulate_all())
        self.vm.trap("VCMD_TRAP", forwarded=forwarded)
        window.write(R.VF_STATUS, R.GST_CMD_TRAP)

    # -- the event log ------------------------------------------------------------------------
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

    def emulated_events(self) -> list[E.Event]:
        """Mediated: what the VMM puts in the emulated guest event log (its own events, then
        the vEVENTQ's), each given once."""
        out = self._pending_events + self.read_veventq()
        self._pending_events = []
        return out

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """The VMM tears the vIOMMU down: HWPTs, HW queues, vEVENTQ, vDEVICEs, vIOMMU."""
        fd = self.vm.fd
        for gdevid, hwpt in list(self.hwpts.items()):
            if self._bound(self.devices[gdevid]):
                fd.detach(self.devices[gdevid].dev_id)
            self._destroy(hwpt)
        self.hwpts.clear()
        for qtype in sorted(self.queues, reverse=True):
            self._destroy(self.queues.pop(qtype))
        if self.veventq is not None:
            self.vm.vmm.close(self.veventq[1])
            self._destroy(self.veventq[0])
            self.veventq = None
        for gdev in self.devices.values():
            if gdev.vdevice_id:
                self._destroy(gdev.vdevice_id)
                gdev.vdevice_id = 0
        if self.vma is not None:
            self.vma.close()  # munmap: the mapping holds the vIOMMU
            self.vma = None
        if self.viommu_id:
            self._destroy(self.viommu_id)
            self.viommu_id = 0
        self.window = None
