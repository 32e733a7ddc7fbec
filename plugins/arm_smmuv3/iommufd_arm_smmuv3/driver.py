"""Hook implementations: Linux arm-smmu-v3.c (paging domains, attach, TLBI) and
arm-smmu-v3-iommufd.c (hw_info, nest parents, vSMMU, vSTE-based nested domains, vSID
invalidation, vEVENTs). The hardware state lives in :mod:`iommufd_arm_smmuv3.hw`; the kernel's
per-SMMU logic in :mod:`iommufd_arm_smmuv3.kernel`, its domains in
:mod:`iommufd_arm_smmuv3.domain` and its vIOMMU objects in :mod:`iommufd_arm_smmuv3.viommu`.
"""

from __future__ import annotations

import errno
from typing import Any

from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.cmdqv import SID_MATCH_VALID, VCMDQ_ADDR, Vintf
from iommufd_arm_smmuv3.domain import NestedDomain, SmmuDomain
from iommufd_arm_smmuv3.guest import GuestSmmuv3
from iommufd_arm_smmuv3.hw import Smmuv3
from iommufd_arm_smmuv3.kernel import (
    CMDQ_BATCH_ENTRIES,
    MSI_IOVA_BASE,
    MSI_IOVA_LENGTH,
    AttachState,
    Master,
    SmmuDevice,
)
from iommufd_arm_smmuv3.option_sets import OPTION_SETS
from iommufd_arm_smmuv3.ste import (
    CFG_ABORT,
    CFG_BYPASS,
    CFG_S1_TRANS,
    EATS_ABT,
    EATS_TRANS,
    NESTING_ALLOWED_0,
    NESTING_ALLOWED_1,
    STE0_V,
    STE1_EATS,
)
from iommufd_arm_smmuv3.viommu import Vcmdq, Vdevice, VintfVsmmu, Vsmmu
from iommufd_model import driver as api
from iommufd_model.api import err, hookimpl
from iommufd_model.core.mmap import MmapOwner
from iommufd_model.core.viommu import report_event_from_irq
from iommufd_model.hw.bits import get, pack, put
from iommufd_model.hw.iommu import IommuHw
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE
from iommufd_model.hw.pci import PciDevice
from iommufd_model.machine import Machine
from iommufd_model.paging import PagingDomainOps
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm.vm import Vm

PROBE_OPTIONS = {
    "sid_bits",
    "ssid_bits",
    "tlb_capacity",
    "range_invalidation",
    "hw_access_flag",
    "hw_dirty",
    "cmdqv",
    "s2fwb",
    "attr_types_ovr",
    "canwbs",
    "cd2l",
    "stall_force",
    "stalls",
    "dma_can_stall",
    "pri",
    "s1p",
    "s2p",
    "hyp",
    "vhe",
    "granules",
    "oas",
    "vax",
    "host_va_bits",
    "guest_page_shift",
}
PAGING_FLAGS = (
    U.IOMMU_HWPT_ALLOC_NEST_PARENT | U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING | U.IOMMU_HWPT_ALLOC_PASID
)
U64_MASK = (1 << 64) - 1
CMDQV_DATA_SIZE = 16  # struct iommu_viommu_tegra241_cmdqv { __u64 out_vintf_mmap_offset, _length; }
VSTE_SIZE = 16  # struct iommu_hwpt_arm_smmuv3 { __le64 ste[2]; }
VCMD_SIZE = 16  # struct iommu_viommu_arm_smmuv3_invalidate { __le64 cmd[2]; }
VSID_MAX = (1 << 20) - 1  # tegra241-cmdqv.c: VINTF_SID_MATCH_VIRT_SID is GENMASK(20, 1)
# The guest commands arm_vsmmu_convert_user_cmd() accepts.
VSMMU_OPCODES = frozenset(
    {
        C.TLBI_NSNH_ALL,
        C.TLBI_NH_VA,
        C.TLBI_NH_VAA,
        C.TLBI_NH_ALL,
        C.TLBI_NH_ASID,
        C.ATC_INV,
        C.CFGI_CD,
        C.CFGI_CD_ALL,
    }
)

