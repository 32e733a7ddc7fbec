"""Nested scenarios: a guest's own IOMMU driver over the host's stage 2, vendor-neutral.

Each scenario boots a VM (guest RAM mapped at IOVA = GPA in a nest-parent IOAS), asks the
driver for its guest IOMMU model (:meth:`Vm.viommu`: the vendor's guest driver plus the VMM's
vIOMMU emulation), passes one device through and drives it only through the
:class:`~iommufd_model.vmm.GuestIommu` API: attach, map, unmap, invalidate, detach. A driver
without a guest model answers EOPNOTSUPP and the cell is "unsupported" with that errno.

Besides the hardware costs, these cells report what the VMM paid (the VM is built with
:meth:`ScenarioContext.vm`): ``traps`` (guest accesses that exited to the VMM) and
``forwarded`` (guest commands the VMM re-issued through iommufd).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import attrs

from iommufd_model.driver import Feature
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.machine import Machine
from iommufd_model.scenarios.base import (
    Divergence,
    Rig,
    Scenario,
    ScenarioContext,
    Unsupported,
    check,
    describe_oserror,
    expect_errno,
    expect_fault,
    pattern,
)
from iommufd_model.scenarios.catalog import scenario
from iommufd_model.vmm import GuestDevice, GuestDomain, GuestIommu, Vm

MIB = 1 << 20
RAM = 8 * MIB  # guest RAM: buffers from the bottom, guest IOMMU tables from the top
TABLE_POOL = 2 * MIB
VIRT_ID = 0x18  # the device as the guest sees it (vRID 00:03.0, vSID, guest DevID)
PASID = 5
IOVA = 0x4000_0000  # guest IOVAs are not GPAs: a translation that skips stage 1 is caught
LARGE = 2 * MIB
BUF = 4 * PAGE_SIZE
NESTED = (Feature.PAGING, Feature.NEST_PARENT, Feature.NESTED)
T = TypeVar("T")

NESTED_SCENARIOS: list[Scenario] = []


def listed_scenario(
    listing: list[Scenario], *features: Feature
) -> Callable[[Callable[[ScenarioContext], None]], Scenario]:
    """catalog's ``@scenario`` with the nested features (so importing a module registers its
    cells in the matrix), also appended to ``listing`` so tests can name the module's cells."""

    def deco(fn: Callable[[ScenarioContext], None]) -> Scenario:
        sc = scenario(*NESTED, *features)(fn)
        listing.append(sc)
        return sc

    return deco


def nested_scenario(*features: Feature) -> Callable[[Callable[[ScenarioContext], None]], Scenario]:
    return listed_scenario(NESTED_SCENARIOS, *features)


