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
from iommufd_intel_vtd.pgtable import SecondStageFormat
from iommufd_model.driver import (
    IOMMU_WRITE,
    Domain,
    DomainType,
    DriverInfo,
    Feature,
    HwInfo,
    InvalidateResult,
    ViommuBase,
)
from iommufd_model.errors import err
from iommufd_model.hookspecs import hookimpl
from iommufd_model.hw.memory import PAGE_SHIFT
from iommufd_model.hw.pci import PciDevice
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.x86_64 import X86_64Format
from iommufd_model.machine import Machine
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw
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
}


# -- domains ----------------------------------------------------------------------------------
class VtdPaging(Domain):
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
            DomainType.PAGING,
            pgsize_bitmap=pgsizes,
            aperture_start=0,
            aperture_end=(1 << va_bits) - 1,
            nest_parent=bool(flags & U.IOMMU_HWPT_ALLOC_NEST_PARENT),
            dirty_tracking=bool(flags & U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING),
            pasid_compat=bool(flags & U.IOMMU_HWPT_ALLOC_PASID),
        )
        self.hw = hw
        self.first_stage = first_stage
        self.pt = RadixPageTable(hw.memory, fmt)
        self.did = state.alloc_did()
        self.attached: set[tuple[int, int]] = set()  # (rid, pasid)
        self.children: list[VtdNested] = []
        self.tracking = False  # intel's dmar_domain->dirty_tracking (enabled state)


class VtdNested(Domain):
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
        self.hw = hw
        self.s2 = parent
        self.cfg = cfg
        self.did = state.alloc_did()
        self.attached: set[tuple[int, int]] = set()


# -- the kernel's per-IOMMU state (struct intel_iommu) -----------------------------------------
class DevInfo:
    """``struct device_domain_info`` + its PASID table."""

    def __init__(self, dev: PciDevice, pasid_dir: int, dir_entries: int) -> None:
        self.dev = dev
        self.pasid_dir = pasid_dir
        self.dir_entries = dir_entries
        self.tables: dict[int, int] = {}  # directory index -> PASID table address
        self.domains: dict[int, Domain] = {}  # pasid -> attached domain


