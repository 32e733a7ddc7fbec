"""HW-vIOMMU objects through the uAPI: guest IDs, the private address space, the DevID and
DomID mapping tables, HW queues, errnos, and teardown in every legal order."""

from __future__ import annotations

import errno
import itertools
import struct
from typing import Any

import pytest
from iommufd_amd import regs as R
from iommufd_amd.domain import AmdDomain
from iommufd_amd.dte import Dte
from iommufd_amd.viommu import AmdViommu
from iommufd_amd.viommu.hw import IOMMU_DEVID

from iommufd_model import uapi as U

from .conftest import NestParent, amd_viommu

PAGE = 4096
GPA = 1 << 20


def gdte(gcr3: int, gdom: int) -> bytes:
    d = Dte(v=True, tv=True, gv=True, giov=True, gcr3=gcr3, domain_id=gdom)
    return struct.pack("<4Q", *d.encode())


class Rig(NestParent):
    """A nest parent over some guest RAM, ready for AMD vIOMMUs."""

    def viommu(self) -> int:
        return int(self.w.viommu(self.parent))

    def drv(self, obj: int) -> AmdViommu:
        return amd_viommu(self.w.fd, obj)

    def vdevice(self, viommu: int, virt_id: int, dev_id: int = 0) -> int:
        st = U.IommuVdeviceAlloc(viommu_id=viommu, dev_id=dev_id or self.w.dev_id, virt_id=virt_id)
        return int(self.w.ioctl(U.IOMMU_VDEVICE_ALLOC, st).out_vdevice_id)

    def queue(
        self,
        viommu: int,
        qtype: int = U.IOMMU_HW_QUEUE_TYPE_AMD_CMD,
        *,
        index: int = 0,
        iova: int = GPA,
        length: int = PAGE,
    ) -> int:
        st = U.IommuHwQueueAlloc(
            viommu_id=viommu, type=qtype, index=index, nesting_parent_iova=iova, length=length
        )
        return int(self.w.ioctl(U.IOMMU_HW_QUEUE_ALLOC, st).out_hw_queue_id)

    def nested(self, viommu: int, gdom: int) -> int:
        return int(self.w.hwpt(viommu, 0, U.IOMMU_HWPT_DATA_AMD_GUEST, gdte(GPA, gdom)))


def snapshot(w: Any) -> dict[str, Any]:
    k = w.kernel
    pas = k.pas
    return {
        "gids": sorted(pas.gids.used),
        "domids": sorted(k.domids.used),
        "frames": w.mem.frames_in_use,
        "pas_tables": len(pas.pt.tables),
        "slots": sorted(w.hw.vi.slots),
        "devtab": [k.read_dte(r).encode() for r in range(0xFFF8, 0x10000)],
        "trans": dict(pas.trans.ids),
        "dte": w.dte_words(),
    }


def test_guest_ids_are_bounded_and_distinct(make_world: Any, expect: Any) -> None:
    w = make_world({"viommu_guests": 2})
    rig = Rig(w)
    assert w.hw.efr & R.EFR_VIOMMU_SUP
    assert w.hw.control & R.CTRL_VIOMMU_EN and w.hw.control & R.CTRL_VCMD_EN
    a, b = rig.viommu(), rig.viommu()
    ga, gb = rig.drv(a).gid, rig.drv(b).gid
    assert {ga, gb} == {1, 2}
    expect(errno.ENOSPC, rig.viommu)
    w.destroy(a)
    assert rig.drv(rig.viommu()).gid == ga  # the ID went back to the pool


def test_no_hw_viommu_keeps_the_plain_viommu(make_world: Any, expect: Any) -> None:
    w = make_world({"viommu_guests": 0})
    rig = Rig(w)
    assert not w.hw.efr & R.EFR_VIOMMU_SUP and w.kernel.pas is None
    v = rig.viommu()
    assert rig.drv(v).gid == 0
    expect(errno.EOPNOTSUPP, lambda: rig.queue(v))


def pas_u64(w: Any, addr: int) -> int:
    """A u64 of the PAS, read as software would: walk the PAS v1 table in machine memory."""
    pa = w.kernel.pas.pt.iova_to_phys(addr)
    assert pa >= 0, f"PAS {addr:#x} is not mapped"
    return int(w.mem.read_u64(pa))


def domid_entry(w: Any, gid: int, gdom: int) -> int:
    return pas_u64(w, R.PAS_DOMID_MAP_BASE + gid * R.PAS_DOMID_MAP_SIZE + gdom * 8)


def devid_entry(w: Any, gid: int, gdev: int) -> int:
    return pas_u64(w, R.PAS_DEVID_MAP_BASE + gid * R.PAS_DEVID_MAP_SIZE + gdev * 16)


