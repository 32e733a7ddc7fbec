"""The Linux AMD IOMMU driver's hooks (drivers/iommu/amd/{init,iommu,nested,iommufd}.c): it
programs the hardware only through MMIO, the device table, page tables and the command
buffer, and waits for its commands with COMPLETION_WAIT like the kernel does. The per-IOMMU
logic is in :mod:`iommufd_amd.kernel`, the domains in :mod:`iommufd_amd.domain`.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Any

from iommufd_amd import commands as C
from iommufd_amd import regs as R
from iommufd_amd.domain import AmdDomain, AmdNestedDomain
from iommufd_amd.dte import (
    GUEST_PGTABLE_4_LEVEL,
    GUEST_PGTABLE_5_LEVEL,
    Dte,
)
from iommufd_amd.hw import AmdIommu
from iommufd_amd.kernel import AmdKernel, DevData
from iommufd_amd.option_sets import OPTION_SETS
from iommufd_amd.viommu import AmdHwQueue, AmdViommu
from iommufd_amd.viommu import kernel as VK
from iommufd_amd.viommu.hw import IOMMU_DEVID, MAX_GUESTS, VfMmioWindow
from iommufd_model.api import (
    Domain,
    DriverInfo,
    Feature,
    HwInfo,
    HwQueueBase,
    InvalidateResult,
    UserData,
    VdeviceBase,
    ViommuBase,
    driver_state,
    err,
    hookimpl,
    iommu_copy_struct_from_user,
)
from iommufd_model.hw.iommu import IommuHw
from iommufd_model.hw.pci import PciDevice
from iommufd_model.machine import Machine
from iommufd_model.paging import PagingDomainOps
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_model.core.mmap import MmapOwner
    from iommufd_model.vmm import GuestIommu, Vm

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
#: What the 7.2 driver refuses as well (the matrix says "unsupported upstream", naming it).
UNSUPPORTED_UPSTREAM = {
    Feature.IOPF: (
        "Linux 7.2 drivers/iommu/amd/ppr.c: iommu_call_iopf_notifier aborts requests without "
        "a PASID, and io-pgfault.c find_fault_handler finds no handler at a PASID (AMD paging "
        "domains have no set_dev_pasid, no user_pasid_table), so iopf_error_response answers"
    ),
    Feature.PASID: (
        "Linux 7.2 drivers/iommu/amd/iommu.c:2664 amdv1_ops and :2741 amdv2_ops have no "
        "set_dev_pasid (only the SVA domain, amd/pasid.c:178, has one), so "
        "iommu.c:3640 iommu_attach_device_pasid gives EOPNOTSUPP"
    ),
    Feature.HWPT_INVALIDATE: (
        "Linux 7.2 drivers/iommu/amd/nested.c:296 nested_domain_ops has no "
        "cache_invalidate_user, so iommufd/hw_pagetable.c:533 gives EOPNOTSUPP"
    ),
}


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
    # struct iommu_hwpt_amd_guest: its one member, dte, is its min_last
    words: tuple[int, int, int, int] = _GDTE.unpack(iommu_copy_struct_from_user(data, _GDTE.size))
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
            option_sets=OPTION_SETS,
            unsupported_upstream=UNSUPPORTED_UPSTREAM,
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
        if not 2 <= int(options.get("domain_levels", 3)) <= host_levels:
            # generic_pt amdv1_iommu_fmt_init(): starting_level 1..PT_MAX_TOP_LEVEL, Mode 2..
            raise err(errno.EINVAL, "domain_levels (the starting Mode) is 2..host_levels")
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
    def domain_free(self, domain: Domain) -> None:
        if isinstance(domain, AmdNestedDomain):
            domain.viommu.put_hdom(domain.gdom_id)
        elif isinstance(domain, AmdDomain):
            domain.free()

    # -- attach ------------------------------------------------------------------------------
    @hookimpl
    def attach(self, iommu: IommuHw, dev: PciDevice, domain: Domain | None) -> None:
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
                    return  # the device's current domain: nothing to do
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
            return
        if isinstance(old, AmdDomain):
            k.detach_device(dd)
        dd.domain = None
        if domain is None:
            k.update_dte(dev, clear=True)
            return
        assert isinstance(domain, AmdDomain)
        if domain.v2:
            k.get_gcr3(dd).set(0, domain.pt.root)  # init_gcr3_table(): update_gcr3(pasid 0)
            dd.giov = True
            k.flush_pasid(dd, 0)
            k.enable_pri(dd)  # pdev_enable_caps() + amd_iommu_iopf_add_device()
        dd.domain = domain
        domain.attached.add((dev.rid, 0))
        k.update_dte(dev)

    @hookimpl
    def set_dev_pasid(self, iommu: IommuHw, dev: PciDevice, pasid: int, domain: Domain) -> None:
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
    def remove_dev_pasid(self, iommu: IommuHw, dev: PciDevice, pasid: int) -> None:
        """blocked_domain_set_dev_pasid(): nothing can be attached to a PASID through
        iommufd (see set_dev_pasid), so there is nothing to remove."""
        _kernel(iommu)

    # -- dirty tracking ------------------------------------------------------------------------
    @hookimpl
    def set_dirty_tracking(self, domain: Domain, enable: bool) -> None:
        """amd_iommu_set_dirty_tracking(): DTE HAD for every device, then flush."""
        dom = _paging(domain)
        if dom.dirty_enabled == enable:
            return
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
    ) -> None:
        """amd_iommu_page_response() -> amd_iommu_complete_ppr(): the response code goes into
        Status as it is (SUCCESS 0, INVALID 1, FAILURE 2; build_complete_ppr masks 4 bits); no
        wait. GN and the PASID follow the device's ``pri_tlp`` (its PRI capability's "PRG
        Response PASID Required" bit, read when PRI was enabled), not the response."""
        k = _kernel(iommu)
        k.complete_ppr(k.dev_data[dev.rid], pasid or 0, code, grpid)

    # -- vIOMMU ------------------------------------------------------------------------------------
    @hookimpl
    def get_viommu_size(self, iommu: IommuHw, dev: PciDevice, viommu_type: int) -> int:
        """``amd_iommufd_get_viommu_size()``. Linux 7.2's ignores the type; the model offers
        only ``IOMMU_VIOMMU_TYPE_AMD``, the type of AMD's tree (docs/parity-amd.md)."""
        return 1 if viommu_type == U.IOMMU_VIOMMU_TYPE_AMD else 0

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
        mandatory ``struct iommu_viommu_amd`` (EINVAL without it), copied with
        ``iommu_copy_struct_from_user(..., min_last = its last member)``: any length but the
        struct's is EINVAL, a tail of zeros too (never E2BIG). Then the vIOMMU takes a guest
        ID, a translate DeviceID and its PAS slice (ENOSPC when either pool is empty).
        Without the HW-vIOMMU it is Linux 7.2's: the data is unused."""
        k = _kernel(iommu)
        if viommu_type != U.IOMMU_VIOMMU_TYPE_AMD:
            raise err(errno.EOPNOTSUPP, f"viommu type {viommu_type}")
        dom = _paging(parent)
        if dom.v2 or not dom.nest_parent or not k.nest_parent_supported():
            raise err(errno.EINVAL, "an AMD vIOMMU needs a v1 nest-parent domain")
        assert isinstance(iommu, AmdIommu)
        viommu = AmdViommu(iommu, dom, viommu_type)
        if k.pas is not None:
            iommu_copy_struct_from_user(data, U.IommuViommuAmd.SIZE)
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
    def viommu_destroy(self, viommu: ViommuBase) -> None:
        if isinstance(viommu, AmdViommu):
            if viommu.mmap is not None:
                viommu.mmap.destroy(viommu.vfmmio_mmap_offset)  # iommufd_viommu_destroy_mmap()
                viommu.mmap = None
            VK.viommu_uninit_one(_kernel(viommu.hw), viommu)
            parent = viommu.parent
            if isinstance(parent, AmdDomain) and viommu in parent.viommus:
                parent.viommus.remove(viommu)

    @hookimpl
    def vdevice_alloc(self, viommu: ViommuBase, dev: PciDevice, virt_id: int) -> VdeviceBase:
        """_amd_viommu_vdevice_init(): the DevID mapping-table entry gDevID -> hDevID and the
        device's guest IDs for its next nested attach (HW-vIOMMU); otherwise the core-only
        vDEVICE object."""
        if isinstance(viommu, AmdViommu) and viommu.gid:
            VK.vdevice_map(_kernel(viommu.hw), viommu, dev.rid, virt_id, True)
        return VdeviceBase(viommu, dev, virt_id)

    @hookimpl
    def vdevice_destroy(self, vdev: VdeviceBase) -> None:
        viommu = vdev.viommu
        if isinstance(viommu, AmdViommu) and viommu.gid and vdev.virt_id in viommu.gdevids:
            VK.vdevice_map(_kernel(viommu.hw), viommu, vdev.dev.rid, vdev.virt_id, False)

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
    def hw_queue_destroy(self, queue: HwQueueBase) -> None:
        if isinstance(queue, AmdHwQueue):
            VK.hw_queue_fini(queue)

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
