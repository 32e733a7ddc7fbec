"""Guest-facing scenarios: fault delivery to a vEVENTQ, the accelerated guest queue, and two
VMs on one machine under a hostile guest. Vendor-neutral, over the :class:`GuestIommu` API.

Like the nested cells (:mod:`iommufd_model.scenarios.nested`), each boots VMs with
:func:`~iommufd_model.scenarios.nested.boot`, so their VMM traps count in the costs.

The vEVENTQ records are vendor formats; :data:`VEVENT_RECORDS` decodes the two fields the
scenario checks (the device ID the record names and the faulting input address), keyed by the
uAPI vEVENTQ type. A driver whose declared types have no entry there is a divergence of the
scenario kit (add a decoder), never a silent pass.
"""

from __future__ import annotations

import errno
import random
import struct
from collections.abc import Callable
from functools import partial

import attrs

from iommufd_model.core.eventq import EventFile
from iommufd_model.driver import Feature
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.scenarios.base import (
    Divergence,
    Scenario,
    ScenarioContext,
    Unsupported,
    check,
    expect_fault,
)
from iommufd_model.scenarios.nested import (
    BUF,
    IOVA,
    MIB,
    RAM,
    VIRT_ID,
    Guest,
    big_pattern,
    boot,
    invalidation_flow,
    listed_scenario,
)
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm import GuestDomain

GUEST_SCENARIOS: list[Scenario] = []
HEADER = struct.Struct("<II")  # struct iommufd_vevent_header: flags, sequence


def guest_scenario(*features: Feature) -> Callable[[Callable[[ScenarioContext], None]], Scenario]:
    return listed_scenario(GUEST_SCENARIOS, *features)


# -- vEVENTQ records --------------------------------------------------------------------------
@attrs.frozen
class VeventRecord:
    """How to read one vendor record: its size, the device ID and the input address."""

    size: int
    dev_id: Callable[[bytes], int]
    address: Callable[[bytes], int]


def _u64(raw: bytes, word: int) -> int:
    return int.from_bytes(raw[word * 8 : word * 8 + 8], "little")


VEVENT_RECORDS: dict[int, VeventRecord] = {
    # struct iommu_vevent_arm_smmuv3 { __le64 evt[4]; }: word 0 StreamID [63:32] (the vSID
    # after the kernel rewrote it), word 2 InputAddr.
    U.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3: VeventRecord(
        32, lambda r: _u64(r, 0) >> 32, lambda r: _u64(r, 2)
    ),
    # Model-defined AMD record, one 128-bit event log entry (iommufd_amd/events.py):
    # word 0 DeviceID [15:0] (the guest DevID), words 2-3 Address.
    U.IOMMU_VEVENTQ_TYPE_AMD: VeventRecord(16, lambda r: _u64(r, 0) & 0xFFFF, lambda r: _u64(r, 1)),
}


@attrs.frozen
class Vevent:
    flags: int
    sequence: int
    dev_id: int
    address: int


def read_vevents(g: Guest, fd: int, qtype: int) -> list[Vevent]:
    """Drain the vEVENTQ file the way the VMM does: header, then one vendor record."""
    rec = VEVENT_RECORDS[qtype]
    file = g.vm.vmm.files.get(fd)
    if not isinstance(file, EventFile):
        raise Divergence(f"vEVENTQ fd {fd} is not an event file in the VMM")
    data = file.read(64 * (HEADER.size + rec.size))
    out: list[Vevent] = []
    pos = 0
    while pos < len(data):
        check(pos + HEADER.size <= len(data), "vEVENTQ read ended inside a header")
        flags, seq = HEADER.unpack_from(data, pos)
        pos += HEADER.size
        if flags & U.IOMMU_VEVENTQ_FLAG_LOST_EVENTS:
            out.append(Vevent(flags, seq, -1, -1))
            continue
        raw = data[pos : pos + rec.size]
        check(len(raw) == rec.size, f"vEVENTQ record {len(raw)} bytes, expected {rec.size}")
        pos += rec.size
        out.append(Vevent(flags, seq, rec.dev_id(raw), rec.address(raw)))
    return out


