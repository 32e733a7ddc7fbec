"""The kernel side of one SMMU (``struct arm_smmu_device``): what arm-smmu-v3.c keeps and does.

It owns the memory it gave the hardware (2-level stream table, CMDQ, EVENTQ, the CMD_SYNC
completion word), programs the registers at probe, builds STEs and CDs as the Linux helpers do
(``arm_smmu_make_*_ste`` / ``arm_smmu_make_s1_cd``), issues commands through the CMDQ and
waits for CMD_SYNC, and runs the event-queue and global-error interrupt handlers.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import events as E
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.cd import CD_SIZE, IRGN_WBWA, TG0_4K, Cd
from iommufd_arm_smmuv3.hw import Smmuv3
from iommufd_arm_smmuv3.pgtable import (
    MAIR_VALUE,
    PGSIZE_BITMAP,
    VA_BITS,
    Stage1Format,
    Stage2Format,
)
from iommufd_arm_smmuv3.ste import (
    CFG_ABORT,
    CFG_NESTED,
    CFG_S1_TRANS,
    CFG_S2_TRANS,
    EATS_TRANS,
    S1C_WBRA,
    S1DSS_SSID0,
    SH_ISH,
    SHCFG_INCOMING,
    STE0_CFG,
    STE1_MEV,
    STE_SIZE,
    Ste,
)
from iommufd_model.driver import Domain, DomainType
from iommufd_model.errors import err
from iommufd_model.hw.bits import get, pack
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.ring import MemRing

if TYPE_CHECKING:
    from iommufd_model.hw.pci import PciDevice

STRTAB_SPLIT = 8  # each level-2 table covers one PCI bus (256 StreamIDs)
CMDQ_LOG2 = 8  # 256 commands: one page
EVTQ_LOG2 = 7  # 128 records: one page
CMDQ_BATCH_ENTRIES = 64  # BITS_PER_LONG, as arm_vsmmu_cache_invalidate batches
MSI_IOVA_BASE = 0x8000000  # the software MSI window every SMMU device reserves
MSI_IOVA_LENGTH = 0x100000
S2_T0SZ = 64 - VA_BITS
S2_SL0_LEVEL0 = 2
IPS_48 = 5


class SmmuDomain(Domain):
    """A paging domain: stage 1 (ASID) or, for nest parents, stage 2 (VMID)."""

    def __init__(self, smmu: SmmuDevice, stage: int, *, nest_parent: bool, pasid: bool) -> None:
        super().__init__(
            smmu.hw,
            DomainType.PAGING,
            pgsize_bitmap=PGSIZE_BITMAP,
            aperture_start=0,
            aperture_end=(1 << VA_BITS) - 1,
            nest_parent=nest_parent,
            pasid_compat=pasid,
        )
        self.smmu = smmu
        self.stage = stage
        fmt = Stage1Format() if stage == 1 else Stage2Format()
        self.pgtable = RadixPageTable(smmu.hw.memory, fmt)
        self.asid = smmu.alloc_id(smmu.asids) if stage == 1 else 0
        self.vmid = smmu.alloc_id(smmu.vmids) if stage == 2 else 0


class Master:
    """``struct arm_smmu_master``: one device's StreamID, CD table and vSMMU identity."""

    def __init__(self, dev: PciDevice, sid: int) -> None:
        self.dev = dev
        self.sid = sid
        self.domain: Domain | None = None
        self.cd_table = 0  # physical address of the linear CD table, allocated on first S1 use
        self.vmaster: tuple[Any, int] | None = None  # (vSMMU, vSID) while nested with a vDEVICE
        self.ats_enabled = False


