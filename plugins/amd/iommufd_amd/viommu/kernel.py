"""The host driver's side of the HW-vIOMMU, after AMD's own implementation on iommufd
(AMDESE/linux-iommu ``viommu.c``, ``iommufd.c``, ``nested.c``, ``trans_devid.c``,
``vfctrl_mmio.c``): ``amd_viommu_init`` (private address space, the IOMMU's own DTE, the
GstBufferTRPMode / VCMD_EN / VIOMMU_EN enable), ``amd_iommufd_viommu_init`` (guest ID, translate
DeviceID, RESET_VMMIO, translate DTE, mapping tables all mapped and valid), the HW queue init and
the VMM-mediated invalidation (the model's own uAPI type).

The driver owns the IOMMU Private Address space (PAS): a v1 page table (its own DomainID) that
the IOMMU's own DTE points at, mapping the guest MMIO region at PAS 0, the command-buffer
dirty-status region at PAS 0x400000 and, per guest ID, the DevID and DomID mapping tables. It
programs per-guest hardware state only through the guest's VF control MMIO and commands on
the host command buffer; it never writes a guest's MMIO slot (RESET_VMMIO clears it).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from iommufd_amd import commands as C
from iommufd_amd import regs as R
from iommufd_amd.domain import AmdDomain
from iommufd_amd.dte import Dte
from iommufd_amd.pgtable_v1 import AmdV1PageTable
from iommufd_amd.viommu import AmdHwQueue, AmdViommu
from iommufd_amd.viommu.hw import IOMMU_DEVID
from iommufd_amd.viommu.trans_devid import TransDevIdPool
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE, InvalidateResult
from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE
from iommufd_model.ida import Ida
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_amd.hw import AmdIommu
    from iommufd_amd.kernel import AmdKernel

PAS_MODE = 4  # a 4-level v1 table covers the 48-bit private address space
RW = IOMMU_READ | IOMMU_WRITE
MIN_QUEUE = 256 * R.ENTRY_SIZE  # 256 entries: the smallest legal buffer (LEN_MIN)
MAX_QUEUE = 1 << 19  # VIOMMU_GUEST_CMDBUF_SIZE: 32 Ki entries (Len 15)
DEVID_TABLE_PAGES = R.PAS_DEVID_MAP_SIZE // PAGE_SIZE
DOMID_TABLE_PAGES = R.PAS_DOMID_MAP_SIZE // PAGE_SIZE
DIRTY_PAGES = R.PAS_CMDBUF_DIRTY_SIZE // PAGE_SIZE
#: HW queue type -> (VFCTRL register, the enable bits a running queue has there)
QUEUE_REGS = {
    U.IOMMU_HW_QUEUE_TYPE_AMD_CMD: (R.VFCTRL_CMD_CONTROL, R.GCMD_CMDBUF_EN),
    U.IOMMU_HW_QUEUE_TYPE_AMD_EVT: (R.VFCTRL_EVT_CONTROL, R.GEVT_LOG_EN),
    U.IOMMU_HW_QUEUE_TYPE_AMD_PPR: (R.VFCTRL_PPR_CONTROL, R.GPPR_LOG_EN | R.GPPR_EN),
}


class PasState:
    """The driver's PAS: its table, DomainID, the backing of the fixed regions, the guest-ID
    pool and the translate-DeviceID pool of the IOMMU's PCI segment."""

    def __init__(self, k: AmdKernel, max_guests: int) -> None:
        self.domid = k.domids.alloc()
        self.pt = AmdV1PageTable(k.mem, PAS_MODE)
        pages = -(-((max_guests + 1) * R.PAS_GUEST_MMIO_ENTRY) // PAGE_SIZE)
        self.mmio_frames = k.mem.alloc_frames(pages)
        for i, pfn in enumerate(self.mmio_frames):
            self.pt.map(R.PAS_GUEST_MMIO_BASE + i * PAGE_SIZE, pfn << PAGE_SHIFT, PAGE_SIZE, RW)
        self.dirty_frames = k.mem.alloc_frames(DIRTY_PAGES)
        for i, pfn in enumerate(self.dirty_frames):
            self.pt.map(R.PAS_CMDBUF_DIRTY_BASE + i * PAGE_SIZE, pfn << PAGE_SHIFT, PAGE_SIZE, RW)
        # The page-table skeleton of every guest's mapping-table slots, built up front (the
        # kernel allocates its private subregions at init too): a vIOMMU then only fills and
        # clears leaf entries, and teardown leaves the PAS table exactly as it found it.
        for base, size in (
            (R.PAS_DEVID_MAP_BASE, R.PAS_DEVID_MAP_SIZE),
            (R.PAS_DOMID_MAP_BASE, R.PAS_DOMID_MAP_SIZE),
        ):
            pfn = k.mem.alloc_frame()
            for addr in range(base + size, base + (max_guests + 1) * size, size):
                self.pt.map(addr, pfn << PAGE_SHIFT, PAGE_SIZE, RW)
                self.pt.unmap(addr, PAGE_SIZE)
            k.mem.put_frame(pfn)
        self.gids = Ida("guest ID", 1, max_guests, owner=k.hw)  # the gid IDA
        self.by_gid: dict[int, AmdViommu] = {}
        self.trans = TransDevIdPool()

    def dirty_bit(self, gid: int) -> tuple[int, int]:
        """(system address of the u64, bit) of ``gid`` in the command-buffer dirty-status
        region, where AMD's ``viommu_clear_dirty_status_mask()`` finds it."""
        off = ((gid & 0xFF) << 4) | (((gid >> 13) & 0x7) << 2)
        pa = (self.dirty_frames[off // PAGE_SIZE] << PAGE_SHIFT) + off % PAGE_SIZE
        return pa, (gid >> 8) & 0x1F


def viommu_enable(k: AmdKernel) -> bool:
    """viommu_enable(): GstBufferTRPMode is set and read back (the hardware keeps the bit only
    if it supports it), then VCMD_EN and VIOMMU_EN. False when the bit does not stick."""
    mmio = k.hw.mmio
    mmio.write(R.CONTROL, mmio.read(R.CONTROL) | R.CTRL_GSTBUFFERTRPMODE)
    if not mmio.read(R.CONTROL) & R.CTRL_GSTBUFFERTRPMODE:
        return False
    mmio.write(R.CONTROL, mmio.read(R.CONTROL) | R.CTRL_VCMD_EN)
    mmio.write(R.CONTROL, mmio.read(R.CONTROL) | R.CTRL_VIOMMU_EN)
    return True


def viommu_init(k: AmdKernel) -> None:
    """amd_viommu_init(): enable (EINVAL, recorded in ``k.viommu_error``, when GstBufferTRPMode
    does not stick: no HW-vIOMMU then), the PAS and the IOMMU's own DTE."""
    hw = k.hw
    if hw.vi is None or not k.efr & R.EFR_VIOMMU_SUP:
        return
    # The model checks the enable first so that a failure leaves nothing behind; AMD's
    # viommu_enable() runs after the PAS is built.
    if not viommu_enable(k):
        k.viommu_error = errno.EINVAL
        return
    pas = k.pas = PasState(k, hw.vi.max_guests)
    pas.trans.reserve(IOMMU_DEVID, _no_relocation)  # the IOMMU's own function is in use
    k.write_dte(
        IOMMU_DEVID,
        Dte(
            v=True,
            tv=True,
            mode=PAS_MODE,
            host_root=pas.pt.root,
            ir=True,
            iw=True,
            domain_id=pas.domid,
        ),
    )
    k.queue(C.inv_devtab_entry(IOMMU_DEVID))
    k.completion_wait()


def _no_relocation(owner: object, old: int, new: int) -> None:
    raise AssertionError("no vIOMMU exists before the PAS")


def map_command(hw: AmdIommu, gid: int, *, domain: bool, gid_: int, hid: int) -> None:
    """amd_viommu_set_device_mapping() / amd_viommu_domain_id_update(): one VFCTRL map command
    (WRITE[63] | gID[61:46] | hID[29:14] | VALID[0]); clearing is mapping to a default host ID."""
    assert hw.vi is not None
    val = (
        R.MAPCTL_GO
        | (gid_ & 0xFFFF) << R.MAPCTL_GID_SHIFT
        | (hid & 0xFFFF) << R.MAPCTL_HID_SHIFT
        | R.MAPCTL_VALID
    )
    off = R.VFCTRL_DID_MAP_CONTROL1 if domain else R.VFCTRL_DID_MAP_CONTROL0
    hw.vi.vfctrl_write(gid, off, val)


def viommu_clear_mapping(k: AmdKernel, viommu: AmdViommu) -> None:
    """viommu_clear_mapping(): every gDomID 0..0xFFFF maps to the nest parent's DomainID and every
    gDevID to hDevID 0, all valid, so the hardware never meets an unmapped ID. AMD's driver
    issues one VFCTRL map command per ID; the model hands the hardware the same 2 x 64 Ki
    commands in one call (:meth:`ViommuHw.map_all`)."""
    vi = k.hw.vi
    assert vi is not None
    vi.map_all(viommu.gid, R.VFCTRL_DID_MAP_CONTROL1, _parent(viommu).id)
    vi.map_all(viommu.gid, R.VFCTRL_DID_MAP_CONTROL0, 0)


def _parent(viommu: AmdViommu) -> AmdDomain:
    parent = viommu.parent
    assert isinstance(parent, AmdDomain)
    return parent


def _flush_pas(k: AmdKernel, addr: int, size: int) -> None:
    """amd_iommu_flush_private_vm_region()."""
    assert k.pas is not None
    k.queue(C.inv_iommu_pages(k.pas.domid, addr, size, pde=True))


def _table_addr(gid: int, i: int) -> int:
    if i < DEVID_TABLE_PAGES:
        return R.PAS_DEVID_MAP_BASE + gid * R.PAS_DEVID_MAP_SIZE + i * PAGE_SIZE
    return R.PAS_DOMID_MAP_BASE + gid * R.PAS_DOMID_MAP_SIZE + (i - DEVID_TABLE_PAGES) * PAGE_SIZE


def set_translate_dte(k: AmdKernel, viommu: AmdViommu) -> None:
    """amd_iommu_set_translate_dte(): the translate DeviceID's DTE is the nest parent's v1 table
    under the parent's own DomainID; the guest's buffers are reached through it (stage 2)."""
    parent = _parent(viommu)
    k.write_dte(
        viommu.trans_devid,
        Dte(
            v=True,
            tv=True,
            mode=parent.mode,
            host_root=parent.pt.root,
            ir=True,
            iw=True,
            domain_id=parent.id,
        ),
    )
    k.queue(C.inv_devtab_entry(viommu.trans_devid))
    k.completion_wait()


def clear_translate_dte(k: AmdKernel, devid: int) -> None:
    """amd_iommu_clear_translate_dte()."""
    k.write_dte(devid, Dte())
    k.queue(C.inv_devtab_entry(devid))
    k.completion_wait()


def relocate_trans_devid(k: AmdKernel, owner: object, old: int, new: int) -> None:
    """trans_devid_do_relocate(): a function appeared at the vIOMMU's translate DeviceID; the
    vIOMMU moves to ``new`` (translate DTE, VFCTRL MISC) and the old DTE is cleared."""
    assert isinstance(owner, AmdViommu) and k.hw.vi is not None
    owner.trans_devid = new
    set_translate_dte(k, owner)
    k.hw.vi.vfctrl_write(owner.gid, R.VFCTRL_MISC_CONTROL, new << R.MISC_TRANS_DEVID_SHIFT)
    clear_translate_dte(k, old)


def reset_vmmio(k: AmdKernel, gid: int) -> None:
    """iommu_reset_vmmio(): RESET_VMMIO (VCmd, All) for the guest ID, then COMPLETION_WAIT."""
    k.queue(C.reset_vmmio(gid))
    k.completion_wait()


def viommu_init_one(k: AmdKernel, viommu: AmdViommu) -> None:
    """amd_iommufd_viommu_init() + amd_viommu_init_one(), in AMD's order: guest ID (ENOSPC),
    translate DeviceID (ENOSPC), RESET_VMMIO, translate DTE, VFCTRL MISC, mapping tables mapped
    in the PAS and cleared to valid defaults, the dirty-status bit cleared. All or nothing."""
    hw = k.hw
    assert hw.vi is not None
    pas = k.pas
    assert pas is not None
    gid = pas.gids.alloc()  # ENOSPC when every guest ID is taken
    viommu.gid = gid
    try:
        viommu.trans_devid = pas.trans.alloc(viommu)
    except OSError:
        pas.gids.free(gid)
        viommu.gid = 0
        raise
    reset_vmmio(k, gid)
    set_translate_dte(k, viommu)
    hw.vi.vfctrl_write(gid, R.VFCTRL_MISC_CONTROL, viommu.trans_devid << R.MISC_TRANS_DEVID_SHIFT)
    frames = viommu.table_frames = k.mem.alloc_frames(DEVID_TABLE_PAGES + DOMID_TABLE_PAGES)
    for i, pfn in enumerate(frames):
        pas.pt.map(_table_addr(gid, i), pfn << PAGE_SHIFT, PAGE_SIZE, RW)
    _flush_pas(k, R.PAS_DEVID_MAP_BASE + gid * R.PAS_DEVID_MAP_SIZE, R.PAS_DEVID_MAP_SIZE)
    _flush_pas(k, R.PAS_DOMID_MAP_BASE + gid * R.PAS_DOMID_MAP_SIZE, R.PAS_DOMID_MAP_SIZE)
    k.completion_wait()
    viommu_clear_mapping(k, viommu)
    _clear_dirty(k, gid)
    viommu.window = hw.vi.slot(gid).window
    pas.by_gid[gid] = viommu


def _clear_dirty(k: AmdKernel, gid: int) -> None:
    """viommu_clear_dirty_status_mask(): the driver's own memory, not the guest's MMIO."""
    assert k.pas is not None
    pa, bit = k.pas.dirty_bit(gid)
    k.mem.write_u64(pa, k.mem.read_u64(pa) & ~(1 << bit))


def viommu_uninit_one(k: AmdKernel, viommu: AmdViommu) -> None:
    """amd_iommufd_viommu_destroy() + amd_viommu_uninit_one(): VFCTRL MISC back to 0, the mapping
    tables cleared to valid defaults again, then unmapped and freed, the translate DTE cleared,
    the translate DeviceID and the guest ID given back. (AMD's uninit_one frees the tables
    before it clears them; the model clears first, while the hardware can still reach them.)"""
    hw = k.hw
    gid = viommu.gid
    if not gid or hw.vi is None:
        return
    vi = hw.vi
    pas = k.pas
    assert pas is not None
    vi.vfctrl_write(gid, R.VFCTRL_MISC_CONTROL, 0)
    viommu_clear_mapping(k, viommu)
    for i in range(DEVID_TABLE_PAGES + DOMID_TABLE_PAGES):
        pas.pt.unmap(_table_addr(gid, i), PAGE_SIZE)
    _flush_pas(k, R.PAS_DEVID_MAP_BASE + gid * R.PAS_DEVID_MAP_SIZE, R.PAS_DEVID_MAP_SIZE)
    _flush_pas(k, R.PAS_DOMID_MAP_BASE + gid * R.PAS_DOMID_MAP_SIZE, R.PAS_DOMID_MAP_SIZE)
    k.completion_wait()
    for pfn in viommu.table_frames:
        k.mem.put_frame(pfn)
    viommu.table_frames = []
    _clear_dirty(k, gid)
    clear_translate_dte(k, viommu.trans_devid)
    pas.trans.free(viommu.trans_devid, viommu)
    pas.by_gid.pop(gid, None)
    vi.release(gid)
    pas.gids.free(gid)
    viommu.window = None
    viommu.gid = 0
    viommu.trans_devid = -1


def vdevice_map(k: AmdKernel, viommu: AmdViommu, hdevid: int, gdevid: int, on: bool) -> None:
    """_amd_viommu_vdevice_init(): the device's guest ID and guest DeviceID (written into its
    DTE at the next nested attach) and the DevID mapping-table entry gDevID -> hDevID. Off:
    the entry goes back to hDevID 0 (AMD's tree has no vDEVICE destroy op; the model clears the
    entry the way ``clear_device_mapping()`` does so a stale gDevID reaches nothing)."""
    if on:
        if not 0 <= gdevid <= R.MAX_GDEVID:
            raise err(errno.EINVAL, f"guest DeviceID {gdevid:#x} is not 16 bits")
        if gdevid in viommu.gdevids:
            raise err(errno.EEXIST, f"guest DeviceID {gdevid:#x} is mapped")
        viommu.gdevids[gdevid] = hdevid
    else:
        viommu.gdevids.pop(gdevid, None)
    map_command(k.hw, viommu.gid, domain=False, gid_=gdevid, hid=hdevid if on else 0)
    dd = k.dev_data[hdevid]
    dd.vgid, dd.vgdevid = (viommu.gid, gdevid) if on else (0, 0)


def hw_queue_init(
    viommu: AmdViommu, queue_type: int, index: int, base_iova: int, length: int
) -> AmdHwQueue:
    """amd_iommufd_hw_queue_init() -> amd_viommu_set_{cmd,evt,ppr}buf_flags(): Len[3:0],
    base (PPR: [55:16]), enable bits. The enable bits of AMD's tree come from HW-queue flags
    that Linux 7.2's IOMMU_HW_QUEUE_ALLOC does not have (flags must be 0): in the model a
    queue runs from its allocation to its destruction."""
    hw = viommu.hw
    if not viommu.gid or hw.vi is None:
        raise err(errno.EOPNOTSUPP, "this vIOMMU has no HW-vIOMMU slice")
    regs = QUEUE_REGS.get(queue_type)
    if regs is None:
        raise err(errno.EINVAL, f"AMD vIOMMU has no HW queue type {queue_type}")
    if index:
        raise err(errno.EINVAL, "the AMD vIOMMU has one queue of each type (index 0)")
    if length & (length - 1) or not MIN_QUEUE <= length <= MAX_QUEUE:
        raise err(errno.EINVAL, "queue length is a power of two, 4 KiB .. 512 KiB")
    if base_iova & (PAGE_SIZE - 1):
        raise err(errno.EINVAL, "queue base must be 4 KiB aligned")
    off, enables = regs
    log2 = (length // R.ENTRY_SIZE).bit_length() - 1
    hw.vi.vfctrl_write(viommu.gid, off, R.gbuf_value(off, base_iova, log2, enables))
    return AmdHwQueue(viommu, queue_type, index, base_iova, length)


def hw_queue_fini(queue: AmdHwQueue) -> None:
    """The model's own: AMD's tree has no HW-queue destroy op; the model stops the buffer
    (its VFCTRL register back to 0) because the core unpins the guest memory."""
    viommu = queue.viommu
    assert isinstance(viommu, AmdViommu)
    hw = viommu.hw
    if viommu.gid and hw.vi is not None:
        hw.vi.vfctrl_write(viommu.gid, QUEUE_REGS[queue.queue_type][0], 0)


def invalidate_user(k: AmdKernel, viommu: AmdViommu, entries: list[bytes]) -> InvalidateResult:
    """The model's own VMM-mediated path (no AMD source has it): IOMMU_HWPT_INVALIDATE on an
    AMD vIOMMU with the model-defined IOMMU_VIOMMU_INVALIDATE_DATA_AMD. Raw guest commands,
    rewritten gDomID -> hDomID and gDevID -> hDevID in software from the vIOMMU's live nested
    domains and vDEVICEs, queued on the host command buffer. IDs the guest does not currently
    use are skipped (nothing of theirs is cached), so are device-TLB flushes of a device
    without ATS; anything but the three
    invalidations is refused with EINVAL (COMPLETION_WAIT is the VMM's to emulate)."""
    handled = 0
    error = 0
    queued = False
    for raw in entries:
        cmd = C.decode(raw) if len(raw) == C.CMD_SIZE else None
        if cmd is None:
            error = errno.EINVAL
            break
        if cmd.opcode == C.INVALIDATE_IOMMU_PAGES:
            info = viommu.gdomids.get(cmd.domid)
            if info is not None:
                k.queue(C.with_domid(raw, info.hdom_id))
                queued = True
        elif cmd.opcode in (C.INVALIDATE_IOTLB_PAGES, C.INVALIDATE_DEVTAB_ENTRY):
            hdev = viommu.gdevids.get(cmd.devid)
            # Device TLB flushes only for an ATS device (as the kernel's ats_enabled check).
            ats = cmd.opcode != C.INVALIDATE_IOTLB_PAGES or (
                hdev is not None and k.dev_data[hdev].dev.ats
            )
            if hdev is not None and ats:
                k.queue(C.with_devid(raw, hdev))
                queued = True
        else:
            error = errno.EINVAL
            break
        handled += 1
    if queued:
        k.completion_wait()
    return InvalidateResult(handled, error)
