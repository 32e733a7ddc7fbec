"""The Linux AMD IOMMU driver as hook implementations (drivers/iommu/amd/{init,iommu,nested,
iommufd}.c): it programs the hardware only through MMIO, the device table, page tables and
the command buffer, and waits for its commands with COMPLETION_WAIT like the kernel does.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Any

from iommufd_amd import commands as C
from iommufd_amd import ppr as P
from iommufd_amd import regs as R
from iommufd_amd.dte import (
    DTE_SIZE,
    GUEST_PGTABLE_4_LEVEL,
    GUEST_PGTABLE_5_LEVEL,
    HAD_DIRTY,
    Dte,
)
from iommufd_amd.gcr3 import Gcr3Table, V2PageTable, glx_for
from iommufd_amd.hw import AmdIommu
from iommufd_amd.pgtable_v1 import AMD_IOMMU_PGSIZES, AmdV1PageTable
from iommufd_amd.viommu import AmdHwQueue, AmdViommu, GdomInfo
from iommufd_amd.viommu import kernel as VK
from iommufd_amd.viommu.hw import IOMMU_DEVID, MAX_GUESTS, VfMmioWindow
from iommufd_model.api import (
    Domain,
    DomainType,
    DriverInfo,
    Feature,
    HwInfo,
    HwQueueBase,
    Ida,
    InvalidateResult,
    UserData,
    VdeviceBase,
    ViommuBase,
    driver_state,
    err,
    hookimpl,
)
from iommufd_model.hw.iommu import IommuHw
from iommufd_model.hw.memory import PAGE_SHIFT
from iommufd_model.hw.pci import PciDevice
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.machine import Machine
from iommufd_model.paging import IotlbGather, PagingDomain, PagingDomainOps
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_amd.events import Event
    from iommufd_model.core.mmap import MmapOwner
    from iommufd_model.vmm import GuestIommu, Vm

MAX_DOMAIN_ID = 65536
DEVTAB_PAGES = 512  # 64 Ki DTEs of 32 bytes: the table for last_bdf = 0xffff
CMD_LOG2 = R.LEN_512
PGSIZES_V2 = (1 << 12) | (1 << 21) | (1 << 30)  # AMD_IOMMU_PGSIZES_V2
MSI_RANGE = (0xFEE0_0000, 0xFEEF_FFFF)  # MSI_RANGE_START / MSI_RANGE_END
HT_RANGE = (0xFD_0000_0000, 0xFF_FFFF_FFFF)  # HT_RANGE_START / HT_RANGE_END
PAGING_FLAGS = (
    U.IOMMU_HWPT_ALLOC_NEST_PARENT | U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING | U.IOMMU_HWPT_ALLOC_PASID
)
OPTIONS = {
    "host_levels",
    "guest_levels",
    "pasid_bits",
    "hd",
    "pgtable",
    "domain_levels",
    "viommu_guests",
    "gst_buffer_trp",
}
HW_QUEUE_TYPES = (
    U.IOMMU_HW_QUEUE_TYPE_AMD_CMD,
    U.IOMMU_HW_QUEUE_TYPE_AMD_EVT,
    U.IOMMU_HW_QUEUE_TYPE_AMD_PPR,
)
VIOMMU_GUESTS = 16  # default HW-vIOMMU guest IDs per IOMMU (option viommu_guests; 0 = none)
_GDTE = struct.Struct("<4Q")
#: What the driver implements (docs/parity-amd.md has the table). Not PASID attach and not IOPF:
#: Linux 7.2's AMD paging domains have no set_dev_pasid, and page requests reach a fault queue
#: only through a PASID attach handle (unsupported upstream). Not HWPT_INVALIDATE
#: on a nested HWPT (the uAPI has no AMD HWPT data type); the HW-vIOMMU brings HW queues
#: (guest command buffer, guest event log), the AMD vEVENTQ and the VMM-mediated
#: vIOMMU invalidation (IOMMU_VIOMMU_INVALIDATE_DATA_AMD, model-defined: docs/amd-hw-viommu.md).
FEATURES = frozenset(
    {
        Feature.PAGING,
        Feature.NEST_PARENT,
        Feature.NESTED,
        Feature.DIRTY_TRACKING,
        Feature.VIOMMU,
        Feature.VDEVICE,
        Feature.LARGE_PAGES,
        Feature.HW_QUEUE,
        Feature.VEVENTQ,
        Feature.VIOMMU_INVALIDATE,
    }
)


class DevData:
    """``struct iommu_dev_data``: what the driver knows about one device."""

    def __init__(self, dev: PciDevice) -> None:
        self.dev = dev
        self.domain: Domain | None = None
        self.gcr3: Gcr3Table | None = None
        self.gcr3_domid = 0
        self.giov = False
        self.vgid = 0  # HW-vIOMMU guest ID and guest DeviceID (from its vDEVICE)
        self.vgdevid = 0
        # pci_ats_queue_depth(): the ATS capability's Invalidate Queue Depth, PCI_ATS_MAX_QDEP
        # (32) when the field reads 0 -- the model's PCI device has no ATS capability
        # registers, so it reads as 0 (model's own).
        self.ats_qdep = 32
        # pdev_enable_cap_pri() / amd_iommu_iopf_add_device(): PRI is enabled for an ATS
        # device (the model's PCI device has PRI exactly when it has ATS, as for VT-d) while
        # an SVA-capable (v2) domain is attached; ``ppr`` then sets the DTE's PPR bit.
        self.ppr = False
        # pci_prg_resp_pasid_required(): the model's PCI device has no PRI capability
        # registers; the model answers "required" (GN and the PASID in responses).
        self.pri_tlp = True


class AmdKernel:
    """The driver's per-IOMMU state (``struct amd_iommu``) and its low-level operations."""

    def __init__(self, hw: AmdIommu, options: dict[str, Any]) -> None:
        self.hw = hw
        self.mem = hw.memory
        # pdom_ids: DomainIDs 1 .. MAX_DOMAIN_ID - 1 (0 is never used)
        self.domids = Ida("DomainID", 1, MAX_DOMAIN_ID - 1, owner=hw)
        self.dev_data: dict[int, DevData] = {}
        self.pgtable = options.get("pgtable", "v1")
        self.domain_levels = int(options.get("domain_levels", 4))
        self.gpt_levels = 5 if hw.gpt5 else 4
        self.cmd_sem_val = 0
        self.pas: VK.PasState | None = None  # the HW-vIOMMU private address space
        self.viommu_error = 0  # errno of a failed amd_viommu_init() (no HW-vIOMMU then)
        hw.ppr_irq = self.ppr_interrupt
        hw.viommu_irq = self.viommu_event
        self.init_hardware()
        VK.viommu_init(self)

    # -- init.c ------------------------------------------------------------------------------
    def init_hardware(self) -> None:
        hw = self.hw
        mem = self.mem
        mmio = hw.mmio
        self.devtab = mem.alloc_contiguous(DEVTAB_PAGES) << PAGE_SHIFT
        mmio.write(R.DEV_TABLE_BASE, R.dev_table_base_value(self.devtab, DEVTAB_PAGES))
        # iommu_enable_command_buffer / iommu_enable_event_buffer / iommu_enable_ppr_log
        self.cmd_buf = mem.alloc_contiguous(2) << PAGE_SHIFT
        self.cmd_entries = 1 << CMD_LOG2
        self.cmd_tail = 0
        mmio.write(R.CMD_BUF_BASE, R.base_value(self.cmd_buf, CMD_LOG2))
        mmio.write(R.CMD_HEAD, 0)
        mmio.write(R.CMD_TAIL, 0)
        self.evt_buf = mem.alloc_contiguous(2) << PAGE_SHIFT
        mmio.write(R.EVT_LOG_BASE, R.base_value(self.evt_buf, R.LEN_512))
        self.ppr_buf = mem.alloc_contiguous(2) << PAGE_SHIFT
        mmio.write(R.PPR_LOG_BASE, R.base_value(self.ppr_buf, R.LEN_512))
        self.cmd_sem = mem.alloc_frame() << PAGE_SHIFT
        efr = mmio.read(R.EFR)
        ctrl = R.CTRL_COHERENT_EN | R.CTRL_CMDBUF_EN | R.CTRL_EVT_LOG_EN
        if efr & R.EFR_PPR_SUP:
            ctrl |= R.CTRL_PPRLOG_EN | R.CTRL_PPR_EN
        if efr & R.EFR_GT_SUP:
            ctrl |= R.CTRL_GT_EN
            if mmio.read(R.EFR2) & R.EFR2_GCR3TRPMODE:
                ctrl |= R.CTRL_GCR3TRPMODE
        mmio.write(R.CONTROL, ctrl)
        mmio.write(R.CONTROL, ctrl | R.CTRL_IOMMU_EN)
        # amd_iommu_flush_all_caches(): INVALIDATE_IOMMU_ALL where supported.
        if efr & R.EFR_IA_SUP:
            self.queue(C.inv_all())
        self.completion_wait()

    # -- features ----------------------------------------------------------------------------
    @property
    def efr(self) -> int:
        return self.hw.efr

    def hd_support(self) -> bool:
        return bool(self.efr & R.EFR_HD_SUP)

    def pasid_supported(self) -> bool:
        return bool(self.efr & R.EFR_GT_SUP)

    def nest_parent_supported(self) -> bool:
        # is_nest_parent_supported(): GT, GIoSup and GCR3TRPMode
        return bool(
            self.efr & R.EFR_GT_SUP
            and self.efr & R.EFR_GIO_SUP
            and self.hw.efr2 & R.EFR2_GCR3TRPMODE
        )

    # -- the command buffer -----------------------------------------------------------------
    def queue(self, cmd: bytes) -> None:
        """iommu_queue_command: write at the tail, then move the tail register."""
        nxt = (self.cmd_tail + 1) % self.cmd_entries
        head = self.hw.mmio.read(R.CMD_HEAD) // R.ENTRY_SIZE
        if nxt == head:
            raise err(errno.EIO, "AMD-Vi: command buffer full (command processor stopped?)")
        self.mem.write(self.cmd_buf + self.cmd_tail * C.CMD_SIZE, cmd)
        self.cmd_tail = nxt
        self.hw.mmio.write(R.CMD_TAIL, nxt * R.ENTRY_SIZE)

    def completion_wait(self) -> None:
        """iommu_completion_wait: COMPLETION_WAIT storing a new value, then wait for it."""
        self.cmd_sem_val += 1
        self.queue(C.completion_wait(self.cmd_sem, self.cmd_sem_val))
        if self.mem.read_u64(self.cmd_sem) != self.cmd_sem_val:
            raise err(errno.EIO, "AMD-Vi: Completion-Wait loop timed out")

    def reset_cmd_buffer(self) -> None:
        """amd_iommu_reset_cmd_buffer: what the driver does after ILLEGAL_COMMAND_ERROR."""
        mmio = self.hw.mmio
        ctrl = mmio.read(R.CONTROL)
        mmio.write(R.CONTROL, ctrl & ~R.CTRL_CMDBUF_EN)
        mmio.write(R.CMD_HEAD, 0)
        mmio.write(R.CMD_TAIL, 0)
        self.cmd_tail = 0
        mmio.write(R.CONTROL, ctrl | R.CTRL_CMDBUF_EN)

    # -- the device table --------------------------------------------------------------------
    def dte_addr(self, devid: int) -> int:
        return self.devtab + devid * DTE_SIZE

    def read_dte(self, devid: int) -> Dte:
        return Dte.from_bytes(self.mem.read(self.dte_addr(devid), DTE_SIZE))

    def write_dte(self, devid: int, dte: Dte) -> None:
        words = dte.encode()
        addr = self.dte_addr(devid)
        # update_dte256(): the upper words first, data[0] (V, TV, Mode) last.
        for i in (3, 2, 1, 0):
            self.mem.write_u64(addr + 8 * i, words[i])

    def make_dte(self, dd: DevData) -> Dte:
        """set_dte_entry() / set_dte_nested() / amd_iommu_make_clear_dte() in one place."""
        dte = Dte(v=True)
        dom = dd.domain
        if isinstance(dom, AmdNestedDomain):
            parent = dom.parent_domain
            g = Dte.decode(dom.gdte)
            self._set_v1(dte, parent, dom.ginfo.hdom_id)
            dte.gv = True  # GV is required for the nested page table
            dte.ppr = g.ppr
            dte.glx = g.glx
            dte.giov = g.giov
            dte.gcr3 = g.gcr3
            dte.gpt_level = g.gpt_level
        else:
            if isinstance(dom, AmdDomain) and not dom.v2:
                self._set_v1(dte, dom, dom.id)
            elif dom is not None or dd.gcr3 is not None:
                dte.tv = True  # mode 0: no host translation
                dte.ir = dte.iw = dom is not None
            if dd.gcr3 is not None:
                dte.domain_id = dd.gcr3_domid
                dte.gv = True
                dte.glx = dd.gcr3.glx
                dte.giov = dd.giov
                dte.gcr3 = dd.gcr3.root
                dte.ppr = dd.ppr  # set_dte_gcr3_table(): DTE_FLAG_PPR with IOPF on
                dte.gpt_level = (
                    GUEST_PGTABLE_5_LEVEL if self.gpt_levels == 5 else GUEST_PGTABLE_4_LEVEL
                )
        if dte.tv and dd.dev.ats:
            dte.i = True  # DTE_FLAG_IOTLB
        if isinstance(dom, AmdNestedDomain) and dom.viommu.gid:
            # set_dte_nested() of AMD's tree: vImuEn, the guest DeviceID and the guest ID
            # from the device's vDEVICE (data[3]); only a nested attach writes them.
            dte.viommu_en = True
            dte.gdev_id = dd.vgdevid
            dte.guest_id = dd.vgid
        return dte

    @staticmethod
    def _set_v1(dte: Dte, dom: AmdDomain, domid: int) -> None:
        """amd_iommu_set_dte_v1(): host table, permissions, DomainID, dirty tracking."""
        dte.tv = True
        dte.mode = dom.mode
        dte.host_root = dom.pt.root
        dte.ir = dte.iw = True
        dte.domain_id = domid
        if dom.dirty_enabled:
            dte.had = HAD_DIRTY

    def update_dte(self, dev: PciDevice, *, clear: bool = False, flush_old: bool = True) -> None:
        """Linux 7.2's DTE update streams: ``set_dte_entry()`` (``clear=False``) or
        ``clear_dte_entry()`` (``clear=True``: V only, ``amd_iommu_make_clear_dte``), both
        through ``amd_iommu_update_dte()`` -- write, INVALIDATE_DEVTAB_ENTRY, a whole-device
        INVALIDATE_IOTLB_PAGES when ATS is on (``device_flush_dte``), COMPLETION_WAIT.
        ``set_dte_entry()`` then flushes the DomainID the old DTE held, whatever it was
        (``amd_iommu_flush_tlb_domid``: all pages, PDE, its own wait); the nested attach
        (``nested_attach_device``) writes through ``amd_iommu_update_dte()`` alone
        (``flush_old=False``)."""
        dd = self.dev_data[dev.rid]
        old_domid = self.read_dte(dev.rid).domain_id
        new = Dte(v=True) if clear else self.make_dte(dd)
        self.write_dte(dev.rid, new)
        self.flush_dte(dd)
        self.completion_wait()
        if not clear and flush_old and old_domid:
            self.queue(C.inv_iommu_all_pages(old_domid))
            self.completion_wait()

    def flush_dte(self, dd: DevData) -> None:
        """device_flush_dte(): INVALIDATE_DEVTAB_ENTRY, then the whole device TLB with ATS."""
        self.queue(C.inv_devtab_entry(dd.dev.rid))
        if dd.dev.ats:
            self.queue(C.inv_iotlb_pages(dd.dev.rid, 0, 1 << 64, qdep=dd.ats_qdep))

    def detach_device(self, dd: DevData) -> None:
        """detach_device(): the cleared DTE, the old domain's flush-all while the device is
        still on its list, then the GCR3 table of a v2 domain (GCR3[0] cleared with its PASID
        flush, table and per-device DomainID freed without commands)."""
        dom = dd.domain
        dd.domain = None
        dd.ppr = False  # amd_iommu_iopf_remove_device()
        self.update_dte(dd.dev, clear=True)
        if not isinstance(dom, AmdDomain):
            return
        self.flush_domain(dom, 0, 1 << 64)
        dom.attached.discard((dd.dev.rid, 0))
        if dom.v2 and dd.gcr3 is not None:
            dd.gcr3.clear(0)
            self.flush_pasid(dd, 0)
            self.free_gcr3(dd)

    # -- ppr.c ---------------------------------------------------------------------------------
    def ppr_interrupt(self) -> None:
        """amd_iommu_poll_ppr_log(): every entry between head and tail is copied, zeroed in
        the log (erratum 733), the head moved past it, then handed to
        iommu_call_iopf_notifier()."""
        mmio = self.hw.mmio
        mmio.write(R.STATUS, R.ST_PPR_INT)  # the interrupt handler acks PprInt (W1C)
        size = 1 << R.LEN_512  # the PPR log init_hardware() set up
        head = mmio.read(R.PPR_HEAD) // R.ENTRY_SIZE
        tail = mmio.read(R.PPR_TAIL) // R.ENTRY_SIZE
        while head != tail:
            slot = self.ppr_buf + head * R.ENTRY_SIZE
            entry = P.PprEntry.from_bytes(self.mem.read(slot, R.ENTRY_SIZE))
            self.mem.write(slot, bytes(R.ENTRY_SIZE))
            head = (head + 1) % size
            mmio.write(R.PPR_HEAD, head * R.ENTRY_SIZE)
            self.iopf_notify(entry)

    def iopf_notify(self, entry: P.PprEntry) -> None:
        """iommu_call_iopf_notifier(): an unknown type is ignored; GN=0, a reserved bit,
        PASID 0 or a PASID beyond the device's are aborted here (COMPLETE_PPR_REQUEST with
        FAILURE); the rest go to the fault framework, which finds no iommufd handler on the
        PASID (none can be attached on AMD) and answers INVALID (iopf_error_response())."""
        if entry.req_type != P.PPR_REQ_FAULT:
            return
        dd = self.dev_data.get(entry.devid)
        if dd is None:
            return  # pci_get_domain_bus_and_slot() found no device
        grpid = entry.tag & 0x1FF
        valid = entry.flags & P.PPR_FLAG_GN and not entry.flags & P.PPR_FLAG_RVSD
        max_pasids = 1 << min(dd.dev.pasid_bits, self.hw.pasid_bits)
        if not valid or entry.pasid == 0 or entry.pasid >= max_pasids:
            self.complete_ppr(dd, entry.pasid, P.RESP_FAILURE, grpid)
            return
        # report_device_fault() -> find_fault_handler() finds nothing -> err_bad_iopf.
        self.complete_ppr(dd, entry.pasid, P.RESP_INVALID, grpid)

    def complete_ppr(self, dd: DevData, pasid: int, status: int, tag: int) -> None:
        """amd_iommu_complete_ppr(): COMPLETE_PPR_REQUEST, GN (and the PASID) when the
        device's PRI wants the PASID in responses (``pri_tlp``); queued without a wait."""
        self.queue(C.complete_ppr(dd.dev.rid, pasid, status & 0xF, tag, gn=dd.pri_tlp))

    def viommu_event(self, gid: int, event: Event) -> None:
        """The vIOMMU event interrupt: forward a guest device's event (guest DevID) to the
        vIOMMU's vEVENTQ of the model's own type IOMMU_VEVENTQ_TYPE_AMD when the VMM allocated
        one (iommufd_viommu_report_event; no AMD source has this type)."""
        viommu = self.pas.by_gid.get(gid) if self.pas is not None else None
        if viommu is not None and viommu.core is not None:
            viommu.core.report_event(U.IOMMU_VEVENTQ_TYPE_AMD, event.to_bytes())

    # -- GCR3 tables ----------------------------------------------------------------------------
    def get_gcr3(self, dd: DevData) -> Gcr3Table:
        """setup_gcr3_table(): one per device, with its own DomainID."""
        if dd.gcr3 is None:
            domid = self.domids.alloc()  # ENOSPC when none is left
            bits = min(dd.dev.pasid_bits, self.hw.pasid_bits) or 1
            dd.gcr3 = Gcr3Table(self.mem, min(glx_for(bits), self.hw.max_glx))
            dd.gcr3_domid = domid
        return dd.gcr3

    def free_gcr3(self, dd: DevData) -> None:
        """free_gcr3_table(): the table and the per-device DomainID go, no command."""
        if dd.gcr3 is None:
            return
        dd.gcr3.free()
        self.domids.free(dd.gcr3_domid)
        dd.gcr3 = None
        dd.gcr3_domid = 0
        dd.giov = False

    def flush_pasid(self, dd: DevData, pasid: int) -> None:
        """dev_flush_pasid_all(): the PASID's guest translations (GN=1, PDE), the device TLB
        of that PASID with ATS, then wait."""
        self.queue(C.inv_iommu_all_pages(dd.gcr3_domid, pasid=pasid, gn=True))
        if dd.dev.ats:
            self.queue(
                C.inv_iotlb_pages(dd.dev.rid, 0, 1 << 64, qdep=dd.ats_qdep, pasid=pasid, gn=True)
            )
        self.completion_wait()

    # -- domain flushes ------------------------------------------------------------------------
    def flush_domain(self, dom: AmdDomain, iova: int, size: int, *, pde: bool = True) -> None:
        """amd_iommu_domain_flush_pages(): IOMMU TLB (+ device TLBs), then wait. ``pde`` is
        CMD_INV_IOMMU_PAGES_PDE_MASK: always for a flush-all, for an unmap only when it freed
        a table."""
        queued = False
        if dom.v2:
            for rid, pasid in sorted(dom.attached):
                dd = self.dev_data[rid]
                self.queue(
                    C.inv_iommu_pages(dd.gcr3_domid, iova, size, pasid=pasid, pde=pde, gn=True)
                )
                queued = True
        else:
            # The parent's own DomainID tags its attached devices and, on the HW-vIOMMU, the
            # translate DTE of every vIOMMU on it (guest buffers through stage 2).
            ids = [dom.id] if dom.attached or any(v.gid for v in dom.viommus) else []
            for viommu in dom.viommus:
                ids += viommu.hdom_ids()  # the nest parent's stage 2 under every hDomID
            for domid in ids:
                self.queue(C.inv_iommu_pages(domid, iova, size, pde=pde))
                queued = True
        for rid, pasid in sorted(dom.attached):
            dev = self.dev_data[rid].dev
            if dev.ats:
                qdep = self.dev_data[rid].ats_qdep
                self.queue(C.inv_iotlb_pages(rid, iova, size, qdep=qdep, pasid=pasid, gn=dom.v2))
                queued = True
        if queued:
            self.completion_wait()


