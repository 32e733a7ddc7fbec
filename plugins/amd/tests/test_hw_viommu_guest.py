"""The issue's "done when": a guest with its stage-1 tables and command buffer in guest RAM,
DMA through the nested translation, a changed mapping invalidated through the guest command
buffer only -- zero VMM traps with the HW-vIOMMU, the same DMA results with the traps counted
on the VMM-mediated path. Plus guest events, vEVENTQ forwarding and command traps."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from iommufd_amd import commands as C
from iommufd_amd import events as E
from iommufd_amd import regs as R
from iommufd_amd.domain import AmdNestedDomain
from iommufd_amd.guest import GuestAmd

import iommufd_model as im
from iommufd_model.vmm import Vm

PAGE = 4096
MIB = 1 << 20
IOVA = 0x40_0000


def boot(
    accelerated: bool, options: dict[str, Any] | None = None, *, ats: bool = False
) -> tuple[Any, Vm, GuestAmd, Any]:
    m = im.Machine.build(iommus=["amd"], options={"amd": options or {}})
    vm = Vm(m, 16 * MIB, table_pool=4 * MIB)
    dev = m.add_pci_device(iommu=0, ats=ats)
    g = vm.viommu(m.iommus[0], accelerated=accelerated)
    assert isinstance(g, GuestAmd)
    return m, vm, g, dev


def run_scenario(accelerated: bool) -> tuple[list[bytes], int, int]:
    """The done-when scenario; returns the DMA results, traps and invalidations."""
    _m, vm, g, dev = boot(accelerated)
    gdev = g.add_device(dev, 0x21)
    dom = g.attach(gdev)
    a, b = vm.alloc_buffer(PAGE), vm.alloc_buffer(PAGE)
    vm.memory.write(a, b"old page" * 512)
    vm.memory.write(b, b"new page" * 512)
    g.map(dom, IOVA, a, PAGE)
    g.invalidate(dom, IOVA, PAGE)
    traps = vm.stats.traps
    seen = [dev.dma_read(IOVA, 8)]  # nested: guest v2 tables over the host stage 2
    dev.dma_write(IOVA + 8, b"devwrite")
    seen.append(vm.memory.read(a + 8, 8))
    g.unmap(dom, IOVA, PAGE)
    g.map(dom, IOVA, b, PAGE)
    seen.append(dev.dma_read(IOVA, 8))  # stale: the IOTLB still holds the old page
    invalidations = 0
    for _ in range(3):
        g.invalidate(dom, IOVA, PAGE)  # through the guest command buffer only
        invalidations += 1
    seen.append(dev.dma_read(IOVA, 8))
    g.unmap(dom, IOVA, PAGE)
    g.invalidate(dom)
    invalidations += 1
    with pytest.raises(im.DmaFault):
        dev.dma_read(IOVA, 8)
    return seen, vm.stats.traps - traps, invalidations


def test_done_when_hw_viommu_and_mediated_agree() -> None:
    hw_seen, hw_traps, n = run_scenario(True)
    vmm_seen, vmm_traps, _ = run_scenario(False)
    assert hw_seen == [b"old page", b"devwrite", b"old page", b"new page"]
    assert vmm_seen == hw_seen
    assert hw_traps == 0  # the HW-vIOMMU: no VMM intervention at all
    assert vmm_traps >= n  # mediated: at least one trap per invalidation


def test_hw_viommu_counts_and_guest_state() -> None:
    _m, vm, g, dev = boot(True)
    gdev = g.add_device(dev, 3)
    dom = g.attach(gdev)
    slot = g.vmm.irq.slot
    before = (slot.commands, vm.stats.traps, vm.stats.forwarded)
    for _ in range(10):
        g.invalidate(dom, IOVA, PAGE)
    assert slot.commands - before[0] == 20  # INVALIDATE_IOMMU_PAGES + COMPLETION_WAIT each
    assert (vm.stats.traps, vm.stats.forwarded) == before[1:]
    assert vm.stats.by_kind == {"MMIO": 3, "gDTE": 1}  # boot and the one gDTE only


def test_pasid_domains_side_by_side_both_paths() -> None:
    for acc in (True, False):
        _m, vm, g, dev = boot(acc)
        gdev = g.add_device(dev, 1)
        rid = g.attach(gdev)
        p5 = g.attach(gdev, pasid=5)
        a, b = vm.alloc_buffer(PAGE), vm.alloc_buffer(PAGE)
        vm.memory.write(a, b"rid-page")
        vm.memory.write(b, b"pasid-5!")
        g.map(rid, IOVA, a, PAGE)
        g.map(p5, IOVA, b, PAGE)
        g.invalidate(rid)
        g.invalidate(p5)
        assert dev.dma_read(IOVA, 8) == b"rid-page"
        assert dev.dma_read(IOVA, 8, pasid=5) == b"pasid-5!"
        g.detach(p5)
        with pytest.raises(im.DmaFault):
            dev.dma_read(IOVA, 8, pasid=5)
        assert dev.dma_read(IOVA, 8) == b"rid-page"


def test_fault_goes_to_the_guest_log_with_the_guest_devid_and_to_the_veventq() -> None:
    m, _vm, g, dev = boot(True)
    gdev = g.add_device(dev, 0x33)
    g.attach(gdev)
    g.vmm.alloc_veventq()
    host_tail = m.iommus[0].mmio["EVT_TAIL"]
    with pytest.raises(im.DmaFault):
        dev.dma_write(IOVA, b"x")
    evs = g.events()
    assert [(e.code, e.devid, e.address, e.write) for e in evs] == [
        (E.IO_PAGE_FAULT, 0x33, IOVA, True)
    ]
    assert evs[0].tag == g.devs[0x33].gdom  # the guest's DomainID, not the host's
    assert g.vmm.read_veventq() == evs
    assert m.iommus[0].mmio["EVT_TAIL"] == host_tail  # the host log never saw it


def test_mediated_fault_reaches_the_guest_through_the_veventq() -> None:
    m, _vm, g, dev = boot(False)
    gdev = g.add_device(dev, 0x34)
    g.attach(gdev)
    g.vmm.alloc_veventq()
    with pytest.raises(im.DmaFault):
        dev.dma_read(IOVA, 4)
    evs = g.events()
    assert [(e.code, e.devid) for e in evs] == [(E.IO_PAGE_FAULT, 0x34)]
    assert m.iommus[0].read_events()[-1].devid == dev.rid  # host log: the host DevID


def test_unvirtualisable_command_traps_to_the_vmm_and_is_never_executed() -> None:
    m, vm, g, dev = boot(True)
    gdev = g.add_device(dev, 2)
    dom = g.attach(gdev)
    hw = m.iommus[0]
    buf = vm.alloc_buffer(PAGE)
    g.map(dom, IOVA, buf, PAGE)
    g.invalidate(dom)
    dev.dma_read(IOVA, 4)
    assert hw.iotlb.lookup((dom_hdom(g, vm, 2), 0), IOVA) is not None
    # Without a VMM handler the processor stalls on INVALIDATE_IOMMU_ALL: nothing flushed.
    g.vmm.irq.set_notify(None)
    g.submit([C.inv_all()])
    slot = g.vmm.irq.slot
    assert slot.stalled and hw.mmio["VIOMMU_STATUS"] & R.VST_CMD_TRAP
    assert hw.iotlb.lookup((dom_hdom(g, vm, 2), 0), IOVA) is not None
    # The VMM's handler emulates it as this guest's invalidations, then resumes (one trap).
    traps = vm.stats.traps
    g.vmm.irq.set_notify(g.vmm._hw_trap)
    g.vmm._hw_trap(slot)
    assert vm.stats.traps == traps + 1 and vm.stats.by_kind["VCMD_TRAP"] == 1
    assert not slot.stalled and not hw.mmio["VIOMMU_STATUS"] & R.VST_CMD_TRAP
    assert hw.iotlb.lookup((dom_hdom(g, vm, 2), 0), IOVA) is None
    g.sync([C.inv_interrupt_table(2)])  # trapped and emulated inline through the notifier
    assert vm.stats.by_kind["VCMD_TRAP"] == 2


def dom_hdom(g: GuestAmd, vm: Vm, gdevid: int) -> int:
    dom = vm.fd.objects.get_hwpt_nested(g.vmm.hwpts[gdevid]).domain
    assert isinstance(dom, AmdNestedDomain)
    return int(dom.ginfo.hdom_id)


def test_illegal_guest_command_stops_the_guest_processor_only() -> None:
    m, _vm, g, dev = boot(True)
    gdev = g.add_device(dev, 2)
    dom = g.attach(gdev)
    hw = m.iommus[0]
    host_tail = hw.mmio["EVT_TAIL"]
    at = g.cmd + g.cmd_tail * 16
    g.submit([b"\xff" * 16])
    evs = g.events()
    assert [e.code for e in evs] == [E.ILLEGAL_COMMAND_ERROR]
    assert evs[0].address == at
    assert hw.mmio["EVT_TAIL"] == host_tail and hw.cmd_running
    with pytest.raises(OSError) as exc:
        g.invalidate(dom)
    assert exc.value.errno == errno.EIO
    g.reset_cmd_buffer()
    g.invalidate(dom)  # the VMM re-allocated the HW queue: the processor runs again


def test_completion_wait_store_outside_guest_ram_is_a_guest_error() -> None:
    _m, vm, g, dev = boot(True)
    g.add_device(dev, 2)
    g.submit([C.completion_wait(vm.ram_size + PAGE, 0x1234)])
    assert [e.code for e in g.events()] == [E.COMMAND_HARDWARE_ERROR]


def test_accelerated_needs_the_hardware() -> None:
    m = im.Machine.build(iommus=["amd"], options={"amd": {"viommu_guests": 0}})
    vm = Vm(m, 16 * MIB, table_pool=4 * MIB)
    with pytest.raises(OSError) as exc:
        vm.viommu(m.iommus[0], accelerated=True)
    assert exc.value.errno == errno.EOPNOTSUPP
    assert isinstance(vm.viommu(m.iommus[0], accelerated=False), GuestAmd)


def test_close_gives_everything_back() -> None:
    m, _vm, g, dev = boot(True)
    hw = m.iommus[0]
    gids = set(hw.driver_state.pas.gids.used)
    g.add_device(dev, 9)
    g.attach(g.devs[9].gdev)
    assert hw.driver_state.pas.gids.used != gids
    g.close()
    assert hw.driver_state.pas.gids.used == gids and not hw.vi.slots
