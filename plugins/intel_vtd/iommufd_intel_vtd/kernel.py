"""The VT-d driver's per-unit logic (``struct intel_iommu`` and what
drivers/iommu/intel/{iommu,pasid,cache,dmar}.c do with it): bring-up, the DID space, the
per-device PASID tables, cache tags, queued invalidation and the flushes Linux issues. The
hooks that call it are in :mod:`iommufd_intel_vtd.driver`, the domains in
:mod:`iommufd_intel_vtd.domain`.
"""

from __future__ import annotations

import errno

import attrs

from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import regs as R
from iommufd_intel_vtd import tables as T
from iommufd_intel_vtd.domain import (
    CACHE_TAG_DEVTLB,
    CACHE_TAG_IOTLB,
    CACHE_TAG_NESTING_DEVTLB,
    CACHE_TAG_NESTING_IOTLB,
    CacheTag,
    VtdDomain,
    VtdNested,
)
from iommufd_intel_vtd.hw import IntelVtd
from iommufd_intel_vtd.iopf import KernelPrq
from iommufd_model.api import Domain, Ida, err
from iommufd_model.devices.pri import (
    pci_enable_pri,
    pci_prg_resp_pasid_required,
    pci_pri_supported,
    pci_reset_pri,
)
from iommufd_model.hw.memory import PAGE_SHIFT
from iommufd_model.hw.pci import PciDevice

FIRST_DID = 2  # DID 0 is reserved, 1 is FLPT_DEFAULT_DID in scalable mode


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


PRQ_DEPTH = (4096 << 4) >> 5  # iommu.h: PRQ_SIZE (4 KiB << PRQ_ORDER 4) >> 5

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
        # intel_iommu_probe_device(): PRI is supported with ATS, ECAP.PRS and ECAP.PDS and
        # the device's PRI capability (pci_pri_supported); iommu_enable_pci_pri() at
        # probe_finalize enables it (pci_reset_pri, pci_enable_pri(PRQ_DEPTH)) unless the
        # device's PASID is enabled and its PRI does not want the PASID in PRG responses
        # (pci_prg_resp_pasid_required). The PASID capability is enabled when the device and
        # the unit have PASIDs (``bits``).
        prs = R.ECAP_PRS | R.ECAP_PDS
        info.pri_supported = (
            info.ats_enabled and self.hw.ecap & prs == prs and pci_pri_supported(dev)
        )
        if (
            info.pri_supported
            and (bits == 0 or pci_prg_resp_pasid_required(dev))
            and not pci_reset_pri(dev)
        ):
            info.pri_enabled = not pci_enable_pri(dev, PRQ_DEPTH)
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


def domain_set_dirty(st: IommuState, d: VtdDomain, enable: bool, quiet: bool = False) -> None:
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