class AmdDomain(PagingDomain[RadixPageTable]):
    """``struct protection_domain`` of a paging domain: v1 (host) or v2 (x86-64) tables."""

    def __init__(self, kernel: AmdKernel, flags: int, *, v2: bool) -> None:
        hw = kernel.hw
        self.v2 = v2
        pt: RadixPageTable
        if v2:
            levels = kernel.gpt_levels
            self.mode = 0
            pt = V2PageTable(kernel.mem, levels)
            pgsizes = PGSIZES_V2
            end = (1 << (56 if levels == 5 else 47)) - 1  # no sign extension: lower half
        else:
            self.mode = min(kernel.domain_levels, hw.max_mode)
            pt = AmdV1PageTable(kernel.mem, self.mode)
            pgsizes = AMD_IOMMU_PGSIZES
            end = min((1 << pt.fmt.va_bits) - 1, (1 << 64) - 1)
        super().__init__(
            hw,
            pt,
            pgsize_bitmap=pgsizes,
            aperture_start=0,
            aperture_end=end,
            nest_parent=bool(flags & U.IOMMU_HWPT_ALLOC_NEST_PARENT),
            dirty_tracking=bool(flags & U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING),
            pasid_compat=v2,
        )
        self.kernel = kernel
        try:
            self.id = kernel.domids.alloc()
        except OSError:
            self.pt.free()
            raise
        self.attached: set[tuple[int, int]] = set()  # (devid, pasid; 0 for the RID)
        self.viommus: list[AmdViommu] = []

    def iotlb_sync(self, gather: IotlbGather) -> None:
        """amd_iommu_iotlb_sync(): PDE only when the unmap freed a table (generic_pt frees
        every table the range covers whole: the gather's free list is not empty)."""
        frees_table = self.pt.covers_a_table(gather.first, gather.last)
        self.kernel.flush_domain(
            self, gather.first, gather.last - gather.first + 1, pde=frees_table
        )

    def free(self) -> None:
        super().free()
        self.kernel.domids.free(self.id)


