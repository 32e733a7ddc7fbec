"""Hook implementations: the Linux intel-iommu driver (iommu.c, pasid.c, nested.c, cache.c).

The driver owns the in-memory structures the hardware walks -- root table, scalable-mode
context tables, per-device PASID directory and PASID tables, first/second-stage tables -- and
talks to the hardware only through registers and the invalidation queue, issuing the
invalidations Linux issues. A missing flush shows up as stale translation, as on silicon.

Domain choice (intel_iommu_domain_alloc_paging_flags): a first-stage domain whenever the
hardware has FLTS and no flag other than PASID is asked for; otherwise (nest parent, dirty
tracking) a second-stage domain. VT-d has no vIOMMU type upstream: viommu_alloc is refused.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import attrs

from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import regs as R
from iommufd_intel_vtd import tables as T
from iommufd_intel_vtd.guest import GuestVtd
from iommufd_intel_vtd.hw import IntelVtd
from iommufd_intel_vtd.iopf import KernelPrq
from iommufd_intel_vtd.pgtable import SecondStageFormat
from iommufd_model.api import (
    IOMMU_WRITE,
    Domain,
    DomainType,
    DriverInfo,
    Feature,
    HwInfo,
    Ida,
    InvalidateResult,
    IommuHw,
    UserData,
    ViommuBase,
    driver_state,
    err,
    hookimpl,
)
from iommufd_model.hw.memory import PAGE_SHIFT
from iommufd_model.hw.pci import PciDevice
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.x86_64 import X86_64Format
from iommufd_model.machine import Machine
from iommufd_model.paging import IotlbGather, PagingDomain, PagingDomainOps
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_model.vmm import GuestIommu, Vm

PAGING_FLAGS = (
    U.IOMMU_HWPT_ALLOC_NEST_PARENT | U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING | U.IOMMU_HWPT_ALLOC_PASID
)
VTD_S1_LEN = U.IommuHwptVtdS1.SIZE  # offsetofend(struct iommu_hwpt_vtd_s1, __reserved)
VTD_INV_LEN = U.IommuHwptVtdS1Invalidate.SIZE
ADDR_WIDTH_4LEVEL = 48
ADDR_WIDTH_5LEVEL = 57
MSI_RANGE = (0xFEE0_0000, 0xFEEF_FFFF)  # IOAPIC/MSI window, reserved as IOMMU_RESV_MSI
FIRST_DID = 2  # DID 0 is reserved, 1 is FLPT_DEFAULT_DID in scalable mode
U64 = (1 << 64) - 1

OPTIONS = {
    "levels": 4,  # second-stage depth: SAGAW/MGAW (4: 48-bit, 5: 57-bit)
    "first_stage": True,  # ECAP.FLTS
    "second_stage": True,  # ECAP.SLTS
    "nest": True,  # ECAP.NEST
    "dirty": True,  # ECAP.SLADS (second-stage A/D)
    "pasid_bits": 20,  # ECAP.PSS + 1, 0 = no PASID support
    "fl1gp": True,  # CAP.FL1GP
    "fl5lp": True,  # CAP.FL5LP
    "fs_levels": 4,  # first-stage depth Linux uses for its own domains (5 needs FL5LP)
    "sllps": 0b11,  # CAP.SLLPS
    "srs": False,  # ECAP.SRS
    "eafs": False,  # ECAP.EAFS
    "nfr": 8,  # CAP.NFR + 1
    "prs": True,  # ECAP.PRS and ECAP.PDS: page requests (PRI devices get IOPF)
}


# -- domains ----------------------------------------------------------------------------------
CACHE_TAG_IOTLB, CACHE_TAG_DEVTLB, CACHE_TAG_NESTING_IOTLB, CACHE_TAG_NESTING_DEVTLB = range(4)


@attrs.define
class CacheTag:
    """``struct cache_tag`` (cache.c): one cache a domain's translations may sit in."""

    type: int  # CACHE_TAG_*
    did: int
    pasid: int
    rid: int  # the device of a DEVTLB tag; -1 for IOTLB tags (one per IOMMU)
    users: int = 1


class DomainIds:
    """What every dmar_domain carries: its DID on the unit (allocated at the first attach,
    freed at the last detach: domain_attach_iommu / domain_detach_iommu) and its cache tags
    in assignment order (cache_tag_assign: a new tag goes after the unit's last tag)."""

    did: int | None
    did_refs: int
    tags: list[CacheTag]

    def init_ids(self) -> None:
        self.did = None
        self.did_refs = 0
        self.tags = []


class VtdPaging(PagingDomain[RadixPageTable], DomainIds):
    """A kernel-owned paging domain (``struct dmar_domain``) of one stage."""

    def __init__(self, hw: IntelVtd, state: IommuState, *, first_stage: bool, flags: int) -> None:
        if first_stage:
            levels = state.fs_levels
            fmt: Any = X86_64Format(levels)
            if not hw.cap & R.CAP_FL1GP:
                fmt.large_leaf_levels = frozenset({1})
            va_bits = fmt.va_bits - 1  # canonical lower half only
            pgsizes = 1 << 12 | 1 << 21 | ((1 << 30) if hw.cap & R.CAP_FL1GP else 0)
        else:
            fmt = SecondStageFormat(T.aw_levels(state.agaw), hw.sllps)
            va_bits = min(fmt.va_bits, hw.mgaw)
            pgsizes = 1 << 12 | sum(1 << fmt.level_shift(lv) for lv in fmt.large_leaf_levels)
        super().__init__(
            hw,
            RadixPageTable(hw.memory, fmt),
            pgsize_bitmap=pgsizes,
            aperture_start=0,
            aperture_end=(1 << va_bits) - 1,
            nest_parent=bool(flags & U.IOMMU_HWPT_ALLOC_NEST_PARENT),
            dirty_tracking=bool(flags & U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING),
            pasid_compat=bool(flags & U.IOMMU_HWPT_ALLOC_PASID),
        )
        self.init_ids()
        self.hw = hw
        self.first_stage = first_stage
        self.attached: set[tuple[int, int]] = set()  # (rid, pasid)
        self.children: list[VtdNested] = []
        self.tracking = False  # intel's dmar_domain->dirty_tracking (enabled state)
        self.force_snooping = False  # enforce_cache_coherency() was called and held

    def check_map(self, iova: int, size: int, prot: int) -> None:
        """intel_iommu_map()'s checks before the table."""
        if self.nest_parent and not prot & IOMMU_WRITE:
            # ERRATA_772415_SPR17: no read-only mapping in a nest parent.
            raise err(errno.EINVAL, "read-only mapping in a nest parent")
        if iova + size - 1 > self.aperture_end:
            raise err(errno.EFAULT, "mapping beyond the domain's address width")

    def iotlb_sync(self, gather: IotlbGather) -> None:
        """intel_iommu_tlb_sync(): generic_pt frees every table the range covers whole; the
        flush then has IH = 0 (paging-structure caches too), else IH = 1 (leaves only).
        Nothing when nothing was unmapped."""
        if gather.runs:
            frees_tables = self.pt.covers_a_table(gather.first, gather.last)
            _state(self.owner).flush_range(self, gather.first, gather.last, not frees_tables)


