"""The host driver's side of the HW-vIOMMU (the AMD vIOMMU series' ``amd_viommu_init``,
``amd_viommu_init_one`` / ``uninit_one``, ``set_device_mapping``, ``set_domain_mapping``, the
HW queue init, and the VMM-mediated invalidation path).

The driver owns the IOMMU Private Address space: a v1 page table (its own DomainID) that the
IOMMU's own DTE points at, mapping the guest MMIO region at PAS 0 and, per guest ID, the DevID
and DomID mapping tables. It programs per-guest hardware state only through the guest's VF
control MMIO, and flushes what it changes with commands on the host command buffer.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from iommufd_amd import commands as C
from iommufd_amd import regs as R
from iommufd_amd.dte import Dte
from iommufd_amd.pgtable_v1 import AmdV1PageTable
from iommufd_amd.viommu import AmdHwQueue, AmdViommu
from iommufd_amd.viommu.hw import IOMMU_DEVID, TRANS_DEVID_BASE
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE, InvalidateResult
from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_amd.driver import AmdDomain, AmdKernel
    from iommufd_amd.hw import AmdIommu

PAS_MODE = 4  # a 4-level v1 table covers the 48-bit private address space
RW = IOMMU_READ | IOMMU_WRITE
MIN_QUEUE = 256 * R.ENTRY_SIZE  # 256 entries: the smallest legal buffer (LEN_MIN)
MAX_QUEUE = 1 << 19  # VIOMMU_GUEST_CMDBUF_SIZE: 32 Ki entries (Len 15)
DEVID_TABLE_PAGES = R.PAS_DEVID_MAP_SIZE // PAGE_SIZE
DOMID_TABLE_PAGES = R.PAS_DOMID_MAP_SIZE // PAGE_SIZE


class PasState:
    """The driver's PAS: its table, DomainID and the guest MMIO backing."""

    def __init__(self, k: AmdKernel, max_guests: int) -> None:
        self.domid = k.domids.alloc()
        self.pt = AmdV1PageTable(k.mem, PAS_MODE)
        pages = -(-((max_guests + 1) * R.PAS_GUEST_MMIO_ENTRY) // PAGE_SIZE)
        self.mmio_frames = k.mem.alloc_frames(pages)
        for i, pfn in enumerate(self.mmio_frames):
            self.pt.map(R.PAS_GUEST_MMIO_BASE + i * PAGE_SIZE, pfn << PAGE_SHIFT, PAGE_SIZE, RW)
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
        from iommufd_amd.driver import IdAllocator

        self.gids = IdAllocator(max_guests + 1)  # guest IDs 1..max_guests
        self.by_gid: dict[int, AmdViommu] = {}

    def mmio_pa(self, gid: int) -> int:
        off = R.PAS_GUEST_MMIO_BASE + gid * R.PAS_GUEST_MMIO_ENTRY
        return (self.mmio_frames[off // PAGE_SIZE] << PAGE_SHIFT) + off % PAGE_SIZE


def viommu_init(k: AmdKernel) -> None:
    """amd_viommu_init(): the PAS, the IOMMU's own DTE, then CONTROL VCMD_EN / VIOMMU_EN."""
    hw = k.hw
    if hw.vi is None or not k.efr & R.EFR_VIOMMU_SUP:
        return
    pas = k.pas = PasState(k, hw.vi.max_guests)
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
    ctrl = hw.mmio.read(R.CONTROL)
    hw.mmio.write(R.CONTROL, ctrl | R.CTRL_VCMD_EN | R.CTRL_VIOMMU_EN)


def map_command(hw: AmdIommu, gid: int, *, domain: bool, gid_: int, hid: int, valid: bool) -> None:
    """set_device_mapping() / set_domain_mapping(): one VFCTRL map command."""
    assert hw.vi is not None
    val = (
        R.MAPCTL_GO
        | (gid_ & 0xFFFF) << R.MAPCTL_GID_SHIFT
        | (hid & 0xFFFF) << R.MAPCTL_HID_SHIFT
        | (R.MAPCTL_VALID if valid else 0)
    )
    off = R.VFCTRL_DID_MAP_CONTROL1 if domain else R.VFCTRL_DID_MAP_CONTROL0
    hw.vi.vfctrl_write(gid, off, val)


def _flush_pas(k: AmdKernel, addr: int, size: int) -> None:
    assert k.pas is not None
    k.queue(C.inv_iommu_pages(k.pas.domid, addr, size, pde=True))


def viommu_init_one(k: AmdKernel, viommu: AmdViommu, parent: AmdDomain) -> None:
    """amd_viommu_init_one(): guest ID, mapping tables in the PAS, TransDevID DTE. All or
    nothing: on failure everything taken so far is given back."""
    hw = k.hw
    assert hw.vi is not None
    pas = k.pas
    assert pas is not None
    gid = pas.gids.alloc()
    if gid <= 0:
        raise err(errno.ENOSPC, "no HW-vIOMMU guest ID left on this IOMMU")
    try:
        tdom = k.domids.alloc()
        if tdom <= 0:
            raise err(errno.ENOSPC, "no DomainID left for the guest's stage-2 fetches")
        viommu.gid, viommu.trans_domid = gid, tdom
        viommu.trans_devid = TRANS_DEVID_BASE | gid
        frames = viommu.table_frames = k.mem.alloc_frames(DEVID_TABLE_PAGES + DOMID_TABLE_PAGES)
        for i, pfn in enumerate(frames):
            if i < DEVID_TABLE_PAGES:
                addr = R.PAS_DEVID_MAP_BASE + gid * R.PAS_DEVID_MAP_SIZE + i * PAGE_SIZE
            else:
                j = i - DEVID_TABLE_PAGES
                addr = R.PAS_DOMID_MAP_BASE + gid * R.PAS_DOMID_MAP_SIZE + j * PAGE_SIZE
            pas.pt.map(addr, pfn << PAGE_SHIFT, PAGE_SIZE, RW)
    except OSError:
        _undo(k, viommu)
        raise
    _flush_pas(k, R.PAS_DEVID_MAP_BASE + gid * R.PAS_DEVID_MAP_SIZE, R.PAS_DEVID_MAP_SIZE)
    _flush_pas(k, R.PAS_DOMID_MAP_BASE + gid * R.PAS_DOMID_MAP_SIZE, R.PAS_DOMID_MAP_SIZE)
    k.mem.write(pas.mmio_pa(gid), bytes(R.PAS_GUEST_MMIO_ENTRY))  # fresh guest registers
    # set_trans_dte(): guest buffers are guest-physical; the hardware translates them through
    # this DTE, i.e. through the nest parent's stage 2, tagged with the guest's own DomainID.
    k.write_dte(
        viommu.trans_devid,
        Dte(
            v=True,
            tv=True,
            mode=parent.mode,
            host_root=parent.pt.root,
            ir=True,
            iw=True,
            domain_id=tdom,
        ),
    )
    k.queue(C.inv_devtab_entry(viommu.trans_devid))
    k.completion_wait()
    hw.vi.vfctrl_write(gid, R.VFCTRL_MISC_CONTROL, viommu.trans_devid << R.MISC_TRANS_DEVID_SHIFT)
    viommu.window = hw.vi.slots[gid].window
    pas.by_gid[gid] = viommu


def _undo(k: AmdKernel, viommu: AmdViommu) -> None:
    """Give back what :func:`viommu_init_one` took (PAS mappings, frames, IDs)."""
    pas = k.pas
    assert pas is not None
    gid = viommu.gid
    if viommu.table_frames:
        for base, size in (
            (R.PAS_DEVID_MAP_BASE, R.PAS_DEVID_MAP_SIZE),
            (R.PAS_DOMID_MAP_BASE, R.PAS_DOMID_MAP_SIZE),
        ):
            pas.pt.unmap(base + gid * size, size)
            _flush_pas(k, base + gid * size, size)
        k.completion_wait()
        for pfn in viommu.table_frames:
            k.mem.put_frame(pfn)
        viommu.table_frames = []
    if viommu.trans_domid:
        k.domids.free(viommu.trans_domid)
    if gid:
        pas.gids.free(gid)
    viommu.gid = viommu.trans_domid = viommu.trans_devid = 0


def viommu_uninit_one(k: AmdKernel, viommu: AmdViommu) -> None:
    """amd_viommu_uninit_one(): stop the guest's buffers, clear its DTE and tables, give
    its guest ID back. The PAS, mapping tables and ID pool end as before the vIOMMU."""
    hw = k.hw
    gid = viommu.gid
    if not gid or hw.vi is None:
        return
    vi = hw.vi
    pas = k.pas
    assert pas is not None
    for off in (R.VFCTRL_CMD_CONTROL, R.VFCTRL_EVT_CONTROL, R.VFCTRL_MISC_CONTROL):
        vi.vfctrl_write(gid, off, 0)
    for gdev in list(viommu.gdevids):
        map_command(hw, gid, domain=False, gid_=gdev, hid=0, valid=False)
    for gdom in list(viommu.gdomids):
        map_command(hw, gid, domain=True, gid_=gdom, hid=0, valid=False)
    k.write_dte(viommu.trans_devid, Dte())
    k.queue(C.inv_devtab_entry(viommu.trans_devid))
    k.queue(C.inv_iommu_all_pages(viommu.trans_domid))
    k.mem.write(pas.mmio_pa(gid), bytes(R.PAS_GUEST_MMIO_ENTRY))
    pas.by_gid.pop(gid, None)
    vi.release(gid)
    viommu.window = None
    _undo(k, viommu)


def vdevice_map(k: AmdKernel, viommu: AmdViommu, hdevid: int, gdevid: int, on: bool) -> None:
    """The vDEVICE's DevID mapping-table entry, and the DTE's vIOMMU fields."""
    if on:
        if not 0 <= gdevid <= 0xFFFF:
            raise err(errno.EINVAL, f"guest DeviceID {gdevid:#x} is not 16 bits")
        if gdevid in viommu.gdevids:
            raise err(errno.EEXIST, f"guest DeviceID {gdevid:#x} is mapped")
        viommu.gdevids[gdevid] = hdevid
    else:
        viommu.gdevids.pop(gdevid, None)
    map_command(k.hw, viommu.gid, domain=False, gid_=gdevid, hid=hdevid, valid=on)
    dd = k.dev_data[hdevid]
    dd.vgid, dd.vgdevid = (viommu.gid, gdevid) if on else (0, 0)
    k.update_dte(dd.dev)


def hw_queue_init(
    viommu: AmdViommu, queue_type: int, index: int, base_iova: int, length: int
) -> AmdHwQueue:
    """amd_iommufd_hw_queue_init(): the guest command buffer / event log, by GPA."""
    hw = viommu.hw
    if not viommu.gid or hw.vi is None:
        raise err(errno.EOPNOTSUPP, "this vIOMMU has no HW-vIOMMU slice")
    if queue_type == U.IOMMU_HW_QUEUE_TYPE_AMD_CMD:
        off = R.VFCTRL_CMD_CONTROL
    elif queue_type == U.IOMMU_HW_QUEUE_TYPE_AMD_EVT:
        off = R.VFCTRL_EVT_CONTROL
    else:
        raise err(errno.EOPNOTSUPP, f"AMD vIOMMU has no HW queue type {queue_type}")
    if index:
        raise err(errno.EINVAL, "the AMD vIOMMU has one queue of each type (index 0)")
    if length & (length - 1) or not MIN_QUEUE <= length <= MAX_QUEUE:
        raise err(errno.EINVAL, "queue length is a power of two, 4 KiB .. 512 KiB")
    if base_iova & (PAGE_SIZE - 1):
        raise err(errno.EINVAL, "queue base must be 4 KiB aligned")
    log2 = (length // R.ENTRY_SIZE).bit_length() - 1
    hw.vi.vfctrl_write(
        viommu.gid, off, (base_iova & R.BASE_ADDR_MASK) | log2 << R.LEN_SHIFT | R.GBUF_EN
    )
    return AmdHwQueue(viommu, queue_type, index, base_iova, length)


def hw_queue_fini(queue: AmdHwQueue) -> None:
    viommu = queue.viommu
    assert isinstance(viommu, AmdViommu)
    hw = viommu.hw
    if viommu.gid and hw.vi is not None:
        off = (
            R.VFCTRL_CMD_CONTROL
            if queue.queue_type == U.IOMMU_HW_QUEUE_TYPE_AMD_CMD
            else R.VFCTRL_EVT_CONTROL
        )
        hw.vi.vfctrl_write(viommu.gid, off, 0)


def invalidate_user(k: AmdKernel, viommu: AmdViommu, entries: list[bytes]) -> InvalidateResult:
    """IOMMU_HWPT_INVALIDATE on an AMD vIOMMU (IOMMU_VIOMMU_INVALIDATE_DATA_AMD): raw guest
    commands, rewritten gDomID -> hDomID and gDevID -> hDevID in software exactly as the
    hardware does through its mapping tables, queued on the host command buffer. IDs the
    guest does not own are skipped (nothing of theirs is cached), so are device-TLB flushes of
    a device without ATS; anything but the three
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