class AmdNestedDomain(Domain):
    """``struct nested_domain``: guest DTE words over the vIOMMU's nest parent."""

    def __init__(
        self, hw: AmdIommu, viommu: AmdViommu, gdte: tuple[int, int, int, int], info: GdomInfo
    ) -> None:
        parent = viommu.parent
        assert isinstance(parent, AmdDomain)
        super().__init__(hw, DomainType.NESTED, parent=parent)
        self.parent_domain = parent
        self.viommu = viommu
        self.gdte = gdte
        self.gdom_id = gdte[1] & 0xFFFF
        self.ginfo = info


def _kernel(iommu: IommuHw) -> AmdKernel:
    return driver_state(iommu, AmdKernel)


def _paging(domain: Domain) -> AmdDomain:
    if not isinstance(domain, AmdDomain):
        raise err(errno.EINVAL, "not an AMD paging domain")
    return domain


def validate_gdte_nested(words: tuple[int, int, int, int], gpt5_ok: bool) -> None:
    """nested.c validate_gdte_nested(): EINVAL / EOPNOTSUPP like the kernel."""
    g = Dte.decode(words)
    if g.mode != 0 or g.host_root != 0:
        raise err(errno.EINVAL, "guest DTE must not set Mode or the host table root")
    if g.v and g.gv and g.gcr3 == 0:
        raise err(errno.EINVAL, "guest DTE with V and GV needs a GCR3 table root")
    if g.gpt_level not in (GUEST_PGTABLE_4_LEVEL, GUEST_PGTABLE_5_LEVEL):
        raise err(errno.EINVAL, f"guest paging mode {g.gpt_level} is reserved")
    if g.glx == 3:
        raise err(errno.EINVAL, "GLX 3 is reserved")
    if g.gpt_level == GUEST_PGTABLE_5_LEVEL and not gpt5_ok:
        raise err(errno.EOPNOTSUPP, "5-level guest tables not supported by the host")


