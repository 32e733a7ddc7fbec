"""The kernel side of one SMMU (``struct arm_smmu_device``): what arm-smmu-v3.c keeps and does.

It owns the memory it gave the hardware (2-level stream table, CMDQ, EVENTQ, the CMD_SYNC
completion word), programs the registers at probe, builds STEs and CDs as the Linux helpers do
(``arm_smmu_make_*_ste`` / ``arm_smmu_make_s1_cd``), issues commands through the CMDQ and
waits for CMD_SYNC, and runs the event-queue and global-error interrupt handlers.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import attrs

from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import events as E
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.cd import CD0_V, IRGN_WBWA, Cd
from iommufd_arm_smmuv3.cdtable import LINEAR_CDMAX, CdTable
from iommufd_arm_smmuv3.domain import SmmuDomain
from iommufd_arm_smmuv3.entry_writer import cd_used, ste_update_safe, ste_used, write_entry
from iommufd_arm_smmuv3.hw import Smmuv3
from iommufd_arm_smmuv3.invs import (
    INV_ATS,
    INV_ATS_FULL,
    INV_S1_ASID,
    INV_S2_VMID,
    INV_S2_VMID_S1_CLEAR,
    Batch,
    Inv,
    flush_tag,
    inv_range,
)
from iommufd_arm_smmuv3.pgtable import BLOCK_4T, GRANULE_PGSIZES, MAIR_VALUE
from iommufd_arm_smmuv3.ste import (
    CFG_ABORT,
    CFG_BYPASS,
    CFG_NESTED,
    CFG_S1_TRANS,
    CFG_S2_TRANS,
    EATS_TRANS,
    S1C_WBRA,
    S1DSS_BYPASS,
    S1DSS_SSID0,
    S1DSS_TERMINATE,
    SH_ISH,
    SHCFG_INCOMING,
    STE0_CFG,
    STE1_MEV,
    STE_SIZE,
    STRW_EL2,
    STRW_NSEL1,
    Ste,
)
from iommufd_model.core.eventq import IopfFault, deliver_iopf_group, iopf_perm
from iommufd_model.core.viommu import report_event_from_irq
from iommufd_model.driver import Domain, DomainType
from iommufd_model.errors import err
from iommufd_model.hw.bits import get, pack
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE
from iommufd_model.hw.ring import MemRing
from iommufd_model.ida import Ida
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_model.hw.pci import PciDevice

STRTAB_SPLIT = 8  # each level-2 table covers one PCI bus (256 StreamIDs)
CMDQ_LOG2 = 8  # 256 commands: one page
EVTQ_LOG2 = 7  # 128 records: one page
PRIQ_LOG2 = 8  # 256 page requests: one page
PRI_RESP_DENY = 0
CMDQ_BATCH_ENTRIES = 64  # BITS_PER_LONG, as arm_vsmmu_cache_invalidate batches
MSI_IOVA_BASE = 0x8000000  # the software MSI window every SMMU device reserves
MSI_IOVA_LENGTH = 0x100000
# CR1: tables and queues inner shareable, inner and outer write-back (arm_smmu_device_reset)
CR1_VALUE = (SH_ISH << 10) | (1 << 8) | (1 << 6) | (SH_ISH << 4) | (1 << 2) | 1
RESUME_RETRY = 1  # CMDQ_RESUME_0_RESP_RETRY
RESUME_ABORT = 2  # CMDQ_RESUME_0_RESP_ABORT
ABORT_RETRIES = 8  # the model's bound on re-fetching a command whose fetch aborts


class Master:
    """``struct arm_smmu_master``: one device's StreamID, CD table and vSMMU identity."""

    def __init__(self, dev: PciDevice, sid: int, *, canwbs: bool) -> None:
        self.dev = dev
        self.sid = sid
        self.canwbs = canwbs  # arm_smmu_master_canwbs(): the fwspec's PCI_RC_CANWBS flag
        self.domain: Domain | None = None
        self.cd_table: CdTable | None = None  # allocated on the first CD written
        self.cd_in_ste = False  # cd_table.in_ste: the STE points at the CD table
        self.ssid_bits = 0  # S1CDMax: set at probe (arm_smmu_enable_pasid)
        self.pasid_domains: dict[int, SmmuDomain] = {}  # SSID -> its stage-1 domain
        # stall_enabled: set at probe (SmmuDevice.master_stall_enabled)
        self.stall_enabled = False
        self.vmaster: tuple[Any, int] | None = None  # (vSMMU, vSID) while nested with a vDEVICE
        self.ats_enabled = False  # master->ats_enabled: the driver's view, set at commit
        self.pci_ats = False  # the Enable bit of the device's PCI ATS capability
        self.ste_ats_enabled = False  # the installed STE has EATS = TRANS