def _veventq(ctx: ScenarioContext, g: Guest) -> tuple[int, int]:
    """The driver's vEVENTQ type on the guest's vIOMMU: ``(type, fd)``, or unsupported."""
    viommu = getattr(g.iommu, "viommu_id", 0)  # AMD and SMMUv3 guest models keep one
    vm = g.vm

    def probe(qtype: int) -> object:
        if viommu:
            return vm.fd.veventq_alloc(viommu, qtype, 16)
        # No vIOMMU to hang a vEVENTQ on: ask for one, as a VMM would.
        parent = vm.nest_parent(g.gdev.dev_id, g.machine.iommus[0])
        return vm.fd.viommu_alloc(g.gdev.dev_id, parent, U.IOMMU_VIOMMU_TYPE_DEFAULT)

    try:
        ctx.driver_type(
            Feature.VEVENTQ, ctx.info.veventq_types, probe, U.IOMMU_VEVENTQ_TYPE_DEFAULT
        )
    except Unsupported as exc:
        if viommu:
            raise
        why = str(exc).split(": ", 1)[-1].removesuffix(f" ({exc.upstream})")
        raise Unsupported(
            exc.feature, exc.errno, f"no vIOMMU to carry one: {why}", exc.upstream
        ) from exc
    if not viommu:
        raise Unsupported(Feature.VEVENTQ, errno.EOPNOTSUPP, "the guest model exposes no viommu_id")
    known = sorted(ctx.info.veventq_types & VEVENT_RECORDS.keys())
    if not known:
        raise Divergence(
            f"no record decoder for vEVENTQ types {sorted(ctx.info.veventq_types)}: "
            "add one to VEVENT_RECORDS"
        )
    qtype = known[0]
    _, fd = vm.fd.veventq_alloc(viommu, qtype, 16)
    return qtype, fd


# -- scenarios ----------------------------------------------------------------------------------
@guest_scenario(Feature.VIOMMU, Feature.VEVENTQ)
def guest_fault_delivery(ctx: ScenarioContext) -> None:
    """A nested device DMAs to guest IOVAs the guest never mapped: each fault reaches the
    VMM's vEVENTQ in order, naming the virtual device ID and the faulting IOVA."""
    g = boot(ctx)
    qtype, fd = _veventq(ctx, g)
    dom = g.domain()
    gpa = g.buffer(BUF, 91)
    g.iommu.map(dom, IOVA, gpa, BUF)
    check(g.dma_read(IOVA, BUF) == big_pattern(91, BUF), "DMA through the guest mapping")
    check(read_vevents(g, fd, qtype) == [], "an event for a DMA that succeeded")
    holes = (IOVA + BUF, IOVA + 16 * MIB + 0x123 * PAGE_SIZE)
    expect_fault(lambda: g.dma_read(holes[0], 8), "read of an unmapped guest IOVA")
    expect_fault(lambda: g.dma_write(holes[1], b"fault"), "write to an unmapped guest IOVA")
    events = read_vevents(g, fd, qtype)
    check(len(events) == 2, f"{len(events)} vEVENTQ records for 2 faults")
    check(all(ev.flags == 0 for ev in events), "LOST_EVENTS on a queue that never filled")
    check([ev.sequence for ev in events] == [0, 1], f"sequence {[e.sequence for e in events]}")
    for ev, iova in zip(events, holes, strict=True):
        check(ev.dev_id == VIRT_ID, f"record names device {ev.dev_id:#x}, not vID {VIRT_ID:#x}")
        check(ev.address == iova, f"record address {ev.address:#x}, DMA was at {iova:#x}")
    check(g.gdev.dev.rid != VIRT_ID, "test setup: the virtual ID must differ from the RID")
    check(read_vevents(g, fd, qtype) == [], "the read did not consume the records")
    expect_fault(lambda: g.dma_read(holes[0], 8), "the same fault again")
    (again,) = read_vevents(g, fd, qtype)
    check(again.sequence == 2 and again.dev_id == VIRT_ID, "third record: sequence or vID")