FEATURES = frozenset(
    {
        api.Feature.PAGING,
        api.Feature.NEST_PARENT,
        api.Feature.NESTED,
        api.Feature.VIOMMU,
        api.Feature.VDEVICE,
        api.Feature.VEVENTQ,
        api.Feature.VIOMMU_INVALIDATE,
        api.Feature.LARGE_PAGES,
        api.Feature.HW_QUEUE,
        api.Feature.PASID,
        api.Feature.DIRTY_TRACKING,
    }
)
VIOMMU_TYPES = frozenset({U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3, U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV})
#: What the 7.2 driver refuses as well (the matrix says "unsupported upstream", naming it).
UNSUPPORTED_UPSTREAM = {
    api.Feature.IOPF: (
        "Linux 7.2 drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.c: arm_smmu_handle_ppr answers "
        "every PCIe page request with PRI_RESP DENY; IO page faults reach iommufd only from a "
        "stalling master (arm_smmu_probe_device: dma-can-stall under IDR0.STALL_MODEL = 0b00, "
        "or STALL_MODEL = FORCE; the option sets 'stall-dma' and 'stall')"
    ),
    api.Feature.HWPT_INVALIDATE: (
        "Linux 7.2 drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3-iommufd.c: "
        "arm_smmu_nested_ops has no cache_invalidate_user, so iommufd_hwpt_invalidate gives "
        "EOPNOTSUPP; a nested HWPT is invalidated through its vIOMMU (arm_vsmmu_cache_invalidate)"
    ),
}


def smmu_of(iommu: IommuHw) -> SmmuDevice:
    return api.driver_state(iommu, SmmuDevice)


def master_of(dev: PciDevice) -> Master:
    master = dev.iommu_priv
    if not isinstance(master, Master):
        raise err(errno.ENODEV, f"{dev.name} was not probed by arm_smmuv3")
    return master


def _paging(domain: api.Domain) -> SmmuDomain:
    if not isinstance(domain, SmmuDomain):
        raise err(errno.EINVAL, "not an SMMUv3 paging domain")
    return domain


def validate_vste(ste0: int, ste1: int) -> tuple[int, int, bool]:
    """arm_smmu_validate_vste(): the vSTE words to keep and whether ATS is enabled (else EIO)."""
    if not ste0 & STE0_V:
        return 0, 0, False  # a non-valid vSTE becomes an abort STE
    if ste0 & ~NESTING_ALLOWED_0 or ste1 & ~NESTING_ALLOWED_1:
        raise err(errno.EIO, "vSTE sets bits userspace may not control")
    cfg = get(ste0, 3, 1)
    if cfg not in (CFG_ABORT, CFG_BYPASS, CFG_S1_TRANS):
        raise err(errno.EIO, f"vSTE Config {cfg:#05b} not allowed")
    eats = get(ste1, 29, 28)
    if eats not in (EATS_ABT, EATS_TRANS):
        raise err(errno.EIO, "vSTE EATS must be ABT or TRANS")
    ats = cfg == CFG_S1_TRANS and eats == EATS_TRANS
    return ste0, ste1 & ~STE1_EATS, ats