def devices_domain(domain: Domain | None) -> SmmuDomain | None:
    """``to_smmu_domain_devices()``: the paging domain whose invalidations cover a master
    attached to ``domain`` (a nested domain's stage-2 parent), or None (blocked, identity)."""
    if isinstance(domain, SmmuDomain):
        return domain
    parent = getattr(domain, "s2_parent", None)
    return parent if isinstance(parent, SmmuDomain) else None


@attrs.define
class AttachState:
    """``struct arm_smmu_attach_state``: what an attach prepared and must commit."""

    master: Master
    old_domain: Domain | None
    ssid: int = 0
    disable_ats: bool = False
    cd_needs_ats: bool = False
    ats_enabled: bool = False
    new_dd: SmmuDomain | None = None
    new_build: list[Inv] = attrs.Factory(list)
    old_dd: SmmuDomain | None = None
    old_build: list[Inv] = attrs.Factory(list)
    vmaster: tuple[Any, int] | None = None


class SmmuDevice:
    """Driver state of one SMMU instance; ``probe`` programs the hardware from reset."""

    def __init__(self, hw: Smmuv3) -> None:
        self.hw = hw
        mem = hw.memory
        # The ASID xarray and the vmid_map IDA, 1 .. 2^16 - 1 (the model's 16-bit widths).
        self.asids = Ida("ASID", 1, (1 << 16) - 1, owner=hw)
        self.vmids = Ida("VMID", 1, (1 << 16) - 1, owner=hw)
        self.masters: dict[int, Master] = {}
        self.host_events: list[E.Event] = []  # what the kernel would print to dmesg
        self.cmdq_errors: list[tuple[int, int, int]] = []  # (CERROR, word 0, word 1)
        self.forwarded = 0
        self.vintf_owners: dict[int, Any] = {}  # CMDQV VINTF index -> the vIOMMU owning it
        # arm_smmu_device_hw_probe(): the features this driver reads from the ID registers.
        idr0, idr1, idr3 = (hw.mmio.read(r, 4) for r in (R.IDR0, R.IDR1, R.IDR3))
        self.feat_ril = bool(idr3 & R.IDR3_RIL)
        self.feat_s2fwb = bool(idr3 & R.IDR3_FWB)
        self.feat_attr_types_ovr = bool(idr1 & R.IDR1_ATTR_TYPES_OVR)
        self.feat_ha = get(idr0, 7, 6) >= 1
        self.feat_hd = get(idr0, 7, 6) >= 2
        self.feat_ats = bool(idr0 & R.IDR0_ATS)
        self.idr0_httu = get(idr0, 7, 6)
        self.dbm_capable = R.dbm_capable(idr0)
        self.feat_cd2l = bool(idr0 & R.IDR0_CD2L)
        # ARM_SMMU_FEAT_TRANS_S1 / _S2, and NESTING with both (arm_smmu_device_hw_probe)
        self.feat_s1 = bool(idr0 & R.IDR0_S1P)
        self.feat_s2 = bool(idr0 & R.IDR0_S2P)
        self.feat_nesting = self.feat_s1 and self.feat_s2
        # ARM_SMMU_FEAT_HYP with IDR0.HYP; E2H when the host kernel also runs at EL2 with VHE
        # (cpus_have_cap(ARM64_HAS_VIRT_HOST_EXTN): the SMMU's ``vhe`` probe option)
        self.feat_hyp = bool(idr0 & R.IDR0_HYP)
        self.feat_e2h = self.feat_hyp and hw.host_vhe
        # arm_smmu_device_hw_probe(): STALL_MODEL FORCE gives STALL_FORCE and STALLS, 0b00 STALLS
        stall_model = get(idr0, 25, R.IDR0_STALL_MODEL_SHIFT)
        self.feat_stall_force = stall_model == R.STALL_MODEL_FORCE
        self.feat_stalls = stall_model in (R.STALL_MODEL_STALL, R.STALL_MODEL_FORCE)
        self.ssid_bits = get(idr1, 10, 6)
        # IDR5: the page sizes of the granules offered, the OAS (52 adds the 4 TiB block),
        # ARM_SMMU_FEAT_VAX
        idr5 = hw.mmio.read(R.IDR5, 4)
        self.pgsize_bitmap = 0
        for shift, gran in ((16, R.IDR5_GRAN64K), (14, R.IDR5_GRAN16K), (12, R.IDR5_GRAN4K)):
            if idr5 & gran:
                self.pgsize_bitmap |= GRANULE_PGSIZES[shift]
        self.oas = 52 if get(idr5, 2, 0) == R.IDR5_OAS_52 else 48
        if self.oas == 52:
            self.pgsize_bitmap |= BLOCK_4T
        self.feat_vax = get(idr5, 11, 10) == 1
        self._abort_retries = 0
        sid_bits = hw.sid_bits
        l1_count = 1 << max(sid_bits - STRTAB_SPLIT, 0)
        l1_pages = max(1, l1_count * 8 // PAGE_SIZE)
        self.strtab = mem.alloc_contiguous(l1_pages) << PAGE_SHIFT
        self.l2: dict[int, int] = {}
        self.cmdq = MemRing(mem, mem.alloc_frame() << PAGE_SHIFT, C.CMD_SIZE, 1 << CMDQ_LOG2)
        self.evtq = MemRing(mem, mem.alloc_frame() << PAGE_SHIFT, E.EVENT_SIZE, 1 << EVTQ_LOG2)
        self.feat_pri = bool(hw.mmio.read(R.IDR0, 4) & R.IDR0_PRI)
        self.priq: MemRing | None = None
        if self.feat_pri:
            self.priq = MemRing(mem, mem.alloc_frame() << PAGE_SHIFT, E.PRI_SIZE, 1 << PRIQ_LOG2)
        self.page_requests: list[E.PageRequest] = []  # "unexpected PRI request" in dmesg
        self._reset(sid_bits)

    # -- probe: arm_smmu_device_reset() ---------------------------------------------------------
    def _reset(self, sid_bits: int) -> None:
        hw = self.hw
        w = hw.mmio.write
        hw.evtq_irq.append(self.evtq_thread)
        hw.gerror_irq.append(self.gerror_handler)
        w(R.CR0, 0, 4)
        w(R.CR1, CR1_VALUE, 4)
        w(R.CR2, R.CR2_PTM | R.CR2_RECINVSID | (R.CR2_E2H if self.feat_e2h else 0), 4)
        w(R.STRTAB_BASE, R.STRTAB_BASE_RA | self.strtab)
        cfg = (R.STRTAB_CFG_FMT_2LVL << 16) | (STRTAB_SPLIT << 6) | sid_bits
        w(R.STRTAB_BASE_CFG, cfg, 4)
        w(R.CMDQ_BASE, R.Q_BASE_RA | self.cmdq.base | CMDQ_LOG2)
        w(R.CMDQ_PROD, 0, 4)
        w(R.CMDQ_CONS, 0, 4)
        enables = R.CR0_CMDQEN
        w(R.CR0, enables, 4)
        self.issue([C.cfgi_all()])
        if self.feat_hyp:
            self.issue([C.tlbi_el2_all()])
        self.issue([C.tlbi_nsnh_all()])
        w(R.EVENTQ_BASE, R.Q_BASE_RA | self.evtq.base | EVTQ_LOG2)
        w(R.EVENTQ_PROD, 0, 4)
        w(R.EVENTQ_CONS, 0, 4)
        enables |= R.CR0_EVTQEN
        w(R.CR0, enables, 4)
        if self.priq is not None:
            hw.priq_irq.append(self.priq_thread)
            w(R.PRIQ_BASE, R.Q_BASE_RA | self.priq.base | PRIQ_LOG2)
            w(R.PRIQ_PROD, 0, 4)
            w(R.PRIQ_CONS, 0, 4)
            enables |= R.CR0_PRIQEN
            w(R.CR0, enables, 4)
        if self.feat_ats:
            enables |= R.CR0_ATSCHK
            w(R.CR0, enables, 4)
        irqs = R.IRQ_CTRL_GERROR_IRQEN | R.IRQ_CTRL_EVTQ_IRQEN
        w(R.IRQ_CTRL, irqs | (R.IRQ_CTRL_PRIQ_IRQEN if self.priq is not None else 0), 4)
        w(R.CR0, enables | R.CR0_SMMUEN, 4)

    # -- command queue: arm_smmu_cmdq_issue_cmdlist() -----------------------------------------
    def issue(self, cmds: list[tuple[int, int]], sync: bool = True) -> None:
        """Queue ``cmds`` and, with ``sync``, a CMD_SYNC; then wait for it.

        The SYNC is the MSI-polling kind the driver uses on a coherent SMMU with MSIs
        (ARM_SMMU_OPT_MSIPOLL): CS = IRQ, MSIAddr = the SYNC's own slot in the queue, MSIData
        0, so completion shows as the SYNC's first word turning to zero.
        """
        hw = self.hw
        mmio = hw.mmio
        mask = (1 << (CMDQ_LOG2 + 1)) - 1
        sync_slot = -1
        todo = list(cmds)
        if sync:
            todo.append(C.cmd_sync(C.CS_IRQ))
        for n, cmd in enumerate(todo):
            prod = mmio.read(R.CMDQ_PROD, 4) & mask
            cons = mmio.read(R.CMDQ_CONS, 4) & mask
            if prod ^ cons == 1 << CMDQ_LOG2:
                raise err(errno.ETIMEDOUT, "CMDQ full and not draining")
            if sync and n == len(todo) - 1:
                sync_slot = self.cmdq.addr(prod)
                cmd = C.cmd_sync(C.CS_IRQ, sync_slot)
            self.cmdq.write(prod, C.encode(cmd))
            mmio.write(R.CMDQ_PROD, (prod + 1) & mask, 4)
        if sync_slot >= 0 and int.from_bytes(hw.memory.read(sync_slot, 4), "little"):
            raise err(errno.ETIMEDOUT, "CMD_SYNC did not complete")

    # -- interrupts -------------------------------------------------------------------------------
    def gerror_handler(self) -> None:
        """arm_smmu_gerror_handler() / arm_smmu_cmdq_skip_err(): an illegal command becomes a
        CMD_SYNC (CS = SEV); an abort on command fetch is retried as it is (the kernel logs
        "retrying command fetch"); the model gives up after a few retries of one slot, so
        that the issuer sees its SYNC time out rather than the model spinning forever."""
        mmio = self.hw.mmio
        gerror = mmio.read(R.GERROR, 4)
        active = gerror ^ mmio.read(R.GERRORN, 4)
        if active & R.GERROR_CMDQ_ERR:
            cons = mmio.read(R.CMDQ_CONS, 4)
            cerror = get(cons, 30, 24)
            index = cons & ((1 << CMDQ_LOG2) - 1)
            if cerror == R.CERROR_ABT:
                self.cmdq_errors.append((cerror, 0, 0))
                self._abort_retries += 1
                if self._abort_retries > ABORT_RETRIES:
                    return  # left unacknowledged: the queue stays stopped
            else:
                self._abort_retries = 0
                w0, w1 = C.decode(self.cmdq.read(index))
                self.cmdq_errors.append((cerror, w0, w1))
                if cerror != R.CERROR_ATC_INV_SYNC:
                    self.cmdq.write(index, C.encode(C.cmd_sync(C.CS_SEV)))
        mmio.write(R.GERRORN, gerror, 4)

    def _drain(self, ring: MemRing, prod_reg: int, cons_reg: int, log2: int, handle: Any) -> None:
        """Consume a hardware-written queue from CONS to PROD, acknowledging overflow."""
        mmio = self.hw.mmio
        mask = (1 << (log2 + 1)) - 1
        while True:
            prod = mmio.read(prod_reg, 4)
            cons = mmio.read(cons_reg, 4)
            if (prod & mask) == (cons & mask):
                break
            handle(ring.read(cons & mask))
            mmio.write(cons_reg, (prod & R.Q_OVERFLOW) | ((cons + 1) & mask), 4)

    def evtq_thread(self) -> None:
        """arm_smmu_evtq_thread(): drain the event queue, forward what belongs to a vSMMU."""
        self._drain(self.evtq, R.EVENTQ_PROD, R.EVENTQ_CONS, EVTQ_LOG2, self.handle_event)

    def priq_thread(self) -> None:
        """arm_smmu_priq_thread() / arm_smmu_handle_ppr(): 7.2 does not serve PCIe page
        requests; each is logged and the last of a group answered with PRI_RESP DENY."""
        assert self.priq is not None
        self._drain(self.priq, R.PRIQ_PROD, R.PRIQ_CONS, PRIQ_LOG2, self.handle_ppr)

    def handle_ppr(self, raw: bytes) -> None:
        req = E.PageRequest.decode(raw)
        self.page_requests.append(req)
        if req.last:
            self.issue([C.pri_resp(req.sid, req.grpid, PRI_RESP_DENY, req.ssid)], sync=False)

    def handle_event(self, raw: bytes) -> None:
        """arm_smmu_handle_event(): a stalled fault goes to IOPF (iommu_report_device_fault),
        a fault of a nested master to its vSMMU's vEVENTQ, anything else to the log."""
        event = E.Event.decode(raw)
        self.host_events.append(event)
        if event.id not in E.FORWARDED_TO_VIOMMU:
            return
        master = self.masters.get(event.sid)
        if master is None:
            return
        if event.stall:
            self.report_iopf(master, event)
            return
        if master.vmaster is None or event.s2:
            return
        vsmmu, vsid = master.vmaster
        core = vsmmu.core
        if core is not None and report_event_from_irq(core, VEVENTQ_TYPE, E.replace_sid(raw, vsid)):
            self.forwarded += 1

    # -- IO page faults: iommu_report_device_fault() and arm_smmu_page_response() ------------
    def report_iopf(self, master: Master, event: E.Event) -> None:
        """A stalled transaction as a one-page IOPF group (LAST_PAGE, grpid = STAG) to the
        FAULT queue of the HWPT attached at its SSID (a PASID with none: the RID's nested
        HWPT, since SMMUv3 has a user PASID table); with no fault-capable HWPT there the
        request is answered at once (iopf_error_response: INVALID, a RESUME with ABORT)."""
        pasid = event.ssid
        domain: Domain | None = master.domain
        if pasid is not None:
            domain = master.pasid_domains.get(pasid)
            if domain is None and master.domain is not None:
                domain = master.domain if master.domain.type == DomainType.NESTED else None
        # arm_smmu_handle_event(): READ or WRITE from RnW, EXEC from InD, PRIV from PnU
        perm = iopf_perm(read=event.read, write=not event.read, exe=event.instr, priv=event.priv)
        fault = IopfFault(event.input_addr, perm, pasid)
        if not deliver_iopf_group(domain, master.dev, event.stag, [fault]):
            self.page_response(master, event.stag, U.IOMMUFD_PAGE_RESP_INVALID)

    def page_response(self, master: Master, stag: int, code: int) -> None:
        """arm_smmu_page_response(): CMD_RESUME of the STAG, RETRY for success, ABORT for
        an invalid or failed response; no CMD_SYNC (it does nothing for RESUME)."""
        if not master.stall_enabled:
            return  # the kernel WARNs: only stalling masters get page responses
        resp = RESUME_RETRY if code == U.IOMMUFD_PAGE_RESP_SUCCESS else RESUME_ABORT
        self.issue([C.resume(master.sid, stag, resp)], sync=False)

    # -- stream table ---------------------------------------------------------------------------
    def ensure_l2(self, sid: int) -> None:
        """arm_smmu_init_l2_strtab(): a level-2 table of abort STEs for the device's bus (no
        CFGI: an invalid level-1 descriptor is never cached)."""
        l1_index = sid >> STRTAB_SPLIT
        if l1_index in self.l2:
            return
        mem = self.hw.memory
        pages = (STE_SIZE << STRTAB_SPLIT) // PAGE_SIZE
        l2 = mem.alloc_contiguous(pages) << PAGE_SHIFT
        abort = pack(abort_ste())
        for i in range(1 << STRTAB_SPLIT):
            mem.write(l2 + i * STE_SIZE, abort)
        self.l2[l1_index] = l2
        mem.write_u64(self.strtab + l1_index * 8, l2 | (STRTAB_SPLIT + 1))

    def ste_addr(self, sid: int) -> int:
        return self.l2[sid >> STRTAB_SPLIT] + (sid & ((1 << STRTAB_SPLIT) - 1)) * STE_SIZE

    def _write(self, addr: int, target: list[int], used: Any, safe: Any, cfgi: Any) -> None:
        mem = self.hw.memory
        cur = [mem.read_u64(addr + 8 * i) for i in range(8)]

        def store(i: int, value: int) -> None:
            mem.write_u64(addr + 8 * i, value)

        write_entry(cur, target, used, safe, store, lambda: self.issue([cfgi]))

    def write_ste(self, master: Master, words: list[int]) -> None:
        """arm_smmu_install_ste_for_dev(): the STE rewritten as arm_smmu_write_entry() does,
        one CFGI_STE + CMD_SYNC per step, then a PREFETCH_CFG (no sync)."""
        master.cd_in_ste = get(words[0], 3, 1) == CFG_S1_TRANS and bool(words[0] & 1)
        master.ste_ats_enabled = get(words[1], 29, 28) == EATS_TRANS
        sid = master.sid
        self._write(self.ste_addr(sid), words, ste_used, ste_update_safe, C.cfgi_ste(sid))
        self.issue([C.prefetch_cfg(sid)], sync=False)

    def cd_table(self, master: Master, ssid: int) -> CdTable:
        """arm_smmu_alloc_cd_ptr(): the CD table (made on first use), with the leaf table of
        ``ssid`` present; a new leaf's L1 descriptor is followed by a non-leaf CFGI_CD."""
        table = master.cd_table
        if table is None:
            table = master.cd_table = CdTable(self.hw.memory, master.ssid_bits, self.feat_cd2l)
        if table.alloc_leaf(ssid):
            self.sync_cd(master, ssid, leaf=False)
        return table

    def sync_cd(self, master: Master, ssid: int, leaf: bool) -> None:
        """arm_smmu_sync_cd(): CFGI_CD of the SSID for each StreamID, then a SYNC."""
        batch = Batch(self)
        batch.add(C.cfgi_cd(master.sid, ssid, leaf))
        batch.submit()

    def write_cd(self, master: Master, ssid: int, words: list[int]) -> None:
        """arm_smmu_write_cd_entry(): the CD rewritten step by step, CFGI_CD (leaf) + SYNC;
        a substream other than 0 becoming valid or invalid counts in ``used_ssids``."""
        table = self.cd_table(master, ssid)
        addr = table.cd_addr(ssid)
        assert addr is not None
        if ssid:
            was = bool(self.hw.memory.read_u64(addr) & CD0_V)
            table.used_ssids += int(bool(words[0] & CD0_V)) - int(was)
        self._write(addr, words, cd_used, None, C.cfgi_cd(master.sid, ssid))

    def clear_cd(self, master: Master, ssid: int) -> None:
        """arm_smmu_clear_cd(): only where a CD table (and the CD's leaf table) exists."""
        table = master.cd_table
        if table is not None and table.cd_addr(ssid) is not None:
            self.write_cd(master, ssid, [0] * 8)

    @staticmethod
    def cd_addr(master: Master, ssid: int) -> int:
        """Where the CD of ``ssid`` is (its CD table and leaf table must exist)."""
        addr = None if master.cd_table is None else master.cd_table.cd_addr(ssid)
        if addr is None:
            raise err(errno.ENOENT, f"no CD for SSID {ssid}")
        return addr

    @staticmethod
    def ssids_in_use(master: Master) -> bool:
        return master.cd_table is not None and master.cd_table.used_ssids > 0

    # -- STE / CD builders ------------------------------------------------------------------------
    def make_s1_cd(self, domain: SmmuDomain, master: Master) -> list[int]:
        """arm_smmu_make_s1_cd(): a 48-bit, 4 KiB-granule, write-back TTB0 context; HA and HD
        only for a dirty-tracking domain (IO_PGTABLE_QUIRK_ARM_HD)."""
        cd = Cd(v=True, aa64=True, r=True, a=True, aset=True, epd1=True, asid=domain.asid)
        cfg = domain.cfg  # the TCR io-pgtable-arm computed
        cd.t0sz, cd.tg0, cd.ips, cd.sh0 = cfg.tsz, cfg.tg, cfg.ips, SH_ISH
        cd.ir0 = cd.or0 = IRGN_WBWA
        cd.ha = cd.hd = domain.dirty_tracking
        cd.s = master.stall_enabled
        cd.ttb0, cd.mair = domain.pt.root, MAIR_VALUE
        return cd.encode()

    def make_cdtable_ste(
        self, master: Master, ats: bool = False, s1dss: int = S1DSS_SSID0
    ) -> list[int]:
        """arm_smmu_make_cdtable_ste(): SHCFG only with IDR1.ATTR_TYPES_OVR and S1DSS bypass."""
        table = master.cd_table
        assert table is not None
        ste = Ste(
            v=True,
            config=CFG_S1_TRANS,
            s1fmt=table.s1fmt,
            s1ctxptr=table.base,
            s1cdmax=table.s1cdmax,
            s1dss=s1dss,
            s1cir=S1C_WBRA,
            s1cor=S1C_WBRA,
            s1csh=SH_ISH,
            eats=EATS_TRANS if ats else 0,
            # EL2(-E2H) on an E2H SMMU so the StreamWorld matches the host CPU's (BTM)
            strw=STRW_EL2 if self.feat_e2h else STRW_NSEL1,
            s1stalld=self.feat_stalls and not master.stall_enabled,
        )
        if self.feat_attr_types_ovr and s1dss == S1DSS_BYPASS:
            ste.shcfg = SHCFG_INCOMING
        return ste.encode()

    def make_s2_ste(self, master: Master, domain: SmmuDomain, ats: bool = False) -> list[int]:
        """arm_smmu_make_s2_domain_ste(): S2PTW always, S2FWB for an S2FWB nest parent,
        SHCFG only with IDR1.ATTR_TYPES_OVR."""
        ste = Ste(
            v=True,
            config=CFG_S2_TRANS,
            shcfg=SHCFG_INCOMING if self.feat_attr_types_ovr else 0,
            s2fwb=domain.nest_parent and self.feat_s2fwb,
            eats=EATS_TRANS if ats else 0,
            s2vmid=domain.vmid,
            s2t0sz=domain.cfg.tsz,
            s2sl0=domain.cfg.sl0,
            s2ir0=IRGN_WBWA,
            s2or0=IRGN_WBWA,
            s2sh0=SH_ISH,
            s2tg=domain.cfg.tg,
            s2ps=domain.cfg.ips,
            s2aa64=True,
            s2r=True,
            s2s=master.stall_enabled,
            s2ptw=True,
            s2ttb=domain.pt.root,
        )
        return ste.encode()

    def make_nested_ste(
        self, master: Master, parent: SmmuDomain, ste0: int, ste1: int, ats: bool
    ) -> list[int]:
        """arm_smmu_make_nested_domain_ste(): the guest's vSTE merged over the S2 STE."""
        cfg = get(ste0, 3, 1) if ste0 & 1 else CFG_ABORT
        if cfg == CFG_S1_TRANS:
            words = self.make_s2_ste(master, parent, ats)
            words[0] = 1 | (CFG_NESTED << 1) | (ste0 & ~STE0_CFG)
            words[1] |= ste1 | STE1_MEV
            return words
        if cfg == CFG_BYPASS:  # bypass: the guest sees its IPA space
            return self.make_s2_ste(master, parent, ats)
        return abort_ste()

    # -- attach: arm_smmu_attach_prepare() / arm_smmu_attach_commit() ---------------------------
    def ats_supported(self, master: Master) -> bool:
        """arm_smmu_ats_supported(): IDR0.ATS and a device with an ATS capability (the model's
        root complexes all declare ATS in IORT)."""
        return self.feat_ats and master.dev.ats

    def build_invs(self, master: Master, ats: bool, ssid: int, domain: SmmuDomain) -> list[Inv]:
        """arm_smmu_master_build_invs(): this master's entries for ``domain``'s array."""
        pgsize = (domain.pgsize_bitmap & -domain.pgsize_bitmap).bit_length() - 1
        pgsize = pgsize if self.feat_ril else 0
        if domain.stage == 1:
            out = [Inv(INV_S1_ASID, domain.asid, 0, pgsize)]
        else:
            out = [Inv(INV_S2_VMID, domain.vmid, 0, pgsize)]
        if domain.nest_parent:
            out.append(Inv(INV_S2_VMID_S1_CLEAR, domain.vmid))
        if ats:
            out.append(Inv(INV_ATS_FULL if domain.nest_parent else INV_ATS, master.sid, ssid))
        return out

    def attach_prepare(self, state: AttachState, new_domain: Domain | None) -> None:
        """Decide EATS, extend the new domain's invalidation array (before the STE changes),
        and turn PCI ATS off first when it goes off. Raises before touching anything."""
        master = state.master
        new_dd = devices_domain(new_domain)
        if new_dd is not None or state.cd_needs_ats:
            state.ats_enabled = not state.disable_ats and self.ats_supported(master)
        old_dd = devices_domain(state.old_domain)
        if new_dd is not None:
            state.new_dd = new_dd
            state.new_build = self.build_invs(master, state.ats_enabled, state.ssid, new_dd)
        if old_dd is not None:
            state.old_dd = old_dd
            state.old_build = self.build_invs(master, master.ats_enabled, state.ssid, old_dd)
        if new_dd is not None:
            new_dd.invs.merge(state.new_build)
        if not state.ats_enabled and master.ats_enabled:
            master.pci_ats = False  # pci_disable_ats() before the STE says EATS = 0
            self.hw.pci_ats(master.dev, False)

    def attach_commit(self, state: AttachState) -> None:
        """Flush the ATC as ATS changes, then drop the master from the old domain's array
        (flushing a tag that lost its last user)."""
        master = state.master
        if state.ats_enabled and not master.ats_enabled:
            self.atc_inv_master(master, 0)  # arm_smmu_enable_ats(): ATC clean before enable
            master.pci_ats = True
            self.hw.pci_ats(master.dev, True)
        elif state.ats_enabled and master.ats_enabled:
            self.atc_inv_master(master, state.ssid)
        elif not state.ats_enabled and master.ats_enabled:
            self.atc_inv_master(master, 0)
        if state.old_dd is not None:
            state.old_dd.invs.unref(state.old_build)
            if state.old_build and not state.old_build[0].users:
                flush_tag(self, state.old_build[0])
        master.ats_enabled = state.ats_enabled

    def atc_inv_master(self, master: Master, ssid: int) -> None:
        """arm_smmu_atc_inv_master(): ATC_INV of everything, per StreamID, then a SYNC."""
        batch = Batch(self)
        batch.add(C.atc_inv(master.sid, 0, C.ATC_INV_SIZE_ALL, ssid or None))
        batch.submit()

    def master_ssid_bits(self, dev: PciDevice) -> int:
        """arm_smmu_probe_device(): the device's PASID width capped by IDR1.SSIDSIZE
        (arm_smmu_enable_pasid), and by a 64 KiB linear table without IDR0.CD2L."""
        bits = min(dev.pasid_bits, self.ssid_bits)
        return bits if self.feat_cd2l else min(bits, LINEAR_CDMAX)

    def master_stall_enabled(self, sid: int) -> bool:
        """arm_smmu_probe_device(): a master stalls when firmware says "dma-can-stall" and the
        SMMU supports stalls (STALL_MODEL 0b00 or FORCE), or always under FORCE. The firmware
        property is read through the hardware object (the model's stand-in for the device's
        fwnode)."""
        return self.feat_stall_force or (self.feat_stalls and self.hw.dma_can_stall(sid))

    def attach_paging(self, master: Master, domain: SmmuDomain) -> None:
        """arm_smmu_attach_dev(): stage 1 writes CD 0 then a CD-table STE (S1DSS = SSID0);
        stage 2 (EBUSY while substreams are in use) writes its STE then clears CD 0."""
        if domain.stage == 1:
            self.cd_table(master, 0)
        elif self.ssids_in_use(master):
            raise err(errno.EBUSY, "substreams in use: the STE must keep the CD table")
        state = AttachState(master, master.domain)
        self.attach_prepare(state, domain)
        if domain.stage == 1:
            self.write_cd(master, 0, self.make_s1_cd(domain, master))
            self.write_ste(master, self.make_cdtable_ste(master, state.ats_enabled))
        else:
            self.write_ste(master, self.make_s2_ste(master, domain, state.ats_enabled))
            self.clear_cd(master, 0)
        self.attach_commit(state)
        master.vmaster = None

    def attach_blocked(self, master: Master) -> None:
        """arm_smmu_attach_dev_blocked(): an abort STE, then CD 0 cleared; while substreams
        are in use the STE keeps the CD table and terminates only SSID-less traffic
        (S1DSS = TERMINATE), with ATS as the device allows (arm_smmu_attach_dev_ste)."""
        master.vmaster = None
        state = AttachState(master, master.domain)
        if self.ssids_in_use(master):
            state.cd_needs_ats = True
            self.attach_prepare(state, None)
            ste = self.make_cdtable_ste(master, state.ats_enabled, S1DSS_TERMINATE)
        else:
            self.attach_prepare(state, None)
            ste = abort_ste()
        self.write_ste(master, ste)
        self.attach_commit(state)
        self.clear_cd(master, 0)

    # -- substreams: arm_smmu_s1_set_dev_pasid() / arm_smmu_blocking_set_dev_pasid() ----------
    def set_pasid(self, master: Master, domain: SmmuDomain, pasid: int) -> None:
        """arm_smmu_set_pasid(): CD ``pasid`` for a stage-1 domain; the STE becomes a CD-table
        STE first if the RID is blocked (S1DSS = TERMINATE), and is left alone if it already
        points at the CD table with the right EATS. The RID on a stage-2 or nested domain
        cannot take substreams: EINVAL."""
        if domain.smmu is not self or domain.stage != 1:
            raise err(errno.EINVAL, "only a stage-1 domain of this SMMU attaches to a PASID")
        if not master.cd_in_ste and master.domain is not None:
            raise err(errno.EINVAL, "the RID's STE is not a CD-table STE")
        self.cd_table(master, pasid)
        state = AttachState(master, master.pasid_domains.get(pasid), ssid=pasid)
        self.attach_prepare(state, domain)
        self.write_cd(master, pasid, self.make_s1_cd(domain, master))
        if not (master.cd_in_ste and master.ste_ats_enabled == state.ats_enabled):
            # arm_smmu_update_ste(): the RID is blocked here (the model has no identity)
            ste = self.make_cdtable_ste(master, state.ats_enabled, S1DSS_TERMINATE)
            self.write_ste(master, ste)
        self.attach_commit(state)
        master.pasid_domains[pasid] = domain

    def remove_pasid(self, master: Master, pasid: int) -> None:
        """arm_smmu_blocking_set_dev_pasid(): CD cleared, the ATC of the PASID flushed, the
        domain's array loses this master (its tag flushed if that was the last user); with
        no substream left a blocked RID goes back to a plain abort STE."""
        old = master.pasid_domains.pop(pasid, None)
        if old is None:
            return
        state = AttachState(master, old, ssid=pasid)
        state.old_dd = old
        state.old_build = self.build_invs(master, master.ats_enabled, pasid, old)
        self.clear_cd(master, pasid)
        if master.ats_enabled:
            self.atc_inv_master(master, pasid)
        old.invs.unref(state.old_build)
        if not state.old_build[0].users:
            flush_tag(self, state.old_build[0])
        if not self.ssids_in_use(master) and master.domain is None:
            self.attach_blocked(master)

    # -- invalidation -----------------------------------------------------------------------------
    def tlb_inv_range(self, domain: SmmuDomain, iova: int, size: int, granule: int) -> None:
        """arm_smmu_iotlb_sync(): the gathered range of leaves, granule = their page size."""
        inv_range(self, domain.invs, iova, size, granule, leaf=True)


def abort_ste() -> list[int]:
    return Ste(v=True, config=CFG_ABORT).encode()


VEVENTQ_TYPE = 1  # IOMMU_VEVENTQ_TYPE_ARM_SMMUV3