# -- the guest world ------------------------------------------------------------------------------
@attrs.define(eq=False)
class Guest:
    """One VM with its guest IOMMU and one passed-through device."""

    machine: Machine
    vm: Vm
    iommu: GuestIommu
    gdev: GuestDevice

    def buffer(self, length: int, seed: int, *, align: int = PAGE_SIZE) -> int:
        """A guest-physical buffer filled with :func:`big_pattern` (``align``-aligned GPA)."""
        gpa = self.vm.alloc_buffer(length + align - PAGE_SIZE)
        gpa = -(-gpa // align) * align
        self.vm.memory.write(gpa, big_pattern(seed, length))
        return gpa

    def ram(self, gpa: int, n: int) -> bytes:
        return self.vm.memory.read(gpa, n)

    def dma_read(self, iova: int, n: int, pasid: int | None = None) -> bytes:
        return self.gdev.dev.dma_read(iova, n, pasid=pasid)

    def dma_write(self, iova: int, data: bytes, pasid: int | None = None) -> None:
        self.gdev.dev.dma_write(iova, data, pasid=pasid)

    def iotlb_hits(self) -> int:
        return sum(hw.stats.iotlb_hits for hw in self.machine.iommus)

    def domain(self, pasid: int | None = None) -> GuestDomain:
        """The guest attaches a fresh stage-1 domain (EOPNOTSUPP for PASID -> unsupported)."""
        if pasid is None:
            return self.iommu.attach(self.gdev)
        return refused_as(Feature.PASID, lambda: self.iommu.attach(self.gdev, pasid=pasid))


def big_pattern(seed: int, n: int) -> bytes:
    """:func:`pattern` for the first page; beyond it every 4 KiB page differs from the
    others too (a page index mixed in), built fast enough for megabytes."""
    if n <= PAGE_SIZE:
        return pattern(seed, n)
    pages = -(-n // PAGE_SIZE)
    base = int.from_bytes(pattern(seed, PAGE_SIZE) * pages, "little")
    tags = b"".join(
        (i * 0x9E37_79B9).to_bytes(8, "little") * (PAGE_SIZE // 8) for i in range(pages)
    )
    return (base ^ int.from_bytes(tags, "little")).to_bytes(pages * PAGE_SIZE, "little")[:n]


def refused_as(feature: Feature, fn: Callable[[], T]) -> T:
    """Run ``fn``; an EOPNOTSUPP from it means the driver lacks ``feature`` (unsupported)."""
    try:
        return fn()
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            raise Unsupported(feature, exc.errno, describe_oserror(exc)) from exc
        raise


def boot(
    ctx: ScenarioContext, machine: Machine | None = None, *, accelerated: bool = False
) -> Guest:
    """A VM (on a fresh machine unless given one), the guest IOMMU model and one
    passed-through device. ``accelerated`` asks for the vendor's hardware-accelerated guest
    queue: a driver with a guest model but no such queue is unsupported (``hw_queue``) with
    the errno ``Vm.viommu`` gave; one with no guest model at all stays ``nested``."""
    machine = machine if machine is not None else ctx.machine()
    vm = ctx.vm(machine, ram_size=RAM, table_pool=TABLE_POOL)  # its traps count in the costs
    hw = machine.iommus[0]
    ctx.need(Feature.NESTED, lambda: vm.viommu(hw))
    if accelerated:
        try:
            viommu = vm.viommu(hw, accelerated=True)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            refused_as(Feature.NESTED, lambda: vm.viommu(hw))  # no guest model at all
            raise ctx.unsupported(Feature.HW_QUEUE, exc) from exc
    else:
        viommu = refused_as(Feature.NESTED, lambda: vm.viommu(hw))
    gdev = viommu.add_device(machine.add_pci_device(iommu=0), VIRT_ID)
    return Guest(machine, vm, viommu, gdev)


def stale_or_fresh(
    g: Guest, iova: int, old: bytes, new: bytes, what: str, pasid: int | None = None
) -> bool:
    """DMA after a guest remap without invalidation: an IOTLB hit must serve the old page,
    a miss must walk the new tables. Returns True when the stale translation was used."""
    before = g.iotlb_hits()
    got = g.dma_read(iova, len(old), pasid)
    if g.iotlb_hits() > before:
        check(got == old, f"{what}: IOTLB hit but DMA did not see the cached translation")
        return True
    check(got == new, f"{what}: IOTLB miss but DMA did not see the guest's new tables")
    return False


def remap(g: Guest, dom: GuestDomain, iova: int, gpa: int, size: int) -> None:
    """The guest points ``[iova, iova+size)`` at ``gpa`` and does not invalidate."""
    g.iommu.unmap(dom, iova, size)
    g.iommu.map(dom, iova, gpa, size)


# -- scenarios ----------------------------------------------------------------------------------
@nested_scenario()
def nested_dma(ctx: ScenarioContext) -> None:
    """Guest stage 1 over host stage 2: DMA reads and writes land in guest RAM."""
    g = boot(ctx)
    dom = g.domain()
    gpa = g.buffer(BUF, 31)
    expect_fault(lambda: g.dma_read(IOVA, 8), "DMA before the guest mapped anything")
    g.iommu.map(dom, IOVA, gpa, BUF)
    check(g.dma_read(IOVA, BUF) == big_pattern(31, BUF), "DMA read != guest RAM behind the IOVA")
    data = big_pattern(32, 3000)
    g.dma_write(IOVA + PAGE_SIZE + 100, data)
    check(g.ram(gpa + PAGE_SIZE + 100, len(data)) == data, "DMA write did not land in guest RAM")
    check(g.ram(gpa, 100) == big_pattern(31, 100), "DMA write clobbered a neighbour")
    expect_fault(lambda: g.dma_read(gpa, 8), "IOVA = GPA went through: stage 1 bypassed")
    expect_fault(lambda: g.dma_read(IOVA + BUF, 8), "DMA past the guest mapping")
    ro = g.buffer(PAGE_SIZE, 33)
    g.iommu.map(dom, IOVA + BUF, ro, PAGE_SIZE, write=False)
    check(g.dma_read(IOVA + BUF, 64) == big_pattern(33, 64), "read through a read-only mapping")
    expect_fault(lambda: g.dma_write(IOVA + BUF, b"w"), "write through a read-only mapping")
    check(g.ram(ro, 64) == big_pattern(33, 64), "refused write reached guest RAM")


@nested_scenario(Feature.HWPT_INVALIDATE)
def nested_invalidation(ctx: ScenarioContext) -> None:
    """Guest remaps without invalidating (stale iff the IOTLB hit), then invalidates one
    page, a range and everything: DMA sees the new mapping each time."""
    g = boot(ctx)
    invalidation_flow(g, g.domain())


def invalidation_flow(g: Guest, dom: GuestDomain) -> None:
    """:func:`nested_invalidation`'s steps on an attached domain: map, remap without
    invalidating (stale iff the IOTLB hit), invalidate a page, a range, everything."""
    a, b = g.buffer(BUF, 41), g.buffer(BUF, 42)
    pa, pb = big_pattern(41, BUF), big_pattern(42, BUF)
    g.iommu.map(dom, IOVA, a, BUF)
    check(g.dma_read(IOVA, BUF) == pa, "first DMA")  # every page now cached
    page = slice(0, PAGE_SIZE)
    remap(g, dom, IOVA, b, PAGE_SIZE)  # one page, a -> b
    stale_or_fresh(g, IOVA, pa[page], pb[page], "page 0 before invalidation")
    g.iommu.invalidate(dom, IOVA, PAGE_SIZE)
    check(g.dma_read(IOVA, PAGE_SIZE) == pb[page], "page 0 stale after a page invalidation")
    rest = slice(PAGE_SIZE, BUF)
    remap(g, dom, IOVA + PAGE_SIZE, b + PAGE_SIZE, BUF - PAGE_SIZE)  # a range, a -> b
    for i in range(1, BUF // PAGE_SIZE):
        span = slice(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)
        stale_or_fresh(g, IOVA + i * PAGE_SIZE, pa[span], pb[span], f"page {i} uninvalidated")
    g.iommu.invalidate(dom, IOVA + PAGE_SIZE, BUF - PAGE_SIZE)
    check(g.dma_read(IOVA + PAGE_SIZE, BUF - PAGE_SIZE) == pb[rest], "stale after a range flush")
    remap(g, dom, IOVA, a, BUF)  # everything, b -> a
    for i in range(BUF // PAGE_SIZE):
        span = slice(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)
        stale_or_fresh(g, IOVA + i * PAGE_SIZE, pb[span], pa[span], f"page {i} before flush-all")
    g.iommu.invalidate(dom)
    check(g.dma_read(IOVA, BUF) == pa, "stale after invalidating the whole domain")


@nested_scenario(Feature.HWPT_INVALIDATE)
def nested_unmap_faults(ctx: ScenarioContext) -> None:
    """Guest unmap + invalidate: DMA to the range faults, nothing is written, the rest works."""
    g = boot(ctx)
    dom = g.domain()
    gpa = g.buffer(2 * BUF, 51)
    g.iommu.map(dom, IOVA, gpa, 2 * BUF)
    check(g.dma_read(IOVA, 2 * BUF) == big_pattern(51, 2 * BUF), "DMA before unmap")
    g.iommu.unmap(dom, IOVA, BUF)
    g.iommu.invalidate(dom, IOVA, BUF)
    expect_fault(lambda: g.dma_read(IOVA, 8), "read after unmap + invalidate")
    expect_fault(lambda: g.dma_read(IOVA + BUF - 8, 8), "read of the range's last page")
    expect_fault(lambda: g.dma_write(IOVA + PAGE_SIZE, b"z" * 8), "write after unmap")
    check(g.ram(gpa + PAGE_SIZE, 8) == big_pattern(51, PAGE_SIZE + 8)[PAGE_SIZE:], "write leaked")
    check(g.dma_read(IOVA + BUF, 16) == big_pattern(51, BUF + 16)[BUF:], "unmap hit the neighbour")
    g.iommu.map(dom, IOVA, gpa + BUF, PAGE_SIZE)  # the guest reuses the IOVA
    check(g.dma_read(IOVA, 16) == big_pattern(51, BUF + 16)[BUF:], "remapped IOVA after a fault")


@nested_scenario(Feature.HWPT_INVALIDATE)
def nested_large_pages(ctx: ScenarioContext) -> None:
    """A 2 MiB guest stage-1 page over guest RAM: every offset translates, unmap clears all."""
    g = boot(ctx)
    dom = g.domain()
    gpa = g.buffer(LARGE, 61, align=LARGE)
    data = big_pattern(61, LARGE)
    g.iommu.map(dom, IOVA, gpa, LARGE)
    for off in (0, PAGE_SIZE * 37 + 5, LARGE // 2, LARGE - 64):
        check(g.dma_read(IOVA + off, 64) == data[off : off + 64], f"large page offset {off:#x}")
    g.dma_write(IOVA + MIB + 3, b"large")
    check(g.ram(gpa + MIB + 3, 5) == b"large", "write through a large page missed guest RAM")
    g.iommu.unmap(dom, IOVA, LARGE)
    g.iommu.invalidate(dom, IOVA, LARGE)
    for off in (0, MIB, LARGE - 8):
        expect_fault(partial(g.dma_read, IOVA + off, 8), f"large page gone, {off:#x}")
    g.iommu.map(dom, IOVA, gpa, PAGE_SIZE)  # a 4 KiB page where the large one was
    check(g.dma_read(IOVA, 16) == data[:16], "4 KiB page after the large page")
    expect_fault(lambda: g.dma_read(IOVA + PAGE_SIZE, 8), "rest of the old large page")


@nested_scenario(Feature.PASID)
def nested_pasid(ctx: ScenarioContext) -> None:
    """A guest PASID domain beside the guest RID domain: each request uses its own tables."""
    g = boot(ctx)
    rid = g.domain()
    pas = g.domain(PASID)
    a, b = g.buffer(BUF, 71), g.buffer(BUF, 72)
    g.iommu.map(rid, IOVA, a, BUF)
    g.iommu.map(pas, IOVA, b, BUF)
    check(g.dma_read(IOVA, BUF) == big_pattern(71, BUF), "RID DMA not through the RID domain")
    check(g.dma_read(IOVA, BUF, PASID) == big_pattern(72, BUF), "PASID DMA not its domain")
    expect_fault(lambda: g.dma_read(IOVA, 8, PASID + 1), "DMA with a PASID the guest never set")
    g.dma_write(IOVA + 8, b"pasid", PASID)
    check(g.ram(b + 8, 5) == b"pasid", "PASID write missed its buffer")
    check(g.ram(a + 8, 5) == big_pattern(71, 13)[8:], "PASID write reached the RID's buffer")
    g.iommu.unmap(pas, IOVA, BUF)
    g.iommu.invalidate(pas)
    expect_fault(lambda: g.dma_read(IOVA, 8, PASID), "PASID DMA after unmap + invalidate")
    check(g.dma_read(IOVA, 16) == big_pattern(71, 16), "PASID invalidation broke the RID domain")
    g.iommu.detach(pas)
    expect_fault(lambda: g.dma_read(IOVA, 8, PASID), "PASID DMA after detach")
    check(g.dma_read(IOVA, 16) == big_pattern(71, 16), "PASID detach broke the RID domain")
    g.iommu.detach(rid)
    expect_fault(lambda: g.dma_read(IOVA, 8), "RID DMA after detach")


@nested_scenario()
def nested_guest_isolation(ctx: ScenarioContext) -> None:
    """A hostile guest points stage 1 outside its RAM: stage 2 refuses, host memory intact."""
    g = boot(ctx)
    dom = g.domain()
    beyond = g.vm.ram_size + 16 * MIB
    g.iommu.map(dom, IOVA, beyond, PAGE_SIZE)
    g.iommu.map(dom, IOVA + PAGE_SIZE, g.vm.ram_size - PAGE_SIZE, 2 * PAGE_SIZE)
    expect_fault(lambda: g.dma_read(IOVA, 8), "stage-1 PTE beyond guest RAM")
    expect_fault(lambda: g.dma_write(IOVA, b"evil"), "write beyond guest RAM")
    check(len(g.dma_read(IOVA + PAGE_SIZE, 64)) == 64, "last page of guest RAM")
    expect_fault(lambda: g.dma_read(IOVA + 2 * PAGE_SIZE, 8), "page just past guest RAM")


_TEARDOWN = ("detach_rid", "detach_pasid", "unbind")


def teardown_orders(with_pasid: bool) -> list[tuple[str, ...]]:
    """Every order of guest detaches and the VMM's unbind, then closing the iommufd.

    A guest may detach after the VMM unplugged the device (its writes then go nowhere);
    without an unbind every domain must be detached before the VMM closes. Closing alone
    (a VMM that dies) is legal too."""
    steps = _TEARDOWN if with_pasid else _TEARDOWN[::2]
    detaches = set(steps) - {"unbind"}
    orders: list[tuple[str, ...]] = [("close",)]

    def grow(prefix: tuple[str, ...]) -> None:
        if "unbind" in prefix or detaches <= set(prefix):
            orders.append((*prefix, "close"))
        for step in steps:
            if step not in prefix:
                grow((*prefix, step))

    grow(())
    return orders


@nested_scenario()
def nested_teardown(ctx: ScenarioContext) -> None:
    """Tear down guest domains, the device and the VM in every legal order: EBUSY where the
    kernel refuses, DMA faults once a domain is gone, the device is reusable afterwards."""
    probe = boot(ctx)
    probe.domain()
    try:
        probe.domain(PASID)
        with_pasid = True
    except Unsupported:
        with_pasid = False
    probe.vm.fd.close()
    for order in teardown_orders(with_pasid):
        _teardown_once(ctx, order, with_pasid)


def _teardown_once(ctx: ScenarioContext, order: tuple[str, ...], with_pasid: bool) -> None:
    g = boot(ctx)
    fd = g.vm.fd
    doms = {"detach_rid": g.domain()}
    if with_pasid:
        doms["detach_pasid"] = g.domain(PASID)
    gpa = g.buffer(BUF, 81)
    for dom in doms.values():
        g.iommu.map(dom, IOVA, gpa, BUF)
    live = {dom.pasid for dom in doms.values()}
    parent = g.vm.nest_parent(g.gdev.dev_id, g.machine.iommus[0])
    expect_errno(errno.EBUSY, lambda: fd.destroy(parent), f"{order}: nest parent in use")
    for step in order:
        expect_errno(errno.EBUSY, lambda: fd.destroy(g.vm.ioas_id), f"{order}: IOAS in use")
        if step in doms:
            g.iommu.detach(doms[step])
            live.discard(doms[step].pasid)
        elif step == "unbind":
            fd.unbind(g.gdev.dev_id)
            live.clear()
        else:
            fd.close()
            live.clear()
        for pasid in (None, PASID) if with_pasid else (None,):
            if pasid in live:
                check(g.dma_read(IOVA, 8, pasid) == big_pattern(81, 8), f"{order}: {pasid} lost")
            else:
                expect_fault(partial(g.dma_read, IOVA, 8, pasid), f"{order}: after {step}")
    again = Rig(g.machine, g.gdev.dev)
    ioas = again.ioas_alloc()
    again.fd.attach(again.dev_id, ioas)
    iova = again.ioas_map(ioas, again.buffer(BUF, 82), BUF)
    if again.dev.dma_read(iova, 8) != pattern(82, 8):
        raise Divergence(f"{order}: device not reusable after the VM went away")


__all__ = [
    "NESTED_SCENARIOS",
    "Guest",
    "boot",
    "invalidation_flow",
    "nested_scenario",
    "teardown_orders",
]
