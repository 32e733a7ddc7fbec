"""Issue 16: the HW-vIOMMU as AMD's own tree (AMDESE/linux-iommu) builds it, read back the way
software would -- MMIO registers, the device table and the PAS page table in machine memory."""

from __future__ import annotations

import errno
import traceback
from typing import Any

import pytest
from iommufd_amd import commands as C
from iommufd_amd import events as E
from iommufd_amd import regs as R
from iommufd_amd.domain import AmdDomain
from iommufd_amd.guest import GuestAmd
from iommufd_amd.hw import NO_PASID
from iommufd_amd.viommu.trans_devid import RESERVED, TransDevIdPool

import iommufd_model as im
from iommufd_model.vmm import Vm

from .conftest import amd_iommu, amd_viommu

PAGE = 4096
MIB = 1 << 20
IOVA = 0x40_0000


def boot(options: dict[str, Any] | None = None, rid: int | None = None) -> tuple[Any, Vm, Any]:
    m = im.Machine.build(iommus=["amd"], options={"amd": options or {}})
    vm = Vm(m, 16 * MIB, table_pool=4 * MIB)
    dev = m.add_pci_device(iommu=0, rid=rid)
    return m, vm, dev


def guest(vm: Vm, m: Any) -> GuestAmd:
    g = vm.viommu(m.iommus[0], accelerated=True)
    assert isinstance(g, GuestAmd)
    return g


def test_enable_sets_and_checks_gstbuffer_trp_mode() -> None:
    m, _vm, _dev = boot()
    ctrl = amd_iommu(m).mmio.read(R.CONTROL)
    assert ctrl & R.CTRL_GSTBUFFERTRPMODE and ctrl & R.CTRL_VCMD_EN and ctrl & R.CTRL_VIOMMU_EN
    # Hardware where bit 60 does not stick: EINVAL, no VCMD_EN / VIOMMU_EN, no HW-vIOMMU.
    m2, vm2, dev2 = boot({"gst_buffer_trp": False})
    hw = amd_iommu(m2)
    ctrl = hw.mmio.read(R.CONTROL)
    assert not ctrl & (R.CTRL_GSTBUFFERTRPMODE | R.CTRL_VCMD_EN | R.CTRL_VIOMMU_EN)
    assert hw.driver_state.viommu_error == errno.EINVAL and hw.driver_state.pas is None
    g = vm2.viommu(hw, accelerated=False)  # Linux 7.2's vIOMMU still works
    gdev = g.add_device(dev2, 1)
    assert not amd_viommu(vm2.fd, g.viommu_id).gid
    g.attach(gdev)


def test_viommu_alloc_issues_reset_vmmio_and_never_writes_the_guest_mmio_slot() -> None:
    m, vm, dev = boot()
    hw = amd_iommu(m)
    executed: list[C.Command] = []
    real = hw.execute

    def spy(cmd: C.Command, addr: int) -> bool:
        executed.append(cmd)
        return bool(real(cmd, addr))

    hw.execute = spy  # type: ignore[method-assign]
    g = guest(vm, m)
    g.add_device(dev, 5)
    del hw.execute
    gid = amd_viommu(vm.fd, g.viommu_id).gid
    ops = [c.opcode for c in executed]
    i = ops.index(C.RESET_VMMIO)
    assert executed[i].guest_id == gid and executed[i].vcmd and executed[i].all
    assert ops[i + 1] == C.COMPLETION_WAIT
    # The guest's registers live in the PAS slot; nothing but the hardware writes them.
    pas = hw.driver_state.pas
    slot_pa = pas.pt.iova_to_phys(R.PAS_GUEST_MMIO_BASE + gid * R.PAS_GUEST_MMIO_ENTRY)
    writes: list[int] = []
    real_write = hw.driver_state.mem.write_u64

    def watch(addr: int, value: int) -> None:
        # A store into the slot from outside the hardware model is software writing it.
        hardware = any(f.filename.endswith("viommu/hw.py") for f in traceback.extract_stack())
        if slot_pa <= addr < slot_pa + R.PAS_GUEST_MMIO_ENTRY and not hardware:
            writes.append(addr)
        real_write(addr, value)

    hw.driver_state.mem.write_u64 = watch
    try:
        vm.close()
    finally:
        del hw.driver_state.mem.write_u64
    assert writes == []