def test_private_address_space_holds_the_slice(world: Any) -> None:
    w = world
    rig = Rig(w)
    v = rig.viommu()
    drv: AmdViommu = rig.drv(v)
    gid = drv.gid
    pas = w.kernel.pas
    # The IOMMU's own DTE maps the PAS; the DevID / DomID tables of this guest are mapped.
    own = w.kernel.read_dte(IOMMU_DEVID)
    assert own.v and own.tv and own.host_root == pas.pt.root and own.domain_id == pas.domid
    for base, size in (
        (R.PAS_DEVID_MAP_BASE, R.PAS_DEVID_MAP_SIZE),
        (R.PAS_DOMID_MAP_BASE, R.PAS_DOMID_MAP_SIZE),
    ):
        assert pas.pt.iova_to_phys(base + gid * size) >= 0
        assert pas.pt.iova_to_phys(base + gid * size + size - 8) >= 0
        assert pas.pt.iova_to_phys(base + (gid + 1) * size) < 0
    assert pas.pt.iova_to_phys(R.PAS_CMDBUF_DIRTY_BASE + R.PAS_CMDBUF_DIRTY_SIZE - 8) >= 0
    # The translate DTE is the nest parent's stage 2 under the parent's own DomainID (AMD's
    # amd_iommu_set_translate_dte()), and VFCTRL MISC holds the ID in [31:16].
    parent = w.fd.objects.get(rig.parent).domain
    t = w.kernel.read_dte(drv.trans_devid)
    assert (t.host_root, t.mode, t.domain_id) == (parent.pt.root, parent.mode, parent.id)
    assert w.hw.vi.vfctrl_read(gid, R.VFCTRL_MISC_CONTROL) == drv.trans_devid << 16
    trans = drv.trans_devid
    w.destroy(v)
    assert pas.pt.iova_to_phys(R.PAS_DEVID_MAP_BASE + gid * R.PAS_DEVID_MAP_SIZE) < 0
    assert not w.kernel.read_dte(trans).v
    assert w.hw.vi.vfctrl_read(gid, R.VFCTRL_MISC_CONTROL) == 0


def test_mapping_tables_never_hold_an_invalid_entry(world: Any) -> None:
    """viommu_clear_mapping(): right after vIOMMU alloc every gDomID maps to the parent's
    DomainID and every gDevID to hDevID 0, all valid; destroy writes the same again."""
    w = world
    rig = Rig(w)
    v = rig.viommu()
    drv: AmdViommu = rig.drv(v)
    gid = drv.gid
    parent = w.fd.objects.get(rig.parent).domain
    dom_ok = parent.id << R.MAP_HID_SHIFT | R.MAP_V
    for gdom in (0, 1, 0x1234, 0xFFFF):
        assert domid_entry(w, gid, gdom) == dom_ok
    for gdev in (0, 0x42, 0xFFFF):
        assert devid_entry(w, gid, gdev) == R.MAP_V
    base = R.PAS_DOMID_MAP_BASE + gid * R.PAS_DOMID_MAP_SIZE
    assert {pas_u64(w, base + i * 8) for i in range(0, 1 << 16, 97)} == {dom_ok}
    # Destroy clears again before the tables leave the PAS: the frames hold valid defaults.
    vd = rig.vdevice(v, 0x42)
    n = rig.nested(v, 9)
    w.fd.attach(w.dev_id, n)
    dom_pa = w.kernel.pas.pt.iova_to_phys(R.PAS_DOMID_MAP_BASE + gid * R.PAS_DOMID_MAP_SIZE)
    dev_pa = w.kernel.pas.pt.iova_to_phys(R.PAS_DEVID_MAP_BASE + gid * R.PAS_DEVID_MAP_SIZE)
    seen: list[tuple[int, int]] = []
    real_unmap = w.kernel.pas.pt.unmap

    def spy(addr: int, size: int) -> int:  # the moment the driver unmaps the first table page
        if not seen:
            seen.append((w.mem.read_u64(dom_pa + 9 * 8), w.mem.read_u64(dev_pa + 0x42 * 16)))
        return int(real_unmap(addr, size))

    assert (domid_entry(w, gid, 9), devid_entry(w, gid, 0x42)) != (dom_ok, R.MAP_V)
    w.fd.attach(w.dev_id, rig.parent)
    w.destroy(n)
    w.destroy(vd)
    w.kernel.pas.pt.unmap = spy
    try:
        w.destroy(v)
    finally:
        w.kernel.pas.pt.unmap = real_unmap
    assert seen == [(dom_ok, R.MAP_V)]