class SmmuDevice:
    """Driver state of one SMMU instance; ``probe`` programs the hardware from reset."""

    def __init__(self, hw: Smmuv3) -> None:
        self.hw = hw
        mem = hw.memory
        self.asids: set[int] = set()
        self.vmids: set[int] = set()
        self.masters: dict[int, Master] = {}
        self.host_events: list[E.Event] = []  # what the kernel would print to dmesg
        self.cmdq_errors: list[tuple[int, int, int]] = []  # (CERROR, word 0, word 1)
        self.forwarded = 0
        self.vintf_owners: dict[int, Any] = {}  # CMDQV VINTF index -> the vIOMMU owning it
        self._sync_seq = 0
        sid_bits = hw.sid_bits
        l1_count = 1 << max(sid_bits - STRTAB_SPLIT, 0)
        l1_pages = max(1, l1_count * 8 // PAGE_SIZE)
        self.strtab = mem.alloc_contiguous(l1_pages) << PAGE_SHIFT
        self.l2: dict[int, int] = {}
        self.cmdq = MemRing(mem, mem.alloc_frame() << PAGE_SHIFT, C.CMD_SIZE, 1 << CMDQ_LOG2)
        self.evtq = MemRing(mem, mem.alloc_frame() << PAGE_SHIFT, E.EVENT_SIZE, 1 << EVTQ_LOG2)
        self.sync_word = mem.alloc_frame() << PAGE_SHIFT
        self._reset(sid_bits)

    # -- probe: arm_smmu_device_reset() ---------------------------------------------------------
    def _reset(self, sid_bits: int) -> None:
        hw = self.hw
        w = hw.mmio.write
        hw.evtq_irq.append(self.evtq_thread)
        hw.gerror_irq.append(self.gerror_handler)
        w(R.CR0, 0, 4)
        w(R.CR1, (1 << 10) | (1 << 8) | (1 << 6) | (1 << 4) | (1 << 2) | 1, 4)  # WB, ISH
        w(R.STRTAB_BASE, R.STRTAB_BASE_RA | self.strtab)
        cfg = (R.STRTAB_CFG_FMT_2LVL << 16) | (STRTAB_SPLIT << 6) | sid_bits
        w(R.STRTAB_BASE_CFG, cfg, 4)
        w(R.CMDQ_BASE, R.Q_BASE_RA | self.cmdq.base | CMDQ_LOG2)
        w(R.CMDQ_PROD, 0, 4)
        w(R.CMDQ_CONS, 0, 4)
        w(R.CR0, R.CR0_CMDQEN, 4)
        self.issue([C.cfgi_all(), C.tlbi_nsnh_all()])
        w(R.EVENTQ_BASE, R.Q_BASE_RA | self.evtq.base | EVTQ_LOG2)
        w(R.EVENTQ_PROD, 0, 4)
        w(R.EVENTQ_CONS, 0, 4)
        w(R.CR0, R.CR0_CMDQEN | R.CR0_EVTQEN, 4)
        w(R.IRQ_CTRL, R.IRQ_CTRL_GERROR_IRQEN | R.IRQ_CTRL_EVTQ_IRQEN, 4)
        w(R.GBPA, R.GBPA_UPDATE | R.GBPA_ABORT, 4)  # disable_bypass
        w(R.CR0, R.CR0_CMDQEN | R.CR0_EVTQEN | R.CR0_SMMUEN, 4)

    @staticmethod
    def alloc_id(used: set[int], bits: int = 16) -> int:
        for value in range(1, 1 << bits):
            if value not in used:
                used.add(value)
                return value
        raise err(errno.ENOSPC, "no ASID/VMID left")

    # -- command queue: arm_smmu_cmdq_issue_cmdlist() -----------------------------------------
    def issue(self, cmds: list[tuple[int, int]], sync: bool = True) -> None:
        """Queue ``cmds`` (then a CMD_SYNC) and wait for the SYNC's MSI write."""
        hw = self.hw
        mmio = hw.mmio
        mask = (1 << (CMDQ_LOG2 + 1)) - 1
        todo = list(cmds)
        if sync:
            self._sync_seq = (self._sync_seq + 1) & 0xFFFF_FFFF
            hw.memory.write(self.sync_word, b"\xff\xff\xff\xff")
            todo.append(C.cmd_sync(C.CS_IRQ, self.sync_word, self._sync_seq))
        for cmd in todo:
            prod = mmio.read(R.CMDQ_PROD, 4) & mask
            cons = mmio.read(R.CMDQ_CONS, 4) & mask
            if prod ^ cons == 1 << CMDQ_LOG2:
                raise err(errno.ETIMEDOUT, "CMDQ full and not draining")
            self.cmdq.write(prod, C.encode(cmd))
            mmio.write(R.CMDQ_PROD, (prod + 1) & mask, 4)
        if sync and int.from_bytes(hw.memory.read(self.sync_word, 4), "little") != self._sync_seq:
            raise err(errno.ETIMEDOUT, "CMD_SYNC did not complete")

    # -- interrupts -------------------------------------------------------------------------------
    def gerror_handler(self) -> None:
        """arm_smmu_gerror_handler(): on CMDQ_ERR, skip the bad command (arm_smmu_cmdq_skip_err)."""
        mmio = self.hw.mmio
        gerror = mmio.read(R.GERROR, 4)
        active = gerror ^ mmio.read(R.GERRORN, 4)
        if active & R.GERROR_CMDQ_ERR:
            cons = mmio.read(R.CMDQ_CONS, 4)
            index = cons & ((1 << CMDQ_LOG2) - 1)
            w0, w1 = C.decode(self.cmdq.read(index))
            self.cmdq_errors.append((get(cons, 30, 24), w0, w1))
            # Replace the offending command with a CMD_SYNC and carry on.
            self.cmdq.write(index, C.encode(C.cmd_sync()))
        mmio.write(R.GERRORN, gerror, 4)

    def evtq_thread(self) -> None:
        """arm_smmu_evtq_thread(): drain the event queue, forward what belongs to a vSMMU."""
        mmio = self.hw.mmio
        mask = (1 << (EVTQ_LOG2 + 1)) - 1
        while True:
            prod = mmio.read(R.EVENTQ_PROD, 4)
            cons = mmio.read(R.EVENTQ_CONS, 4)
            if (prod & mask) == (cons & mask):
                break
            raw = self.evtq.read(cons & mask)
            self.handle_event(raw)
            mmio.write(R.EVENTQ_CONS, (prod & R.Q_OVERFLOW) | ((cons + 1) & mask), 4)

    def handle_event(self, raw: bytes) -> None:
        event = E.Event.decode(raw)
        self.host_events.append(event)
        if event.id not in E.FORWARDED_TO_VIOMMU:
            return
        master = self.masters.get(event.sid)
        if master is None or master.vmaster is None or event.s2:
            return
        vsmmu, vsid = master.vmaster
        core = vsmmu.core
        if core is not None and core.report_event(VEVENTQ_TYPE, E.replace_sid(raw, vsid)):
            self.forwarded += 1

    # -- stream table ---------------------------------------------------------------------------
    def ensure_l2(self, sid: int) -> None:
        """arm_smmu_init_l2_strtab(): a level-2 table of abort STEs for the device's bus."""
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
        self.issue([C.cfgi_ste(sid, leaf=False)])

    def ste_addr(self, sid: int) -> int:
        return self.l2[sid >> STRTAB_SPLIT] + (sid & ((1 << STRTAB_SPLIT) - 1)) * STE_SIZE

    def write_ste(self, master: Master, words: list[int]) -> None:
        """arm_smmu_install_ste_for_dev(): write the STE, then CFGI_STE + CMD_SYNC."""
        self.hw.memory.write(self.ste_addr(master.sid), pack(words))
        self.issue([C.cfgi_ste(master.sid)])

    def write_cd(self, master: Master, ssid: int, words: list[int]) -> None:
        mem = self.hw.memory
        if not master.cd_table:
            master.cd_table = mem.alloc_frame() << PAGE_SHIFT
        mem.write(master.cd_table + ssid * CD_SIZE, pack(words))
        self.issue([C.cfgi_cd(master.sid, ssid)])

    # -- STE / CD builders ------------------------------------------------------------------------
    def make_s1_cd(self, domain: SmmuDomain) -> list[int]:
        """arm_smmu_make_s1_cd(): a 48-bit, 4 KiB-granule, write-back TTB0 context."""
        cd = Cd(v=True, aa64=True, r=True, a=True, aset=True, epd1=True, asid=domain.asid)
        cd.t0sz, cd.tg0, cd.ips, cd.sh0 = 64 - VA_BITS, TG0_4K, IPS_48, SH_ISH
        cd.ir0 = cd.or0 = IRGN_WBWA
        cd.ha = bool(self.hw.mmio.read(R.IDR0, 4) & R.IDR0_HTTU_ACCESS)
        cd.ttb0, cd.mair = domain.pgtable.root, MAIR_VALUE
        return cd.encode()

    def make_cdtable_ste(self, master: Master) -> list[int]:
        ste = Ste(
            v=True,
            config=CFG_S1_TRANS,
            s1fmt=0,
            s1ctxptr=master.cd_table,
            s1cdmax=0,
            s1dss=S1DSS_SSID0,
            s1cir=S1C_WBRA,
            s1cor=S1C_WBRA,
            s1csh=SH_ISH,
            eats=EATS_TRANS if master.ats_enabled else 0,
        )
        return ste.encode()

    def make_s2_ste(self, master: Master, domain: SmmuDomain, ats: bool = False) -> list[int]:
        ste = Ste(
            v=True,
            config=CFG_S2_TRANS,
            shcfg=SHCFG_INCOMING,
            eats=EATS_TRANS if ats else 0,
            s2vmid=domain.vmid,
            s2t0sz=S2_T0SZ,
            s2sl0=S2_SL0_LEVEL0,
            s2ir0=IRGN_WBWA,
            s2or0=IRGN_WBWA,
            s2sh0=SH_ISH,
            s2tg=0,
            s2ps=IPS_48,
            s2aa64=True,
            s2r=True,
            s2ptw=domain.nest_parent,
            s2ttb=domain.pgtable.root,
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
        if cfg == 0b100:  # bypass: the guest sees its IPA space
            return self.make_s2_ste(master, parent, ats)
        return abort_ste()

    # -- invalidation -----------------------------------------------------------------------------
    def tlb_inv_range(self, domain: SmmuDomain, iova: int, size: int) -> None:
        """arm_smmu_tlb_inv_range_domain(): range TLBIs when IDR3.RIL, else one per page."""
        if domain.stage == 1:
            opcode, kw = C.TLBI_NH_VA, {"asid": domain.asid}
        else:
            opcode, kw = C.TLBI_S2_IPA, {"vmid": domain.vmid}
        cmds: list[tuple[int, int]] = []
        if self.hw.mmio.read(R.IDR3, 4) & R.IDR3_RIL:
            for addr, num, scale in C.plan_range(iova, size):
                cmds.append(C.tlbi_va(opcode, addr, num=num, scale=scale, tg=1, leaf=True, **kw))
        else:
            for addr in range(iova, iova + size, PAGE_SIZE):
                cmds.append(C.tlbi_va(opcode, addr, leaf=True, **kw))
        if domain.nest_parent:
            # A changed stage 2 stales every nested stage-1 entry of the VMID too.
            cmds.append(C.tlbi_nh_all(domain.vmid))
        self.issue(cmds)


def abort_ste() -> list[int]:
    return Ste(v=True, config=CFG_ABORT).encode()


VEVENTQ_TYPE = 1  # IOMMU_VEVENTQ_TYPE_ARM_SMMUV3