@guest_scenario(Feature.HWPT_INVALIDATE, Feature.HW_QUEUE)
def guest_accelerated_queue(ctx: ScenarioContext) -> None:
    """nested_invalidation on the vendor's hardware-accelerated guest queue: DMA is fresh
    after each guest invalidation and no map, unmap or invalidation exits to the VMM."""
    g = boot(ctx, accelerated=True)
    dom = g.domain()  # configuration (the device's guest table entry) may trap
    traps, forwarded = g.vm.stats.traps, g.vm.stats.forwarded
    commands = sum(hw.stats.commands for hw in g.machine.iommus)
    invalidation_flow(g, dom)
    check(g.vm.stats.traps == traps, f"{g.vm.stats.traps - traps} VMM traps on the fast path")
    check(g.vm.stats.forwarded == forwarded, "the VMM re-issued guest invalidations")
    done = sum(hw.stats.commands for hw in g.machine.iommus) - commands
    check(done >= 3, f"the hardware processed {done} commands for 3 guest invalidations")


def garbage_table(rng: random.Random, tables: list[int]) -> bytes:
    """One page of PTE garbage. Most entries are plausible (valid, table/page, access and
    bit 2 -- x86 U/S, which a VT-d user request needs at every level -- set, other flags
    random, bit 7 -- x86 PS, Arm AP[2] -- clear) and point either at
    one of the guest's ``tables`` (so walks go on through garbage, loops included) or at any
    page of its RAM or past it; the rest are entirely random bytes."""
    out = bytearray()
    for _ in range(PAGE_SIZE // 8):
        if rng.randrange(8):
            if rng.randrange(2):
                gpa = rng.choice(tables)
            else:
                gpa = rng.randrange(RAM + ATTACK_BEYOND) & ~(PAGE_SIZE - 1)
            flags = rng.randrange(PAGE_SIZE) & ~0x80 | 0x407
            out += (gpa | flags).to_bytes(8, "little")
        else:
            out += rng.randbytes(8)
    return bytes(out)


def changed_pages(g: Guest, start: int, before: bytes) -> list[int]:
    """GPAs of the pages of ``[start, start + len(before))`` that differ from ``before``."""
    now = g.ram(start, len(before))
    return [
        start + off
        for off in range(0, len(before), PAGE_SIZE)
        if now[off : off + PAGE_SIZE] != before[off : off + PAGE_SIZE]
    ]


def hostile_storm(a: Guest, dom: GuestDomain, tables: list[int]) -> list[bytes]:
    """The hostile guest overwrites its page-table pages (``tables``, GPAs) with
    :func:`garbage_table`, invalidates everything, then DMA-writes a unique marker at
    :data:`STORM` IOVAs. Returns the markers whose DMA went through (the caller checks
    where they landed)."""
    rng = random.Random(0x1D0)
    for gpa in tables:
        a.vm.memory.write(gpa, garbage_table(rng, tables))
    a.iommu.invalidate(dom)
    landed: list[bytes] = []
    for i in range(STORM):
        base, span = (IOVA, RAM + ATTACK_BEYOND) if i % 2 else (0, 1 << 47)
        iova = (base + rng.randrange(span)) & ~(PAGE_SIZE - 1) | (i * 16)
        marker = b"A%03dstorm%06x" % (i, rng.randrange(1 << 24))
        try:
            a.dma_write(iova, marker)
        except DmaFault:
            continue
        landed.append(marker)
    return landed


ATTACK_BEYOND = 4 * MIB  # how far past its RAM the hostile guest maps
TOP_IOVA = (1 << 47) - 4 * PAGE_SIZE  # the top of a 48-bit guest IOVA space
STORM = 96  # DMA writes through the garbage tables


@guest_scenario()
def two_vms_isolated(ctx: ScenarioContext) -> None:
    """Two VMs on one machine; A's guest is hostile (maps all its RAM and beyond, huge
    IOVAs, garbage in its page tables): B's DMA keeps working, B's RAM is unchanged, and
    every DMA of A either faults or lands in A's own RAM."""
    machine = ctx.machine()
    a = boot(ctx, machine)
    b = boot(ctx, machine)
    # B: a working device before the attack.
    dom_b = b.domain()
    gpa_b = b.buffer(BUF, 101)
    b.iommu.map(dom_b, IOVA, gpa_b, BUF)
    b.dma_write(IOVA + 8, b"B-before")
    ram_b = b.ram(0, b.vm.ram_size)
    # A: every guest-physical page of its RAM, then 4 MiB past it, at IOVA.
    dom_a = a.domain()
    pool = a.vm.memory.pool_start * PAGE_SIZE
    pool_before = a.ram(pool, RAM - pool)  # A's table pool before it maps anything
    a.iommu.map(dom_a, IOVA, 0, RAM + ATTACK_BEYOND)
    a.iommu.map(dom_a, TOP_IOVA, RAM - PAGE_SIZE, PAGE_SIZE)  # huge IOVA, inside RAM
    a.iommu.map(dom_a, TOP_IOVA + PAGE_SIZE, RAM, PAGE_SIZE)  # huge IOVA, just past RAM
    a.iommu.map(dom_a, TOP_IOVA + 2 * PAGE_SIZE, 1 << 40, PAGE_SIZE)  # far past RAM
    tables = changed_pages(a, pool, pool_before)  # the guest's stage-1 table pages
    check(tables, "the guest's mappings changed no guest table page")
    a.iommu.invalidate(dom_a)
    check(a.dma_read(IOVA, RAM) == a.ram(0, RAM), "A's DMA over all its RAM != its RAM")
    fill = big_pattern(102, pool)
    a.dma_write(IOVA, fill)  # every buffer page of A (its tables stay intact)
    check(a.ram(0, pool) == fill, "A's DMA write over its RAM did not land there")
    check(a.dma_read(TOP_IOVA, 16) == a.ram(RAM - PAGE_SIZE, 16), "huge IOVA inside RAM")
    for off in (RAM, RAM + PAGE_SIZE, RAM + ATTACK_BEYOND - PAGE_SIZE):
        expect_fault(partial(a.dma_read, IOVA + off, 8), f"A reads GPA {off:#x} (past RAM)")
        expect_fault(partial(a.dma_write, IOVA + off, b"A-escape"), f"A writes {off:#x}")
    for iova in (TOP_IOVA + PAGE_SIZE, TOP_IOVA + 2 * PAGE_SIZE, 1 << 60, (1 << 64) - PAGE_SIZE):
        expect_fault(partial(a.dma_write, iova, b"A-escape"), f"A writes IOVA {iova:#x}")
    # A scribbles PTE garbage over every page-table page it wrote, invalidates, and DMAs.
    landed = hostile_storm(a, dom_a, tables)
    final_a = a.ram(0, RAM)
    for marker in landed:
        check(marker in final_a, f"A's DMA write {marker!r} went through but not into A's RAM")
    # B: RAM byte for byte, and its device still works.
    check(b.ram(0, b.vm.ram_size) == ram_b, "B's RAM changed while A attacked")
    check(b.dma_read(IOVA + 8, 8) == b"B-before", "B's DMA after the attack")
    check(b.dma_read(IOVA + 16, BUF - 16) == big_pattern(101, BUF)[16:], "B's buffer via DMA")
    b.dma_write(IOVA + PAGE_SIZE, b"B-after")
    check(b.ram(gpa_b + PAGE_SIZE, 7) == b"B-after", "B's DMA write after the attack")


__all__ = [
    "GUEST_SCENARIOS",
    "VEVENT_RECORDS",
    "changed_pages",
    "garbage_table",
    "guest_accelerated_queue",
    "guest_fault_delivery",
    "guest_scenario",
    "hostile_storm",
    "read_vevents",
    "two_vms_isolated",
]