def _alloc_paging(iommu: IommuHw, flags: int) -> Domain:
    """amd_iommu_domain_alloc_paging_flags()."""
    k = _kernel(iommu)
    if flags & ~PAGING_FLAGS:
        raise err(errno.EOPNOTSUPP, f"amd paging flags {flags:#x}")
    nest = U.IOMMU_HWPT_ALLOC_NEST_PARENT
    dirty = U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    if flags in (dirty, nest, dirty | nest):
        if flags & dirty and not k.hd_support():
            raise err(errno.EOPNOTSUPP, "no HD support for dirty tracking")
        if flags & nest and not k.nest_parent_supported():
            raise err(errno.EOPNOTSUPP, "nest parent needs GT, GIoSup and GCR3TRPMode")
        return AmdDomain(k, flags, v2=False)
    if flags == U.IOMMU_HWPT_ALLOC_PASID:
        if not k.pasid_supported():
            raise err(errno.EOPNOTSUPP, "no PASID support")
        return AmdDomain(k, flags, v2=True)
    if flags == 0:
        return AmdDomain(k, 0, v2=k.pgtable == "v2" and k.pasid_supported())
    raise err(errno.EOPNOTSUPP, f"amd cannot combine paging flags {flags:#x}")


def _alloc_nested(
    iommu: IommuHw, parent: Domain, viommu: ViommuBase | None, data_type: int, data: bytes
) -> Domain:
    """nested.c amd_iommu_alloc_domain_nested(), reached through the vIOMMU only (AMD's
    tree wires it as ``iommufd_viommu_ops.alloc_domain_nested``). The AMD driver has no
    ``iommu_ops.domain_alloc_nested``: a nested HWPT straight on a nest parent is
    EOPNOTSUPP, as the core answers for a driver without it."""
    if viommu is None:
        raise err(errno.EOPNOTSUPP, "AMD nested domains are allocated on a vIOMMU")
    if data_type != U.IOMMU_HWPT_DATA_AMD_GUEST:
        raise err(errno.EOPNOTSUPP, f"hwpt data type {data_type}")
    # iommu_copy_struct_from_user(): short -> EINVAL, non-zero tail -> E2BIG
    if len(data) < _GDTE.size:
        raise err(errno.EINVAL, "struct iommu_hwpt_amd_guest is 32 bytes")
    if any(data[_GDTE.size :]):
        raise err(errno.E2BIG, "non-zero bytes past struct iommu_hwpt_amd_guest")
    words: tuple[int, int, int, int] = _GDTE.unpack(data[: _GDTE.size])
    k = _kernel(iommu)
    validate_gdte_nested(words, k.gpt_levels == 5)
    parent_dom = _paging(parent)
    if parent_dom.v2 or not parent_dom.nest_parent:
        raise err(errno.EINVAL, "the parent must be a v1 nest-parent domain")
    assert isinstance(iommu, AmdIommu)
    if not isinstance(viommu, AmdViommu):
        raise err(errno.EINVAL, "not an AMD vIOMMU")
    info = viommu.get_hdom(words[1] & 0xFFFF)
    return AmdNestedDomain(iommu, viommu, words, info)


