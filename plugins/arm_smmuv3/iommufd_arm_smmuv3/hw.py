"""The SMMUv3 as hardware: registers, stream table, CD fetch, TLB, command and event queues.

Configuration is read from memory only on a miss of the STE / CD caches, which only CFGI
commands refresh; translations are cached in a TLB tagged by (VMID, ASID) for stage 1 and
nested walks and by VMID for stage-2-only streams, which only TLBI commands invalidate. So a
driver that forgets a CFGI or a TLBI sees stale translations, as on silicon.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Collection, Hashable
from typing import TYPE_CHECKING, Any

from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import events as E
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.cd import CD_SIZE, Cd
from iommufd_arm_smmuv3.cmdqv import Cmdqv
from iommufd_arm_smmuv3.ste import (
    CFG_ABORT,
    CFG_BYPASS,
    EATS_TRANS,
    L1_L2PTR,
    L1CD_L2PTR,
    L1CD_V,
    S1DSS_BYPASS,
    S1DSS_SSID0,
    S1DSS_TERMINATE,
    S1FMT_4K_L2,
    S1FMT_64K_L2,
    STE_SIZE,
    STRW_EL2,
    Ste,
    ips_bits,
)
from iommufd_model.errors import err
from iommufd_model.hw.bits import get, put, words
from iommufd_model.hw.compiled import load_walker
from iommufd_model.hw.iommu import CacheDict, FastPath, IommuHw, page_run
from iommufd_model.hw.iotlb import Iotlb, TlbEntry
from iommufd_model.hw.ring import MemRing
from iommufd_model.hw.xlate import Walk
from iommufd_model.locking import locked

if TYPE_CHECKING:
    from iommufd_model.hw.pci import PageRequest, PciDevice
    from iommufd_model.machine import Machine

WALKER = "iommufd_arm_smmuv3.walk"
TAG_S1 = 1  # (TAG_S1, vmid, asid): stage-1 and nested translations
TAG_S2 = 2  # (TAG_S2, vmid): stage-2-only translations
TAG_EL2 = 3  # (TAG_EL2, asid): stage-1 translations of EL2 StreamWorld streams (STRW EL2)

ATC_CAPACITY = 64  # entries of a device's ATC (the model's choice)
AIDR_SMMUV3_2 = 0x02  # ArchMajorRev 0 (SMMUv3), ArchMinorRev 2
IIDR_ARM = 0x43B  # Implementer: Arm


class ConfigFault(Exception):
    """A transaction stopped by configuration (bad STE/CD, abort) before any walk."""

    def __init__(self, event: E.Event | None, reason: str) -> None:
        super().__init__(reason)
        self.event = event
        self.reason = reason


class Smmuv3(IommuHw):
    """One SMMUv3 instance (AArch64 tables, stage 1 and stage 2; the 4 KiB granule and 48-bit
    OAS unless ``granules`` / ``oas`` / ``vax`` say otherwise: IDR5.GRAN4K/16K/64K, OAS, VAX).

    ``host_va_bits`` is the host's word, not a register: the kernel's VA_BITS, which caps the
    input size of the stage-1 domains its driver builds. ``guest_page_shift`` is the guests'
    word: the PAGE_SIZE of the guest kernels using a vSMMU on it (their stage-1 granule)."""

    def __init__(
        self,
        machine: Machine,
        index: int,
        *,
        sid_bits: int = 16,
        ssid_bits: int = 20,
        tlb_capacity: int = 4096,
        range_invalidation: bool = True,
        hw_access_flag: bool = True,
        hw_dirty: bool = True,
        cmdqv: bool = True,
        s2fwb: bool = False,
        attr_types_ovr: bool = True,
        canwbs: bool = True,
        cd2l: bool = True,
        stall_force: bool = False,
        stalls: bool = False,
        dma_can_stall: bool | Collection[int] = False,
        pri: bool = False,
        s1p: bool = True,
        s2p: bool = True,
        hyp: bool = False,
        vhe: bool = True,
        granules: tuple[int, ...] = (12,),
        oas: int = 48,
        vax: bool = False,
        host_va_bits: int = 48,
        guest_page_shift: int = 12,
    ) -> None:
        super().__init__(machine, index)
        # IDR5.GRAN4K/16K/64K (log2 of the granules), OAS (48 or 52 bits) and VAX
        if not granules or set(granules) - set(R.IDR5_GRAN) or oas not in (48, 52):
            raise err(errno.EINVAL, f"unsupported SMMUv3 granules {granules} / OAS {oas}")
        self.granules = frozenset(granules)
        self.vax = vax
        self.host_va_bits = host_va_bits
        # Not a register either: the PAGE_SIZE of the guest kernels whose vSMMU sits on this
        # SMMU (the model's knob), which picks their stage-1 granule (guest.py).
        self.guest_page_shift = guest_page_shift
        # IDR0.S1P / S2P: the stages implemented. Substreams select CDs, which only stage 1
        # has: without it SSIDSIZE reads 0 (the model's choice).
        self.s1p = s1p
        self.s2p = s2p
        # IDR0.HYP: the EL2 StreamWorld and the TLBI_EL2_* commands. ``vhe`` is the host's word,
        # not a register: its kernel runs at EL2 with VHE (what makes Linux use E2H).
        self.hyp = hyp
        self.host_vhe = vhe
        if not s1p:
            ssid_bits = 0
        # Firmware's word, not a register: IORT marks the root complex behind this SMMU as
        # CANWBS (IOMMU_FWSPEC_PCI_RC_CANWBS), so its devices' accesses are coherent write-back.
        self.rc_canwbs = canwbs
        self.sid_bits = sid_bits
        self.ssid_bits = ssid_bits
        self.cd2l = cd2l
        # IDR0.STALL_MODEL: FORCE (``stall_force``) or STALL (``stalls``: per stream, the
        # stall model 0b00) make faulting stage-1/2 transactions of CD.S / STE.S2S streams stall
        # until CMD_RESUME; (StreamID, STAG) -> (IOVA, write, PASID) while held. Without
        # either the model is NONE: CD.S / STE.S2S change nothing and CMD_RESUME is illegal.
        self.stall_force = stall_force
        self.stall_model = (
            R.STALL_MODEL_FORCE
            if stall_force
            else R.STALL_MODEL_STALL
            if stalls
            else R.STALL_MODEL_NONE
        )
        self.can_stall = self.stall_model != R.STALL_MODEL_NONE
        # Firmware's word, not a register: the masters whose firmware node carries the
        # "dma-can-stall" property (DT, or an IORT named component's stall flag): every master
        # behind this SMMU (True), none (False) or those of the StreamIDs listed.
        self.fw_dma_can_stall = dma_can_stall
        self.stalled: dict[tuple[int, int], tuple[int, bool, int | None]] = {}
        self.resumes: list[tuple[int, int, int]] = []  # (StreamID, STAG, RESP) executed
        self._next_stag = 0
        # Device ATCs (ATS enabled in the device), by StreamID; tags are the PASID or -1.
        self.atcs: dict[int, Iotlb] = {}
        self.atc_hits = 0
        self.oas_bits = oas
        idr0 = (
            (R.IDR0_S1P if s1p else 0)
            | (R.IDR0_S2P if s2p else 0)
            | R.IDR0_TTF_AARCH64
            | R.IDR0_COHACC
            | R.IDR0_ATS
            | (R.IDR0_HYP if hyp else 0)
            | R.IDR0_ASID16
            | R.IDR0_MSI
            | R.IDR0_SEV
            | R.IDR0_VMID16
            | R.IDR0_TTENDIAN_LE
            | put(self.stall_model, 25, R.IDR0_STALL_MODEL_SHIFT)
            | R.IDR0_ST_LVL_2LVL
            | (R.IDR0_CD2L if cd2l else 0)
            | (R.IDR0_PRI if pri else 0)
            | R.idr0_httu(access=hw_access_flag, dirty=hw_dirty)
        )
        idr1 = (
            (R.IDR1_ATTR_TYPES_OVR if attr_types_ovr else 0)
            | (sid_bits << R.IDR1_SIDSIZE_SHIFT)
            | (ssid_bits << R.IDR1_SSIDSIZE_SHIFT)
            | (19 << R.IDR1_EVTQS_SHIFT)
            | (19 << R.IDR1_CMDQS_SHIFT)
            | ((19 if pri else 0) << R.IDR1_PRIQS_SHIFT)
        )
        ids = {
            "IDR0": idr0,
            "IDR1": idr1,
            "IDR3": (R.IDR3_RIL if range_invalidation else 0) | (R.IDR3_FWB if s2fwb else 0),
            "IDR5": (R.IDR5_OAS_52 if oas == 52 else R.IDR5_OAS_48)
            | sum(R.IDR5_GRAN[g] for g in self.granules)
            | (R.IDR5_VAX_52 if vax else 0),
            "IIDR": IIDR_ARM,
            "AIDR": AIDR_SMMUV3_2,
        }
        self.mmio = R.build(self, f"smmuv3.{index}", ids)
        # CD.HA / CD.HD act only where IDR0.HTTU implements them (IHI 0070: RES0 otherwise, so
        # an SMMU without HTTU walks as if they were clear; the model's reading). Linux 7.2
        # writes them only for dirty-tracking domains, which need HTTU; a guest's CD may not.
        self.httu_access = hw_access_flag or hw_dirty
        self.httu_dirty = hw_dirty
        self.tlb = Iotlb(tlb_capacity)
        # A change of either forgets the request streams the compiled translate front knows.
        self.ste_cache: dict[int, Ste] = CacheDict(self.front)
        self.cd_cache: dict[tuple[int, int], Cd] = CacheDict(self.front)
        self.walker: Any = load_walker(WALKER)
        # Control state mirrored from CR0 / GBPA / IRQ_CTRL for the hot path.
        self.enabled = False
        self.cmdq_on = False
        self.evtq_on = False
        self.gbpa_abort = False
        self.irq_ctrl = 0
        self._cmdq: MemRing | None = None
        self._cmdq_running = False
        self._cmdq_log2 = 0
        self._evtq: MemRing | None = None
        self._evtq_log2 = 0
        self.priq_on = False
        self._priq: MemRing | None = None
        self._priq_log2 = 0
        self.priq_irq: list[Callable[[], None]] = []
        self.page_requests_lost = 0
        # Observable side channels: interrupts, events seen, commands executed.
        self.evtq_irq: list[Callable[[], None]] = []
        self.gerror_irq: list[Callable[[], None]] = []
        self.events: list[E.Event] = []
        self.events_lost = 0
        self.sev_count = 0
        self.sync_irq_count = 0
        self.executed: list[tuple[int, int]] = []
        self.atc_invalidations: list[tuple[int, int | None, int, int]] = []
        self.pri_responses: list[tuple[int, int | None, int, int]] = []
        self.config_fetches = 0
        # The Tegra241 CMDQV extension (guest-owned command queues), when present.
        self.cmdqv = Cmdqv(self) if cmdqv else None

    # -- register side effects ----------------------------------------------------------------
    def reg(self, name: str) -> int:
        return self.mmio[name]

    def cr0_written(self, old: int, new: int) -> None:
        m = self.mmio
        if new & R.CR0_CMDQEN and not self.cmdq_on:
            base = m["CMDQ_BASE"]
            self._cmdq_log2 = min(base & R.Q_BASE_LOG2SIZE, 19)
            self._cmdq = MemRing(
                self.memory, base & R.Q_BASE_ADDR, C.CMD_SIZE, 1 << self._cmdq_log2
            )
        if new & R.CR0_EVTQEN and not self.evtq_on:
            base = m["EVENTQ_BASE"]
            self._evtq_log2 = min(base & R.Q_BASE_LOG2SIZE, 19)
            self._evtq = MemRing(
                self.memory, base & R.Q_BASE_ADDR, E.EVENT_SIZE, 1 << self._evtq_log2
            )
        if new & R.CR0_PRIQEN and not self.priq_on and m["IDR0"] & R.IDR0_PRI:
            base = m["PRIQ_BASE"]
            self._priq_log2 = min(base & R.Q_BASE_LOG2SIZE, 19)
            self._priq = MemRing(
                self.memory, base & R.Q_BASE_ADDR, E.PRI_SIZE, 1 << self._priq_log2
            )
        self.priq_on = bool(new & R.CR0_PRIQEN) and bool(m["IDR0"] & R.IDR0_PRI)
        self.enabled = bool(new & R.CR0_SMMUEN)
        self.front.forget()  # the front's streams assumed SMMUEN
        self.cmdq_on = bool(new & R.CR0_CMDQEN)
        self.evtq_on = bool(new & R.CR0_EVTQEN)
        m.set("CR0ACK", new)  # the update completes at once
        if self.cmdq_on:
            self._run_cmdq()

    def cmdq_prod_written(self, old: int, new: int) -> None:
        if self.cmdq_on:
            self._run_cmdq()

    def gerrorn_written(self, old: int, new: int) -> None:
        # Acknowledging CMDQ_ERR lets the queue resume from CMDQ_CONS.
        if self.cmdq_on and not self._cmdq_error_active():
            self._run_cmdq()

    def gbpa_written(self, old: int, new: int) -> None:
        self.gbpa_abort = bool(new & R.GBPA_ABORT)
        self.mmio.set("GBPA", new & ~R.GBPA_UPDATE)

    def irq_ctrl_written(self, old: int, new: int) -> None:
        self.irq_ctrl = new
        self.mmio.set("IRQ_CTRLACK", new)

    def _cmdq_error_active(self) -> bool:
        m = self.mmio
        return bool((m["GERROR"] ^ m["GERRORN"]) & R.GERROR_CMDQ_ERR)

    def _raise_gerror(self, bit: int) -> None:
        m = self.mmio
        if not (m["GERROR"] ^ m["GERRORN"]) & bit:
            m.set("GERROR", m["GERROR"] ^ bit)
        if self.irq_ctrl & R.IRQ_CTRL_GERROR_IRQEN:
            for handler in list(self.gerror_irq):
                handler()

    # -- command queue --------------------------------------------------------------------------
    def _run_cmdq(self) -> None:
        """Consume commands from CMDQ_CONS to CMDQ_PROD until empty or a command error.

        A global-error interrupt handler may run in the middle (and acknowledge the error);
        a nested kick only marks work, the running loop picks it up.
        """
        if self._cmdq_running:
            return
        self._cmdq_running = True
        try:
            self._cmdq_loop()
        finally:
            self._cmdq_running = False

    def _cmdq_loop(self) -> None:
        ring = self._cmdq
        m = self.mmio
        wrap_mask = (1 << (self._cmdq_log2 + 1)) - 1
        while ring is not None and self.cmdq_on and not self._cmdq_error_active():
            cons = m["CMDQ_CONS"] & wrap_mask
            if cons == m["CMDQ_PROD"] & wrap_mask:
                return
            try:
                w0, w1 = C.decode(ring.read(cons))
                error = R.CERROR_NONE if self.execute(w0, w1) else R.CERROR_ILL
            except OSError:
                error = R.CERROR_ABT
            if error:
                m.set("CMDQ_CONS", cons | (error << R.CMDQ_CONS_ERR_SHIFT))
                self._raise_gerror(R.GERROR_CMDQ_ERR)  # the handler may fix and acknowledge
                continue
            m.set("CMDQ_CONS", (cons + 1) & wrap_mask)

    def execute(self, w0: int, w1: int) -> bool:
        """Carry out one command; False for an illegal one (CERROR_ILL)."""
        opcode = C.op(w0)
        self.stats.commands += 1
        sid = get(w0, 63, 32)
        vmid = get(w0, 47, 32)
        if opcode == C.CMD_SYNC:
            cs = get(w0, 13, 12)
            if cs == 3:
                return False
            if cs == C.CS_IRQ:
                msi_addr = w1 & C.CMD1_SYNC_MSIADDR
                if msi_addr:
                    try:
                        self.memory.write(msi_addr, get(w0, 63, 32).to_bytes(4, "little"))
                    except OSError:  # the MSI write aborted: a global error, the sync completes
                        self._raise_gerror(R.GERROR_MSI_CMDQ_ABT_ERR)
                else:
                    self.sync_irq_count += 1
            elif cs == C.CS_SEV:
                self.sev_count += 1
        elif opcode == C.CFGI_STE:
            self._drop_config(sid, sid)
        elif opcode == C.CFGI_STE_RANGE:
            span = get(w1, 4, 0)
            if span == C.CFGI_ALL_RANGE:
                self.ste_cache.clear()
                self.cd_cache.clear()
            else:
                first = sid & ~((2 << span) - 1)
                self._drop_config(first, first + (2 << span) - 1)
        elif opcode == C.CFGI_CD:
            self.cd_cache.pop((sid, get(w0, 31, 12)), None)
        elif opcode == C.CFGI_CD_ALL:
            for key in [k for k in self.cd_cache if k[0] == sid]:
                del self.cd_cache[key]
        elif opcode == C.TLBI_NH_ALL:
            self.tlb.flush_tag(lambda t: _s1_tag(t, vmid, None))
        elif opcode == C.TLBI_NH_ASID:
            asid = get(w0, 63, 48)
            self.tlb.flush_tag(lambda t: _s1_tag(t, vmid, asid))
        elif opcode in (C.TLBI_NH_VA, C.TLBI_NH_VAA):
            first, last = C.tlbi_range(w0, w1, C.CMD1_TLBI_VA)
            want = get(w0, 63, 48) if opcode == C.TLBI_NH_VA else None
            self._tlbi_range(lambda t: _s1_tag(t, vmid, want), first, last, w1)
        elif opcode == C.TLBI_S2_IPA:
            first, last = C.tlbi_range(w0, w1, C.CMD1_TLBI_IPA)
            self._tlbi_range(lambda t: t == (TAG_S2, vmid), first, last, w1)
        elif opcode == C.TLBI_S12_VMALL:
            self.tlb.flush_tag(lambda t: _s1_tag(t, vmid, None) or t == (TAG_S2, vmid))
        elif opcode == C.TLBI_NSNH_ALL:
            # non-secure, non-hypervisor: EL2 StreamWorld entries stay
            self.tlb.flush_tag(lambda t: not (isinstance(t, tuple) and t[0] == TAG_EL2))
        elif opcode == C.TLBI_EL2_ALL and self.hyp:
            self.tlb.flush_tag(lambda t: isinstance(t, tuple) and t[0] == TAG_EL2)
        elif opcode == C.TLBI_EL2_ASID and self.hyp:
            asid = get(w0, 63, 48)
            self.tlb.flush_tag(lambda t: t == (TAG_EL2, asid))
        elif opcode == C.TLBI_EL2_VA and self.hyp:
            first, last = C.tlbi_range(w0, w1, C.CMD1_TLBI_VA)
            asid = get(w0, 63, 48)
            self._tlbi_range(lambda t: t == (TAG_EL2, asid), first, last, w1)
        elif opcode == C.ATC_INV:
            ssid = get(w0, 31, 12) if w0 & C.CMD0_SSV else None
            self.atc_invalidations.append((sid, ssid, w1 & C.CMD1_ATC_ADDR, get(w1, 5, 0)))
            self._atc_inv(sid, ssid, w1 & C.CMD1_ATC_ADDR, get(w1, 5, 0))
        elif opcode == C.PRI_RESP:
            resp = get(w1, 13, 12)
            if resp == 3:
                return False
            ssid = get(w0, 31, 12) if w0 & C.CMD0_SSV else None
            self.pri_responses.append((sid, ssid, get(w1, 8, 0), resp))
        elif opcode == C.RESUME and self.can_stall:
            # RESP: 0 terminate, 1 retry, 2 abort; an unknown STAG has no effect
            if self.stalled.pop((sid, get(w1, 15, 0)), None) is not None:
                self.resumes.append((sid, get(w1, 15, 0), get(w0, 13, 12)))
        elif opcode != C.PREFETCH_CONFIG:
            return False  # unknown, or RESUME / TLBI_EL2_* which IDR0 does not offer
        self.executed.append((w0, w1))
        return True

    def _tlbi_range(
        self, match: Callable[[Hashable], bool], first: int, last: int, w1: int
    ) -> None:
        """A VA/IPA TLBI of ``[first, last]``. A range command (TG != 0) with a TTL level hint
        (1..3) names the level of the leaves it invalidates; IHI 0070 lets the SMMU skip
        entries of other levels. The model's reading: it keeps every entry larger than a
        leaf of that level (one cannot come from such a leaf) and drops the rest (a nested
        entry may be smaller than the stage-1 leaf it came from), so a driver whose TTL names
        a smaller level than its leaves leaves them stale. TTL 0 or TG 0: no hint."""
        tg, ttl = get(w1, 11, 10), get(w1, 9, 8)
        if not tg or not ttl:
            self.tlb.flush_range(match, first, last)
            return
        granule = C.tg_shift(tg)
        leaf_shift = granule + (granule - 3) * (3 - ttl)
        self.tlb.flush_range_upto(match, first, last, leaf_shift)

    def _drop_config(self, first: int, last: int) -> None:
        for sid in [s for s in self.ste_cache if first <= s <= last]:
            del self.ste_cache[sid]
        for key in [k for k in self.cd_cache if first <= k[0] <= last]:
            del self.cd_cache[key]

    def dma_can_stall(self, sid: int) -> bool:
        """``device_property_read_bool(dev, "dma-can-stall")`` for the master of ``sid``."""
        fw = self.fw_dma_can_stall
        return fw if isinstance(fw, bool) else sid in fw

    # -- event queue ------------------------------------------------------------------------------
    def record_event(self, event: E.Event) -> None:
        """Write an event record at EVENTQ_PROD (or account it lost) and signal the IRQ."""
        self.events.append(event)
        ring = self._evtq
        if not self.evtq_on or ring is None:
            self.events_lost += 1
            return
        m = self.mmio
        log2 = self._evtq_log2
        wrap_mask = (1 << (log2 + 1)) - 1
        prod = m["EVENTQ_PROD"]
        cons = m["EVENTQ_CONS"]
        p, c = prod & wrap_mask, cons & wrap_mask
        if p ^ c == 1 << log2:  # same index, other wrap: full
            self.events_lost += 1
            # Overflow: OVFLG made to differ from the consumer's OVACKFLG.
            m.set("EVENTQ_PROD", (prod & ~R.Q_OVERFLOW) | (~cons & R.Q_OVERFLOW))
        else:
            try:
                ring.write(p, event.encode())
            except OSError:
                self._raise_gerror(R.GERROR_EVTQ_ABT_ERR)
                return
            m.set("EVENTQ_PROD", (prod & R.Q_OVERFLOW) | ((p + 1) & wrap_mask))
        if self.irq_ctrl & R.IRQ_CTRL_EVTQ_IRQEN:
            for handler in list(self.evtq_irq):
                handler()

    @locked
    def page_request(self, dev: PciDevice, request: PageRequest) -> bool:
        """A PCIe page request from ``dev`` (its PRI capability): queued at PRIQ_PROD, the
        PRIQ interrupt raised; False when the queue is off or full (the request is lost)."""
        ring = self._priq
        if not self.priq_on or ring is None:
            self.page_requests_lost += 1
            return False
        m = self.mmio
        log2 = self._priq_log2
        wrap_mask = (1 << (log2 + 1)) - 1
        prod, cons = m["PRIQ_PROD"], m["PRIQ_CONS"]
        if (prod & wrap_mask) ^ (cons & wrap_mask) == 1 << log2:
            self.page_requests_lost += 1
            m.set("PRIQ_PROD", (prod & ~R.Q_OVERFLOW) | (~cons & R.Q_OVERFLOW))
            return False
        r = request
        req = E.PageRequest(
            dev.rid, r.addr, r.grpid, r.last, r.read, r.write, r.pasid, r.exe, r.priv
        )
        ring.write(prod & wrap_mask, req.encode())
        m.set("PRIQ_PROD", (prod & R.Q_OVERFLOW) | ((prod + 1) & wrap_mask))
        if self.irq_ctrl & R.IRQ_CTRL_PRIQ_IRQEN:
            for handler in list(self.priq_irq):
                handler()
        return True

    # -- configuration fetch ----------------------------------------------------------------------
    def fetch_ste(self, sid: int) -> Ste:
        """The STE for ``sid`` from the cache, else from the stream table (ConfigFault)."""
        ste = self.ste_cache.get(sid)
        if ste is not None:
            return ste
        m = self.mmio
        cfg = m["STRTAB_BASE_CFG"]
        base = m["STRTAB_BASE"] & R.STRTAB_BASE_ADDR
        log2size = get(cfg, 5, 0)
        if sid >> min(log2size, self.sid_bits):
            raise ConfigFault(E.Event(E.C_BAD_STREAMID, sid), "StreamID out of range")
        self.config_fetches += 1
        mem = self.memory
        try:
            if get(cfg, 17, 16) == R.STRTAB_CFG_FMT_2LVL:
                split = get(cfg, 10, 6)
                l1 = mem.read_u64(base + (sid >> split) * 8)
                span = l1 & 0x1F
                index = sid & ((1 << split) - 1)
                if not span or index >= 1 << (span - 1):
                    raise ConfigFault(E.Event(E.C_BAD_STREAMID, sid), "no level-2 STE")
                addr = (l1 & L1_L2PTR) + index * STE_SIZE
            else:
                addr = base + sid * STE_SIZE
            raw = mem.read(addr, STE_SIZE)
        except OSError:
            ev = E.Event(E.F_STE_FETCH, sid, fetch_addr=base)
            raise ConfigFault(ev, "STE fetch abort") from None
        ste = Ste.decode(words(raw))
        why = ste.illegal(
            self.ssid_bits,
            self.oas_bits,
            self.cd2l,
            s1p=self.s1p,
            s2p=self.s2p,
            granules=self.granules,
        )
        if why:
            raise ConfigFault(E.Event(E.C_BAD_STE, sid), f"C_BAD_STE: {why}")
        self.ste_cache[sid] = ste
        return ste

    def fetch_cd(self, ste: Ste, sid: int, ssid: int, ev_ssid: int | None) -> Cd:
        """The CD of ``ssid`` from the cache, else from the CD table: linear, or 2-level
        (S1Fmt 1: 64 CDs per leaf table, 2: 1024) through a level-1 descriptor whose V = 0
        is C_BAD_SUBSTREAMID. With stage 2 on, every table address is an IPA."""
        cd = self.cd_cache.get((sid, ssid))
        if cd is not None:
            return cd
        self.config_fetches += 1
        base = ste.s1ctxptr
        if ste.s1fmt in (S1FMT_4K_L2, S1FMT_64K_L2):
            split = 6 if ste.s1fmt == S1FMT_4K_L2 else 10
            l1_addr = self._cd_table_pa(ste, sid, ev_ssid, base + (ssid >> split) * 8)
            try:
                l1 = self.memory.read_u64(l1_addr)
            except OSError:
                ev = E.Event(E.F_CD_FETCH, sid, ev_ssid, fetch_addr=l1_addr)
                raise ConfigFault(ev, "L1 CD descriptor fetch abort") from None
            if not l1 & L1CD_V:
                ev = E.Event(E.C_BAD_SUBSTREAMID, sid, ev_ssid)
                raise ConfigFault(ev, "L1 CD descriptor not valid")
            ipa = (l1 & L1CD_L2PTR) + (ssid & ((1 << split) - 1)) * CD_SIZE
        else:
            ipa = base + ssid * CD_SIZE
        addr = self._cd_table_pa(ste, sid, ev_ssid, ipa)
        try:
            raw = self.memory.read(addr, CD_SIZE)
        except OSError:
            ev = E.Event(E.F_CD_FETCH, sid, ev_ssid, fetch_addr=addr)
            raise ConfigFault(ev, "CD fetch abort") from None
        cd = Cd.decode(words(raw))
        why = cd.illegal(self.granules, self.vax)
        if why:
            raise ConfigFault(E.Event(E.C_BAD_CD, sid, ev_ssid), f"C_BAD_CD: {why}")
        self.cd_cache[(sid, ssid)] = cd
        return cd

    def _cd_table_pa(self, ste: Ste, sid: int, ev_ssid: int | None, addr: int) -> int:
        """A CD-table address as the SMMU reads it: through stage 2 when that is on (the
        table lives in guest memory), a fault there being a CLASS_CD stage-2 fault."""
        if not ste.s2_enabled:
            return addr
        st, pa, _shift, refs, _prot, _lvl = self.walker.walk_s2(
            self.memory._pages,
            self.memory.size,
            ste.s2ttb,
            addr,
            ste.s2_ia_bits,
            ste.s2_start,
            self.oa_bits(ste.s2ps),
            False,
            ste.s2affd,
            ste.s2_granule,
        )
        self.stats.walk_mem_refs += refs
        if st != 0:
            ev = _stage2_event(st, sid, ev_ssid, 0, True, addr, E.CLASS_CD, pa, True)
            raise ConfigFault(ev if ste.s2r else None, f"stage 2 refused CD IPA {addr:#x}")
        return int(pa)

    # -- translation --------------------------------------------------------------------------
    def _bypass(self, dev: PciDevice, iova: int, pasid: int | None, write: bool) -> tuple[int, int]:
        """Untranslated access: the address goes to memory as it is."""
        if iova >= self.memory.size:
            raise self.fault(dev, iova, write, pasid, f"external abort at PA {iova:#x}")
        return iova, page_run(iova)

    def translate(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        self.stats.translations += 1
        if not self.enabled:
            if self.gbpa_abort:
                raise self.fault(dev, iova, write, pasid, "SMMU disabled, GBPA.ABORT")
            return self._bypass(dev, iova, pasid, write)
        atc = self.atcs.get(dev.rid)
        if atc is not None:
            return self._ats(atc, dev, iova, pasid, write)
        return self._translate_smmu(dev, iova, pasid, write)

    def _translate_smmu(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        """The SMMU's own translation of an untranslated request (or an ATS request)."""
        sid = dev.rid
        try:
            ste = self.fetch_ste(sid)
            cfg = ste.config
            if cfg == CFG_ABORT:
                raise ConfigFault(None, "STE Config = abort")
            if cfg == CFG_BYPASS:
                if pasid is not None:
                    raise ConfigFault(E.Event(E.C_BAD_SUBSTREAMID, sid, pasid), "SSID on bypass")
                return self._bypass(dev, iova, pasid, write)
            cd = self._context(ste, sid, pasid)
        except ConfigFault as cf:
            if cf.event is not None:
                if cf.event.id in E.FAULT_RECORDS:
                    # a stage-2 fault of the CD fetch (CLASS CD) describes the transaction
                    cf.event.input_addr, cf.event.read = iova, not write
                self.record_event(cf.event)
            raise self.fault(dev, iova, write, pasid, cf.reason) from None
        return self._translate_walk(dev, ste, cd, iova, pasid, write)

    # -- the device's ATC (ATS) -------------------------------------------------------------------
    def pci_ats(self, dev: PciDevice, enable: bool) -> None:
        """The Enable bit of ``dev``'s ATS capability (a config write by its driver): with it
        set the device caches translations in its own ATC; clearing it empties the ATC."""
        self.front.forget()  # a device with an ATC translates through it first
        if not enable:
            self.atcs.pop(dev.rid, None)
        elif dev.ats and dev.rid not in self.atcs:
            self.atcs[dev.rid] = Iotlb(ATC_CAPACITY)

    def _ats(
        self, atc: Iotlb, dev: PciDevice, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        """A DMA of an ATS-enabled device: a hit in its ATC goes out as a translated
        transaction, which the SMMU only lets through when the stream's STE has EATS = TRANS
        (CR0.ATSCHK); a miss is a translation request (the full translation, with its
        faults), whose answer the device caches. Only ATC_INV removes ATC entries."""
        tag = -1 if pasid is None else pasid
        need = 2 if write else 1
        hit = atc.lookup(tag, iova)
        if hit is not None and hit.perm & need:
            try:
                eats = self.fetch_ste(dev.rid).eats
            except ConfigFault:
                eats = 0
            if self.mmio["CR0"] & R.CR0_ATSCHK and eats != EATS_TRANS:
                raise self.fault(dev, iova, write, pasid, "translated transaction, EATS off")
            self.atc_hits += 1
            off = iova & ((1 << hit.shift) - 1)
            return hit.pa + off, (1 << hit.shift) - off
        pa, run = self._translate_smmu(dev, iova, pasid, write)  # the translation request
        ste = self.ste_cache.get(dev.rid)
        if ste is not None and ste.eats == EATS_TRANS:  # else the request got UR: not cached
            base = pa & ~0xFFF
            prev = 0 if hit is None or hit.pa != base else hit.perm
            atc.insert(tag, iova, TlbEntry(base, 12, prev | need, 0))
        return pa, run

    def _atc_inv(self, sid: int, ssid: int | None, addr: int, size_log2: int) -> None:
        """ATC_INV: the device drops the entries of the span (SSV clear: of every PASID)."""
        atc = self.atcs.get(sid)
        if atc is None:
            return
        first = addr & ~((1 << (12 + size_log2)) - 1) if size_log2 < 52 else 0
        last = first + (1 << (12 + size_log2)) - 1 if size_log2 < 52 else (1 << 64) - 1

        def match(tag: Hashable) -> bool:
            return ssid is None or tag == ssid

        atc.flush_range(match, first, last)

    def iotlb_fast(self, dev: PciDevice, pasid: int | None, write: bool) -> FastPath | None:
        """After a translation of ``dev``: the TLB tag of its requests, from the STE and CD
        caches that translation filled (None when it bypassed or its configuration faults,
        or when the device's own ATC answers its requests)."""
        if not self.enabled or dev.rid in self.atcs:
            return None
        try:
            ste = self.fetch_ste(dev.rid)
            if ste.config in (CFG_ABORT, CFG_BYPASS):
                return None
            cd = self._context(ste, dev.rid, pasid)
        except ConfigFault:
            return None
        return self.tlb, _tlb_tag(ste, cd, self.hyp), 2 if write else 1

    def _context(self, ste: Ste, sid: int, pasid: int | None) -> Cd | None:
        """The CD that stage 1 uses for this transaction (None: stage 1 off or bypassed)."""
        if not ste.s1_enabled:
            if pasid is not None:
                raise ConfigFault(E.Event(E.C_BAD_SUBSTREAMID, sid, pasid), "SSID without stage 1")
            return None
        if pasid is None:
            if ste.s1cdmax and ste.s1dss == S1DSS_TERMINATE:
                raise ConfigFault(
                    E.Event(E.F_STREAM_DISABLED, sid), "S1DSS terminates non-SSID traffic"
                )
            if ste.s1cdmax and ste.s1dss == S1DSS_BYPASS:
                return None
            return self.fetch_cd(ste, sid, 0, None)
        if pasid >> ste.s1cdmax or not ste.s1cdmax or (pasid == 0 and ste.s1dss == S1DSS_SSID0):
            raise ConfigFault(E.Event(E.C_BAD_SUBSTREAMID, sid, pasid), "SubstreamID out of range")
        return self.fetch_cd(ste, sid, pasid, pasid)

    def _translate_walk(
        self, dev: PciDevice, ste: Ste, cd: Cd | None, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        """The TLB lookup for a stream whose STE and CD passed, then the walk on a miss. The
        StreamID is the device's RID (``dev.rid``), as everywhere in this model."""
        sid = dev.rid
        stats = self.stats
        tag = _tlb_tag(ste, cd, self.hyp)
        entry = self.tlb.lookup(tag, iova)
        if entry is not None and entry.perm & (2 if write else 1):
            stats.iotlb_hits += 1
            self._learn(dev, ste, cd, sid, pasid, tag)
            off = iova & ((1 << entry.shift) - 1)
            return entry.pa + off, (1 << entry.shift) - off
        stats.iotlb_misses += 1
        walk = self._walker(ste, cd)
        if walk is None:  # stage 1 bypassed by S1DSS, no stage 2
            return self._bypass(dev, iova, pasid, write)
        return self._walked(dev, ste, cd, iova, pasid, write, tag, walk(iova, write))

    def _walker(self, ste: Ste, cd: Cd | None) -> Walk | None:
        """The compiled walk an STE and CD select, bound to their fields: stage 1 (nested
        through stage 2), stage 2 alone, a CD with EPD0 (a translation fault, no walk); None
        when stage 1 is bypassed by S1DSS and stage 2 is off."""
        mem = self.memory
        s2 = (ste.s2ttb, ste.s2_ia_bits, ste.s2_start, self.oa_bits(ste.s2ps), ste.s2affd)
        s2_granule = ste.s2_granule
        if cd is not None:
            # A read writes memory only through stage 1's access flag updates (CD.HA; HD
            # changes a leaf only for a write); stage 2 alone and EPD0 write nothing.
            if cd.epd0:
                return self.bind_walk(_epd0_walk, (), read_writes=False)
            ha = cd.ha and self.httu_access
            hd = cd.hd and self.httu_dirty
            s1 = (cd.ttb0, cd.ia_bits, self.oa_bits(cd.ips), cd.affd, ha, ste.s2_enabled)
            ctx = (mem._pages, mem.size, *s1, *s2, hd, cd.granule, s2_granule)
            return self.bind_walk(self.walker.walk_s1_bound, ctx, read_writes=ha)
        if ste.s2_enabled:
            ctx2 = (mem._pages, mem.size, *s2, s2_granule)
            return self.bind_walk(self.walker.walk_s2_bound, ctx2, read_writes=False)
        return None

    def _post_walk(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool, res: tuple[int, ...]
    ) -> tuple[int, int]:
        """translate() from a walk the compiled front made for a stream it knows: its STE
        and CD are the cached ones the stream was learnt from."""
        sid = dev.rid
        ste = self.ste_cache[sid]
        cd = self._context(ste, sid, pasid)
        return self._walked(dev, ste, cd, iova, pasid, write, _tlb_tag(ste, cd, self.hyp), res)

    def _walked(
        self,
        dev: PciDevice,
        ste: Ste,
        cd: Cd | None,
        iova: int,
        pasid: int | None,
        write: bool,
        tag: Hashable,
        res: tuple[int, ...],
    ) -> tuple[int, int]:
        """The rest of :meth:`_translate_walk` after a TLB miss's walk (``res``): events,
        stalls, the TLB fill."""
        sid = dev.rid
        stats = self.stats
        mem = self.memory
        if cd is not None:
            status, value, shift, refs, prot, _lvl, fault_s2, ipa, cls, tt_write = res
            record = ste.s2r if fault_s2 else cd.r
        else:
            status, value, shift, refs, prot, _lvl = res
            fault_s2, ipa, cls, tt_write, record = 1, iova, E.CLASS_IN, 0, ste.s2r
        stats.walk_mem_refs += refs
        if status != 0:
            ev_ssid = pasid
            if status == E.F_WALK_EABT:
                ev = E.Event(
                    E.F_WALK_EABT,
                    sid,
                    ev_ssid,
                    iova,
                    not write,
                    bool(fault_s2),
                    cls,
                    fetch_addr=value,
                    tt_read=cls == E.CLASS_TT,  # the abort hit a table read
                )
            elif fault_s2:
                ev = _stage2_event(
                    status, sid, ev_ssid, iova, not write, ipa, cls, value, not tt_write
                )
            else:
                ev = E.Event(status, sid, ev_ssid, iova, not write)
            stall = status != E.F_WALK_EABT and (ste.s2s if fault_s2 else cd is not None and cd.s)
            if stall and self.can_stall:
                # The transaction is held (the model's DMA returns a fault: the device may
                # issue it again after CMD_RESUME); the record carries Stall and the STAG.
                ev.stall, ev.stag = True, self._next_stag
                self._next_stag = (self._next_stag + 1) & 0xFFFF
                self.stalled[(sid, ev.stag)] = (iova, write, pasid)
                self.record_event(ev)
                reason = f"{ev.name} stalled, STAG {ev.stag}"
                raise self.fault(dev, iova, write, pasid, reason)
            if record:
                self.record_event(ev)
            raise self.fault(dev, iova, write, pasid, ev.name + (" (stage 2)" if fault_s2 else ""))
        if value >= mem.size:
            # No memory answers there: the transaction ends in an external abort.
            raise self.fault(dev, iova, write, pasid, f"external abort at PA {value:#x}")
        base = value & ~((1 << shift) - 1)
        self.tlb.insert(tag, iova, TlbEntry(base, shift, prot, refs))
        self._learn(dev, ste, cd, sid, pasid, tag)
        off = value - base
        return value, (1 << shift) - off

    def _learn(
        self,
        dev: PciDevice,
        ste: Ste,
        cd: Cd | None,
        sid: int,
        pasid: int | None,
        tag: Hashable,
    ) -> None:
        """The stream passed the STE and CD checks and uses ``tag``: its next TLB hits are
        the compiled front's (hw/xlate.py), and so are its misses that walk cleanly
        (:meth:`_walked`'s fill rules, in the front), unless the device has an ATC (it asks
        that first: an ATS request reaches here too)."""
        if dev.rid in self.atcs:
            return
        tlb = self.tlb
        walk = self._walker(ste, cd)
        miss = None
        if walk is not None:
            miss = self.front_miss(walk, self._post_walk, tlb, -1, (0, 0), (0, 0), clamp=False)
        self.front.learn(sid, pasid, tlb._tables, tlb.counts, tag, 1, 2, 0, miss)

    def oa_bits(self, ips: int) -> int:
        """The output size a walk uses: IPS / S2PS capped at the SMMU's OAS (a reserved value
        reads as the OAS)."""
        return min(ips_bits(ips) if ips <= 6 else 52, self.oas_bits)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            enabled=self.enabled,
            ste_cached=len(self.ste_cache),
            cd_cached=len(self.cd_cache),
            tlb_entries=len(self.tlb),
            events=len(self.events),
        )
        return d


def _epd0_walk(iova: int, write: bool, ctx: object) -> tuple[int, ...]:
    """The walk of a CD with EPD0 set: none, every access a translation fault (stage 1's
    result layout)."""
    return (E.F_TRANSLATION, 0, 0, 0, 0, 0, 0, 0, E.CLASS_IN, 0)


def _s1_tag(tag: Hashable, vmid: int, asid: int | None) -> bool:
    if not isinstance(tag, tuple) or tag[0] != TAG_S1 or tag[1] != vmid:
        return False
    return asid is None or tag[2] == asid


def _stage2_event(
    status: int,
    sid: int,
    ssid: int | None,
    iova: int,
    read: bool,
    ipa: int,
    cls: int,
    fetch: int,
    tt_read: bool,
) -> E.Event:
    """A stage-2 fault record. TT_RnW (only for CLASS TT) is 1 when stage 2 refused the read
    of a stage-1 descriptor, 0 when it refused the HTTU update of one (a write: AF or dirty
    state, see walk.py)."""
    tt_read = tt_read and cls == E.CLASS_TT
    if status == E.F_WALK_EABT:
        return E.Event(
            E.F_WALK_EABT, sid, ssid, iova, read, True, cls, ipa, fetch_addr=fetch, tt_read=tt_read
        )
    return E.Event(status, sid, ssid, iova, read, True, cls, ipa, tt_read=tt_read)


def queue_value(index: int, wrap: int, log2: int) -> int:
    """A PROD/CONS register value: index in bits log2-1..0, the wrap bit at bit log2."""
    return put(wrap, log2, log2) | (index & ((1 << log2) - 1))


def _tlb_tag(ste: Ste, cd: Cd | None, hyp: bool = False) -> Hashable:
    """The TLB tag of a translation: stage 1 by VMID (0 without stage 2) and ASID, stage 2
    alone by VMID."""
    if cd is None:
        return TAG_S2, ste.s2vmid
    if hyp and ste.strw == STRW_EL2:
        return TAG_EL2, cd.asid
    return TAG_S1, ste.s2vmid if ste.s2_enabled else 0, cd.asid
