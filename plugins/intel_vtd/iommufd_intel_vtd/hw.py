"""The VT-d remapping unit as hardware: registers, structure caches, IOTLB, QI, fault records.

A DMA request from RID (bus:devfn) with an optional PASID is translated as the spec's
scalable mode does: RTADDR -> root entry[bus] -> context entry[devfn] -> PASID directory
entry[PASID >> 6] -> PASID entry[PASID & 63] -> first-stage, second-stage, nested or
pass-through walk. Requests without PASID use the context entry's RID_PASID.

Caches behave as the spec allows and no better: the context cache (by source-id) and the
PASID cache (by source-id and PASID, tagged with the entry's DID) keep present entries until a
context-cache / PASID-cache invalidation drops them; the IOTLB is the framework's ``Iotlb``
tagged ``(DID, PASID, kind)``: second-stage-only translations are shared by every PASID of a
DID (their PASID tag is -1), first-stage and nested ones are per PASID. Not-present entries
are never cached (CAP.CM = 0).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from iommufd_intel_vtd import faults as F
from iommufd_intel_vtd import prq as P
from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import regs as R
from iommufd_intel_vtd import tables as T
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.compiled import load_walker
from iommufd_model.hw.iommu import CacheDict, DmaFault, FastPath, IommuHw, page_run
from iommufd_model.hw.iotlb import Iotlb, TlbEntry
from iommufd_model.hw.regs import Mmio
from iommufd_model.hw.ring import MemRing
from iommufd_model.hw.walk_x86 import walk_x86
from iommufd_model.hw.xlate import Walk
from iommufd_model.locking import locked

if TYPE_CHECKING:
    from iommufd_model.hw.pci import PageRequest, PciDevice
    from iommufd_model.machine import Machine

WALKER_MODULE = "iommufd_intel_vtd.walk"

KIND_SS = 0  # second-stage only: tagged by DID, any PASID
KIND_FS = 1  # first-stage only
KIND_NESTED = 2  # first stage over second stage
KIND_PT = 3  # pass-through
#: TlbEntry.perm flag: the leaf's D bit is known to be set (a write hit may skip the walk)
PERM_DIRTY_OK = 0x10

_WALK_REASON = {  # walker status -> fault reason, per stage ("s2" = nested, second stage)
    ("fs", 1): F.FR_FS_NOT_PRESENT,
    ("fs", 3): F.FR_FS_NON_CANONICAL,
    ("fs", 4): F.FR_FS_RSVD,
    ("fs", 6): F.FR_FS_ACCESS,
    ("fs", 7): F.FR_FS_USER,
    ("ss", 1): F.FR_SS_NOT_PRESENT,
    ("ss", 3): F.FR_ADDR_BEYOND_AW,
    ("ss", 4): F.FR_SS_RSVD,
    ("ss", 6): F.FR_SS_ACCESS,
    ("s2", 1): F.FR_SS_NOT_PRESENT,
    ("s2", 3): F.FR_FS_NESTED_BEYOND_AW,
    ("s2", 4): F.FR_SS_RSVD,
    ("s2", 6): F.FR_SS_ACCESS,
}


class IntelVtd(IommuHw):
    """One DMA-remapping hardware unit in scalable mode."""

    def __init__(self, machine: Machine, index: int, *, cap: int, ecap: int) -> None:
        super().__init__(machine, index)
        self.cap = cap
        self.ecap = ecap
        self.sagaw = R.field(cap, R.CAP_SAGAW_SHIFT, 5)
        self.sllps = R.field(cap, R.CAP_SLLPS_SHIFT, 4)
        self.mgaw = R.field(cap, R.CAP_MGAW_SHIFT, 6) + 1
        self.nfr = R.field(cap, R.CAP_NFR_SHIFT, 8) + 1
        self.mamv = R.field(cap, R.CAP_MAMV_SHIFT, 6)
        self.fl5lp = bool(cap & R.CAP_FL5LP)
        self.fl1gp = bool(cap & R.CAP_FL1GP)
        self.large_mask = self.sllps << 1  # bit n: a second-stage leaf may stand at level n
        # -- architectural state behind the registers
        self.gsts = 0
        self.fsts = 0  # the RW1C bits of FSTS
        self.fri = 0  # next fault record index
        self.root_table = 0  # latched by SRTP
        self.ttm = R.TTM_LEGACY
        self.iq: MemRing | None = None
        self.iq_head = 0  # descriptor index
        self.iq_width = 128
        # -- caches
        # A change of either forgets the request streams the compiled translate front knows.
        self.context_cache: dict[int, T.ContextEntry] = CacheDict(self.front)
        self.pasid_cache: dict[tuple[int, int], T.PasidEntry] = CacheDict(self.front)
        self.iotlb = Iotlb()
        #: the device TLBs (PCIe ATCs) of ATS devices whose context entry has DTE, by RID,
        #: tagged by PASID (-1: requests without PASID): what the device translates by
        #: itself until a device-TLB invalidation reaches it
        self.atc: dict[int, Iotlb] = {}
        self.atc_hits = 0
        self.table_refs = 0  # memory reads spent on root/context/PASID structures
        self.descriptors_done = 0
        self.records: list[F.FaultRecord] = []  # every recorded fault, also the overflowed
        #: page group responses the devices received, in order (the PCIe PRG Response side)
        self.prg_responses: list[P.PageGroupResponse] = []
        #: the page request interrupt (the kernel's prq_event_thread), None until enabled
        self.prq_irq: Callable[[], None] | None = None
        self.walker: Any = load_walker(WALKER_MODULE)
        self.mmio = Mmio(f"vtd{index}")
        R.define_registers(
            self.mmio,
            cap=cap,
            ecap=ecap,
            on_gcmd=self._gcmd,
            on_ccmd=self._ccmd,
            on_iqt=self._iqt,
            on_fsts=self._fsts_write,
            on_ics=self._ics_write,
            on_prs=self._prs_write,
            on_frcd_hi=self._frcd_clear,
            gsts=lambda: self.gsts,
            fsts=self._fsts_read,
        )

    # -- registers ------------------------------------------------------------------------
    def _gcmd(self, old: int, new: int) -> None:
        if new & R.GCMD_SRTP:
            rtaddr = self.mmio["RTADDR"]
            self.root_table = rtaddr & R.RTADDR_RTA_MASK
            self.ttm = (rtaddr >> R.RTADDR_TTM_SHIFT) & 3
            self.gsts |= R.GSTS_RTPS
        if new & R.GCMD_QIE and not self.gsts & R.GSTS_QIES:
            self._enable_qi()
        elif not new & R.GCMD_QIE and self.gsts & R.GSTS_QIES:
            self.gsts &= ~R.GSTS_QIES
            self.iq = None
        self.front.forget()  # translation enable: the front's streams assumed it
        if new & R.GCMD_TE:
            self.gsts |= R.GSTS_TES
        else:
            self.gsts &= ~R.GSTS_TES
        for bit in (R.GCMD_IRE, R.GCMD_CFI):
            self.gsts = (self.gsts | bit) if new & bit else (self.gsts & ~bit)
        # One-shot commands never stay set in the command register.
        self.mmio.set("GCMD", new & R.GCMD_PERSISTENT)

    def _enable_qi(self) -> None:
        iqa = self.mmio["IQA"]
        self.iq_width = 256 if iqa & R.IQA_DW else 128
        pages = 1 << (iqa & R.IQA_QS_MASK)
        entry = self.iq_width // 8
        self.iq = MemRing(self.memory, iqa & R.IQA_ADDR_MASK, entry, pages * 4096 // entry)
        self.iq_head = 0
        self.mmio.set("IQH", 0)
        self.gsts |= R.GSTS_QIES

    def _ccmd(self, old: int, new: int) -> None:
        """Register-based context-cache invalidation (used before QI is enabled)."""
        if not new & R.CCMD_ICC:
            return
        cirg = (new >> R.CCMD_CIRG_SHIFT) & 3
        sid = (new >> R.CCMD_SID_SHIFT) & 0xFFFF
        fm = (new >> R.CCMD_FM_SHIFT) & 3
        if cirg in (Q.CC_GLOBAL, Q.CC_DOMAIN, Q.CC_DEVICE):
            self.flush_context(cirg, sid, fm)
        self.mmio.set("CCMD", (new & ~R.CCMD_ICC) | cirg << R.CCMD_CAIG_SHIFT)

    def _fsts_read(self) -> int:
        ppf = any(self.mmio[f"FRCD{i}_HI"] & R.FRCD_HI_F for i in range(self.nfr))
        return self.fsts | (R.FSTS_PPF if ppf else 0) | self.fri << R.FSTS_FRI_SHIFT

    def _fsts_write(self, old: int, new: int) -> None:
        had_iqe = self.fsts & R.FSTS_IQE
        self.fsts &= ~(new & R.FSTS_RW1C)
        if had_iqe and not self.fsts & R.FSTS_IQE:
            self._run_queue()  # clearing IQE lets the hardware fetch again

    def _ics_write(self, old: int, new: int) -> None:
        self.mmio.set("ICS", old & ~(new & R.ICS_IWC))

    def _prs_write(self, old: int, new: int) -> None:
        self.mmio.set("PRS", old & ~(new & R.PRS_RW1C))

    def _frcd_clear(self, index: int) -> R.Hook:
        def hook(old: int, new: int) -> None:
            self.mmio.set(f"FRCD{index}_HI", old & ~R.FRCD_HI_F if new & R.FRCD_HI_F else old)

        return hook

    # -- queued invalidation --------------------------------------------------------------
    def _iqt(self, old: int, new: int) -> None:
        self._run_queue()

    def _run_queue(self) -> None:
        iq = self.iq
        if iq is None or not self.gsts & R.GSTS_QIES or self.fsts & R.FSTS_IQE:
            return
        shift = 5 if self.iq_width == 256 else 4
        tail = (self.mmio["IQT"] & R.IQ_OFFSET_MASK) >> shift
        while self.iq_head != tail % iq.nentries:
            try:
                raw = iq.read(self.iq_head)
                self.execute(Q.decode(raw))
            except (Q.InvalidDescriptor, OSError):
                self.fsts |= R.FSTS_IQE  # IQH stays at the offending descriptor
                break
            self.iq_head = (self.iq_head + 1) % iq.nentries
            self.mmio.set("IQH", self.iq_head << shift)

    def execute(self, d: Q.Descriptor) -> None:
        """Carry out one valid descriptor."""
        self.stats.commands += 1
        self.descriptors_done += 1
        t = d.type
        if t == Q.CC:
            self.flush_context(d["g"], d["sid"], d["fm"], d["did"])
        elif t == Q.PC:
            self.flush_pasid_cache(d["g"], d["did"], d["pasid"])
        elif t == Q.IOTLB:
            self.flush_iotlb(d["g"], d["did"], d["addr"] << 12, d["am"])
        elif t == Q.PIOTLB:
            self.flush_piotlb(d["g"], d["did"], d["pasid"], d["addr"] << 12, d["am"])
        elif t == Q.PGRP_RESP:
            pasid = d["pasid"] if d["pasid_p"] else None
            self.prg_responses.append(P.PageGroupResponse(d["rid"], pasid, d["prgi"], d["code"]))
        elif t == Q.WAIT:
            if d["sw"]:
                self.memory.write(d["status_addr"] << 2, d["status_data"].to_bytes(4, "little"))
            if d["iflag"]:
                self.mmio.set("ICS", self.mmio["ICS"] | R.ICS_IWC)
        elif t == Q.DEV_TLB:
            self.flush_atc(d["sid"], None, d["addr"], d["size"])
        elif t == Q.PDEV_TLB:
            self.flush_atc(d["sid"], None if d["global_"] else d["pasid"], d["addr"], d["size"])
        # IEC: no interrupt-remapping cache is modelled.

    # -- cache invalidation ---------------------------------------------------------------
    def flush_context(self, g: int, sid: int, fm: int, did: int = 0) -> None:
        if g == Q.CC_DEVICE:
            keep = ~((1 << fm) - 1) if fm else -1  # FM masks the low function bits
            for rid in [r for r in self.context_cache if (r & keep) == (sid & keep)]:
                del self.context_cache[rid]
        else:
            # Scalable-mode context entries carry no DID: domain-selective drops them all.
            self.context_cache.clear()

    def flush_pasid_cache(self, g: int, did: int, pasid: int) -> None:
        if g == Q.PC_GLOBAL:
            self.pasid_cache.clear()
            return
        for key, pe in list(self.pasid_cache.items()):
            if pe.did == did and (g == Q.PC_DOMAIN or key[1] == pasid):
                del self.pasid_cache[key]

    def flush_iotlb(self, g: int, did: int, addr: int, am: int) -> None:
        tlb = self.iotlb
        if g == Q.IOTLB_GLOBAL:
            tlb.flush_all()
        elif g == Q.IOTLB_DOMAIN:
            tlb.flush_tag(lambda tag: tag[0] == did)  # type: ignore[index]
        else:
            first = addr & ~((4096 << am) - 1)
            last = first + (4096 << am) - 1
            tlb.flush_range(lambda tag: tag[0] == did and tag[2] == KIND_SS, first, last)  # type: ignore[index]
            # Nested entries are keyed by first-stage input: all of the DID's go.
            tlb.flush_tag(lambda tag: tag[0] == did and tag[2] == KIND_NESTED)  # type: ignore[index]

    def flush_atc(self, sid: int, pasid: int | None, addr: int, size: int) -> None:
        """A device-TLB invalidation reaching device ``sid``: ADDR (bits 63:12) with S = 0 is
        one page; with S = 1 the lowest 0 bit of ADDR says the size (PCIe ATS range
        encoding). Without a PASID (DEV_TLB, or PDEV_TLB with G) every PASID's entries in
        the range go, as a PCIe invalidation without PASID does."""
        atc = self.atc.get(sid)
        if atc is None:
            return
        order = 0
        if size:
            while addr >> order & 1:
                order += 1
            order += 1
        first = (addr << 12) & ~((4096 << order) - 1)
        last = first + (4096 << order) - 1
        atc.flush_range(lambda tag: pasid is None or tag == pasid, first, last)

    def flush_piotlb(self, g: int, did: int, pasid: int, addr: int, am: int) -> None:
        def match(tag: Any) -> bool:
            return bool(tag[0] == did and tag[1] == pasid and tag[2] in (KIND_FS, KIND_NESTED))

        if g == Q.PIOTLB_PASID:
            self.iotlb.flush_tag(match)
        else:
            first = addr & ~((4096 << am) - 1)
            self.iotlb.flush_range(match, first, first + (4096 << am) - 1)

    # -- structure lookups ----------------------------------------------------------------
    def _read(self, pa: int, reason: int, fpd: bool = False) -> int:
        try:
            value = self.memory.read_u64(pa)
        except OSError:
            raise F.TableFault(reason, fpd) from None
        self.table_refs += 1
        return value

    def context_entry(self, rid: int) -> T.ContextEntry:
        ce = self.context_cache.get(rid)
        if ce is not None:
            return ce
        if self.ttm != R.TTM_SCALABLE:
            raise F.TableFault(F.FR_SM_RTADDR_TTM)
        bus, devfn = rid >> 8, rid & 0xFF
        slot = self.root_table + bus * T.ROOT_ENTRY_SIZE
        re = T.RootEntry.decode(
            self._read(slot, F.FR_SM_ROOT_ACCESS), self._read(slot + 8, F.FR_SM_ROOT_ACCESS)
        )
        present, table = re.half(devfn)
        if not present:
            raise F.TableFault(F.FR_SM_ROOT_NOT_PRESENT)
        if re.rsvd:
            raise F.TableFault(F.FR_SM_ROOT_RSVD)
        slot = table + (devfn & 0x7F) * T.SM_CONTEXT_ENTRY_SIZE
        qs = [self._read(slot + 8 * i, F.FR_SM_CTX_ACCESS) for i in range(4)]
        ce = T.ContextEntry.decode(*qs)
        if not ce.p:
            raise F.TableFault(F.FR_SM_CTX_NOT_PRESENT)
        if ce.rsvd:
            raise F.TableFault(F.FR_SM_CTX_RSVD, ce.fpd)
        self.context_cache[rid] = ce
        return ce

    def pasid_entry(self, rid: int, pasid: int, ce: T.ContextEntry) -> T.PasidEntry:
        key = (rid, pasid)
        pe = self.pasid_cache.get(key)
        if pe is not None:
            return pe
        index = T.pasid_dir_index(pasid)
        if index >= ce.dir_entries:
            raise F.TableFault(F.FR_SM_CTX_PASID_TOO_LARGE, ce.fpd)
        de = T.PasidDirEntry.decode(
            self._read(ce.pasid_dir + index * 8, F.FR_PASID_DIR_ACCESS, ce.fpd)
        )
        if not de.p:
            raise F.TableFault(F.FR_PASID_DIR_NOT_PRESENT, ce.fpd or de.fpd)
        if de.rsvd:
            raise F.TableFault(F.FR_PASID_DIR_RSVD, ce.fpd or de.fpd)
        slot = de.table + T.pasid_table_index(pasid) * T.PASID_ENTRY_SIZE
        qs = [self._read(slot + 8 * i, F.FR_PASID_TABLE_ACCESS, ce.fpd) for i in range(8)]
        pe = T.PasidEntry.decode(qs)
        fpd = ce.fpd or de.fpd or pe.fpd
        if not pe.p:
            raise F.TableFault(F.FR_PASID_NOT_PRESENT, fpd)
        bad = pe.check(self.sagaw, self.fl5lp)
        if bad:
            raise F.TableFault(bad, fpd)
        self.pasid_cache[key] = pe
        return pe

    # -- translation ----------------------------------------------------------------------
    def iotlb_fast(self, dev: PciDevice, pasid: int | None, write: bool) -> FastPath | None:
        """After a translation of ``dev``: the IOTLB tag of its requests, from the context and
        PASID caches the translation filled (None for pass-through or translation off)."""
        if not self.gsts & R.GSTS_TES:
            return None
        ce = self.context_cache.get(dev.rid)
        if ce is None or ce.dte:
            return None  # an ATS device translates through its own ATC first
        eff = ce.rid_pasid if pasid is None else pasid
        pe = self.pasid_cache.get((dev.rid, eff))
        if pe is None:
            return None
        kind, tag = _tlb_tag(pe, eff)
        if kind == KIND_PT:
            return None
        return self.iotlb, tag, (IOMMU_WRITE | PERM_DIRTY_OK) if write else IOMMU_READ

    def translate(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        stats = self.stats
        stats.translations += 1
        if not self.gsts & R.GSTS_TES:
            if iova >= self.memory.size:
                raise self.fault(dev, iova, write, pasid, f"master abort at PA {iova:#x}")
            return iova, page_run(iova)  # translation disabled: DMA is untranslated
        rid = dev.rid
        try:
            ce = self.context_entry(rid)
            if pasid is not None and not ce.paside:
                raise F.TableFault(F.FR_SM_CTX_PASIDE, ce.fpd)
            eff = ce.rid_pasid if pasid is None else pasid
            atc = self.atc.setdefault(rid, Iotlb()) if ce.dte and dev.ats else None
            need = IOMMU_WRITE if write else IOMMU_READ
            atag = -1 if pasid is None else pasid
            if atc is not None:
                # A translated request: the device found it in its ATC, the IOMMU only
                # checks that the context entry allows translated requests (DTE).
                got = atc.lookup(atag, iova)
                if got is not None and got.perm & need and (not write or got.perm & PERM_DIRTY_OK):
                    self.atc_hits += 1
                    return got.pa | (iova & ((1 << got.shift) - 1)), page_run(iova, 1 << got.shift)
            pe = self.pasid_entry(rid, eff, ce)
        except F.TableFault as tf:
            raise self.record(dev, iova, write, pasid, tf.reason, tf.fpd) from None
        kind, tag = _tlb_tag(pe, eff)
        hit = self.iotlb.lookup(tag, iova)
        if hit is not None and hit.perm & need and (not write or hit.perm & PERM_DIRTY_OK):
            stats.iotlb_hits += 1
            if atc is not None:
                atc.insert(atag, iova, hit)  # the ATS completion fills the device's ATC
            else:
                self._learn(rid, pasid, pe, kind, tag)
            return hit.pa | (iova & ((1 << hit.shift) - 1)), page_run(iova, 1 << hit.shift)
        stats.iotlb_misses += 1
        if kind == KIND_PT:
            if iova >= self.memory.size:
                raise self.record(dev, iova, write, pasid, F.FR_ADDR_BEYOND_AW, pe.fpd)
            return iova, page_run(iova)
        res = self._walker(pe, kind)(iova, write)
        return self._walked(dev, iova, pasid, write, pe, kind, tag, atc, atag, res)

    def _walker(self, pe: T.PasidEntry, kind: int) -> Walk:
        """The compiled walk of the tables a PASID entry's PGTT selects, bound to its fields
        (every request a user request: no PM, RID_PRIV = 0)."""
        pages = self.memory._pages
        size = self.memory.size
        ssade = pe.ssade and kind != KIND_FS
        walker = self.walker
        # A read's walk writes memory only through second-stage A/D updates (SSADE); the
        # model's first-stage walk writes nothing.
        if kind == KIND_FS:
            fs = (pe.fsptptr, pe.fs_levels, self.fl1gp, True)
            return self.bind_walk(walker.walk_fs_bound, (pages, size, *fs), read_writes=False)
        ss = (pe.slptptr, T.aw_levels(pe.aw), self.large_mask, ssade)
        if kind == KIND_SS:
            return self.bind_walk(walker.walk_ss_bound, (pages, size, *ss), read_writes=ssade)
        fs_root, fs_levels = pe.fsptptr, pe.fs_levels
        ctx = (walk_x86, pages, size, fs_root, fs_levels, *ss, self.fl1gp, True)
        return self.bind_walk(walker.walk_nested_bound, ctx, read_writes=ssade)

    def _post_walk(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool, res: tuple[int, ...]
    ) -> tuple[int, int]:
        """translate() from a walk the compiled front made for a stream it knows: its context
        and PASID entries are the cached ones the stream was learnt from (and it has no ATC)."""
        rid = dev.rid
        ce = self.context_cache[rid]
        eff = ce.rid_pasid if pasid is None else pasid
        pe = self.pasid_cache[(rid, eff)]
        kind, tag = _tlb_tag(pe, eff)
        return self._walked(dev, iova, pasid, write, pe, kind, tag, None, 0, res)

    def _walked(
        self,
        dev: PciDevice,
        iova: int,
        pasid: int | None,
        write: bool,
        pe: T.PasidEntry,
        kind: int,
        tag: Hashable,
        atc: Iotlb | None,
        atag: int,
        res: tuple[int, ...],
    ) -> tuple[int, int]:
        """The rest of :meth:`translate` after an IOTLB miss's walk (``res``): its fault
        records, the IOTLB (and ATC) fill."""
        stats = self.stats
        st, value, shift, refs, prot = res[:5]
        s2st = res[5] if kind == KIND_NESTED else 0
        stage = "ss" if kind == KIND_SS else "fs"
        ssade = pe.ssade and kind != KIND_FS
        stats.walk_mem_refs += refs
        if st != 0:
            if st == 5:  # the second stage refused a nested access
                st, stage = s2st, "s2"
            if st == 2:
                reason = F.FR_WRITE if write else F.FR_READ
            else:
                reason = _WALK_REASON.get((stage, st), F.FR_SS_RSVD)
            raise self.record(dev, iova, write, pasid, reason, pe.fpd)
        size = self.memory.size
        if value >= size:
            # Within the address width but beyond memory: the translation succeeded, the
            # request ends in a master abort (no fault record), nothing is cached for it.
            raise self.fault(dev, iova, write, pasid, f"master abort at PA {value:#x}")
        perm = prot | (PERM_DIRTY_OK if write or not ssade else 0)
        page = value & ~((1 << shift) - 1)
        entry = TlbEntry(page, shift, perm, refs)
        self.iotlb.insert(tag, iova, entry)
        if atc is not None:
            atc.insert(atag, iova, entry)
        else:
            self._learn(dev.rid, pasid, pe, kind, tag)
        return value, min(page_run(iova, 1 << shift), size - value)

    def _learn(
        self, rid: int, pasid: int | None, pe: T.PasidEntry, kind: int, tag: Hashable
    ) -> None:
        """The stream passed the context and PASID entry checks, has no ATC and uses
        ``tag``: its next IOTLB hits are the compiled front's (hw/xlate.py), and so are its
        misses that walk cleanly (:meth:`_walked`'s fill rules, in the front)."""
        iotlb = self.iotlb
        dirty_ok = 0 if pe.ssade and kind != KIND_FS else PERM_DIRTY_OK
        miss = self.front_miss(
            self._walker(pe, kind),
            self._post_walk,
            iotlb,
            -1,
            (0, 0),
            (dirty_ok, PERM_DIRTY_OK),
            clamp=True,
        )
        self.front.learn(
            rid,
            pasid,
            iotlb._tables,
            iotlb.counts,
            tag,
            IOMMU_READ,
            IOMMU_WRITE | PERM_DIRTY_OK,
            0,  # a hit is not bounded by memory here (a fill was)
            miss,
        )

    # -- page requests ------------------------------------------------------------------
    @locked
    def page_request(self, dev: PciDevice, request: PageRequest) -> bool:
        """A PCIe Page Request from ``dev``: check the context entry (present, PASIDE for a
        request with PASID, PRE), queue the descriptor at PQT, set PRS.PPR and raise the page
        request interrupt. Returns whether it was queued. A refused request records its
        fault and, the last of a group, gets "invalid request" from the hardware; with the
        queue full PRS.PRO and FSTS.PRO are set and the last request of a group is answered
        "success" by the hardware (the model's reading of the spec: the device retries)."""
        r, pasid, write = request, request.pasid, request.write
        req = P.PageRequest(dev.rid, r.addr, pasid, r.read, write, r.exe, r.priv, r.last, r.grpid)
        try:
            ce = self.context_entry(dev.rid)
            if pasid is not None and not ce.paside:
                raise F.TableFault(F.FR_SM_CTX_PASIDE, ce.fpd)
            if not ce.pre:
                raise F.TableFault(F.FR_SM_CTX_PRE, ce.fpd)
        except F.TableFault as tf:
            self.record(dev, r.addr, write, pasid, tf.reason, tf.fpd)
            self._hw_response(req, Q.RESP_INVALID)
            return False
        pqa = self.mmio["PQA"]
        base, size = pqa & R.IQA_ADDR_MASK, 4096 << (pqa & P.PQS_MASK)
        head = (self.mmio["PQH"] & P.PQ_OFFSET_MASK) % size
        tail = (self.mmio["PQT"] & P.PQ_OFFSET_MASK) % size
        nxt = (tail + P.ENTRY_SIZE) % size
        if nxt == head:
            self.mmio.set("PRS", self.mmio["PRS"] | R.PRS_PRO)
            self.fsts |= R.FSTS_PRO
            self._hw_response(req, Q.RESP_SUCCESS)
            return False
        self.memory.write(base + tail, req.encode())
        self.mmio.set("PQT", nxt)
        self.mmio.set("PRS", self.mmio["PRS"] | R.PRS_PPR)
        if self.prq_irq is not None:
            self.prq_irq()
        return True

    def _hw_response(self, req: P.PageRequest, code: int) -> None:
        if req.lpig:
            self.prg_responses.append(
                P.PageGroupResponse(req.rid, req.pasid, req.prgi, code, by_hardware=True)
            )

    # -- fault recording ------------------------------------------------------------------
    def record(
        self, dev: PciDevice, iova: int, write: bool, pasid: int | None, reason: int, fpd: bool
    ) -> DmaFault:
        """Log the fault in the next fault recording register (unless FPD) and build the error."""
        if not fpd:
            rec = F.FaultRecord(dev.rid, iova, reason, write, pasid)
            self.records.append(rec)
            name = f"FRCD{self.fri}_HI"
            if self.mmio[name] & R.FRCD_HI_F:
                self.fsts |= R.FSTS_PFO  # no free record: overflow, the fault is lost
            else:
                lo, hi = rec.encode()
                self.mmio.set(f"FRCD{self.fri}_LO", lo)
                self.mmio.set(name, hi)
                self.fri = (self.fri + 1) % self.nfr
        text = F.REASON_TEXT.get(reason, "?")
        return self.fault(dev, iova, write, pasid, f"reason {reason:#04x}: {text}")

    def pending_faults(self) -> list[F.FaultRecord]:
        """Decode the fault recording registers that hold a fault (F = 1)."""
        out = []
        for i in range(self.nfr):
            hi = self.mmio[f"FRCD{i}_HI"]
            if hi & R.FRCD_HI_F:
                out.append(F.FaultRecord.decode(self.mmio[f"FRCD{i}_LO"], hi))
        return out

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(cap=hex(self.cap), ecap=hex(self.ecap), iotlb=len(self.iotlb))
        return info


def _tlb_tag(pe: T.PasidEntry, pasid: int) -> tuple[int, Hashable]:
    """The walk kind a PASID entry selects (by PGTT) and the IOTLB tag of its translations:
    DID, the PASID (none for second-stage-only), the kind."""
    kind = (KIND_SS, KIND_FS, KIND_SS, KIND_NESTED, KIND_PT)[pe.pgtt]
    return kind, (pe.did, -1 if kind == KIND_SS else pasid, kind)