def test_unused_gdomid_invalidation_flushes_the_parents_tag() -> None:
    m, vm, dev = boot()
    hw = amd_iommu(m)
    g = guest(vm, m)
    gdev = g.add_device(dev, 5)
    g.attach(gdev)
    drv = amd_viommu(vm.fd, g.viommu_id)
    parent = drv.parent
    assert isinstance(parent, AmdDomain)
    # The translate DTE caches guest-physical translations under the parent's DomainID.
    gpa = vm.alloc_buffer(PAGE)
    hw.lookup(drv.trans_devid, gpa, None, False)
    tag = (parent.id, NO_PASID)
    assert hw.iotlb.lookup(tag, gpa) is not None
    assert 0x777 not in drv.gdomids
    traps = vm.stats.traps
    g.submit([C.inv_iommu_all_pages(0x777), C.completion_wait(g.sem, 1)])
    assert vm.stats.traps == traps
    assert hw.iotlb.lookup(tag, gpa) is None


def test_trans_devid_counts_down_skipping_attached_functions_and_relocates() -> None:
    m, vm, dev = boot(rid=0xFFFF)  # a function at the very top of the bus range
    hw = amd_iommu(m)
    k = hw.driver_state
    g = guest(vm, m)
    g.add_device(dev, 1)
    drv = amd_viommu(vm.fd, g.viommu_id)
    assert drv.trans_devid == 0xFFFE
    assert hw.vi is not None
    assert hw.vi.vfctrl_read(drv.gid, R.VFCTRL_MISC_CONTROL) == 0xFFFE << 16
    vm2 = Vm(m, 16 * MIB, table_pool=4 * MIB)
    dev2 = m.add_pci_device(iommu=0, rid=0x100)
    g2 = guest(vm2, m)
    g2.add_device(dev2, 1)
    drv2 = amd_viommu(vm2.fd, g2.viommu_id)
    assert drv2.trans_devid == 0xFFFD
    # Hot-plug a function at vIOMMU 2's translate DeviceID: the vIOMMU moves to the next free
    # ID, its translate DTE and VFCTRL MISC with it; the old DTE is the new function's.
    parent = drv2.parent
    assert isinstance(parent, AmdDomain)
    m.add_pci_device(iommu=0, rid=0xFFFD)
    assert drv2.trans_devid == 0xFFFC
    t = k.read_dte(0xFFFC)
    assert (t.v, t.host_root, t.domain_id) == (True, parent.pt.root, parent.id)
    assert hw.vi.vfctrl_read(drv2.gid, R.VFCTRL_MISC_CONTROL) == 0xFFFC << 16
    assert k.read_dte(0xFFFD).domain_id != parent.id
    assert k.pas.trans.ids[0xFFFD] is RESERVED
    # The guest still runs its command buffer through the moved DTE.
    dom = g2.attach(g2.devs[1].gdev)
    g2.invalidate(dom)
    vm2.close()
    vm.close()


def test_trans_devid_pool_enospc_and_reservation_rules() -> None:
    pool = TransDevIdPool()
    owner = object()
    pool.ids = {i: RESERVED for i in range(1, 0x10000)}
    assert pool.alloc(owner) == 0
    with pytest.raises(OSError) as exc:
        pool.alloc(object())
    assert exc.value.errno == errno.ENOSPC
    # Reserving an ID a vIOMMU holds with nowhere to move it: ENOSPC, nothing changes.
    before = dict(pool.ids)
    with pytest.raises(OSError) as exc:
        pool.reserve(0, lambda o, a, b: None)
    assert exc.value.errno == errno.ENOSPC and pool.ids == before
    pool.free(0, owner)
    pool.reserve(0, lambda o, a, b: None)
    pool.reserve(0, lambda o, a, b: None)  # a second reservation is fine
    assert pool.ids[0] is RESERVED


def test_insert_guest_event_and_guest_event_fault() -> None:
    m, vm, dev = boot()
    hw = amd_iommu(m)
    g = guest(vm, m)
    g.add_device(dev, 7)
    gid = amd_viommu(vm.fd, g.viommu_id).gid
    window = g.window
    assert window is not None
    # The host driver publishes one entry it wrote at the guest log's tail.
    entry = E.Event(E.IO_PAGE_FAULT, 7, 0, 0, 0x1234)
    tail = window.read(R.VF_EVT_TAIL) // R.ENTRY_SIZE
    vm.memory.write(g.evt + tail * R.ENTRY_SIZE, entry.to_bytes())
    hw.driver_state.queue(C.insert_guest_event(gid))
    hw.driver_state.completion_wait()
    assert window.read(R.VF_EVT_TAIL) == (tail + 1) * R.ENTRY_SIZE
    assert window.read(R.VF_STATUS) & R.ST_EVT_INT
    assert g.events() == [entry]
    # A guest event log outside guest RAM: the event becomes GUEST_EVENT_FAULT for the host.
    assert hw.vi is not None
    slot = hw.vi.slots[gid]
    hw.vi.vfctrl_write(
        gid, R.VFCTRL_EVT_CONTROL, R.gbuf_value(R.VFCTRL_EVT_CONTROL, 1 << 40, 8, R.GEVT_LOG_EN)
    )
    hw.read_events()
    assert hw.vi.guest_log(slot, entry)
    codes = [ev.code for ev in hw.read_events()]
    assert codes == [E.GUEST_EVENT_FAULT]
    # A guest may not issue the host-only commands: illegal in its own log.
    assert C.decode(C.reset_vmmio(gid)) is not None


