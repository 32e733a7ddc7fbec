"""The command stream the driver issues, command by command, against Linux 7.2's AMD driver.

Each expected list is written from the 7.2 functions named beside it (drivers/iommu/amd/
iommu.c unless said otherwise), not from the model: a change in the model's ordering, flags or
ranges fails here. ``sig`` reduces a command to the fields the kernel sets.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from iommufd_amd import commands as C
from iommufd_amd.domain import AmdDomain

from iommufd_model import uapi as U
from iommufd_model.testing import assert_errno

PAGE = 4096
IOVA = 1 << 30
ALL = (0, (1 << 64) - 1)
CW = ("CW",)


def sig(cmd: C.Command) -> tuple[Any, ...]:
    """The fields 7.2's build_* helpers fill for each opcode."""
    if cmd.opcode == C.COMPLETION_WAIT:
        return CW
    if cmd.opcode == C.INVALIDATE_DEVTAB_ENTRY:
        return ("DTE", cmd.devid)
    if cmd.opcode == C.INVALIDATE_IOMMU_PAGES:
        rng = C.decode_range(cmd.address, cmd.s)
        return ("PAGES", cmd.domid, cmd.pasid, rng, cmd.pde, cmd.gn)
    if cmd.opcode == C.INVALIDATE_IOTLB_PAGES:
        rng = C.decode_range(cmd.address, cmd.s)
        return ("IOTLB", cmd.devid, cmd.count, cmd.pasid, rng, cmd.gn)
    if cmd.opcode == C.COMPLETE_PPR_REQUEST:
        return ("PPR", cmd.devid, cmd.pasid, cmd.gn, cmd.tag, cmd.status)
    return ("OP", cmd.opcode)