class VtdNested(Domain, DomainIds):
    """A user stage-1 domain over a nest-parent second-stage domain (nested.c)."""

    def __init__(
        self, hw: IntelVtd, state: IommuState, parent: VtdPaging, cfg: U.IommuHwptVtdS1, flags: int
    ) -> None:
        super().__init__(
            hw,
            DomainType.NESTED,
            parent=parent,
            pasid_compat=bool(flags & U.IOMMU_HWPT_ALLOC_PASID),
        )
        self.init_ids()
        self.hw = hw
        self.s2 = parent
        self.cfg = cfg
        self.attached: set[tuple[int, int]] = set()


VtdDomain = VtdPaging | VtdNested


# -- the kernel's per-IOMMU state (struct intel_iommu) -----------------------------------------
class DevInfo:
    """``struct device_domain_info`` + its PASID table."""

    def __init__(self, dev: PciDevice, pasid_dir: int, dir_entries: int, ats: bool) -> None:
        self.dev = dev
        self.pasid_dir = pasid_dir
        self.dir_entries = dir_entries
        self.tables: dict[int, int] = {}  # directory index -> PASID table address
        self.domains: dict[int, VtdDomain] = {}  # pasid -> attached domain
        self.domain_attached = False  # the RID's PASID entry is set up (not blocked)
        self.ats_enabled = ats  # ATS supported by device and unit, enabled at probe_finalize
        self.qdep = dev_qdep(dev) if ats else 0  # pci_ats_queue_depth()
        self.pfsid = 0  # only with ECAP.DIT, which the modelled unit lacks
        self.pri_supported = False  # ATS + ECAP.PRS/PDS + the device's PRI capability
        self.pri_enabled = False  # iommu_enable_pci_pri() at probe_finalize
        self.iopf_refcount = 0  # attachments of domains with an iopf handler


def dev_qdep(dev: PciDevice) -> int:
    """The device's ATS Invalidate Queue Depth (0 encodes 32); the framework's PCI model
    has no ATS capability fields, so a device may carry ``ats_qdep`` (the model's own)."""
    return int(getattr(dev, "ats_qdep", 0))


QI_DONE = 2  # the status value Linux's wait descriptors write (enum qi_status)
QI_IN_USE = 1
QI_MAX_BATCHED_DESC_COUNT = 16
QI_DEV_IOTLB_MAX_INVS = 32