def test_command_tail_sets_the_dirty_status_bit() -> None:
    m, vm, dev = boot()
    hw = amd_iommu(m)
    g = guest(vm, m)
    gdev = g.add_device(dev, 7)
    dom = g.attach(gdev)
    gid = amd_viommu(vm.fd, g.viommu_id).gid
    pa, bit = hw.driver_state.pas.dirty_bit(gid)
    hw.driver_state.mem.write_u64(pa, 0)
    g.invalidate(dom)
    assert hw.driver_state.mem.read_u64(pa) >> bit & 1


def test_vm_close_releases_everything() -> None:
    m = im.Machine.build(iommus=["amd"])
    frames = m.memory.frames_in_use
    hw = amd_iommu(m)
    domids = set(hw.driver_state.domids.used)
    with Vm(m, 16 * MIB, table_pool=4 * MIB) as vm:
        dev = m.add_pci_device(iommu=0)
        g = guest(vm, m)
        gdev = g.add_device(dev, 3)
        dom = g.attach(gdev)
        g.map(dom, IOVA, vm.alloc_buffer(PAGE), PAGE)
        g.vmm.alloc_veventq()
        assert m.memory.frames_in_use > frames
    assert vm.closed and dev.bound_to is None
    assert m.memory.frames_in_use == frames
    assert set(hw.driver_state.domids.used) == domids
    assert hw.vi is not None
    assert not hw.driver_state.pas.gids.used and not hw.vi.slots
    vm.close()  # idempotent


def test_struct_iommu_viommu_amd_and_the_vf_mmio_mmap() -> None:
    m, vm, dev = boot()
    hw = amd_iommu(m)
    fd = vm.fd
    dev_id = fd.bind(dev)
    parent = vm.nest_parent(dev_id, hw)
    size = im.uapi.IommuViommuAmd.SIZE
    # AMD's tree copies it with iommu_copy_struct_from_user(&data, user_data, TYPE_AMD,
    # reserved): min_last is the last member, and __iommu_copy_struct_from_user() refuses
    # any length but the struct's with EINVAL before copy_struct_from_user() could say E2BIG.
    for data, code in (
        (b"", errno.EINVAL),
        (bytes(4), errno.EINVAL),
        (bytes(8), errno.EINVAL),
        (bytes(size - 1), errno.EINVAL),
        (bytes(size) + b"\x01", errno.EINVAL),
        (bytes(size + 8), errno.EINVAL),
    ):
        with pytest.raises(OSError) as exc:
            fd.viommu_alloc(dev_id, parent, im.uapi.IOMMU_VIOMMU_TYPE_AMD, data)
        assert exc.value.errno == code
    assert not hw.driver_state.pas.gids.used
    viommu, out = fd.viommu_alloc_data(dev_id, parent, im.uapi.IOMMU_VIOMMU_TYPE_AMD, bytes(size))
    info = im.uapi.IommuViommuAmd.unpack(out)
    assert info.out_vfmmio_mmap_offset and info.out_vfmmio_mmap_length == PAGE
    gid = amd_viommu(fd, viommu).gid
    # The VMM maps the page; a guest store lands in the guest's slot of the PAS.
    vma = fd.mmap(info.out_vfmmio_mmap_offset, info.out_vfmmio_mmap_length)
    vma.write(R.VF_EVT_HEAD, (0x30).to_bytes(8, "little"))
    pas = hw.driver_state.pas
    slot_pa = pas.pt.iova_to_phys(R.PAS_GUEST_MMIO_BASE + gid * R.PAS_GUEST_MMIO_ENTRY)
    assert m.memory.read_u64(slot_pa + R.VF_EVT_HEAD) == 0x30
    m.memory.write_u64(slot_pa + R.VF_STATUS, R.ST_CMDBUF_RUN)  # as the hardware would
    assert int.from_bytes(vma.read(R.VF_STATUS, 8), "little") == R.ST_CMDBUF_RUN
    assert vma.read(0x100, 4) == bytes(4)  # reserved space of the page reads zero
    with pytest.raises(OSError) as exc:
        fd.destroy(viommu)  # the mapping holds the vIOMMU
    assert exc.value.errno == errno.EBUSY
    vma.close()
    fd.destroy(viommu)
    with pytest.raises(OSError) as exc:
        fd.mmap(info.out_vfmmio_mmap_offset, PAGE)
    assert exc.value.errno == errno.ENXIO
    vm.close()