class AmdDriver(PagingDomainOps):
    """The AMD IOMMU driver plugin object (entry point ``amd``)."""

    @hookimpl
    def driver_info(self) -> DriverInfo:
        return DriverInfo(
            "amd",
            "AMD IOMMU (AMD-Vi): device table, v1/v2 tables, command buffer",
            FEATURES,
            hwpt_data_types=frozenset({U.IOMMU_HWPT_DATA_AMD_GUEST}),
            viommu_types=frozenset({U.IOMMU_VIOMMU_TYPE_AMD}),
            hw_info_type=U.IOMMU_HW_INFO_TYPE_AMD,
            veventq_types=frozenset({U.IOMMU_VEVENTQ_TYPE_AMD}),
            hw_queue_types=frozenset(HW_QUEUE_TYPES),
        )

    @hookimpl
    def probe(self, machine: Machine, index: int, options: dict[str, Any]) -> AmdIommu:
        unknown = set(options) - OPTIONS
        if unknown:
            raise err(errno.EINVAL, f"unknown amd options: {sorted(unknown)}")
        host_levels = int(options.get("host_levels", 6))
        guest_levels = int(options.get("guest_levels", 4))
        pasid_bits = int(options.get("pasid_bits", 16))
        if host_levels not in (4, 5, 6) or guest_levels not in (4, 5):
            raise err(errno.EINVAL, "host_levels is 4..6 (HATS), guest_levels 4 or 5 (GATS)")
        if not 1 <= pasid_bits <= 16 or options.get("pgtable", "v1") not in ("v1", "v2"):
            raise err(errno.EINVAL, "pasid_bits is 1..16, pgtable v1 or v2")
        if not 1 <= int(options.get("domain_levels", 4)) <= host_levels:
            raise err(errno.EINVAL, "domain_levels is 1..host_levels")
        guests = int(options.get("viommu_guests", VIOMMU_GUESTS))
        if not 0 <= guests <= MAX_GUESTS:
            raise err(errno.EINVAL, f"viommu_guests is 0..{MAX_GUESTS}")
        hw = AmdIommu(
            machine,
            index,
            host_levels=host_levels,
            guest_levels=guest_levels,
            pasid_bits=pasid_bits,
            hd=bool(options.get("hd", True)),
            viommu_guests=guests,
            gst_buffer_trp=bool(options.get("gst_buffer_trp", True)),
        )
        hw.driver_state = AmdKernel(hw, options)
        return hw

    @hookimpl
    def probe_device(self, iommu: IommuHw, dev: PciDevice) -> object:
        k = _kernel(iommu)
        if k.pas is not None:
            if dev.rid == IOMMU_DEVID:
                # Model's own: no other function can sit at the IOMMU's BDF.
                raise err(errno.ENODEV, f"DeviceID {dev.rid:#x} is the IOMMU's own (HW-vIOMMU)")
            # amd_iommu_trans_devid_reserve_pci_aliases(): AMD reserves at attach; the model
            # writes a function's DTE at probe already, so it reserves (and relocates a vIOMMU
            # holding the ID, ENOSPC when none is free) here.
            pas = k.pas
            pas.trans.reserve(dev.rid, lambda o, a, b: VK.relocate_trans_devid(k, o, a, b))
        dd = k.dev_data[dev.rid] = DevData(dev)
        # init_device_table_dma(): V and TV with no permission -- DMA blocked.
        k.write_dte(dev.rid, Dte(v=True, tv=True))
        k.queue(C.inv_devtab_entry(dev.rid))
        k.completion_wait()
        return dd

    @hookimpl
    def dev_reserved_regions(self, iommu: IommuHw, dev: PciDevice) -> list[tuple[int, int]]:
        return [MSI_RANGE, HT_RANGE]

    @hookimpl
    def hw_info(self, iommu: IommuHw, dev: PciDevice, data_type: int) -> HwInfo:
        if data_type not in (U.IOMMU_HW_INFO_TYPE_DEFAULT, U.IOMMU_HW_INFO_TYPE_AMD):
            raise err(errno.EOPNOTSUPP, f"amd reports no hw_info type {data_type}")
        k = _kernel(iommu)
        mmio = k.hw.mmio
        data = U.IommuHwInfoAmd(efr=mmio.read(R.EFR), efr2=mmio.read(R.EFR2)).pack()
        caps = U.IOMMU_HW_CAP_DIRTY_TRACKING if k.hd_support() else 0
        pasid_log2 = k.hw.pasid_bits if k.pasid_supported() and dev.pasid_bits else 0
        return HwInfo(U.IOMMU_HW_INFO_TYPE_AMD, data, caps, pasid_log2)

    # -- domains --------------------------------------------------------------------------------
    @hookimpl
    def domain_alloc_user(
        self,
        iommu: IommuHw,
        dev: PciDevice,
        flags: int,
        parent: Domain | None,
        viommu: ViommuBase | None,
        user_data: UserData | None,
    ) -> Domain:
        """amd_iommu_domain_alloc_paging_flags() without ``parent`` (user data refused,
        unread); the vIOMMU's amd_iommu_alloc_domain_nested() with one."""
        if parent is not None and user_data is not None:
            return _alloc_nested(iommu, parent, viommu, user_data.type, user_data.read())
        if user_data is not None:
            raise err(errno.EOPNOTSUPP, "amd paging domains take no user data")
        if parent is not None:
            raise err(errno.EOPNOTSUPP, "a nested domain needs iommu_hwpt_amd_guest data")
        return _alloc_paging(iommu, flags)

    @hookimpl
    def domain_free(self, domain: Domain) -> bool:
        if isinstance(domain, AmdNestedDomain):
            domain.viommu.put_hdom(domain.gdom_id)
        elif isinstance(domain, AmdDomain):
            domain.free()
        return True

    # -- attach ------------------------------------------------------------------------------
    @hookimpl
    def attach(self, iommu: IommuHw, dev: PciDevice, domain: Domain | None) -> bool:
        """amd_iommu_attach_device() / blocked_domain_attach_device() / nested_attach_device()
        of Linux 7.2, command for command: a paging attach first detaches the old domain
        (cleared DTE, the old domain's flush-all), then a v2 domain gets its GCR3 table
        (GCR3[0] set and flushed), then ``set_dte_entry()``; the blocked domain detaches and
        clears the DTE once more; a nested attach only rewrites the DTE."""
        k = _kernel(iommu)
        dd = k.dev_data[dev.rid]
        if domain is not None:
            if domain.owner is not iommu:
                raise err(errno.EINVAL, "domain of another IOMMU")
            if isinstance(domain, AmdNestedDomain):
                cur = dd.domain
                if isinstance(cur, AmdDomain) and cur.v2 and dev.pasid_bits:
                    # nested_attach_device(): WARN_ON(pasid_enabled) -- the PASID capability
                    # is on while a v2 (SVA-capable) domain is attached.
                    raise err(errno.EINVAL, "nested attach with PASID enabled")
            elif isinstance(domain, AmdDomain):
                if domain is dd.domain:
                    return True  # the device's current domain: nothing to do
                if domain.dirty_tracking and not k.hd_support():
                    raise err(errno.EINVAL, "device cannot track dirty pages")
            else:
                raise err(errno.EINVAL, "unknown domain kind")
        old = dd.domain
        if isinstance(domain, AmdNestedDomain):
            # The model keeps one domain per device: the paging domain the nested attach
            # replaces leaves the device's list without 7.2's detach stream (7.2 leaves it
            # on the list; nested_attach_device() writes the DTE and nothing else).
            if isinstance(old, AmdDomain):
                old.attached.discard((dev.rid, 0))
                if old.v2:
                    k.free_gcr3(dd)
            dd.domain = domain
            k.update_dte(dev, flush_old=False)
            if domain.viommu.gid:
                # nested_attach_device() of AMD's tree: amd_viommu_domain_id_update() writes
                # the DomID map gDomID -> hDomID (for the device's guest ID) at every attach.
                VK.map_command(
                    k.hw,
                    domain.viommu.gid,
                    domain=True,
                    gid_=domain.gdom_id,
                    hid=domain.ginfo.hdom_id,
                )
            return True
        if isinstance(old, AmdDomain):
            k.detach_device(dd)
        dd.domain = None
        if domain is None:
            k.update_dte(dev, clear=True)
            return True
        assert isinstance(domain, AmdDomain)
        if domain.v2:
            k.get_gcr3(dd).set(0, domain.pt.root)  # init_gcr3_table(): update_gcr3(pasid 0)
            dd.giov = True
            k.flush_pasid(dd, 0)
            # pdev_enable_caps() + amd_iommu_iopf_add_device(): PRI on an ATS device.
            dd.ppr = dev.ats and bool(k.efr & R.EFR_PPR_SUP)
        dd.domain = domain
        domain.attached.add((dev.rid, 0))
        k.update_dte(dev)
        return True

    @hookimpl
    def set_dev_pasid(self, iommu: IommuHw, dev: PciDevice, pasid: int, domain: Domain) -> bool:
        """Linux 7.2: only the SVA domain (pasid.c) has ``set_dev_pasid``; ``amdv1_ops`` and
        ``amdv2_ops`` have none, so ``iommu_attach_device_pasid()`` /
        ``iommu_replace_device_pasid()`` answer EOPNOTSUPP before touching anything, and
        iommufd allocates no SVA domain: PASID attach is unsupported upstream."""
        _kernel(iommu)
        raise err(
            errno.EOPNOTSUPP,
            "unsupported upstream: Linux 7.2's AMD paging domains have no set_dev_pasid",
        )

    @hookimpl
    def remove_dev_pasid(self, iommu: IommuHw, dev: PciDevice, pasid: int) -> bool:
        """blocked_domain_set_dev_pasid(): nothing can be attached to a PASID through
        iommufd (see set_dev_pasid), so there is nothing to remove."""
        _kernel(iommu)
        return True

    # -- dirty tracking ------------------------------------------------------------------------
    @hookimpl
    def set_dirty_tracking(self, domain: Domain, enable: bool) -> bool:
        """amd_iommu_set_dirty_tracking(): DTE HAD for every device, then flush."""
        dom = _paging(domain)
        if dom.dirty_enabled == enable:
            return True
        dom.dirty_enabled = enable
        k = dom.kernel
        # 7.2 flips HAD in data[0] in place and flushes each DTE (device_flush_dte, no wait),
        # then the whole domain (amd_iommu_domain_flush_all: PDE, device TLBs, one wait).
        for rid, _pasid in sorted(dom.attached):
            dd = k.dev_data[rid]
            k.write_dte(rid, k.make_dte(dd))
            k.flush_dte(dd)
        if dom.attached:
            k.flush_domain(dom, 0, 1 << 64)
        return True

    @hookimpl
    def read_and_clear_dirty(
        self, domain: Domain, iova: int, length: int, clear: bool, report: bool
    ) -> list[tuple[int, int]]:
        """Report the host table's D bits (and clear them), as Linux 7.2's generic_pt
        read_and_clear_dirty, which reads whether tracking is on or off."""
        dom = _paging(domain)
        runs = dom.pt.read_and_clear_dirty(iova, length, clear)
        if clear and runs:
            # iommu_iotlb_sync() of the gathered range: cached "already dirty" entries go.
            dom.kernel.flush_domain(dom, iova, length)
        return runs if report else []

    @hookimpl
    def page_response(
        self, iommu: IommuHw, dev: PciDevice, pasid: int | None, grpid: int, code: int
    ) -> bool:
        """amd_iommu_page_response() -> amd_iommu_complete_ppr(): the response code goes into
        Status as it is (SUCCESS 0, INVALID 1, FAILURE 2; build_complete_ppr masks 4 bits); no
        wait. GN (and the PASID) follow the device's PRI "PRG Response PASID Required" bit,
        which the model's PCI device does not have: the model uses "a PASID was given"."""
        k = _kernel(iommu)
        k.queue(C.complete_ppr(dev.rid, pasid or 0, code & 0xF, grpid, gn=pasid is not None))
        return True

    # -- vIOMMU ------------------------------------------------------------------------------------
    @hookimpl
    def viommu_alloc(
        self,
        iommu: IommuHw,
        dev: PciDevice,
        parent: Domain,
        viommu_type: int,
        data: bytes,
        mmap: MmapOwner,
    ) -> ViommuBase:
        """amd_iommufd_viommu_init(). On HW-vIOMMU hardware (AMD's tree) the user data is the
        mandatory ``struct iommu_viommu_amd`` (EINVAL without it, copied like
        ``iommu_copy_struct_from_user()``: short -> EINVAL, non-zero bytes past it -> E2BIG),
        and the vIOMMU takes a guest ID, a translate DeviceID and its PAS slice (ENOSPC when
        either pool is empty). Without the HW-vIOMMU it is Linux 7.2's: the data is unused."""
        k = _kernel(iommu)
        if viommu_type != U.IOMMU_VIOMMU_TYPE_AMD:
            raise err(errno.EOPNOTSUPP, f"viommu type {viommu_type}")
        dom = _paging(parent)
        if dom.v2 or not dom.nest_parent or not k.nest_parent_supported():
            raise err(errno.EINVAL, "an AMD vIOMMU needs a v1 nest-parent domain")
        assert isinstance(iommu, AmdIommu)
        viommu = AmdViommu(iommu, dom, viommu_type)
        if k.pas is not None:
            size = U.IommuViommuAmd.SIZE
            if len(data) < 8:  # offsetofend(out_vfmmio_mmap_offset)
                raise err(errno.EINVAL, "struct iommu_viommu_amd is mandatory")
            if any(data[size:]):
                raise err(errno.E2BIG, "non-zero bytes past struct iommu_viommu_amd")
            VK.viommu_init_one(k, viommu)
            # iommufd_viommu_alloc_mmap() of the guest's 4 KiB VF MMIO page.
            window = viommu.window
            assert isinstance(window, VfMmioWindow)
            try:
                viommu.vfmmio_mmap_offset = mmap.alloc(window)
            except OSError:
                VK.viommu_uninit_one(k, viommu)
                raise
            viommu.mmap = mmap
            out = U.IommuViommuAmd(viommu.vfmmio_mmap_offset, R.VF_MMIO_SIZE)
            viommu.out_data = out.pack()
        dom.viommus.append(viommu)
        return viommu

    @hookimpl
    def viommu_destroy(self, viommu: ViommuBase) -> bool:
        if isinstance(viommu, AmdViommu):
            if viommu.mmap is not None:
                viommu.mmap.destroy(viommu.vfmmio_mmap_offset)  # iommufd_viommu_destroy_mmap()
                viommu.mmap = None
            VK.viommu_uninit_one(_kernel(viommu.hw), viommu)
            parent = viommu.parent
            if isinstance(parent, AmdDomain) and viommu in parent.viommus:
                parent.viommus.remove(viommu)
        return True

    @hookimpl
    def vdevice_alloc(self, viommu: ViommuBase, dev: PciDevice, virt_id: int) -> VdeviceBase:
        """_amd_viommu_vdevice_init(): the DevID mapping-table entry gDevID -> hDevID and the
        device's guest IDs for its next nested attach (HW-vIOMMU); otherwise the core-only
        vDEVICE object."""
        if isinstance(viommu, AmdViommu) and viommu.gid:
            VK.vdevice_map(_kernel(viommu.hw), viommu, dev.rid, virt_id, True)
        return VdeviceBase(viommu, dev, virt_id)

    @hookimpl
    def vdevice_destroy(self, vdev: VdeviceBase) -> bool:
        viommu = vdev.viommu
        if isinstance(viommu, AmdViommu) and viommu.gid and vdev.virt_id in viommu.gdevids:
            VK.vdevice_map(_kernel(viommu.hw), viommu, vdev.dev.rid, vdev.virt_id, False)
        return True

    @hookimpl
    def hw_queue_supported(self, viommu: ViommuBase, queue_type: int) -> bool:
        """amd_iommufd_get_hw_queue_size(): guest command buffer, event log and PPR log, on a
        vIOMMU with a HW-vIOMMU slice (the PPR log is programmed; no PRI request is modelled)."""
        return isinstance(viommu, AmdViommu) and bool(viommu.gid) and queue_type in HW_QUEUE_TYPES

    @hookimpl
    def hw_queue_alloc(
        self,
        viommu: ViommuBase,
        queue_type: int,
        index: int,
        base_iova: int,
        length: int,
        pfns: list[int],
    ) -> HwQueueBase:
        if not isinstance(viommu, AmdViommu):
            raise err(errno.EINVAL, "not an AMD vIOMMU")
        return VK.hw_queue_init(viommu, queue_type, index, base_iova, length)

    @hookimpl
    def hw_queue_destroy(self, queue: HwQueueBase) -> bool:
        if isinstance(queue, AmdHwQueue):
            VK.hw_queue_fini(queue)
        return True

    @hookimpl
    def cache_invalidate_user(
        self, target: Domain | ViommuBase, data_type: int, entries: list[bytes]
    ) -> InvalidateResult:
        """Only the vIOMMU-scoped, model-defined IOMMU_VIOMMU_INVALIDATE_DATA_AMD."""
        if not isinstance(target, AmdViommu) or data_type != U.IOMMU_VIOMMU_INVALIDATE_DATA_AMD:
            return InvalidateResult(0, errno.EOPNOTSUPP)
        return VK.invalidate_user(_kernel(target.hw), target, entries)

    @hookimpl
    def guest_iommu_alloc(self, vm: Vm, iommu: IommuHw, accelerated: bool) -> GuestIommu:
        from iommufd_amd.guest import GuestAmd

        _kernel(iommu)
        return GuestAmd(vm, iommu, accelerated=accelerated)


plugin = AmdDriver()