def test_vdevice_and_nested_attach_program_the_mapping_tables(world: Any, expect: Any) -> None:
    w = world
    rig = Rig(w)
    v = rig.viommu()
    drv: AmdViommu = rig.drv(v)
    vi = w.hw.vi
    slot = vi.slots[drv.gid]
    parent = w.fd.objects.get(rig.parent).domain
    vd = rig.vdevice(v, 0x42)
    assert vi.hdevid(slot, 0x42) == w.dev.rid and vi.hdevid(slot, 0x43) == 0
    # vDEVICE alloc does not touch the DTE: data[3] is written at nested attach only.
    assert not w.kernel.read_dte(w.dev.rid).viommu_en
    # The taken gDevID and a second vDEVICE for the same device: EEXIST like the kernel.
    dev2 = w.machine.add_pci_device(iommu=0)
    dev2_id = w.fd.bind(dev2)
    expect(errno.EEXIST, lambda: rig.vdevice(v, 0x42, dev2_id))
    v2 = rig.viommu()
    expect(errno.EEXIST, lambda: rig.vdevice(v2, 0x7))
    expect(errno.EINVAL, lambda: rig.vdevice(v2, 0x1_0000, dev2_id))
    # A nested HWPT with gDomID 9: the DomID map is written at attach, not at alloc.
    n = rig.nested(v, 9)
    hdom = w.fd.objects.get(n).domain.ginfo.hdom_id
    assert vi.hdomid(slot, 9) == parent.id
    w.fd.attach(w.dev_id, n)
    assert vi.hdomid(slot, 9) == hdom and vi.hdomid(slot, 10) == parent.id
    # DTE data[3] in machine memory: vIOMMUEn[15], GuestDeviceID[31:16], GuestID[47:32].
    d3 = w.mem.read_u64(w.kernel.dte_addr(w.dev.rid) + 24)
    assert d3 == 1 << 15 | 0x42 << 16 | drv.gid << 32
    # ... and not in the other vIOMMU's table.
    parent2 = rig.drv(v2).parent
    assert isinstance(parent2, AmdDomain)
    assert vi.hdomid(vi.slots[rig.drv(v2).gid], 9) == parent2.id
    # Freeing the nested domain leaves the DomID map as it is (AMD's nested_domain_free()).
    w.fd.attach(w.dev_id, rig.parent)
    w.destroy(n)
    assert vi.hdomid(slot, 9) == hdom
    assert not w.kernel.read_dte(w.dev.rid).viommu_en
    w.destroy(vd)
    assert vi.hdevid(slot, 0x42) == 0


def test_hw_queue_rules(world: Any, expect: Any) -> None:
    w = world
    rig = Rig(w)
    v = rig.viommu()
    expect(errno.EOPNOTSUPP, lambda: rig.queue(v, U.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV))
    expect(errno.EINVAL, lambda: rig.queue(v, index=1))
    expect(errno.EINVAL, lambda: rig.queue(v, length=3 * PAGE))
    expect(errno.EINVAL, lambda: rig.queue(v, length=2048))
    expect(errno.EINVAL, lambda: rig.queue(v, iova=GPA + 0x800))
    q = rig.queue(v)
    expect(errno.EEXIST, lambda: rig.queue(v))
    gid = rig.drv(v).gid
    # AMD's encoding (amd_viommu_set_*buf_flags): Len[3:0] = log2(entries), base[51:12]
    # (PPR: base >> 12 in [55:16]), the enable bits from bit 8.
    assert w.hw.vi.vfctrl_read(gid, R.VFCTRL_CMD_CONTROL) == GPA | 8 | 1 << 8
    e = rig.queue(v, U.IOMMU_HW_QUEUE_TYPE_AMD_EVT, iova=GPA + 2 * PAGE, length=2 * PAGE)
    assert w.hw.vi.vfctrl_read(gid, R.VFCTRL_EVT_CONTROL) == (GPA + 2 * PAGE) | 9 | 1 << 8
    p = rig.queue(v, U.IOMMU_HW_QUEUE_TYPE_AMD_PPR, iova=GPA + 4 * PAGE)
    ppr = ((GPA + 4 * PAGE) >> 12) << 16 | 8 | 1 << 8 | 1 << 10
    assert w.hw.vi.vfctrl_read(gid, R.VFCTRL_PPR_CONTROL) == ppr
    expect(errno.EBUSY, lambda: w.unmap(rig.ioas, GPA, PAGE))
    for obj in (q, e, p):
        w.destroy(obj)
    for off in (R.VFCTRL_CMD_CONTROL, R.VFCTRL_EVT_CONTROL, R.VFCTRL_PPR_CONTROL):
        assert not w.hw.vi.vfctrl_read(gid, off)


@pytest.mark.parametrize("order", list(itertools.permutations(["hwpt", "vdev", "cmdq", "evtq"])))
def test_teardown_in_any_legal_order_restores_everything(
    world: Any, expect: Any, order: tuple[str, ...]
) -> None:
    w = world
    rig = Rig(w)
    before = snapshot(w)
    v = rig.viommu()
    objs = {
        "vdev": rig.vdevice(v, 0x10),
        "hwpt": rig.nested(v, 3),
        "cmdq": rig.queue(v),
        "evtq": rig.queue(v, U.IOMMU_HW_QUEUE_TYPE_AMD_EVT, iova=GPA + PAGE),
    }
    w.fd.attach(w.dev_id, objs["hwpt"])
    for name in order:
        expect(errno.EBUSY, lambda: w.destroy(v))
        if name == "hwpt":
            w.fd.detach(w.dev_id)
        w.destroy(objs[name])
    w.destroy(v)
    after = snapshot(w)
    before["dte"] = after["dte"] = None  # the device went from blocked to blocked
    assert after == before