class IommuState:
    """What the kernel keeps per DMAR unit: tables, DID space, the invalidation queue."""

    def __init__(self, hw: IntelVtd, fs_levels: int) -> None:
        self.hw = hw
        mem = hw.memory
        self.mem = mem
        self.fs_levels = fs_levels
        self.agaw = max(aw for aw in (1, 2, 3) if hw.sagaw >> aw & 1)
        self.sm = bool(hw.ecap & R.ECAP_SMTS)
        # The unit's domain_ids IDA: DID 0 is reserved, 1 is FLPT_DEFAULT_DID in scalable mode.
        nd = 1 << (4 + 2 * R.field(hw.cap, R.CAP_ND_SHIFT, 3))  # CAP.ND
        self.dids = Ida("DID", FIRST_DID, nd - 1, owner=hw)
        self.devs: dict[int, DevInfo] = {}
        self.context_tables: dict[tuple[int, int], int] = {}
        self.status = mem.alloc_frame() << PAGE_SHIFT
        #: every descriptor submitted, wait descriptors included (the tests' command stream)
        self.issued: list[Q.Descriptor] = []
        # Queued invalidation first (dmar_enable_qi): 256-bit descriptors in scalable mode.
        self.iq = mem.alloc_frame() << PAGE_SHIFT
        self.width = 256 if self.sm else 128
        self.qsize = 4096 // (self.width // 8)
        self.tail = 0
        mmio = hw.mmio
        mmio.write(R.IQT, 0)
        mmio.write(R.IQA, self.iq | (R.IQA_DW if self.width == 256 else 0))
        self.gcmd = R.GCMD_QIE
        mmio.write(R.GCMD, self.gcmd, 4)
        # Root table (iommu_set_root_entry): SRTP, then the global flushes Linux issues.
        self.root = mem.alloc_frame() << PAGE_SHIFT
        mmio.write(R.RTADDR, self.root | R.TTM_SCALABLE << R.RTADDR_TTM_SHIFT)
        mmio.write(R.GCMD, self.gcmd | R.GCMD_SRTP, 4)
        self.submit(Q.make(Q.CC, g=Q.CC_GLOBAL))
        self.submit(Q.make(Q.PC, g=Q.PC_GLOBAL))
        self.submit(self.iotlb_desc(0, 0, 0, Q.IOTLB_GLOBAL))
        # init_dmars(): the page request queue of a unit with ECAP.PRS, then translation.
        self.prq = KernelPrq(self) if hw.ecap & R.ECAP_PRS else None
        self.gcmd |= R.GCMD_TE
        mmio.write(R.GCMD, self.gcmd, 4)

    # -- domain IDs (domain_attach_iommu / domain_detach_iommu) --------------------------------
    def attach_iommu(self, d: VtdDomain) -> int:
        if d.did is not None:
            d.did_refs += 1
            return d.did
        did = self.dids.alloc()  # ENOSPC when the unit's DIDs are all taken
        d.did, d.did_refs = did, 1
        return did

    def detach_iommu(self, d: VtdDomain) -> None:
        d.did_refs -= 1
        if d.did_refs == 0 and d.did is not None:
            self.dids.free(d.did)
            d.did = None

    # -- IOPF enablement (iopf_for_domain_set / _remove, intel_iommu_enable_iopf) -----------
    @staticmethod
    def iopf_set(info: DevInfo, d: Domain | None) -> None:
        if d is None or getattr(d.hwpt, "fault", None) is None:
            return  # no iopf handler: the HWPT has no fault queue
        if not info.pri_enabled:
            raise err(errno.ENODEV, "the device has no PRI enabled")
        info.iopf_refcount += 1

    @staticmethod
    def iopf_remove(info: DevInfo, d: Domain | None) -> None:
        if d is None or getattr(d.hwpt, "fault", None) is None or not info.iopf_refcount:
            return
        info.iopf_refcount -= 1

    def iopf_replace(self, info: DevInfo, new: Domain | None, old: Domain | None) -> None:
        self.iopf_set(info, new)
        self.iopf_remove(info, old)

    # -- cache tags (cache.c) ----------------------------------------------------------------
    @staticmethod
    def _tag_assign(d: VtdDomain, type_: int, did: int, rid: int, pasid: int) -> None:
        key_rid = rid if type_ in (CACHE_TAG_DEVTLB, CACHE_TAG_NESTING_DEVTLB) else -1
        for tag in d.tags:
            if (tag.type, tag.did, tag.pasid, tag.rid) == (type_, did, pasid, key_rid):
                tag.users += 1
                return
        d.tags.append(CacheTag(type_, did, pasid, key_rid))

    @staticmethod
    def _tag_unassign(d: VtdDomain, type_: int, did: int, rid: int, pasid: int) -> None:
        key_rid = rid if type_ in (CACHE_TAG_DEVTLB, CACHE_TAG_NESTING_DEVTLB) else -1
        for tag in d.tags:
            if (tag.type, tag.did, tag.pasid, tag.rid) == (type_, did, pasid, key_rid):
                tag.users -= 1
                if not tag.users:
                    d.tags.remove(tag)
                return

    @staticmethod
    def _domain_tags(d: VtdDomain, info: DevInfo) -> list[tuple[VtdDomain, int]]:
        """The (domain, type) tags cache_tag_assign_domain() gives an attachment: IOTLB
        (+ DEVTLB with ATS), and on a nested domain's parent the NESTING_ ones."""
        out: list[tuple[VtdDomain, int]] = [(d, CACHE_TAG_IOTLB)]
        if info.ats_enabled:
            out.append((d, CACHE_TAG_DEVTLB))
        if isinstance(d, VtdNested):
            out.append((d.s2, CACHE_TAG_NESTING_IOTLB))
            if info.ats_enabled:
                out.append((d.s2, CACHE_TAG_NESTING_DEVTLB))
        return out

    def tag_assign_domain(self, d: VtdDomain, info: DevInfo, pasid: int) -> None:
        assert d.did is not None
        for owner, type_ in self._domain_tags(d, info):
            self._tag_assign(owner, type_, d.did, info.dev.rid, pasid)

    def tag_unassign_domain(self, d: VtdDomain, info: DevInfo, pasid: int) -> None:
        assert d.did is not None
        for owner, type_ in self._domain_tags(d, info):
            self._tag_unassign(owner, type_, d.did, info.dev.rid, pasid)

    # -- queued invalidation (qi_submit_sync) -------------------------------------------------
    def submit(self, *descs: Q.Descriptor, drain: bool = False) -> None:
        """One qi_submit_sync(): ``descs`` plus a wait descriptor writing QI_DONE to the
        status slot (with PD for a page-request drain), ring IQT, check the status."""
        self.mem.write(self.status, QI_IN_USE.to_bytes(4, "little"))
        wait = Q.make(
            Q.WAIT, sw=1, pd=int(drain), status_data=QI_DONE, status_addr=self.status >> 2
        )
        entry = self.width // 8
        for d in (*descs, wait):
            self.mem.write(self.iq + self.tail * entry, d.encode(self.width))
            self.tail = (self.tail + 1) % self.qsize
            self.issued.append(d)
        self.hw.mmio.write(R.IQT, self.tail * entry)
        done = int.from_bytes(self.mem.read(self.status, 4), "little")
        if self.hw.fsts & R.FSTS_IQE or done != QI_DONE:
            raise err(errno.EIO, "invalidation queue error")

    def iotlb_desc(self, did: int, addr: int, am: int, g: int, ih: int = 0) -> Q.Descriptor:
        """qi_desc_iotlb(): DR/DW whenever the unit drains (CAP.DRD/DWD), for every G."""
        return Q.make(
            Q.IOTLB,
            g=g,
            did=did,
            dr=int(bool(self.hw.cap & R.CAP_DRD)),
            dw=int(bool(self.hw.cap & R.CAP_DWD)),
            addr=addr >> 12,
            am=am,
            ih=ih,
        )

    @staticmethod
    def devtlb_desc(info: DevInfo, pasid: int, addr: int, order: int) -> Q.Descriptor:
        """qi_desc_dev_iotlb() for PASID 0 (RID_PASID), qi_desc_dev_iotlb_pasid() else."""
        qdep = info.qdep if info.qdep < QI_DEV_IOTLB_MAX_INVS else 0
        field, size = Q.devtlb_range(addr, order)
        pf = info.pfsid
        if pasid == 0:
            return Q.make(
                Q.DEV_TLB,
                sid=info.dev.rid,
                qdep=qdep,
                pfsid_lo=pf & 0xF,
                pfsid_hi=pf >> 4,
                addr=field,
                size=size,
            )
        return Q.make(
            Q.PDEV_TLB,
            sid=info.dev.rid,
            pasid=pasid,
            qdep=info.qdep,  # the PASID form masks QDEP to 5 bits without the 32 check
            pfsid_lo=pf & 0xF,
            pfsid_hi=pf >> 4,
            addr=field,
            size=size,
        )

    # -- context and PASID tables ------------------------------------------------------------
    def probe(self, dev: PciDevice) -> DevInfo:
        bits = dev.pasid_bits if self.hw.ecap & R.ECAP_PASID else 0
        bits = min(bits, R.field(self.hw.ecap, R.ECAP_PSS_SHIFT, 5) + 1)
        dir_entries = max(512, 1 << max(bits - 6, 0))  # at least one page of directory
        npages = dir_entries * T.PASID_DIR_ENTRY_SIZE >> PAGE_SHIFT
        pasid_dir = self.mem.alloc_contiguous(npages) << PAGE_SHIFT
        info = DevInfo(dev, pasid_dir, dir_entries, dev.ats and bool(self.hw.ecap & R.ECAP_DT))
        bus, devfn = dev.rid >> 8, dev.rid & 0xFF
        half = int(devfn >= 128)
        table = self.context_tables.get((bus, half))
        if table is None:
            table = self.context_tables[(bus, half)] = self.mem.alloc_frame() << PAGE_SHIFT
            slot = self.root + bus * T.ROOT_ENTRY_SIZE
            re = T.RootEntry.decode(self.mem.read_u64(slot), self.mem.read_u64(slot + 8))
            re = T.RootEntry(
                lp=re.lp or not half,
                lctp=table if not half else re.lctp,
                up=re.up or bool(half),
                uctp=table if half else re.uctp,
            )
            lo, hi = re.encode()
            self.mem.write_u64(slot, lo)
            self.mem.write_u64(slot + 8, hi)
        # intel_iommu_probe_device() / iommu_enable_pci_pri(): PRI needs ATS, ECAP.PRS and
        # ECAP.PDS; with PASID enabled the device must want the PASID in PRG responses.
        # The framework's PCI device has one ATS flag: PRI follows it unless the device
        # carries ``pri`` / ``prg_resp_pasid_required`` (the model's own knobs).
        pri_cap = bool(getattr(dev, "pri", dev.ats))
        prs = R.ECAP_PRS | R.ECAP_PDS
        info.pri_supported = info.ats_enabled and self.hw.ecap & prs == prs and pri_cap
        info.pri_enabled = info.pri_supported and (
            bits == 0 or bool(getattr(dev, "prg_resp_pasid_required", True))
        )
        ce = T.ContextEntry(
            p=True,
            dte=info.ats_enabled,
            pre=info.pri_supported,
            paside=bits > 0,
            pdts=dir_entries.bit_length() - 1 - 7,
            pasid_dir=pasid_dir,
            rid_pasid=0,  # IOMMU_NO_PASID
        )
        slot = table + (devfn & 0x7F) * T.SM_CONTEXT_ENTRY_SIZE
        for i, q in enumerate(ce.encode()):
            self.mem.write_u64(slot + 8 * i, q)
        self.devs[dev.rid] = info
        return info

    def pasid_slot(self, info: DevInfo, pasid: int) -> int:
        """Address of the PASID entry (allocating its PASID table like intel_pasid_get_entry)."""
        index = T.pasid_dir_index(pasid)
        if index >= info.dir_entries:
            raise err(errno.EINVAL, f"PASID {pasid} beyond the PASID directory")
        table = info.tables.get(index)
        if table is None:
            table = info.tables[index] = self.mem.alloc_frame() << PAGE_SHIFT
            de = T.PasidDirEntry(p=True, table=table)
            self.mem.write_u64(info.pasid_dir + index * T.PASID_DIR_ENTRY_SIZE, de.encode())
        return table + T.pasid_table_index(pasid) * T.PASID_ENTRY_SIZE

    def read_pasid_entry(self, info: DevInfo, pasid: int) -> T.PasidEntry:
        slot = self.pasid_slot(info, pasid)
        return T.PasidEntry.decode([self.mem.read_u64(slot + 8 * i) for i in range(8)])

    def write_pasid_entry(self, info: DevInfo, pasid: int, pe: T.PasidEntry) -> None:
        slot = self.pasid_slot(info, pasid)
        for i, q in enumerate(pe.encode()):
            self.mem.write_u64(slot + 8 * i, q)

    # -- PASID entry teardown and flushes (pasid.c / cache.c) -----------------------------------
    def devtlb_flush_pasid(self, info: DevInfo, pasid: int) -> None:
        """devtlb_invalidation_with_pasid(): the whole device TLB of ``pasid`` (ATS only)."""
        if info.ats_enabled and self.gcmd & R.GCMD_TE:
            self.submit(self.devtlb_desc(info, pasid, 0, Q.MAX_AGAW_PFN_WIDTH))

    def tear_down_entry(self, info: DevInfo, pasid: int) -> None:
        """intel_pasid_tear_down_entry(): clear P, flush PASID cache, IOTLB and device TLB,
        each its own qi_submit_sync(), then clear the entry."""
        old = self.read_pasid_entry(info, pasid)
        if not old.p:
            if old.fpd:
                self.write_pasid_entry(info, pasid, T.PasidEntry())
            return
        self.write_pasid_entry(info, pasid, attrs.evolve(old, p=False))
        self.submit(Q.make(Q.PC, g=Q.PC_PASID, did=old.did, pasid=pasid))
        if old.pgtt in (T.PGTT_FIRST, T.PGTT_PT):
            self.submit(Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=old.did, pasid=pasid))
        else:
            self.submit(self.iotlb_desc(old.did, 0, 0, Q.IOTLB_DOMAIN))
        self.devtlb_flush_pasid(info, pasid)
        self.write_pasid_entry(info, pasid, T.PasidEntry())
        if self.prq is not None:
            self.prq.drain(info, pasid, info.domains.get(0))

    def flush_range(self, domain: VtdDomain, start: int, end: int, ih: bool) -> None:
        """cache_tag_flush_range(): one invalidation per cache tag, in tag order, batched
        sixteen descriptors to a qi_submit_sync()."""
        addr, mask = Q.psi_aligned(start, end)
        use_piotlb = isinstance(domain, VtdNested) or domain.first_stage
        hw = self.hw
        batch: list[Q.Descriptor] = []

        def add(desc: Q.Descriptor) -> None:
            batch.append(desc)
            if len(batch) == QI_MAX_BATCHED_DESC_COUNT:
                self.submit(*batch)
                batch.clear()

        for tag in domain.tags:
            if tag.type in (CACHE_TAG_IOTLB, CACHE_TAG_NESTING_IOTLB):
                if use_piotlb:
                    if mask >= Q.MAX_AGAW_PFN_WIDTH:
                        add(Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=tag.did, pasid=tag.pasid))
                    else:
                        add(
                            Q.make(
                                Q.PIOTLB,
                                g=Q.PIOTLB_PAGE,
                                did=tag.did,
                                pasid=tag.pasid,
                                addr=addr >> 12,
                                am=mask,
                                ih=int(ih),
                            )
                        )
                elif not hw.cap & R.CAP_PSI or mask > hw.mamv:
                    add(self.iotlb_desc(tag.did, 0, 0, Q.IOTLB_DOMAIN))
                else:
                    add(self.iotlb_desc(tag.did, addr, mask, Q.IOTLB_PAGE, int(ih)))
                continue
            if tag.type == CACHE_TAG_NESTING_DEVTLB:
                # A stage-2 change may hit any nested translation the device cached: the
                # whole device TLB goes, and (as in 7.2's loop) so for every later tag.
                addr, mask = 0, Q.MAX_AGAW_PFN_WIDTH
            if self.gcmd & R.GCMD_TE:
                add(self.devtlb_desc(self.devs[tag.rid], tag.pasid, addr, mask))
        if batch:
            self.submit(*batch)


