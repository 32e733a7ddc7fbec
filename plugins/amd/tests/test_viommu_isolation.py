"""Isolation under a hostile guest (hypothesis): two VMs on one AMD IOMMU. Guest A writes
arbitrary bytes and well-formed commands with any gDomID / gDevID (including B's), points
completion-wait stores anywhere, floods COMPLETION_WAIT and points its command buffer
outside its RAM. Nothing of VM B (its RAM, its cached translations, its DTE) nor of the host
(memory outside A's RAM, the host event log and command processor) may change."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iommufd_amd import commands as C
from iommufd_amd import regs as R
from iommufd_amd.domain import AmdDomain
from iommufd_amd.guest import GuestAmd
from iommufd_amd.viommu.hw import IOMMU_DEVID

import iommufd_model as im
from iommufd_model.hw.memory import PAGE_SHIFT
from iommufd_model.vmm import Vm

from .conftest import amd_iommu, amd_viommu

PAGE = 4096
MIB = 1 << 20
IOVA = 0x20_0000
RAM = 16 * MIB


class World:
    """VM A (hostile, HW-vIOMMU or mediated) and VM B (victim, HW-vIOMMU) on one IOMMU."""

    def __init__(self, accelerated: bool) -> None:
        m = self.m = im.Machine.build(iommus=["amd"])
        self.hw = amd_iommu(m)
        self.vms: list[Vm] = []
        self.g: list[GuestAmd] = []
        self.dev: list[Any] = []
        self.dom: list[Any] = []
        self.pages: list[tuple[int, int]] = []
        for i, acc in enumerate((accelerated, True)):
            vm = Vm(m, RAM, table_pool=4 * MIB)
            dev = m.add_pci_device(iommu=0)
            g = vm.viommu(self.hw, accelerated=acc)
            assert isinstance(g, GuestAmd)
            gdev = g.add_device(dev, 0x10 + i)  # gDevIDs 0x10 (A) and 0x11 (B)
            dom = g.attach(gdev)
            p1, p2 = vm.alloc_buffer(PAGE), vm.alloc_buffer(PAGE)
            vm.memory.write(p1, bytes([0xA1 + i]) * PAGE)
            vm.memory.write(p2, bytes([0xB1 + i]) * PAGE)
            g.map(dom, IOVA, p1, PAGE)
            g.invalidate(dom)
            self.vms.append(vm)
            self.g.append(g)
            self.dev.append(dev)
            self.dom.append(dom)
            self.pages.append((p1, p2))
        a = self.vms[0]
        self.a_pfns = {a.vmm.translate(a.ram_va + off) for off in range(0, RAM, PAGE)}
        slot = self.g[0].vmm.irq.slot if self.g[0].vmm.irq is not None else None
        self.a_gid = slot.gid if slot is not None else amd_viommu(a.fd, self.g[0].viommu_id).gid

    def victim_stale(self) -> None:
        """B remaps its IOVA without invalidating: its IOTLB still holds the old page."""
        g, dom, (_p1, p2) = self.g[1], self.dom[1], self.pages[1]
        assert self.dev[1].dma_read(IOVA, 1) == b"\xa2"
        g.unmap(dom, IOVA, PAGE)
        g.map(dom, IOVA, p2, PAGE)

    def victim_restore(self) -> None:
        g, dom, (p1, _p2) = self.g[1], self.dom[1], self.pages[1]
        g.invalidate(dom, IOVA, PAGE)
        assert self.dev[1].dma_read(IOVA, 1) == b"\xb2"
        g.unmap(dom, IOVA, PAGE)
        g.map(dom, IOVA, p1, PAGE)
        g.invalidate(dom, IOVA, PAGE)

    def host_state(self) -> dict[str, Any]:
        mem = self.m.memory
        pas = self.hw.driver_state.pas
        mmio_pfn = pas.mmio_frames[0]
        a_slot = slice((self.a_gid * 64) % PAGE, (self.a_gid * 64) % PAGE + 64)
        k = self.hw.driver_state
        # The host command buffer and its semaphore move when the VMM legitimately asks the
        # kernel to flush A's own IDs: what those commands touch is checked by ``spy``.
        host_ring = {(k.cmd_buf >> PAGE_SHIFT) + i for i in range(2)} | {k.cmd_sem >> PAGE_SHIFT}
        pages: dict[int, bytes] = {}
        for pfn, page in mem._pages.items():
            if pfn in self.a_pfns or pfn in host_ring:
                continue
            data = bytearray(page)
            if pfn == mmio_pfn:
                data[a_slot] = bytes(64)  # A's own guest registers
            if any(data):
                pages[pfn] = bytes(data)
        b = self.hw.driver_state.read_dte(self.dev[1].rid)
        return {
            "pages": pages,
            "host_evt_tail": self.hw.mmio["EVT_TAIL"],
            "host_cmd_run": self.hw.cmd_running,
            "b_dte": b.encode(),
            "b_dte_cached": self.hw.dte_cache.get(self.dev[1].rid),
            "own_dte": self.hw.driver_state.read_dte(IOMMU_DEVID).encode(),
            "b_traps": self.vms[1].stats.traps,
        }


_WORLDS: dict[bool, World] = {}


def world(accelerated: bool) -> World:
    if accelerated not in _WORLDS:
        _WORLDS[accelerated] = World(accelerated)
    return _WORLDS[accelerated]


ids = st.sampled_from([0, 1, 2, 0x10, 0x11, 0x7F, 0xFFFF]) | st.integers(0, 0xFFFF)
addrs = st.sampled_from([0, RAM - 8, RAM, RAM + PAGE, 1 << 40, (1 << 52) - 8]) | st.integers(
    0, (1 << 52) - 1
).map(lambda a: a & ~7)
commands = st.one_of(
    st.binary(min_size=16, max_size=16),
    st.builds(
        lambda d, a, s: C.inv_iommu_pages(d, a & ~0xFFF, s),
        ids,
        addrs,
        st.sampled_from([PAGE, 1 << 21, 1 << 64]),
    ),
    st.builds(lambda d, p: C.inv_iommu_all_pages(d, pasid=p, gn=True), ids, st.integers(0, 15)),
    st.builds(lambda d, a: C.inv_iotlb_pages(d, a & ~0xFFF, PAGE), ids, addrs),
    st.builds(C.inv_devtab_entry, ids),
    st.builds(
        lambda a, v: C.completion_wait(a, v, interrupt=True), addrs, st.integers(0, (1 << 64) - 1)
    ),
    st.just(C.inv_all()),
    st.builds(C.inv_interrupt_table, ids),
    st.builds(lambda d, t: C.complete_ppr(d, 0, 0, t), ids, st.integers(0, 0x1FF)),
)
streams = st.lists(
    st.one_of(
        commands.map(lambda c: [c]),
        st.integers(1, 300).map(lambda n: [C.completion_wait(RAM - 8, n, interrupt=True)] * n),
    ),
    min_size=1,
    max_size=12,
)


def a_may_flush(w: World) -> tuple[set[int], set[int]]:
    """The host DomainIDs and DeviceIDs that belong to VM A (its nest parent's DomainID tags
    its translate DTE and is what every unused gDomID maps to)."""
    drv = amd_viommu(w.vms[0].fd, w.g[0].viommu_id)
    assert isinstance(drv.parent, AmdDomain)
    return ({i.hdom_id for i in drv.gdomids.values()} | {drv.parent.id}, {w.dev[0].rid})


def hostile_run(w: World, stream: list[list[bytes]], outside: bool) -> None:
    """Run A's stream; every command the host command processor runs meanwhile must only
    concern A's own host IDs (the VMM may re-issue A's invalidations, nothing more)."""
    executed: list[C.Command] = []
    real = w.hw.execute

    def spy(cmd: C.Command, addr: int) -> bool:
        executed.append(cmd)
        return bool(real(cmd, addr))

    w.hw.execute = spy  # type: ignore[method-assign]
    try:
        _hostile_run(w, stream, outside)
    finally:
        del w.hw.execute
    doms, devs = a_may_flush(w)
    k = w.hw.driver_state
    for cmd in executed:
        if cmd.opcode == C.INVALIDATE_IOMMU_PAGES:
            assert cmd.domid in doms, cmd
        elif cmd.opcode in (C.INVALIDATE_IOTLB_PAGES, C.INVALIDATE_DEVTAB_ENTRY):
            assert cmd.devid in devs, cmd
        else:
            assert cmd.opcode == C.COMPLETION_WAIT and cmd.address == k.cmd_sem, cmd


def _hostile_run(w: World, stream: list[list[bytes]], outside: bool) -> None:
    a = w.g[0]
    for chunk in stream:
        for raw in chunk:
            try:
                a.submit([raw])
            except OSError:  # full, stopped or its buffer is gone: the guest resets it
                _reset(a, w)
        if a.stopped or (a.window is not None and not a.window.read(R.VF_STATUS) & R.ST_CMDBUF_RUN):
            _reset(a, w)
    if outside:
        for bad in (RAM, RAM + PAGE, 1 << 40):
            with contextlib.suppress(OSError):
                a.reset_cmd_buffer(bad)
            with contextlib.suppress(OSError):
                a.submit([C.inv_all(), C.completion_wait(0, 1)])
    _reset(a, w)
    a.events()


def _reset(a: GuestAmd, w: World) -> None:
    try:
        a.reset_cmd_buffer(
            w.vms[0].memory.pool_start * PAGE - 64 * PAGE if a.cmd >= RAM or a.cmd < 0 else a.cmd
        )
    except OSError:
        a.reset_cmd_buffer(a.cmd if 0 <= a.cmd < RAM else 0)


def check_isolated(accelerated: bool, stream: list[list[bytes]], outside: bool) -> None:
    w = world(accelerated)
    w.victim_stale()
    before = w.host_state()
    hostile_run(w, stream, outside)
    assert w.host_state() == before
    # B's cached translation survived (stale), and its own invalidation still works.
    assert w.dev[1].dma_read(IOVA, 1) == b"\xa2"
    w.victim_restore()
    # A still works for itself (its own RAM is its own to scribble on).
    w.g[0].invalidate(w.dom[0])
    w.dev[0].dma_read(IOVA, 1)


@pytest.mark.parametrize("hw_viommu", [True, False], ids=["hw-viommu", "mediated"])
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=streams, outside=st.booleans())
def test_hostile_guest_cannot_touch_another_vm_or_the_host(
    hw_viommu: bool, stream: list[list[bytes]], outside: bool
) -> None:
    """A guest on the HW-vIOMMU (its command buffer consumed by the hardware) and one behind
    the VMM-mediated path: whatever its command stream, neither reaches outside its VM."""
    check_isolated(hw_viommu, stream, outside)


def test_command_buffer_outside_ram_is_refused_and_changes_nothing() -> None:
    w = World(True)
    a = w.g[0]
    before = w.host_state()
    for bad in (RAM, RAM + PAGE, 1 << 40):
        try:
            a.reset_cmd_buffer(bad)
        except OSError:
            pass
        else:
            raise AssertionError(f"command buffer at {bad:#x} accepted")
    assert w.host_state() == before
    assert PAGE_SHIFT == 12