def update_dte(rid: int, *device_tlb: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """amd_iommu_update_dte(): update_dte256() writes and flushes (iommu_flush_dte_sync:
    INVALIDATE_DEVTAB_ENTRY, COMPLETION_WAIT), then device_flush_dte() (the entry again, the
    device TLB with ATS) and iommu_completion_wait()."""
    return [("DTE", rid), CW, ("DTE", rid), *device_tlb, CW]


def domain_of(w: Any) -> AmdDomain:
    dom = w.fd.device(w.dev_id).hwpt.domain
    assert isinstance(dom, AmdDomain)
    return dom


def test_attach_map_unmap_replace_detach_v1(world: Any) -> None:
    w = world
    rid = w.dev.rid
    ioas = w.ioas()
    a, b = w.hwpt(ioas), w.hwpt(ioas)
    seen = w.record_commands()
    # set_dte_entry() -> amd_iommu_update_dte(); the probe-time DTE held DomainID 0: no
    # old-DomID flush.
    w.fd.attach(w.dev_id, a)
    dom_a = domain_of(w)
    assert [sig(c) for c in seen] == update_dte(rid)
    seen.clear()
    # amd_iommu_iotlb_sync_map(): nothing unless NpCache (the model's EFR has no NpCache).
    w.map(ioas, w.buffer(4 * PAGE, fill=1), 4 * PAGE, IOVA)
    assert seen == []
    # unmap of one page: amd_iommu_iotlb_sync() -> amd_iommu_domain_flush_pages(), no PDE
    # (no table freed), then domain_flush_complete().
    w.unmap(ioas, IOVA, 4 * PAGE)
    assert [sig(c) for c in seen] == [
        ("PAGES", dom_a.id, 0, (IOVA, IOVA + 4 * PAGE - 1), False, False),
        CW,
    ]
    seen.clear()
    # replace: detach_device() (cleared DTE + flush, the old domain's flush-all with PDE),
    # then attach_device()'s set_dte_entry(); the DTE now holds DomainID 0: no DomID flush.
    w.fd.attach(w.dev_id, b)
    dom_b = domain_of(w)
    assert [sig(c) for c in seen] == [
        *update_dte(rid),
        ("PAGES", dom_a.id, 0, ALL, True, False),
        CW,
        *update_dte(rid),
    ]
    assert w.kernel.read_dte(rid).domain_id == dom_b.id
    seen.clear()
    # blocked_domain_attach_device(): detach_device(), then dev_update_dte(false) again.
    w.fd.detach(w.dev_id)
    assert [sig(c) for c in seen] == [
        *update_dte(rid),
        ("PAGES", dom_b.id, 0, ALL, True, False),
        CW,
        *update_dte(rid),
    ]
    dte = w.kernel.read_dte(rid)
    assert dte.v and not dte.tv and dte.domain_id == 0  # amd_iommu_make_clear_dte()


def test_unmap_that_frees_a_table_sets_pde(world: Any) -> None:
    """generic_pt frees a table whose whole span the unmap covers; the gather's free list is
    then not empty and amd_iommu_iotlb_sync() sets PDE."""
    w = world
    ioas = w.ioas()
    w.fd.attach(w.dev_id, w.hwpt(ioas))
    dom = domain_of(w)
    two_m = 2 << 20
    w.map(ioas, w.buffer(two_m + PAGE), two_m + PAGE, IOVA)  # 4 KiB leaves: a PTE table
    seen = w.record_commands()
    w.unmap(ioas, IOVA, two_m + PAGE)
    assert [sig(c) for c in seen] == [
        ("PAGES", dom.id, 0, C.decode_range(*_addr_s(IOVA, two_m + PAGE)), True, False),
        CW,
    ]


def _addr_s(iova: int, size: int) -> tuple[int, bool]:
    """The (address, S) pair build_inv_address() encodes for a range."""
    cmd = C.decode(C.inv_iommu_pages(1, iova, size, pde=False))
    assert cmd is not None
    return cmd.address, cmd.s


def test_ats_device_tlb_flushes_carry_qdep(make_world: Any) -> None:
    """With ATS: device_flush_dte() adds a whole-device INVALIDATE_IOTLB_PAGES, every
    domain flush one per device (MaxPend = pci_ats_queue_depth(): 32 for a 0 field)."""
    w = make_world(ats=True)
    rid = w.dev.rid
    ioas = w.ioas()
    seen = w.record_commands()
    w.fd.attach(w.dev_id, w.hwpt(ioas))
    dom = domain_of(w)
    assert [sig(c) for c in seen] == update_dte(rid, ("IOTLB", rid, 32, 0, ALL, False))
    w.map(ioas, w.buffer(PAGE), PAGE, IOVA)
    seen.clear()
    w.unmap(ioas, IOVA, PAGE)
    assert [sig(c) for c in seen] == [
        ("PAGES", dom.id, 0, (IOVA, IOVA + PAGE - 1), False, False),
        ("IOTLB", rid, 32, 0, (IOVA, IOVA + PAGE - 1), False),
        CW,
    ]
    assert w.kernel.read_dte(rid).i  # DTE_FLAG_IOTLB


def test_v2_domain_attach_sets_gcr3_0_then_the_dte(make_world: Any) -> None:
    """init_gcr3_table(): GCR3[0] set and flushed (dev_flush_pasid_all: GN, PDE, the per-device
    DomainID) before set_dte_entry() writes the GCR3 DTE; detach clears GCR3[0] the same way."""
    w = make_world()
    rid = w.dev.rid
    ioas = w.ioas()
    h = w.hwpt(ioas, U.IOMMU_HWPT_ALLOC_PASID)
    seen = w.record_commands()
    w.fd.attach(w.dev_id, h)
    dd = w.kernel.dev_data[rid]
    gdom = dd.gcr3_domid
    assert [sig(c) for c in seen] == [("PAGES", gdom, 0, ALL, True, True), CW, *update_dte(rid)]
    dte = w.kernel.read_dte(rid)
    assert dte.gv and dte.giov and dte.domain_id == gdom and dte.gcr3 == dd.gcr3.root
    seen.clear()
    w.fd.detach(w.dev_id)
    assert [sig(c) for c in seen] == [
        *update_dte(rid),
        ("PAGES", gdom, 0, ALL, True, True),  # domain_flush_pages_v2 (flush-all: PDE)
        CW,
        ("PAGES", gdom, 0, ALL, True, True),  # destroy_gcr3_table(): update_gcr3(0, clear)
        CW,
        *update_dte(rid),
    ]
    assert dd.gcr3 is None and gdom not in w.kernel.domids.used  # free_gcr3_table()


def test_set_dirty_tracking_flushes_each_dte_then_the_domain(make_world: Any) -> None:
    """amd_iommu_set_dirty_tracking(): HAD in place, device_flush_dte() without a wait, then
    amd_iommu_domain_flush_all()."""
    w = make_world()
    rid = w.dev.rid
    h = w.hwpt(w.ioas(), U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    w.fd.attach(w.dev_id, h)
    dom = domain_of(w)
    seen = w.record_commands()
    w.ioctl(
        U.IOMMU_HWPT_SET_DIRTY_TRACKING,
        U.IommuHwptSetDirtyTracking(hwpt_id=h, flags=U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE),
    )
    assert [sig(c) for c in seen] == [("DTE", rid), ("PAGES", dom.id, 0, ALL, True, False), CW]
    assert w.kernel.read_dte(rid).had


@pytest.mark.parametrize(
    ("flags", "want"), [(0, errno.EINVAL), (U.IOMMU_HWPT_ALLOC_PASID, errno.EOPNOTSUPP)]
)
def test_pasid_attach_is_unsupported_upstream(world: Any, flags: int, want: int) -> None:
    """amdv1_ops / amdv2_ops have no set_dev_pasid: iommu_attach_device_pasid() answers
    EOPNOTSUPP before it touches anything -- no command, no DTE or GCR3 change (a HWPT
    without IOMMU_HWPT_ALLOC_PASID is iommufd's EINVAL first)."""
    w = world
    ioas = w.ioas()
    h = w.hwpt(ioas, flags)
    before = w.kernel.read_dte(w.dev.rid)
    seen = w.record_commands()
    assert_errno(want, lambda: w.fd.attach(w.dev_id, h, pasid=5))
    assert seen == [] and w.kernel.read_dte(w.dev.rid) == before
    assert w.kernel.dev_data[w.dev.rid].gcr3 is None


def test_page_response_status_is_the_response_code(world: Any) -> None:
    """amd_iommu_page_response() -> build_complete_ppr(): Status = resp->code (FAILURE = 2
    too), tag masked to 9 bits, no COMPLETION_WAIT; GN and the PASID follow
    ``dev_data->pri_tlp``, which stays 0 until PRI is enabled (the world's device never had
    it): no GN, no PASID, whatever PASID the response names."""
    w = world
    seen = w.record_commands()
    plugin = _plugin()
    for code in (0, 1, 2):
        plugin.page_response(iommu=w.hw, dev=w.dev, pasid=9, grpid=0x211, code=code)
    assert [sig(c) for c in seen] == [("PPR", w.dev.rid, 0, False, 0x011, s) for s in (0, 1, 2)]


@pytest.mark.parametrize("required", [True, False])
def test_complete_ppr_follows_the_prg_response_pasid_required_bit(
    make_world: Any, required: bool
) -> None:
    """pdev_enable_cap_pri() at a v2 attach: pci_reset_pri(), pci_enable_pri(32) (Allocation
    = min(Capacity, 32), Enable), ``pri_tlp`` = the PRI capability's "PRG Response PASID
    Required" bit; every COMPLETE_PPR_REQUEST then carries GN and the PASID exactly when it
    is set (amd_iommu_complete_ppr), for the driver's own answers and for page_response.
    Detach disables PRI (pdev_disable_caps) and ``pri_tlp`` stays as it was."""
    from iommufd_amd import ppr as P

    from iommufd_model.devices import pci_regs as R

    w = make_world(ats=True, prg_resp_pasid_required=required)
    rid = w.dev.rid
    pos = w.dev.config.find_ext_cap(R.PCI_EXT_CAP_ID_PRI)
    assert pos == 0x100
    ctrl, status = pos + R.PCI_PRI_CTRL, pos + R.PCI_PRI_STATUS
    assert w.dev.config_read(ctrl, 2) == 0
    assert w.dev.config_read(status, 2) & R.PCI_PRI_STATUS_STOPPED
    h = w.hwpt(w.ioas(), U.IOMMU_HWPT_ALLOC_PASID)
    w.fd.attach(w.dev_id, h)
    assert w.dev.config_read(ctrl, 2) == R.PCI_PRI_CTRL_ENABLE
    assert not w.dev.config_read(status, 2) & R.PCI_PRI_STATUS_STOPPED
    assert w.dev.config_read(pos + R.PCI_PRI_ALLOC_REQ, 4) == 32
    assert w.kernel.read_dte(rid).ppr
    seen = w.record_commands()
    assert w.dev.page_request(IOVA, grpid=0x11)  # no PASID: aborted with FAILURE
    assert w.dev.page_request(IOVA, pasid=5, grpid=0x12)  # no handler: INVALID
    _plugin().page_response(iommu=w.hw, dev=w.dev, pasid=7, grpid=0x13, code=0)
    pasid = (lambda p: p) if required else (lambda p: 0)
    assert [sig(c) for c in seen] == [
        ("PPR", rid, 0, required, 0x11, P.RESP_FAILURE),
        ("PPR", rid, pasid(5), required, 0x12, P.RESP_INVALID),
        ("PPR", rid, pasid(7), required, 0x13, 0),
    ]
    w.fd.detach(w.dev_id)
    assert w.dev.config_read(ctrl, 2) == 0
    assert w.dev.config_read(status, 2) & R.PCI_PRI_STATUS_STOPPED
    seen.clear()
    _plugin().page_response(iommu=w.hw, dev=w.dev, pasid=7, grpid=0x14, code=1)
    assert [sig(c) for c in seen] == [("PPR", rid, pasid(7), required, 0x14, 1)]


def test_pri_is_enabled_only_with_the_capability(make_world: Any) -> None:
    """pdev_enable_cap_pri() needs ATS enabled and AMD_IOMMU_DEVICE_FLAG_PRI_SUP (the PRI
    capability, pci_pri_supported): a device without either gets no PRI, no DTE PPR bit, and
    ``pri_tlp`` stays 0."""
    from iommufd_model.devices import pci_regs as R

    for w in (make_world(ats=True, pri=False), make_world(ats=False, pri=True)):
        pos = w.dev.config.find_ext_cap(R.PCI_EXT_CAP_ID_PRI)
        w.fd.attach(w.dev_id, w.hwpt(w.ioas(), U.IOMMU_HWPT_ALLOC_PASID))
        dd = w.kernel.dev_data[w.dev.rid]
        assert not w.kernel.read_dte(w.dev.rid).ppr
        assert not dd.pri_enabled and not dd.pri_tlp
        assert pos is None or w.dev.config_read(pos + R.PCI_PRI_CTRL, 2) == 0


def _plugin() -> Any:
    from iommufd_amd.driver import plugin

    return plugin


def test_page_requests_are_answered_by_the_kernel(make_world: Any) -> None:
    """PPR end to end on 7.2: a v2 (SVA-capable) domain on an ATS device turns IOPF on (DTE PPR
    bit); the device's page requests land in the PPR log, the driver consumes them and -- no
    iommufd handler can exist on AMD -- answers each: FAILURE for a request without a PASID
    (``iommu_call_iopf_notifier``), INVALID for one with a PASID (``iopf_error_response``)."""
    from iommufd_amd import ppr as P
    from iommufd_amd import regs as R

    w = make_world(ats=True)
    rid = w.dev.rid
    h = w.hwpt(w.ioas(), U.IOMMU_HWPT_ALLOC_PASID)
    assert not w.dev.page_request(IOVA)  # DTE without PPR: not logged
    w.fd.attach(w.dev_id, h)
    assert w.kernel.read_dte(rid).ppr
    seen = w.record_commands()
    assert w.dev.page_request(IOVA + 0x123, grpid=0x11)
    assert w.dev.page_request(IOVA, pasid=5, write=True, grpid=0x12)
    assert [sig(c) for c in seen] == [
        ("PPR", rid, 0, True, 0x11, P.RESP_FAILURE),
        ("PPR", rid, 5, True, 0x12, P.RESP_INVALID),
    ]
    mmio = w.hw.mmio
    assert mmio.read(R.PPR_HEAD) == mmio.read(R.PPR_TAIL) == 2 * R.ENTRY_SIZE
    assert not mmio.read(R.STATUS) & R.ST_PPR_INT
    # The log entries were zeroed after reading (erratum 733 handling).
    assert w.mem.read(w.kernel.ppr_buf, 2 * R.ENTRY_SIZE) == bytes(2 * R.ENTRY_SIZE)
    w.fd.detach(w.dev_id)
    assert not w.kernel.read_dte(rid).ppr


def test_ppr_entry_layout() -> None:
    """amd_iommu_types.h PPR_DEVID / PPR_PASID1/2 / PPR_TAG / PPR_FLAGS / PPR_REQ_TYPE."""
    from iommufd_amd import ppr as P

    e = P.PprEntry(0x1234, 0xA_BCDE, 0x3FF, P.PPR_FLAG_GN | P.PPR_FLAG_WRITE, 0x5000)
    w0 = int.from_bytes(e.to_bytes()[:8], "little")
    assert w0 & 0xFFFF == 0x1234
    assert ((w0 >> 42) & 0xF) << 16 | (w0 >> 16) & 0xFFFF == 0xA_BCDE
    assert (w0 >> 32) & 0x3FF == 0x3FF and (w0 >> 48) & 0xFFF == 0x120 and w0 >> 60 == 1
    assert P.PprEntry.from_bytes(e.to_bytes()) == e


def test_v1_mode_grows_on_demand_and_rewrites_each_dte(make_world: Any) -> None:
    """generic_pt amdv1 with PT_FEAT_DYNAMIC_TOP starts at level 2 (Mode 3, 39 bits); a map
    past the top's reach adds levels (``increase_top()``: the new top's entry 0 is the old
    top) and calls amd_iommu_change_top(): set_dte_entry() for every device on the domain's
    list (its DTE held the domain's own DomainID: amd_iommu_flush_tlb_domid() follows), then
    device_flush_dte() of each, then domain_flush_complete(). The map itself issues nothing."""
    w = make_world()
    dev2 = w.machine.add_pci_device(iommu=0, ats=True)
    dev2_id = w.fd.bind(dev2)
    rid, rid2 = w.dev.rid, dev2.rid
    ioas = w.ioas()
    h = w.hwpt(ioas)
    w.fd.attach(w.dev_id, h)
    w.fd.attach(dev2_id, h)
    dom = domain_of(w)
    old_root = dom.pt.root
    assert dom.mode == 3 and w.kernel.read_dte(rid).mode == 3
    w.map(ioas, w.buffer(PAGE, fill=0x11), PAGE, IOVA)
    assert dom.mode == 3
    seen = w.record_commands()
    far = 1 << 40  # beyond 39 bits: Mode 4 reaches 48
    w.map(ioas, w.buffer(PAGE, fill=0x22), PAGE, far)
    iotlb_all = ("IOTLB", rid2, 32, 0, ALL, False)
    flush_domid = [("PAGES", dom.id, 0, ALL, True, False), CW]
    assert [sig(c) for c in seen] == [
        *update_dte(rid),
        *flush_domid,
        *update_dte(rid2, iotlb_all),
        *flush_domid,
        ("DTE", rid),
        ("DTE", rid2),
        iotlb_all,
        CW,
    ]
    assert dom.mode == 4 and dom.pt.root != old_root
    for r in (rid, rid2):
        dte = w.kernel.read_dte(r)
        assert (dte.mode, dte.host_root, dte.domain_id) == (4, dom.pt.root, dom.id)
    # The old top hangs at entry 0 of the new one (PDE, NextLevel = 3, PR, IR, IW).
    assert w.mem.read_u64(dom.pt.root) == old_root | 3 << 9 | 1 | 3 << 61
    assert w.dev.dma_read(IOVA, 1) == b"\x11" and w.dev.dma_read(far, 1) == b"\x22"
    seen.clear()
    w.map(ioas, w.buffer(PAGE), PAGE, far + PAGE)  # within Mode 4: nothing issued
    assert seen == []


def test_v1_growth_to_mode_6_and_without_devices(make_world: Any) -> None:
    """A domain on no device grows without a command (its dev_list and iommu_array are
    empty); attaching it later writes the grown Mode. The top grows by as many levels as the
    IOVA needs at once, up to Mode 6 with HATS = 6 levels (amd_iommu_hpt_vasize 64)."""
    w = make_world()
    ioas = w.ioas()
    h = w.hwpt(ioas)
    dom = w.fd.objects.get(h).domain
    assert isinstance(dom, AmdDomain) and dom.aperture_end == (1 << 64) - 1
    seen = w.record_commands()
    top = 1 << 62
    w.map(ioas, w.buffer(PAGE, fill=0x33), PAGE, top)
    assert seen == [] and dom.mode == 6
    w.fd.attach(w.dev_id, h)
    assert w.kernel.read_dte(w.dev.rid).mode == 6
    assert w.dev.dma_read(top, 1) == b"\x33"


@pytest.mark.parametrize(("host_levels", "vasize", "max_mode"), [(4, 48, 4), (5, 57, 5)])
def test_v1_growth_stops_at_what_hats_allows(
    make_world: Any, host_levels: int, vasize: int, max_mode: int
) -> None:
    """amd_iommu_hpt_vasize = (HATS + 3) * 9 + 21: the aperture ends there (so iommufd never
    asks for more) and increase_top() refuses a top whose entries would span it (ERANGE)."""
    w = make_world({"host_levels": host_levels})
    ioas = w.ioas()
    dom = w.fd.objects.get(w.hwpt(ioas)).domain
    assert isinstance(dom, AmdDomain) and dom.aperture_end == (1 << vasize) - 1
    pa = w.mem.alloc_frame() << 12
    dom.map((1 << vasize) - PAGE, pa, PAGE, 3)
    assert dom.mode == max_mode
    root = dom.pt.root
    assert_errno(errno.ERANGE, lambda: dom.map(1 << vasize, pa, PAGE, 3))
    assert dom.mode == max_mode and dom.pt.root == root