def _state(iommu: IommuHw) -> IommuState:
    return driver_state(iommu, IommuState)


def _vtd(domain: Domain) -> VtdDomain:
    if not isinstance(domain, (VtdPaging, VtdNested)):
        raise err(errno.EINVAL, "not an Intel VT-d domain")
    return domain


def _paging(domain: Domain) -> VtdPaging:
    if not isinstance(domain, VtdPaging):
        raise err(errno.EINVAL, "not an Intel VT-d paging domain")
    return domain


def copy_struct(data: bytes, min_len: int) -> bytes:
    """copy_struct_from_user(): too short -> EINVAL, a non-zero tail beyond ours -> E2BIG."""
    if len(data) < min_len:
        raise err(errno.EINVAL, "vendor data too short")
    if any(data[min_len:]):
        raise err(errno.E2BIG, "non-zero bytes beyond the known struct")
    return data[:min_len]


INFO = DriverInfo(
    name="intel_vtd",
    description="Intel VT-d scalable mode (Linux drivers/iommu/intel)",
    features=frozenset(
        {
            Feature.PAGING,
            Feature.NEST_PARENT,
            Feature.NESTED,
            Feature.PASID,
            Feature.DIRTY_TRACKING,
            Feature.HWPT_INVALIDATE,
            Feature.LARGE_PAGES,
            Feature.IOPF,
        }
    ),
    hwpt_data_types=frozenset({U.IOMMU_HWPT_DATA_VTD_S1}),
    viommu_types=frozenset(),  # no vIOMMU type exists for VT-d upstream
    hw_info_type=U.IOMMU_HW_INFO_TYPE_INTEL_VTD,
)