class IommuState:
    """What the kernel keeps per DMAR unit: tables, DID space, the invalidation queue."""

    def __init__(self, hw: IntelVtd, fs_levels: int) -> None:
        self.hw = hw
        mem = hw.memory
        self.mem = mem
        self.fs_levels = fs_levels
        self.agaw = max(aw for aw in (1, 2, 3) if hw.sagaw >> aw & 1)
        self.sm = bool(hw.ecap & R.ECAP_SMTS)
        self.dids: set[int] = set()
        self.devs: dict[int, DevInfo] = {}
        self.context_tables: dict[tuple[int, int], int] = {}
        self.status = mem.alloc_frame() << PAGE_SHIFT
        self.seq = 0
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
        self.submit(
            Q.make(Q.CC, g=Q.CC_GLOBAL),
            Q.make(Q.PC, g=Q.PC_GLOBAL),
            Q.make(Q.IOTLB, g=Q.IOTLB_GLOBAL, dr=1, dw=1),
        )
        self.gcmd |= R.GCMD_TE
        mmio.write(R.GCMD, self.gcmd, 4)

    def alloc_did(self) -> int:
        nd = 1 << (4 + 2 * R.field(self.hw.cap, R.CAP_ND_SHIFT, 3))
        for did in range(FIRST_DID, nd):
            if did not in self.dids:
                self.dids.add(did)
                return did
        raise err(errno.ENOSPC, "out of domain IDs")

    # -- queued invalidation (qi_submit_sync) -------------------------------------------------
    def submit(self, *descs: Q.Descriptor) -> None:
        """Queue ``descs`` plus a wait descriptor with status write, ring IQT, check status."""
        self.seq = (self.seq + 1) & 0xFFFF_FFFF
        wait = Q.make(Q.WAIT, sw=1, fn=1, status_data=self.seq, status_addr=self.status >> 2)
        entry = self.width // 8
        for d in (*descs, wait):
            self.mem.write(self.iq + self.tail * entry, d.encode(self.width))
            self.tail = (self.tail + 1) % self.qsize
        self.hw.mmio.write(R.IQT, self.tail * entry)
        done = int.from_bytes(self.mem.read(self.status, 4), "little")
        if self.hw.fsts & R.FSTS_IQE or done != self.seq:
            raise err(errno.EIO, "invalidation queue error")

    # -- context and PASID tables ------------------------------------------------------------
    def probe(self, dev: PciDevice) -> DevInfo:
        bits = dev.pasid_bits if self.hw.ecap & R.ECAP_PASID else 0
        bits = min(bits, R.field(self.hw.ecap, R.ECAP_PSS_SHIFT, 5) + 1)
        dir_entries = max(512, 1 << max(bits - 6, 0))  # at least one page of directory
        npages = dir_entries * T.PASID_DIR_ENTRY_SIZE >> PAGE_SHIFT
        pasid_dir = self.mem.alloc_contiguous(npages) << PAGE_SHIFT
        info = DevInfo(dev, pasid_dir, dir_entries)
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
        ce = T.ContextEntry(
            p=True,
            dte=dev.ats and bool(self.hw.ecap & R.ECAP_DT),
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

    # -- flushes (pasid.c / cache.c) ----------------------------------------------------------
    def flush_entry(self, info: DevInfo, pasid: int, old: T.PasidEntry) -> None:
        """After a present entry changed or was cleared: PASID cache, IOTLB, device-TLB."""
        descs = [Q.make(Q.PC, g=Q.PC_PASID, did=old.did, pasid=pasid)]
        if old.pgtt in (T.PGTT_FIRST, T.PGTT_PT):
            descs.append(Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=old.did, pasid=pasid))
        else:
            descs.append(Q.make(Q.IOTLB, g=Q.IOTLB_DOMAIN, did=old.did, dr=1, dw=1))
        descs += self.devtlb(info, pasid)
        self.submit(*descs)

    def devtlb(
        self, info: DevInfo, pasid: int, addr: int = 0, size: bool = True
    ) -> list[Q.Descriptor]:
        if not info.dev.ats:
            return []
        if pasid == 0:
            return [Q.make(Q.DEV_TLB, sid=info.dev.rid, addr=addr >> 12, size=int(size))]
        return [Q.make(Q.PDEV_TLB, sid=info.dev.rid, pasid=pasid, addr=addr >> 12, size=int(size))]

    def flush_range(self, domain: Domain, start: int, end: int, leaf: bool) -> None:
        """cache_tag_flush_range(): one flush per cache tag of ``domain`` (and its children)."""
        full = end >= U64
        addr, am = (0, Q.MAX_AGAW_PFN_WIDTH) if full else Q.psi_aligned(start, end)
        page_ok = not full and bool(self.hw.cap & R.CAP_PSI) and am <= self.hw.mamv
        descs: list[Q.Descriptor] = []
        ih = int(leaf)

        def by_did(did: int) -> None:
            if page_ok:
                descs.append(
                    Q.make(Q.IOTLB, g=Q.IOTLB_PAGE, did=did, addr=addr >> 12, am=am, ih=ih)
                )
            else:
                descs.append(Q.make(Q.IOTLB, g=Q.IOTLB_DOMAIN, did=did, dr=1, dw=1))

        def by_pasid(did: int, pasid: int) -> None:
            if page_ok:
                descs.append(
                    Q.make(
                        Q.PIOTLB,
                        g=Q.PIOTLB_PAGE,
                        did=did,
                        pasid=pasid,
                        addr=addr >> 12,
                        am=am,
                        ih=ih,
                    )
                )
            else:
                descs.append(Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=did, pasid=pasid))

        if isinstance(domain, VtdPaging) and not domain.first_stage:
            if domain.attached:
                by_did(domain.did)
            for child in domain.children:
                if child.attached:
                    by_did(child.did)  # CACHE_TAG_NESTING_IOTLB
            users = set(domain.attached).union(*(c.attached for c in domain.children))
        elif isinstance(domain, (VtdPaging, VtdNested)):
            for _rid, pasid in sorted(domain.attached):
                by_pasid(domain.did, pasid)
            users = domain.attached
        else:
            return
        for rid, pasid in sorted(users):
            descs += self.devtlb(self.devs[rid], pasid, addr, not page_ok)
        if descs:
            self.submit(*descs)