class ArmSmmuV3Driver(PagingDomainOps):
    """The arm_smmuv3 plugin object (entry point ``arm_smmuv3``)."""

    # -- hardware -------------------------------------------------------------------------------
    @hookimpl
    def probe(self, machine: Machine, index: int, options: dict[str, Any]) -> Smmuv3:
        unknown = set(options) - PROBE_OPTIONS
        if unknown:
            raise err(errno.EINVAL, f"unknown arm_smmuv3 options: {sorted(unknown)}")
        if not options.get("s1p", True) and not options.get("s2p", True):
            # arm_smmu_device_hw_probe(): neither IDR0.S1P nor S2P
            raise err(errno.ENXIO, "no translation support!")
        hw = Smmuv3(machine, index, **options)
        hw.driver_name = "arm_smmuv3"  # the registers are programmed before Machine sets it
        hw.driver_state = SmmuDevice(hw)
        return hw

    @hookimpl
    def driver_info(self) -> api.DriverInfo:
        """The driver's self-description: what the matrix may run against it."""
        return api.DriverInfo(
            name="arm_smmuv3",
            description="Arm SMMUv3 (Linux arm-smmu-v3 + iommufd vSMMU, Tegra241 CMDQV)",
            features=FEATURES,
            hwpt_data_types=frozenset({U.IOMMU_HWPT_DATA_ARM_SMMUV3}),
            viommu_types=VIOMMU_TYPES,
            hw_info_type=U.IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
            veventq_types=frozenset({U.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3}),
            hw_queue_types=frozenset({U.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV}),
            option_sets=OPTION_SETS,
            unsupported_upstream=UNSUPPORTED_UPSTREAM,
        )

    @hookimpl
    def probe_device(self, iommu: IommuHw, dev: PciDevice) -> object:
        smmu = smmu_of(iommu)
        sid = dev.rid
        if sid >> smmu.hw.sid_bits:
            raise err(errno.ENODEV, f"StreamID {sid:#x} beyond IDR1.SIDSIZE")
        smmu.ensure_l2(sid)
        master = Master(dev, sid, canwbs=smmu.hw.rc_canwbs)
        master.ssid_bits = smmu.master_ssid_bits(dev)
        master.stall_enabled = smmu.master_stall_enabled(sid)
        smmu.masters[sid] = master
        return master

    @hookimpl
    def dev_reserved_regions(self, iommu: IommuHw, dev: PciDevice) -> list[tuple[int, int]]:
        return [(MSI_IOVA_BASE, MSI_IOVA_BASE + MSI_IOVA_LENGTH - 1)]

    @hookimpl
    def hw_info(self, iommu: IommuHw, dev: PciDevice, data_type: int) -> api.HwInfo:
        """arm_smmu_hw_info(): the raw ID registers (or the CMDQV's parameters on request)."""
        cmdqv = smmu_of(iommu).hw.cmdqv
        if data_type == U.IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV and cmdqv is not None:
            param = cmdqv.param
            tegra = U.IommuHwInfoTegra241Cmdqv(
                flags=0,
                version=get(param, 3, 0),
                log2vcmdqs=(cmdqv.lvcmdqs_per_vintf - 1).bit_length(),
                log2vsids=get(param, 15, 12),
            )
            return api.HwInfo(U.IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV, tegra.pack(), 0, 0)
        if data_type not in (U.IOMMU_HW_INFO_TYPE_DEFAULT, U.IOMMU_HW_INFO_TYPE_ARM_SMMUV3):
            raise err(errno.EOPNOTSUPP, f"arm_smmuv3 reports no hw_info type {data_type}")
        mmio = smmu_of(iommu).hw.mmio
        idr = [mmio.read(R.IDR0 + 4 * i, 4) for i in range(6)]
        info = U.IommuHwInfoArmSmmuv3(
            flags=0,
            reserved=0,
            idr0=idr[0],
            idr1=idr[1],
            idr2=idr[2],
            idr3=idr[3],
            idr4=idr[4],
            idr5=idr[5],
            iidr=mmio.read(R.IIDR, 4),
            aidr=mmio.read(R.AIDR, 4),
        )
        # out_max_pasid_log2: the core's dev->iommu->max_pasids, the smaller of the
        # device's PASID width and 1 << IDR1.SSIDSIZE
        max_pasid_log2 = min(dev.pasid_bits, smmu_of(iommu).ssid_bits)
        smmu = smmu_of(iommu)
        caps = U.IOMMU_HW_CAP_DIRTY_TRACKING if smmu.dbm_capable else 0
        return api.HwInfo(
            U.IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
            info.pack(),
            caps,
            max_pasid_log2,
            ats_supported=smmu.ats_supported(master_of(dev)),  # IOMMU_CAP_PCI_ATS_SUPPORTED
        )

    # -- paging domains -------------------------------------------------------------------------
    @hookimpl
    def domain_alloc_user(
        self,
        iommu: IommuHw,
        dev: PciDevice,
        flags: int,
        parent: api.Domain | None,
        viommu: api.ViommuBase | None,
        user_data: api.UserData | None,
    ) -> api.Domain:
        """arm_smmu_domain_alloc_paging_flags() without ``parent`` (user data refused,
        unread); arm_vsmmu_alloc_domain_nested() with one."""
        if parent is None:
            if user_data is not None:
                raise err(errno.EOPNOTSUPP, "arm_smmuv3 paging domains take no user data")
            return self._alloc_paging(iommu, flags)
        if user_data is None:
            raise err(errno.EOPNOTSUPP, "a nested domain needs iommu_hwpt_arm_smmuv3 data")
        return self._alloc_nested(viommu, flags, user_data.type, user_data.read())

    def _alloc_paging(self, iommu: IommuHw, flags: int) -> SmmuDomain:
        """arm_smmu_domain_alloc_paging_flags(): flags 0 is stage 1 when the SMMU has it
        (IDR0.S1P), else stage 2; NEST_PARENT is stage 2 and needs both stages (NESTING);
        DIRTY_TRACKING and PASID are stage 1 only; EOPNOTSUPP otherwise."""
        smmu = smmu_of(iommu)
        if flags & ~PAGING_FLAGS:
            raise err(errno.EOPNOTSUPP, f"arm_smmuv3 paging flags {flags:#x}")
        dirty = bool(flags & U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
        if dirty and not smmu.dbm_capable:
            # the core's IOMMU_CAP_DIRTY_TRACKING check (arm_smmu_dbm_capable)
            raise err(
                errno.EOPNOTSUPP,
                f"arm_smmu_dbm_capable(): IDR0.HTTU is {smmu.idr0_httu}, no dirty-state "
                "update on this SMMU",
            )
        nest = flags == U.IOMMU_HWPT_ALLOC_NEST_PARENT
        if flags & U.IOMMU_HWPT_ALLOC_NEST_PARENT and not nest:
            raise err(errno.EOPNOTSUPP, "a nest parent takes no other flag")
        if nest and not smmu.feat_nesting:
            raise err(errno.EOPNOTSUPP, "a nest parent needs both stages (IDR0.S1P and S2P)")
        if flags and not nest and not smmu.feat_s1:
            raise err(errno.EOPNOTSUPP, "dirty tracking and PASID need stage 1 (IDR0.S1P)")
        pasid = bool(flags & U.IOMMU_HWPT_ALLOC_PASID)
        stage = 2 if nest or not smmu.feat_s1 else 1
        return SmmuDomain(smmu, stage, nest_parent=nest, pasid=pasid, dirty_tracking=dirty)

    @hookimpl
    def domain_free(self, domain: api.Domain) -> None:
        if isinstance(domain, SmmuDomain):
            domain.free()

    # -- attach ---------------------------------------------------------------------------------
    @hookimpl
    def attach(self, iommu: IommuHw, dev: PciDevice, domain: api.Domain | None) -> None:
        smmu = smmu_of(iommu)
        master = master_of(dev)
        if domain is None:
            smmu.attach_blocked(master)
        elif isinstance(domain, NestedDomain):
            self._attach_nested(smmu, master, domain)
        else:
            d = _paging(domain)
            if d.smmu is not smmu:
                raise err(errno.EINVAL, "domain belongs to another SMMU")
            smmu.attach_paging(master, d)
        master.domain = domain

    def _attach_nested(self, smmu: SmmuDevice, master: Master, domain: NestedDomain) -> None:
        """arm_smmu_attach_dev_nested(): EATS from the vSTE only for a translating vSTE
        (a bypass or abort vSTE keeps the device's own ATS), the merged STE, commit."""
        vsmmu = domain.vsmmu
        if vsmmu.smmu is not smmu:
            raise err(errno.EINVAL, "vSMMU belongs to another SMMU")
        if smmu.ssids_in_use(master):
            raise err(errno.EBUSY, "substreams in use: no nested STE over the CD table")
        vsid = next((v for v, m in vsmmu.vsids.items() if m is master), None)
        # arm_smmu_attach_prepare_vmaster(), before anything changes
        if vsid is None and domain.cfg not in (CFG_ABORT, CFG_BYPASS):
            raise err(errno.ENOENT, "a translating nested domain needs a vDEVICE first")
        state = AttachState(master, master.domain)
        if get(domain.ste0, 3, 1) == CFG_S1_TRANS:
            state.disable_ats = not domain.enable_ats
        smmu.attach_prepare(state, domain)
        words = smmu.make_nested_ste(
            master, vsmmu.s2_parent, domain.ste0, domain.ste1, state.ats_enabled
        )
        smmu.write_ste(master, words)
        master.vmaster = (vsmmu, vsid) if vsid is not None else None
        smmu.attach_commit(state)

    # -- dirty tracking: arm_smmu_dirty_ops ----------------------------------------------------
    @hookimpl
    def set_dirty_tracking(self, domain: api.Domain, enable: bool) -> None:
        """arm_smmu_set_dirty_tracking(): nothing to do. A dirty-tracking domain's CD has HA
        and HD from its first attach on; the core wipes the bits before enabling."""
        _paging(domain)

    @hookimpl
    def read_and_clear_dirty(
        self, domain: api.Domain, iova: int, length: int, clear: bool, report: bool
    ) -> list[tuple[int, int]]:
        """arm_lpae_read_and_clear_dirty(): writable-dirty leaves (DBM, AP[2] clear) are
        reported and, unless NO_CLEAR, made writable-clean (AP[2] set). Whether tracking is
        on does not matter (7.2 refuses nothing here), and no TLBI follows: the core's
        iotlb_sync gets a gather without a page size, which arm_smmu_iotlb_sync skips."""
        d = _paging(domain)
        if not d.dirty_tracking or d.stage != 1:
            raise err(errno.EINVAL, "not a stage-1 dirty-tracking domain")
        runs = d.pt.read_and_clear_dirty(iova, length, clear)
        return runs if report else []

    # -- substreams ---------------------------------------------------------------------------
    @hookimpl
    def set_dev_pasid(self, iommu: IommuHw, dev: PciDevice, pasid: int, domain: api.Domain) -> None:
        """arm_smmu_s1_set_dev_pasid() (also a replace of the PASID's domain)."""
        smmu = smmu_of(iommu)
        if not isinstance(domain, SmmuDomain):
            raise err(errno.EINVAL, "only paging domains attach to a PASID")
        smmu.set_pasid(master_of(dev), domain, pasid)

    @hookimpl
    def remove_dev_pasid(self, iommu: IommuHw, dev: PciDevice, pasid: int) -> None:
        smmu_of(iommu).remove_pasid(master_of(dev), pasid)

    # -- nested domains and the vSMMU -------------------------------------------------------------
    def _alloc_nested(
        self, viommu: api.ViommuBase | None, flags: int, data_type: int, data: bytes
    ) -> NestedDomain:
        """arm_vsmmu_alloc_domain_nested(): only on a vSMMU, from a validated vSTE."""
        if not isinstance(viommu, Vsmmu):
            raise err(errno.EOPNOTSUPP, "SMMUv3 nested domains are allocated on a vIOMMU")
        if flags:
            raise err(errno.EOPNOTSUPP, f"nested flags {flags:#x}")
        if data_type != U.IOMMU_HWPT_DATA_ARM_SMMUV3:
            raise err(errno.EINVAL, f"data_type {data_type} is not IOMMU_HWPT_DATA_ARM_SMMUV3")
        arg = U.IommuHwptArmSmmuv3.unpack(api.iommu_copy_struct_from_user(data, VSTE_SIZE))
        ste0, ste1, ats = validate_vste(arg.ste0, arg.ste1)
        return NestedDomain(viommu, ste0, ste1, ats)

    @hookimpl
    def get_viommu_size(self, iommu: IommuHw, dev: PciDevice, viommu_type: int) -> int:
        """``arm_smmu_get_viommu_size()``: no vIOMMU without both stages (FEAT_NESTING), nor
        for a device that is not CANWBS on an SMMU without S2FWB (VFIO does no cache
        maintenance, so a VM must not be able to make DMA non-coherent); then the SMMUv3 type,
        or the Tegra241 CMDQV type where the CMDQV is present (``tegra241_cmdqv_get_vintf_size``).
        """
        smmu = smmu_of(iommu)
        if not smmu.feat_nesting:
            return 0
        if not master_of(dev).canwbs and not smmu.feat_s2fwb:
            return 0
        if viommu_type == U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3:
            return 1
        if viommu_type == U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV and smmu.hw.cmdqv is not None:
            return 1
        return 0

    @hookimpl
    def viommu_alloc(
        self,
        iommu: IommuHw,
        dev: PciDevice,
        parent: api.Domain,
        viommu_type: int,
        data: bytes,
        mmap: MmapOwner,
    ) -> Vsmmu:
        """arm_vsmmu_init(): the vSMMU takes the nest parent's VMID; a CMDQV type also gets
        a guest VINTF (tegra241_cmdqv_init_vintf_user)."""
        smmu = smmu_of(iommu)
        cmdqv = smmu.hw.cmdqv
        if not self.get_viommu_size(iommu, dev, viommu_type):
            raise err(errno.EOPNOTSUPP, f"no vSMMU of type {viommu_type} for this device")
        tegra = viommu_type == U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV
        s2 = _paging(parent)
        if s2.smmu is not smmu or s2.stage != 2:
            raise err(errno.EINVAL, "parent is not a stage-2 domain of this SMMU")
        if not tegra:
            return Vsmmu(smmu, s2)
        assert cmdqv is not None
        api.iommu_copy_struct_from_user(data, CMDQV_DATA_SIZE)  # no data at all is EINVAL too
        free = [v for v in cmdqv.vintfs[1:] if v.idx not in smmu.vintf_owners]
        if not free:
            raise err(errno.ENOSPC, "no more available VINTF")
        vintf = free[0]
        vsmmu = VintfVsmmu(smmu, s2, vintf)
        vintf.reset()
        vintf.configure(vsmmu.vmid, enable=True)
        try:
            vsmmu.expose(mmap)
        except OSError:
            vintf.reset()  # tegra241_vintf_hw_deinit()
            raise
        vintf.error_irq.append(self._vintf_error)
        smmu.vintf_owners[vintf.idx] = vsmmu
        return vsmmu

    @staticmethod
    def _vintf_error(vintf: Vintf) -> None:
        """tegra241_vintf_user_handle_error(): the LVCMDQ error map goes to the guest."""
        smmu = smmu_of(vintf.cmdqv.hw)
        vsmmu = smmu.vintf_owners.get(vintf.idx)
        if vsmmu is not None and vsmmu.core is not None:
            data = pack([vintf.err_map & U64_MASK, vintf.err_map >> 64])
            report_event_from_irq(vsmmu.core, U.IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV, data)

    @hookimpl
    def viommu_destroy(self, viommu: api.ViommuBase) -> None:
        if isinstance(viommu, VintfVsmmu):
            vintf = viommu.vintf
            if viommu.mmap is not None:  # tegra241_cmdqv_destroy_vintf_user()
                viommu.mmap.destroy(viommu.mmap_offset)
                viommu.mmap = None
            vintf.reset()
            vintf.error_irq.clear()
            viommu.smmu.vintf_owners.pop(vintf.idx, None)

    @hookimpl
    def vdevice_alloc(self, viommu: api.ViommuBase, dev: PciDevice, virt_id: int) -> Vdevice:
        if not isinstance(viommu, Vsmmu):
            raise err(errno.EINVAL, "not a vSMMU")
        master = master_of(dev)
        sidx = -1
        if isinstance(viommu, VintfVsmmu):
            # tegra241_vintf_init_vsid(): a free SID_MATCH / SID_REPLACE pair.
            if virt_id > VSID_MAX:
                raise err(errno.EINVAL, "a CMDQV vSID fits SID_MATCH.VIRT_SID (20 bits)")
            vintf = viommu.vintf
            used = {v.sidx for v in viommu.vdevs.values()}
            sidx = next((i for i in range(len(vintf.sid_match)) if i not in used), -1)
            if sidx < 0:
                raise err(errno.ENOSPC, "no free SID_MATCH slot in the VINTF")
            vintf.sid_replace[sidx] = master.sid
            vintf.sid_match[sidx] = (virt_id << 1) | SID_MATCH_VALID
        viommu.vsids[virt_id] = master
        vdev = Vdevice(viommu, dev, virt_id, sidx)
        if isinstance(viommu, VintfVsmmu):
            viommu.vdevs[virt_id] = vdev
        return vdev

    @hookimpl
    def vdevice_destroy(self, vdev: api.VdeviceBase) -> None:
        vsmmu = vdev.viommu
        if isinstance(vsmmu, Vsmmu):
            master = vsmmu.vsids.pop(vdev.virt_id, None)
            if master is not None and master.vmaster is not None and master.vmaster[0] is vsmmu:
                master.vmaster = None
        if isinstance(vsmmu, VintfVsmmu) and isinstance(vdev, Vdevice) and vdev.sidx >= 0:
            vsmmu.vintf.sid_match[vdev.sidx] = 0
            vsmmu.vintf.sid_replace[vdev.sidx] = 0
            vsmmu.vdevs.pop(vdev.virt_id, None)

    # -- CMDQV hardware queues ----------------------------------------------------------------
    @hookimpl
    def hw_queue_supported(self, viommu: api.ViommuBase, queue_type: int) -> bool:
        """tegra241_vintf_get_hw_queue_size(): only CMDQV queues, only on a VINTF vIOMMU."""
        return queue_type == U.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV and isinstance(viommu, VintfVsmmu)

    @hookimpl
    def hw_queue_alloc(
        self,
        viommu: api.ViommuBase,
        queue_type: int,
        index: int,
        base_iova: int,
        length: int,
        pfns: list[int],
    ) -> Vcmdq:
        """tegra241_vintf_alloc_lvcmdq_user(): hand guest queue memory to a logical VCMDQ."""
        if queue_type != U.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV or not isinstance(viommu, VintfVsmmu):
            raise err(errno.EOPNOTSUPP, f"hw_queue type {queue_type} on this vIOMMU")
        vintf = viommu.vintf
        if index >= len(vintf.lvcmdqs):
            raise err(errno.EINVAL, f"LVCMDQ index {index} beyond the VINTF's queues")
        q = vintf.lvcmdqs[index]
        if q.allocated:
            raise err(errno.EEXIST, "LVCMDQ already allocated")
        if index and not vintf.lvcmdqs[index - 1].allocated:
            raise err(errno.EIO, "LVCMDQs must be allocated in ascending order")
        cmdqs = get(viommu.smmu.hw.mmio.read(R.IDR1, 4), 25, 21)
        if length & (length - 1) or length < 32 or length > 1 << (cmdqs + 4):
            raise err(errno.EINVAL, "queue length must be a power of two in [32, 2^(CMDQS+4)]")
        base_pa = (pfns[0] << PAGE_SHIFT) | (base_iova & (PAGE_SIZE - 1))
        if base_pa & ~VCMDQ_ADDR or base_pa & (length - 1):
            raise err(errno.EINVAL, "queue memory must be aligned to its length")
        q.reset()
        q.allocated = True
        q.base = base_pa | ((length.bit_length() - 1) - 4)  # LOG2SIZE in 16-byte entries
        queue = Vcmdq(viommu, index, base_iova, length)
        if index:
            # The kernel makes each LVCMDQ depend on the previous one: destroy is descending.
            queue.depend(viommu.queues[index - 1])
        viommu.queues[index] = queue
        return queue

    @hookimpl
    def hw_queue_destroy(self, queue: api.HwQueueBase) -> None:
        """tegra241_vintf_destroy_lvcmdq_user(): disable, flush a pending timeout, unmap."""
        if isinstance(queue, Vcmdq):
            q = queue.vintf.lvcmdqs[queue.index]
            q.reset()
            q.allocated = False
            vsmmu = queue.viommu
            if isinstance(vsmmu, VintfVsmmu):
                vsmmu.queues.pop(queue.index, None)
            smmu_of(queue.vintf.cmdqv.hw).issue([])  # a CMD_SYNC on the main queue

    @hookimpl
    def cache_invalidate_user(
        self, target: api.Domain | api.ViommuBase, data_type: int, entries: list[bytes]
    ) -> api.InvalidateResult | None:
        """arm_vsmmu_cache_invalidate(): guest commands, vSID -> pSID and the VMID enforced."""
        if not isinstance(target, Vsmmu):
            return None  # SMMUv3 nested domains have no cache_invalidate_user
        # iommu_copy_struct_from_full_user_array(): the type, then an empty array, is EINVAL.
        if data_type != U.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3 or not entries:
            return api.InvalidateResult(0, errno.EINVAL)
        try:
            raw = [api.copy_struct_from_user(e, VCMD_SIZE) for e in entries]
        except OSError as exc:
            return api.InvalidateResult(0, exc.errno or errno.EINVAL)
        smmu = target.smmu
        batch: list[tuple[int, int]] = []
        for index, entry in enumerate(raw):
            cmd = self._convert_user_cmd(target, C.decode(entry))
            if cmd is None:
                # As the kernel: converted but not yet issued entries of this batch are dropped.
                return api.InvalidateResult(index, errno.EIO)
            batch.append(cmd)
            if index + 1 != len(raw) and len(batch) != CMDQ_BATCH_ENTRIES - 1:
                continue
            try:
                smmu.issue(batch)
            except OSError as exc:
                return api.InvalidateResult(index, exc.errno or errno.EIO)
            batch = []
        return api.InvalidateResult(len(raw))

    @staticmethod
    def _convert_user_cmd(vsmmu: Vsmmu, cmd: tuple[int, int]) -> tuple[int, int] | None:
        w0, w1 = cmd
        opcode = C.op(w0)
        if opcode not in VSMMU_OPCODES:
            return None
        if opcode == C.TLBI_NSNH_ALL:
            return C.tlbi_nh_all(vsmmu.vmid)
        if opcode in (C.TLBI_NH_VA, C.TLBI_NH_VAA, C.TLBI_NH_ALL, C.TLBI_NH_ASID):
            return (w0 & ~C.CMD0_TLBI_VMID) | put(vsmmu.vmid, 47, 32), w1
        master = vsmmu.vsids.get(get(w0, 63, 32))
        if master is None:
            return None
        return (w0 & ~C.CMD0_SID) | put(master.sid, 63, 32), w1

    # -- the guest model ------------------------------------------------------------------------
    @hookimpl
    def guest_iommu_alloc(self, vm: Vm, iommu: IommuHw, accelerated: bool) -> GuestSmmuv3:
        """The guest's arm-smmu-v3 driver and the VMM's vSMMU; accelerated = CMDQV VCMDQ.
        A host SMMU without both stages can hold no nest parent, so the VMM's vSMMU over
        iommufd cannot start (EOPNOTSUPP, as the VT-d model's QEMU rule; model's reading)."""
        if not smmu_of(iommu).feat_nesting:
            raise err(errno.EOPNOTSUPP, "the host SMMU lacks a stage: no nested vSMMU")
        if accelerated and smmu_of(iommu).hw.cmdqv is None:
            raise err(errno.EOPNOTSUPP, "this SMMU has no CMDQV")
        hw = smmu_of(iommu).hw
        return GuestSmmuv3(
            vm,
            iommu,
            accelerated=accelerated,
            idr5=hw.mmio.read(R.IDR5, 4),  # what hw_info hands the VMM
            page_shift=hw.guest_page_shift,
        )

    # -- IO page faults ------------------------------------------------------------------------
    @hookimpl
    def page_response(
        self, iommu: IommuHw, dev: PciDevice, pasid: int | None, grpid: int, code: int
    ) -> None:
        """The user's answer from the FAULT queue: CMD_RESUME of the stalled transaction."""
        smmu_of(iommu).page_response(master_of(dev), grpid, code)


plugin = ArmSmmuV3Driver()