class VtdDriver(PagingDomainOps):
    """Entry point ``intel_vtd``: intel_iommu_ops and the domain ops, as pluggy hooks."""

    @hookimpl
    def driver_info(self) -> DriverInfo:
        return INFO

    @hookimpl
    def probe(self, machine: Machine, index: int, options: dict[str, Any]) -> IntelVtd:
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise err(errno.EINVAL, f"unknown intel_vtd options: {sorted(unknown)}")
        o = {**OPTIONS, **options}
        levels, fs_levels = int(o["levels"]), int(o["fs_levels"])
        if levels not in (4, 5) or fs_levels not in (4, 5) or (fs_levels == 5 and not o["fl5lp"]):
            raise err(errno.EINVAL, "bad paging depth options")
        sagaw = 0b0100 if levels == 4 else 0b1100
        cap = R.make_cap(
            sagaw=sagaw,
            mgaw=48 if levels == 4 else 57,
            nfr=int(o["nfr"]),
            sllps=int(o["sllps"]),
            fl1gp=bool(o["fl1gp"]),
            fl5lp=bool(o["fl5lp"]),
        )
        ecap = R.make_ecap(
            first_stage=bool(o["first_stage"]),
            second_stage=bool(o["second_stage"]),
            nest=bool(o["nest"]),
            ssads=bool(o["dirty"]),
            pasid_bits=int(o["pasid_bits"]),
            srs=bool(o["srs"]),
            eafs=bool(o["eafs"]),
            prs=bool(o["prs"]),
        )
        hw = IntelVtd(machine, index, cap=cap, ecap=ecap)
        hw.driver_state = IommuState(hw, fs_levels)
        return hw

    @hookimpl
    def probe_device(self, iommu: Any, dev: PciDevice) -> object:
        return _state(iommu).probe(dev)

    @hookimpl
    def dev_reserved_regions(self, iommu: Any, dev: PciDevice) -> list[tuple[int, int]]:
        return [MSI_RANGE]

    @hookimpl
    def hw_info(self, iommu: Any, dev: PciDevice, data_type: int) -> HwInfo:
        if data_type not in (U.IOMMU_HW_INFO_TYPE_DEFAULT, U.IOMMU_HW_INFO_TYPE_INTEL_VTD):
            raise err(errno.EOPNOTSUPP, f"VT-d reports no hw_info type {data_type}")
        st = _state(iommu)
        hw = st.hw
        data = U.IommuHwInfoVtd(
            flags=U.IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17, cap_reg=hw.cap, ecap_reg=hw.ecap
        ).pack()
        caps = U.IOMMU_HW_CAP_DIRTY_TRACKING if hw.ecap & R.ECAP_SLADS else 0
        pasid_log2 = R.field(hw.ecap, R.ECAP_PSS_SHIFT, 5) + 1 if hw.ecap & R.ECAP_PASID else 0
        # intel_iommu_capable(IOMMU_CAP_PCI_ATS_SUPPORTED): info->ats_supported, which needs
        # ECAP.DT besides the device's ATS capability.
        ats = st.devs[dev.rid].ats_enabled
        return HwInfo(U.IOMMU_HW_INFO_TYPE_INTEL_VTD, data, caps, pasid_log2, ats_supported=ats)

    # -- domains -----------------------------------------------------------------------------
    @hookimpl
    def domain_alloc_user(
        self,
        iommu: Any,
        dev: PciDevice,
        flags: int,
        parent: Domain | None,
        viommu: ViommuBase | None,
        user_data: UserData | None,
    ) -> Domain:
        """intel_iommu_domain_alloc_paging_flags() without ``parent`` (user data refused,
        unread); intel_iommu_domain_alloc_nested() with one."""
        if parent is None:
            if user_data is not None:
                raise err(errno.EOPNOTSUPP, "intel_vtd paging domains take no user data")
            return self._alloc_paging(iommu, dev, flags)
        if user_data is None:
            raise err(errno.EOPNOTSUPP, "a nested domain needs iommu_hwpt_vtd_s1 data")
        return self._alloc_nested(iommu, parent, flags, user_data.type, user_data.read())

    def _alloc_paging(self, iommu: Any, dev: PciDevice | None, flags: int) -> Domain:
        st = _state(iommu)
        hw = st.hw
        if flags & ~PAGING_FLAGS:
            raise err(errno.EOPNOTSUPP, f"paging flags {flags:#x}")
        # intel_iommu_domain_alloc_first_stage(): only without NEST_PARENT / DIRTY_TRACKING
        if not flags & ~U.IOMMU_HWPT_ALLOC_PASID and st.sm and hw.ecap & R.ECAP_FLTS:
            return _enforce_cc(VtdPaging(hw, st, first_stage=True, flags=flags), dev)
        # intel_iommu_domain_alloc_second_stage()
        nested_ok = st.sm and bool(hw.ecap & R.ECAP_NEST)
        ssads_ok = st.sm and bool(hw.ecap & R.ECAP_SLADS)
        if (flags & U.IOMMU_HWPT_ALLOC_NEST_PARENT and not nested_ok) or (
            flags & U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING and not ssads_ok
        ):
            raise err(errno.EOPNOTSUPP, "nesting or dirty tracking not supported")
        if st.sm and not hw.ecap & R.ECAP_SLTS:
            raise err(errno.EOPNOTSUPP, "no second-stage translation")
        return _enforce_cc(VtdPaging(hw, st, first_stage=False, flags=flags), dev)

    def _alloc_nested(
        self, iommu: Any, parent: Domain, flags: int, data_type: int, data: bytes
    ) -> Domain:
        st = _state(iommu)
        if not (st.sm and st.hw.ecap & R.ECAP_NEST) or flags & ~U.IOMMU_HWPT_ALLOC_PASID:
            raise err(errno.EOPNOTSUPP, "nesting not supported or bad flags")
        if data_type != U.IOMMU_HWPT_DATA_VTD_S1:
            raise err(errno.EOPNOTSUPP, f"hwpt data type {data_type}")
        if not isinstance(parent, VtdPaging) or parent.first_stage or not parent.nest_parent:
            raise err(errno.EINVAL, "parent must be a second-stage nest parent")
        cfg = U.IommuHwptVtdS1.unpack(copy_struct(data, VTD_S1_LEN))
        # As nested.c: flags/addr_width are checked when the domain is attached, not here.
        child = VtdNested(st.hw, st, parent, cfg, flags)
        parent.children.append(child)
        return child

    @hookimpl
    def domain_free(self, domain: Domain) -> bool:
        st = _state(domain.owner)
        if isinstance(domain, VtdPaging):
            domain.free()
        elif isinstance(domain, VtdNested):
            domain.s2.children.remove(domain)
        if isinstance(domain, (VtdPaging, VtdNested)) and domain.did is not None:
            st.dids.free(domain.did)  # no device is attached: nothing refers to it
        return True

    # -- attach -------------------------------------------------------------------------------
    @staticmethod
    def _entry_for(st: IommuState, domain: VtdDomain, did: int) -> T.PasidEntry:
        """The PASID entry intel_pasid_setup_{first_level,second_level,nested}() write; the
        nested checks fail with EINVAL there, after the old entry was torn down."""
        hw = st.hw
        if isinstance(domain, VtdNested):
            cfg = domain.cfg
            if cfg.addr_width not in (ADDR_WIDTH_4LEVEL, ADDR_WIDTH_5LEVEL):
                raise err(errno.EINVAL, f"stage-1 address width {cfg.addr_width}")
            if cfg.addr_width == ADDR_WIDTH_5LEVEL and not hw.cap & R.CAP_FL5LP:
                raise err(errno.EINVAL, "no 5-level first-stage paging")
            if cfg.flags & U.IOMMU_VTD_S1_SRE and not hw.ecap & R.ECAP_SRS:
                raise err(errno.EINVAL, "no supervisor request support")
            if cfg.flags & U.IOMMU_VTD_S1_EAFE and not hw.ecap & R.ECAP_EAFS:
                raise err(errno.EINVAL, "no extended access flag support")
            s2 = domain.s2
            sre = bool(cfg.flags & U.IOMMU_VTD_S1_SRE)
            return T.PasidEntry(
                p=True,
                aw=st.agaw,
                pgtt=T.PGTT_NESTED,
                ssade=s2.tracking,
                slptptr=s2.pt.root,
                did=did,
                pwsnp=True,
                pgsnp=s2.force_snooping,
                sre=sre,
                wpe=sre and bool(cfg.flags & U.IOMMU_VTD_S1_WPE),  # WPE only with SRE
                eafe=bool(cfg.flags & U.IOMMU_VTD_S1_EAFE),
                fspm=int(cfg.addr_width == ADDR_WIDTH_5LEVEL),
                fsptptr=cfg.pgtbl_addr,
            )
        if domain.first_stage:
            return T.PasidEntry(
                p=True,
                aw=st.agaw,
                pgtt=T.PGTT_FIRST,
                did=did,
                pwsnp=True,
                pgsnp=domain.force_snooping,
                fspm=int(domain.pt.fmt.levels == 5),
                fsptptr=domain.pt.root,
            )
        return T.PasidEntry(
            p=True,
            aw=st.agaw,
            pgtt=T.PGTT_SECOND,
            ssade=domain.tracking,
            slptptr=domain.pt.root,
            did=did,
            pwsnp=True,
        )

    @staticmethod
    def _setup_entry(st: IommuState, info: DevInfo, pasid: int, domain: VtdDomain) -> None:
        """intel_pasid_setup_*(): EBUSY over a present entry; with CM = 0 and no RWBF no
        invalidation follows (pasid_flush_caches)."""
        assert domain.did is not None
        new = VtdDriver._entry_for(st, domain, domain.did)
        if st.read_pasid_entry(info, pasid).p:
            raise err(errno.EBUSY, f"PASID {pasid} entry is present")
        st.write_pasid_entry(info, pasid, new)

    @staticmethod
    def _block_translation(st: IommuState, info: DevInfo) -> None:
        """device_block_translation(): untag, tear the RID's entry down, drop the DID."""
        if not info.domain_attached:
            return
        d = info.domains.get(0)
        if d is not None:
            st.tag_unassign_domain(d, info, 0)
        st.tear_down_entry(info, 0)  # its PRQ drain names the RID domain's DID
        info.domains.pop(0, None)
        info.domain_attached = False
        if d is not None:
            d.attached.discard((info.dev.rid, 0))
            st.detach_iommu(d)

    @hookimpl
    def attach(self, iommu: Any, dev: PciDevice, domain: Domain | None) -> bool:
        """intel_iommu_attach_device() / intel_nested_attach_dev() / the blocking domain:
        the old entry is torn down first, so a failure leaves the RID blocked (as in 7.2)."""
        st = _state(iommu)
        info = st.devs[dev.rid]
        if domain is not None and domain.owner is not st.hw:
            raise err(errno.EINVAL, "domain of another IOMMU")
        d = _vtd(domain) if domain is not None else None
        old = info.domains.get(0)
        if d is None:
            st.iopf_remove(info, old)  # blocking_domain_attach_dev()
            self._block_translation(st, info)
            return True
        if isinstance(d, VtdNested):
            # 7.2 checks the stage-1 data in intel_pasid_setup_nested(), after the teardown,
            # so a bad one leaves the RID blocked; the framework's contract (and its uAPI
            # state machine) wants a refused attach to change nothing: the model checks
            # first (a deviation, listed in docs/parity-intel-vtd.md).
            self._entry_for(st, d, 0)
        self._block_translation(st, info)
        if isinstance(d, VtdNested):
            st.attach_iommu(d)
            st.tag_assign_domain(d, info, 0)
            try:
                st.iopf_set(info, d)  # 7.2's nested attach takes no old-domain reference off
                try:
                    self._setup_entry(st, info, 0, d)
                except OSError:
                    st.iopf_remove(info, d)
                    raise
            except OSError:
                st.tag_unassign_domain(d, info, 0)
                st.detach_iommu(d)
                raise
        else:
            st.iopf_replace(info, d, old)
            try:
                st.attach_iommu(d)
                try:
                    self._setup_entry(st, info, 0, d)
                except OSError:
                    st.detach_iommu(d)
                    raise
            except OSError:
                st.iopf_replace(info, old, d)
                raise
            st.tag_assign_domain(d, info, 0)
        info.domains[0] = d
        info.domain_attached = True
        d.attached.add((dev.rid, 0))
        return True

    @hookimpl
    def set_dev_pasid(self, iommu: Any, dev: PciDevice, pasid: int, domain: Domain) -> bool:
        """intel_iommu_set_dev_pasid() / intel_nested_set_dev_pasid(): tag the new domain,
        tear the old entry down, set the new one up; on failure untag the new domain (the
        PASID stays blocked)."""
        st = _state(iommu)
        if not st.hw.ecap & R.ECAP_PASID:
            raise err(errno.EOPNOTSUPP, "no PASID support")
        if domain.owner is not st.hw:
            raise err(errno.EINVAL, "domain of another IOMMU")
        info = st.devs[dev.rid]
        d = _vtd(domain)
        st.pasid_slot(info, pasid)  # intel_pasid_get_entry(): EINVAL beyond the table
        if isinstance(d, VtdNested):
            self._entry_for(st, d, 0)  # checked before the teardown (see attach)
        st.attach_iommu(d)
        st.tag_assign_domain(d, info, pasid)
        old = info.domains.get(pasid)
        try:
            st.iopf_replace(info, d, old)
        except OSError:
            st.tag_unassign_domain(d, info, pasid)
            st.detach_iommu(d)
            raise
        try:
            if old is not None:
                st.tear_down_entry(info, pasid)
            self._setup_entry(st, info, pasid, d)
        except OSError:
            # 7.2 leaves the old domain's dev_pasid (tags, DID) in place: the PASID is
            # blocked in hardware, still attached in iommufd's view until detached.
            st.iopf_replace(info, old, d)
            st.tag_unassign_domain(d, info, pasid)
            st.detach_iommu(d)
            raise
        if old is not None:
            self._remove_dev_pasid(st, info, pasid, old)
        info.domains[pasid] = d
        d.attached.add((dev.rid, pasid))
        return True

    @staticmethod
    def _remove_dev_pasid(st: IommuState, info: DevInfo, pasid: int, old: VtdDomain) -> None:
        """domain_remove_dev_pasid(): untag the old domain and drop its DID reference."""
        st.tag_unassign_domain(old, info, pasid)
        st.detach_iommu(old)
        old.attached.discard((info.dev.rid, pasid))
        if info.domains.get(pasid) is old:
            del info.domains[pasid]

    @hookimpl
    def remove_dev_pasid(self, iommu: Any, dev: PciDevice, pasid: int) -> bool:
        """blocking_domain_set_dev_pasid(): tear down, then forget the old domain."""
        st = _state(iommu)
        info = st.devs[dev.rid]
        st.tear_down_entry(info, pasid)
        old = info.domains.get(pasid)
        st.iopf_remove(info, old)
        if old is not None:
            self._remove_dev_pasid(st, info, pasid, old)
        return True

    @hookimpl
    def page_response(
        self, iommu: Any, dev: PciDevice, pasid: int | None, grpid: int, code: int
    ) -> bool:
        """intel_iommu_page_response(): a page group response descriptor (type 0x9) with
        the user's code (IOMMUFD_PAGE_RESP_SUCCESS 0 / INVALID 1, the PCIe codes)."""
        st = _state(iommu)
        if st.prq is None:
            raise err(errno.EOPNOTSUPP, "no page request support")
        st.prq.respond(dev.rid, pasid, grpid & 0x1FF, code)
        return True

    # -- invalidation and dirty tracking -------------------------------------------------------
    @hookimpl
    def cache_invalidate_user(
        self, target: Domain | ViommuBase, data_type: int, entries: list[bytes]
    ) -> InvalidateResult:
        if not isinstance(target, VtdNested):
            return InvalidateResult(0, errno.EOPNOTSUPP)
        if data_type != U.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1:
            return InvalidateResult(0, errno.EINVAL)
        st = _state(target.owner)
        done = 0
        for raw in entries:
            try:
                inv = U.IommuHwptVtdS1Invalidate.unpack(copy_struct(raw, VTD_INV_LEN))
            except OSError as exc:
                return InvalidateResult(done, exc.errno or errno.EINVAL)
            if inv.flags & ~U.IOMMU_VTD_INV_FLAGS_LEAF or inv.reserved:
                return InvalidateResult(done, errno.EOPNOTSUPP)
            if inv.addr & 0xFFF or (inv.npages == U64 and inv.addr):
                return InvalidateResult(done, errno.EINVAL)
            # end = addr + nrpages_to_size(npages) - 1, in 64-bit arithmetic as the kernel.
            end = (inv.addr + ((inv.npages << 12) & U64) - 1) & U64
            # A wrapped end is passed on as the kernel does (calculate_psi_aligned_address
            # then sees only start ^ end).
            st.flush_range(target, inv.addr, end, bool(inv.flags & U.IOMMU_VTD_INV_FLAGS_LEAF))
            done += 1
        return InvalidateResult(done)

    @hookimpl
    def read_and_clear_dirty(
        self, domain: Domain, iova: int, length: int, clear: bool, report: bool
    ) -> list[tuple[int, int]]:
        """generic_pt's read_and_clear_dirty (7.2 checks no tracking state): the dirty runs
        gather into one range that iommu_iotlb_sync() flushes with IH = 1 (no table freed)."""
        d = _paging(domain)
        if d.first_stage:
            raise err(errno.EOPNOTSUPP, "first-stage domains have no dirty ops")
        runs = d.pt.read_and_clear_dirty(iova, length, clear)
        if runs and clear:
            first = min(start for start, _ in runs)
            last = max(start + size - 1 for start, size in runs)
            _state(d.owner).flush_range(d, first, last, True)
        return runs

    @hookimpl
    def set_dirty_tracking(self, domain: Domain, enable: bool) -> bool:
        """intel_iommu_set_dirty_tracking(): the domain's own attachments, then (a nest
        parent) its stage-1 children's; any failure re-applies the old state everywhere."""
        d = _paging(domain)
        if d.first_stage:
            raise err(errno.EOPNOTSUPP, "first-stage domains have no dirty ops")
        if d.tracking == enable:
            return True
        st = _state(d.owner)
        try:
            _domain_set_dirty(st, d, enable)
            for child in d.children:
                try:
                    _domain_set_dirty(st, child, enable)
                except OSError:
                    for c in d.children:  # parent_domain_set_dirty_tracking()'s unwind
                        _domain_set_dirty(st, c, d.tracking, quiet=True)
                    raise
        except OSError:
            _domain_set_dirty(st, d, d.tracking, quiet=True)
            raise
        d.tracking = enable
        return True

    @hookimpl
    def viommu_alloc(
        self, iommu: Any, dev: PciDevice, parent: Domain, viommu_type: int, data: bytes
    ) -> ViommuBase:
        raise err(errno.EOPNOTSUPP, "VT-d has no vIOMMU type upstream")

    # -- the guest model --------------------------------------------------------------------------
    @hookimpl
    def guest_iommu_alloc(self, vm: Vm, iommu: IommuHw, accelerated: bool) -> GuestIommu:
        """The guest's intel-iommu driver and the VMM's emulated VT-d (nesting over iommufd).

        ``accelerated`` is refused: VT-d has no queue the hardware consumes from guest RAM."""
        _state(iommu)
        if accelerated:
            raise err(errno.EOPNOTSUPP, "VT-d has no hardware-accelerated guest queue")
        return GuestVtd(vm, iommu, accelerated=False)