def _state(iommu: Any) -> IommuState:
    if not isinstance(iommu, IntelVtd) or not isinstance(iommu.driver_state, IommuState):
        raise err(errno.EINVAL, "not an Intel VT-d unit")
    return iommu.driver_state


def _paging(domain: Domain) -> VtdPaging:
    if not isinstance(domain, VtdPaging):
        raise err(errno.EINVAL, "not an Intel VT-d paging domain")
    return domain


def _map(d: VtdPaging, iova: int, pa: int, size: int, prot: int, pgsize: int) -> None:
    """intel_iommu_map(): the checks, then the table (``pgsize`` caps the leaves; 0: none)."""
    if d.nest_parent and not prot & IOMMU_WRITE:
        # ERRATA_772415_SPR17: no read-only mapping in a nest parent.
        raise err(errno.EINVAL, "read-only mapping in a nest parent")
    if iova + size - 1 > d.aperture_end:
        raise err(errno.EFAULT, "mapping beyond the domain's address width")
    d.pt.map(iova, pa, size, prot, pgsize)


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
        }
    ),
    hwpt_data_types=frozenset({U.IOMMU_HWPT_DATA_VTD_S1}),
    viommu_types=frozenset(),  # no vIOMMU type exists for VT-d upstream
    hw_info_type=U.IOMMU_HW_INFO_TYPE_INTEL_VTD,
)


