"""The AMD IOMMU driver's per-IOMMU logic (``struct amd_iommu`` and what
drivers/iommu/amd/{init,iommu,ppr}.c do with it): bring-up, the command buffer and
COMPLETION_WAIT, the device table and its update streams, GCR3 tables, the PPR log, and the
domain flushes. The hooks that call it are in :mod:`iommufd_amd.driver`, the domains in
:mod:`iommufd_amd.domain`.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from iommufd_amd import commands as C
from iommufd_amd import ppr as P
from iommufd_amd import regs as R
from iommufd_amd.domain import AmdDomain, AmdNestedDomain
from iommufd_amd.dte import (
    DTE_GPT_LEVEL_SHIFT,
    DTE_GV,
    DTE_SIZE,
    DTE_V,
    GUEST_PGTABLE_4_LEVEL,
    GUEST_PGTABLE_5_LEVEL,
    HAD_DIRTY,
    Dte,
)
from iommufd_amd.gcr3 import Gcr3Table, glx_for
from iommufd_amd.hw import AmdIommu
from iommufd_amd.viommu import kernel as VK
from iommufd_model.api import Domain, Ida, err
from iommufd_model.core.viommu import report_event_from_irq
from iommufd_model.devices.pri import (
    pci_disable_pri,
    pci_enable_pri,
    pci_prg_resp_pasid_required,
    pci_pri_supported,
    pci_reset_pri,
)
from iommufd_model.hw.memory import PAGE_SHIFT
from iommufd_model.hw.pci import PciDevice
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_amd.events import Event

MAX_DOMAIN_ID = 65536
# DTE_DATA2_INTR_MASK: the bits of data[2] outside [55:52] (interrupt remapping) that
# write_dte_upper128() keeps from the entry in memory.
DTE_DATA2_INTR_MASK = ((1 << 64) - 1) & ~(0xF << 52)
GPT_LEVEL = 3 << DTE_GPT_LEVEL_SHIFT  # DTE_GPT_LEVEL_MASK
DEVTAB_PAGES = 512  # 64 Ki DTEs of 32 bytes: the table for last_bdf = 0xffff
CMD_LOG2 = R.LEN_512
AMD_PRI_REQUESTS = 32  # pdev_enable_cap_pri(): "Hardcode number of outstanding requests"


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
        # pdev_get_caps(): AMD_IOMMU_DEVICE_FLAG_PRI_SUP from pci_pri_supported(), the
        # device's (a VF: its PF's) PRI capability in its configuration space.
        self.pri_sup = pci_pri_supported(dev)
        # pdev_enable_cap_pri(): PRI enabled on an ATS device while an SVA-capable (v2)
        # domain is attached; ``pri_tlp`` is then read from the capability's "PRG Response
        # PASID Required" bit (pci_prg_resp_pasid_required) and kept after PRI is disabled
        # (pdev_disable_cap_pri() leaves it), 0 until PRI was first enabled (kzalloc).
        self.pri_enabled = False
        self.pri_tlp = False
        # amd_iommu_iopf_add_device(): the device is on the IOPF queue; ``ppr`` then sets the
        # DTE's PPR bit.
        self.ppr = False


class AmdKernel:
    """The driver's per-IOMMU state (``struct amd_iommu``) and its low-level operations."""

    def __init__(self, hw: AmdIommu, options: dict[str, Any]) -> None:
        self.hw = hw
        self.mem = hw.memory
        # pdom_ids: DomainIDs 1 .. MAX_DOMAIN_ID - 1 (0 is never used)
        self.domids = Ida("DomainID", 1, MAX_DOMAIN_ID - 1, owner=hw)
        self.dev_data: dict[int, DevData] = {}
        self.pgtable = options.get("pgtable", "v1")
        # amd_iommu_domain_alloc_paging_v1(): generic_pt starting_level 2, a Mode 3 table that
        # grows on demand (PT_FEAT_DYNAMIC_TOP). ``domain_levels`` starts it elsewhere (the
        # model's own knob; 7.2 has none).
        self.domain_levels = int(options.get("domain_levels", 3))
        # amd_iommu_hpt_vasize (init.c): (HATS + 3) * 9 + 21 bits, capped by the IVRS IVinfo
        # VAsize, which is 64 when the field is 0 (the model's IVRS gives none).
        self.hpt_vasize = min(64, (hw.max_mode - 4 + 3) * 9 + 21)
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

    def update_dte256(self, devid: int, new: Dte) -> None:
        """update_dte256(): the two 128-bit halves written in the order that keeps V and GV
        last when setting and first when clearing, each change followed by
        ``iommu_flush_dte_sync()`` (INVALIDATE_DEVTAB_ENTRY, COMPLETION_WAIT); a guest-table
        DTE whose guest paging mode changes is cleared and flushed first; one that keeps it
        gets its lower half only, with no flush. ``write_dte_upper128()`` keeps the
        interrupt-remapping bits of data[2] from memory."""
        addr = self.dte_addr(devid)
        read = self.mem.read_u64
        old0, old2 = read(addr), read(addr + 16)
        words = list(new.encode())
        words[2] = (words[2] & ~DTE_DATA2_INTR_MASK) | (old2 & DTE_DATA2_INTR_MASK)

        def upper() -> None:
            self.mem.write_u64(addr + 16, words[2])
            self.mem.write_u64(addr + 24, words[3])

        def lower(w0: int, w1: int) -> None:
            self.mem.write_u64(addr + 8, w1)
            self.mem.write_u64(addr, w0)

        def flush_sync() -> None:
            self.queue(C.inv_devtab_entry(devid))
            self.completion_wait()

        if not old0 & DTE_V or (not old0 & DTE_GV and words[0] & DTE_V):
            upper()
            lower(words[0], words[1])
        elif not words[0] & DTE_V or not words[0] & DTE_GV:
            lower(words[0], words[1])
            upper()
        elif old2 & GPT_LEVEL != words[2] & GPT_LEVEL:
            lower(0, 0)
            flush_sync()
            upper()
            lower(words[0], words[1])
        else:
            lower(words[0], words[1])
            return
        flush_sync()

    def update_dte(self, dev: PciDevice, *, clear: bool = False, flush_old: bool = True) -> None:
        """Linux 7.2's DTE update streams: ``set_dte_entry()`` (``clear=False``) or
        ``clear_dte_entry()`` (``clear=True``: V only, ``amd_iommu_make_clear_dte``), both
        through ``amd_iommu_update_dte()`` -- :meth:`update_dte256`, then
        ``device_flush_dte()`` (INVALIDATE_DEVTAB_ENTRY, a whole-device INVALIDATE_IOTLB_PAGES
        when ATS is on) and COMPLETION_WAIT. ``set_dte_entry()`` then flushes the DomainID the
        old DTE held, whatever it was (``amd_iommu_flush_tlb_domid``: all pages, PDE, its own
        wait); the nested attach (``nested_attach_device``) writes through
        ``amd_iommu_update_dte()`` alone (``flush_old=False``)."""
        dd = self.dev_data[dev.rid]
        old_domid = self.read_dte(dev.rid).domain_id
        new = Dte(v=True) if clear else self.make_dte(dd)
        self.update_dte256(dev.rid, new)
        self.flush_dte(dd)
        self.completion_wait()
        if not clear and flush_old and old_domid:
            self.queue(C.inv_iommu_all_pages(old_domid))
            self.completion_wait()

    def change_top(self, dom: AmdDomain) -> None:
        """amd_iommu_change_top(), generic_pt's ``change_top`` op after its table grew: the
        DTE of every device on the domain's list rewritten with the new Mode and root
        (``set_dte_entry()``, its old-DomainID flush included), then ``device_flush_dte()``
        of each, then one COMPLETION_WAIT per IOMMU the domain is on
        (``domain_flush_complete``). A domain on no device issues nothing; nested DTEs over a
        nest parent are not on its list and keep the old top, as in 7.2."""
        rids = sorted(rid for rid, pasid in dom.attached if pasid == 0)
        for rid in rids:
            self.update_dte(self.dev_data[rid].dev)
        for rid in rids:
            self.flush_dte(self.dev_data[rid])
        if dom.attached:
            self.completion_wait()

    def flush_dte(self, dd: DevData) -> None:
        """device_flush_dte(): INVALIDATE_DEVTAB_ENTRY, then the whole device TLB with ATS."""
        self.queue(C.inv_devtab_entry(dd.dev.rid))
        if dd.dev.ats:
            self.queue(C.inv_iotlb_pages(dd.dev.rid, 0, 1 << 64, qdep=dd.ats_qdep))

    def enable_pri(self, dd: DevData) -> None:
        """pdev_enable_cap_pri() then amd_iommu_iopf_add_device(): on an ATS device with the
        PRI capability, pci_reset_pri() and pci_enable_pri(32 requests); ``pri_tlp`` from the
        capability; without an IOPF queue (no PPR support) PRI is disabled again."""
        if not dd.pri_enabled and dd.dev.ats and dd.pri_sup:
            dev = dd.dev
            if not pci_reset_pri(dev) and not pci_enable_pri(dev, AMD_PRI_REQUESTS):
                dd.pri_enabled = True
                dd.pri_tlp = pci_prg_resp_pasid_required(dev)
        if not dd.pri_enabled:
            return
        if not self.efr & R.EFR_PPR_SUP:  # iommu->iopf_queue is NULL: -EINVAL
            self.disable_pri(dd)
            return
        dd.ppr = True

    def disable_pri(self, dd: DevData) -> None:
        """pdev_disable_cap_pri(): pci_disable_pri() when enabled (``pri_tlp`` stays)."""
        if dd.pri_enabled:
            pci_disable_pri(dd.dev)
            dd.pri_enabled = False

    def detach_device(self, dd: DevData) -> None:
        """detach_device(): the device leaves the IOPF queue, its PRI is disabled
        (pdev_disable_caps), then the cleared DTE, the old domain's flush-all while the
        device is still on its list, then the GCR3 table of a v2 domain (GCR3[0] cleared
        with its PASID flush, table and per-device DomainID freed without commands)."""
        dom = dd.domain
        dd.domain = None
        dd.ppr = False  # amd_iommu_iopf_remove_device()
        self.disable_pri(dd)
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
            report_event_from_irq(viommu.core, U.IOMMU_VEVENTQ_TYPE_AMD, event.to_bytes())

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