def _domain_set_dirty(st: IommuState, d: VtdDomain, enable: bool, quiet: bool = False) -> None:
    """domain_set_dirty_tracking(): intel_pasid_setup_dirty_tracking() on every attachment
    (RID first, then PASIDs); stops at the first EOPNOTSUPP unless ``quiet`` (the unwind,
    whose errors the kernel ignores)."""
    for rid, pasid in sorted(d.attached):
        info = st.devs[rid]
        pe = st.read_pasid_entry(info, pasid)
        if pe.pgtt not in (T.PGTT_SECOND, T.PGTT_NESTED):
            if quiet:
                continue
            raise err(errno.EOPNOTSUPP, f"dirty tracking on PGTT {pe.pgtt}")
        if pe.ssade == enable:
            continue
        st.write_pasid_entry(info, pasid, attrs.evolve(pe, ssade=enable))
        st.submit(Q.make(Q.PC, g=Q.PC_PASID, did=pe.did, pasid=pasid))
        st.submit(st.iotlb_desc(pe.did, 0, 0, Q.IOTLB_DOMAIN))
        st.devtlb_flush_pasid(info, pasid)


def _enforce_cc(d: VtdPaging, dev: PciDevice | None) -> VtdPaging:
    """iommufd_hwpt_paging_alloc() calls enforce_cache_coherency() on every paging domain
    it allocates for a device whose unit has ECAP.SC (IOMMU_CAP_ENFORCE_CACHE_COHERENCY),
    before anything is attached: a first-stage domain then sets PGSNP in its PASID entries
    (intel_iommu_enforce_cache_coherency_fs), a second-stage one SNP in every leaf
    (PT_FEAT_VTDSS_FORCE_COHERENCE) and PGSNP in its nested children's entries."""
    if dev is not None and d.hw.ecap & R.ECAP_SC:
        d.force_snooping = True
        if isinstance(d.pt.fmt, SecondStageFormat):
            d.pt.fmt.snoop = True
    return d


plugin = VtdDriver()