class VtdDriver:
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
            prs=False,
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
        hw = _state(iommu).hw
        data = U.IommuHwInfoVtd(
            flags=U.IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17, cap_reg=hw.cap, ecap_reg=hw.ecap
        ).pack()
        caps = U.IOMMU_HW_CAP_DIRTY_TRACKING if hw.ecap & R.ECAP_SLADS else 0
        pasid_log2 = R.field(hw.ecap, R.ECAP_PSS_SHIFT, 5) + 1 if hw.ecap & R.ECAP_PASID else 0
        return HwInfo(U.IOMMU_HW_INFO_TYPE_INTEL_VTD, data, caps, pasid_log2)

    # -- domains -----------------------------------------------------------------------------
    @hookimpl
    def domain_alloc_paging(self, iommu: Any, dev: PciDevice | None, flags: int) -> Domain:
        st = _state(iommu)
        hw = st.hw
        if flags & ~PAGING_FLAGS:
            raise err(errno.EOPNOTSUPP, f"paging flags {flags:#x}")
        # intel_iommu_domain_alloc_first_stage(): only without NEST_PARENT / DIRTY_TRACKING
        if not flags & ~U.IOMMU_HWPT_ALLOC_PASID and st.sm and hw.ecap & R.ECAP_FLTS:
            return VtdPaging(hw, st, first_stage=True, flags=flags)
        # intel_iommu_domain_alloc_second_stage()
        nested_ok = st.sm and bool(hw.ecap & R.ECAP_NEST)
        ssads_ok = st.sm and bool(hw.ecap & R.ECAP_SLADS)
        if (flags & U.IOMMU_HWPT_ALLOC_NEST_PARENT and not nested_ok) or (
            flags & U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING and not ssads_ok
        ):
            raise err(errno.EOPNOTSUPP, "nesting or dirty tracking not supported")
        if st.sm and not hw.ecap & R.ECAP_SLTS:
            raise err(errno.EOPNOTSUPP, "no second-stage translation")
        return VtdPaging(hw, st, first_stage=False, flags=flags)

    @hookimpl
    def domain_alloc_nested(
        self,
        iommu: Any,
        dev: PciDevice,
        parent: Domain,
        viommu: ViommuBase | None,
        flags: int,
        data_type: int,
        data: bytes,
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
            domain.pt.free()
        elif isinstance(domain, VtdNested):
            domain.s2.children.remove(domain)
        st.dids.discard(getattr(domain, "did", -1))
        return True

    @hookimpl
    def domain_map(self, domain: Domain, iova: int, pa: int, size: int, prot: int) -> bool:
        _map(_paging(domain), iova, pa, size, prot, 0)
        return True

    @hookimpl
    def domain_map_pages(
        self, domain: Domain, iova: int, pa: int, pgsize: int, pgcount: int, prot: int
    ) -> bool:
        _map(_paging(domain), iova, pa, pgsize * pgcount, prot, pgsize)
        return True

    @hookimpl
    def domain_unmap(self, domain: Domain, iova: int, size: int) -> int:
        d = _paging(domain)
        done = d.pt.unmap(iova, size)
        if done:
            _state(d.owner).flush_range(d, iova, iova + size - 1, False)
        return done

    @hookimpl
    def domain_iova_to_phys(self, domain: Domain, iova: int) -> int:
        return _paging(domain).pt.iova_to_phys(iova)

    # -- attach -------------------------------------------------------------------------------
    def _entry_for(self, st: IommuState, domain: Domain) -> T.PasidEntry:
        hw = st.hw
        if isinstance(domain, VtdNested):
            cfg = domain.cfg
            # intel_pasid_setup_nested(): address width, SRE and EAFE against the hardware.
            if cfg.addr_width not in (ADDR_WIDTH_4LEVEL, ADDR_WIDTH_5LEVEL):
                raise err(errno.EINVAL, f"stage-1 address width {cfg.addr_width}")
            if cfg.addr_width == ADDR_WIDTH_5LEVEL and not hw.cap & R.CAP_FL5LP:
                raise err(errno.EINVAL, "no 5-level first-stage paging")
            if cfg.flags & U.IOMMU_VTD_S1_SRE and not hw.ecap & R.ECAP_SRS:
                raise err(errno.EINVAL, "no supervisor request support")
            if cfg.flags & U.IOMMU_VTD_S1_EAFE and not hw.ecap & R.ECAP_EAFS:
                raise err(errno.EINVAL, "no extended access flag support")
            s2 = domain.s2
            return T.PasidEntry(
                p=True,
                aw=st.agaw,
                pgtt=T.PGTT_NESTED,
                ssade=s2.tracking,
                slptptr=s2.pt.root,
                did=domain.did,
                pwsnp=True,
                sre=bool(cfg.flags & U.IOMMU_VTD_S1_SRE),
                wpe=bool(cfg.flags & U.IOMMU_VTD_S1_WPE),
                eafe=bool(cfg.flags & U.IOMMU_VTD_S1_EAFE),
                fspm=int(cfg.addr_width == ADDR_WIDTH_5LEVEL),
                fsptptr=cfg.pgtbl_addr,
            )
        d = _paging(domain)
        if d.first_stage:
            return T.PasidEntry(
                p=True,
                pgtt=T.PGTT_FIRST,
                did=d.did,
                pwsnp=True,
                fspm=int(d.pt.fmt.levels == 5),
                fsptptr=d.pt.root,
            )
        return T.PasidEntry(
            p=True,
            aw=st.agaw,
            pgtt=T.PGTT_SECOND,
            ssade=d.tracking,
            slptptr=d.pt.root,
            did=d.did,
            pwsnp=True,
        )

    def _set(self, iommu: Any, dev: PciDevice, pasid: int, domain: Domain | None) -> bool:
        st = _state(iommu)
        info = st.devs[dev.rid]
        new = self._entry_for(st, domain) if domain is not None else None
        if domain is not None and domain.owner is not st.hw:
            raise err(errno.EINVAL, "domain of another IOMMU")
        old = st.read_pasid_entry(info, pasid)
        st.write_pasid_entry(info, pasid, new if new is not None else T.PasidEntry())
        if old.p:
            st.flush_entry(info, pasid, old)  # intel_pasid_flush_present / tear_down_entry
        prev = info.domains.pop(pasid, None)
        if isinstance(prev, (VtdPaging, VtdNested)):
            prev.attached.discard((dev.rid, pasid))
        if isinstance(domain, (VtdPaging, VtdNested)):
            info.domains[pasid] = domain
            domain.attached.add((dev.rid, pasid))
        return True

    @hookimpl
    def attach_dev(self, iommu: Any, dev: PciDevice, domain: Domain | None) -> bool:
        return self._set(iommu, dev, 0, domain)

    @hookimpl
    def set_dev_pasid(self, iommu: Any, dev: PciDevice, pasid: int, domain: Domain) -> bool:
        st = _state(iommu)
        if not st.hw.ecap & R.ECAP_PASID:
            raise err(errno.EOPNOTSUPP, "no PASID support")
        return self._set(iommu, dev, pasid, domain)

    @hookimpl
    def remove_dev_pasid(self, iommu: Any, dev: PciDevice, pasid: int) -> bool:
        return self._set(iommu, dev, pasid, None)

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
            st.flush_range(
                target,
                inv.addr,
                U64 if end < inv.addr else end,
                bool(inv.flags & U.IOMMU_VTD_INV_FLAGS_LEAF),
            )
            done += 1
        return InvalidateResult(done)

    @hookimpl
    def read_and_clear_dirty(
        self, domain: Domain, iova: int, length: int, clear: bool, report: bool
    ) -> list[tuple[int, int]]:
        d = _paging(domain)
        if report and not d.tracking:
            # intel_iommu_read_and_clear_dirty(): a bitmap read needs tracking on; the core's
            # stale-bit wipe before enabling (report=False, no bitmap) is allowed.
            raise err(errno.EINVAL, "dirty tracking is not enabled")
        runs = d.pt.read_and_clear_dirty(iova, length, clear)
        if runs and clear:
            _state(d.owner).flush_range(d, iova, iova + length - 1, False)
        return runs

    @hookimpl
    def set_dirty_tracking(self, domain: Domain, enable: bool) -> bool:
        d = _paging(domain)
        if d.first_stage:
            raise err(errno.EINVAL, "first-stage domains cannot track dirty pages")
        if d.tracking == enable:
            return True
        st = _state(d.owner)
        users: list[tuple[Domain, tuple[int, int]]] = [(d, a) for a in sorted(d.attached)]
        users += [(c, a) for c in d.children for a in sorted(c.attached)]
        for _dom, (rid, pasid) in users:
            # intel_pasid_setup_dirty_tracking(): flip SSADE, then flush what cached the entry.
            info = st.devs[rid]
            pe = st.read_pasid_entry(info, pasid)
            if pe.pgtt not in (T.PGTT_SECOND, T.PGTT_NESTED):
                raise err(errno.EINVAL, "dirty tracking needs a second-stage PASID entry")
            st.write_pasid_entry(info, pasid, _with_ssade(pe, enable))
            st.submit(
                Q.make(Q.PC, g=Q.PC_PASID, did=pe.did, pasid=pasid),
                Q.make(Q.IOTLB, g=Q.IOTLB_DOMAIN, did=pe.did, dr=1, dw=1),
                *st.devtlb(info, pasid),
            )
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


def _with_ssade(pe: T.PasidEntry, enable: bool) -> T.PasidEntry:
    return attrs.evolve(pe, ssade=enable)


plugin = VtdDriver()
