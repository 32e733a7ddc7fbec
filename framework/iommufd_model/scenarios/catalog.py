"""The vendor-neutral scenarios. Each is a short function over the public API and raw uAPI.

Order matters only for display: the matrix prints them as listed here.
"""

from __future__ import annotations

import errno
import inspect
import itertools
from collections.abc import Callable

from iommufd_model.driver import Feature
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.scenarios.base import (
    Divergence,
    Rig,
    Scenario,
    ScenarioContext,
    check,
    expect_errno,
    expect_fault,
    expect_refused,
    pattern,
)
from iommufd_model.uapi import iommufd as U

SCENARIOS: dict[str, Scenario] = {}
BUF = 4 * PAGE_SIZE
GARBAGE_DATA_TYPE = 0xBAD0_DA7A


def scenario(*features: Feature) -> Callable[[Callable[[ScenarioContext], None]], Scenario]:
    """Register a scenario under its function name, declaring the features it needs; its
    description (matrix JSON and HTML) is the docstring's whole first paragraph."""

    def deco(fn: Callable[[ScenarioContext], None]) -> Scenario:
        doc = " ".join(inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0].split())
        sc = Scenario(fn.__name__, doc, frozenset(features), fn)
        SCENARIOS[sc.name] = sc
        return sc

    return deco


def _attached_buffer(rig: Rig, seed: int) -> tuple[int, int, int]:
    """IOAS with the device attached and a filled buffer mapped: ``(ioas, va, iova)``."""
    ioas = rig.ioas_alloc()
    rig.fd.attach(rig.dev_id, ioas)
    va = rig.buffer(BUF, seed)
    return ioas, va, rig.ioas_map(ioas, va, BUF)


@scenario(Feature.PAGING)
def paging_dma(ctx: ScenarioContext) -> None:
    """Map, DMA read/write visible in process memory, unmap, then DMA faults."""
    rig = ctx.rig()
    ioas, va, iova = _attached_buffer(rig, 1)
    check(rig.dev.dma_read(iova, BUF) == pattern(1, BUF), "DMA read != process memory")
    data = pattern(2, 3000)
    rig.dev.dma_write(iova + PAGE_SIZE + 100, data)
    check(rig.proc.read(va + PAGE_SIZE + 100, len(data)) == data, "DMA write not in process")
    check(rig.proc.read(va, 100) == pattern(1, 100), "DMA write clobbered a neighbour")
    check(rig.ioas_unmap(ioas, iova, BUF) == BUF, "IOAS_UNMAP did not unmap the whole range")
    expect_fault(lambda: rig.dev.dma_read(iova, 8), "read after unmap")
    expect_fault(lambda: rig.dev.dma_write(iova + BUF - 8, b"x" * 8), "write after unmap")


@scenario(Feature.PAGING)
def replace_under_dma(ctx: ScenarioContext) -> None:
    """Replace IOAS A by IOAS B while DMA keeps going: no fault, and B's pages from then on."""
    rig = ctx.rig()
    ioas_a, va_a, iova = _attached_buffer(rig, 3)
    ioas_b = rig.ioas_alloc()
    va_b = rig.buffer(BUF, 4)
    rig.ioas_map(ioas_b, va_b, BUF, iova)
    check(rig.dev.dma_read(iova, 64) == pattern(3, 64), "before replace: not A's memory")
    rig.fd.attach(rig.dev_id, ioas_b)  # replace: no detach in between
    check(rig.dev.dma_read(iova, BUF) == pattern(4, BUF), "after replace: not B's memory")
    rig.dev.dma_write(iova, b"\xee" * 16)
    check(rig.proc.read(va_b, 16) == b"\xee" * 16, "write after replace missed B")
    check(rig.proc.read(va_a, 16) == pattern(3, 16), "write after replace reached A")
    rig.ioas_unmap(ioas_a, iova, BUF)  # A no longer attached: B keeps translating
    check(rig.dev.dma_read(iova, 16) == b"\xee" * 16, "unmap in old IOAS broke the new one")


@scenario(Feature.PAGING, Feature.PASID)
def pasid_side_by_side(ctx: ScenarioContext) -> None:
    """A PASID domain next to the RID domain: each PASID translates through its own table."""
    rig = ctx.rig()
    ioas_a, ioas_b = rig.ioas_alloc(), rig.ioas_alloc()
    # The probe is the PASID attach itself: a driver may allocate PASID-compatible domains
    # and still refuse set_dev_pasid (Linux 7.2's AMD driver).
    ctx.need(
        Feature.PASID,
        lambda: rig.fd.attach(
            rig.dev_id, rig.hwpt_alloc(ioas_a, U.IOMMU_HWPT_ALLOC_PASID), pasid=1
        ),
    )
    rid_hwpt = rig.hwpt_alloc(ioas_a, U.IOMMU_HWPT_ALLOC_PASID)
    pasid_hwpt = rig.hwpt_alloc(ioas_b, U.IOMMU_HWPT_ALLOC_PASID)
    rig.fd.attach(rig.dev_id, rid_hwpt)
    rig.fd.attach(rig.dev_id, pasid_hwpt, pasid=1)
    va_a, va_b = rig.buffer(BUF, 5), rig.buffer(BUF, 6)
    iova = rig.ioas_map(ioas_a, va_a, BUF)
    rig.ioas_map(ioas_b, va_b, BUF, iova)
    check(rig.dev.dma_read(iova, BUF) == pattern(5, BUF), "RID DMA did not use the RID domain")
    check(rig.dev.dma_read(iova, BUF, pasid=1) == pattern(6, BUF), "PASID 1 not its domain")
    expect_fault(lambda: rig.dev.dma_read(iova, 8, pasid=2), "DMA on unattached PASID 2")
    rig.fd.detach(rig.dev_id, pasid=1)
    expect_fault(lambda: rig.dev.dma_read(iova, 8, pasid=1), "PASID 1 after detach")
    check(rig.dev.dma_read(iova, 64) == pattern(5, 64), "PASID detach broke the RID domain")


@scenario(Feature.PAGING, Feature.DIRTY_TRACKING)
def dirty_tracking(ctx: ScenarioContext) -> None:
    """DIRTY_TRACKING HWPT: exactly the pages DMA wrote are reported, then cleared."""
    rig = ctx.rig()
    ioas = rig.ioas_alloc()
    flags = U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    ctx.need(Feature.DIRTY_TRACKING, lambda: rig.hwpt_alloc(ioas, flags))
    hwpt = rig.hwpt_alloc(ioas, flags)
    rig.fd.attach(rig.dev_id, hwpt)
    va = rig.buffer(BUF, 7)
    iova = rig.ioas_map(ioas, va, BUF)
    rig.dev.dma_write(iova, b"before")  # tracking is off: must not be reported
    rig.set_dirty_tracking(hwpt, True)
    check(rig.dirty_pages(hwpt, iova, BUF) == [], "pages dirty before any tracked write")
    rig.dev.dma_read(iova + 2 * PAGE_SIZE, 64)  # reads never dirty a page
    rig.dev.dma_write(iova + PAGE_SIZE + 8, b"a")
    rig.dev.dma_write(iova + 3 * PAGE_SIZE + 4000, b"b")
    got = rig.dirty_pages(hwpt, iova, BUF, clear=False)
    check(got == [1, 3], f"dirty pages {got}, DMA wrote pages [1, 3]")
    check(rig.dirty_pages(hwpt, iova, BUF) == [1, 3], "NO_CLEAR read cleared the bits")
    check(rig.dirty_pages(hwpt, iova, BUF) == [], "bits not cleared after a clearing read")
    check(rig.proc.read(va + PAGE_SIZE + 8, 1) == b"a", "dirty-tracked write lost")
    rig.dev.dma_write(iova + 2 * PAGE_SIZE, b"c")  # dirty, then tracking stops
    rig.set_dirty_tracking(hwpt, False)
    # Linux 7.2's drivers read (and clear) with tracking off, what was left dirty: generic_pt
    # (mock, AMD, VT-d) and io-pgtable-arm (SMMUv3) alike
    got = rig.dirty_pages(hwpt, iova, BUF)
    check(got == [2], f"read with tracking off gave {got}, the page left dirty is [2]")
    rig.set_dirty_tracking(hwpt, True)  # enabling again starts from a clean snapshot
    check(rig.dirty_pages(hwpt, iova, BUF) == [], "stale dirty bits survived re-enabling")


_TEARDOWN_STEPS = ("detach", "unbind", "destroy_hwpt", "unmap", "destroy_ioas")


def _legal(order: tuple[str, ...]) -> bool:
    """The kernel's refcount rules: what must already be gone before each step."""
    pos = {step: i for i, step in enumerate(order)}
    device_gone = min(pos.get("detach", 99), pos["unbind"])
    return (
        pos.get("detach", -1) < pos["unbind"]
        and device_gone < pos["destroy_hwpt"]
        and pos["destroy_hwpt"] < pos["destroy_ioas"]
        and pos.get("unmap", -1) < pos["destroy_ioas"]
    )


def _teardown_orders() -> list[tuple[str, ...]]:
    orders = []
    for size in (4, 5):
        for order in itertools.permutations(_TEARDOWN_STEPS, size):
            if set(_TEARDOWN_STEPS) - set(order) <= {"detach", "unmap"} and _legal(order):
                orders.append(order)
    return sorted(set(orders))


@scenario(Feature.PAGING)
def teardown_orders(ctx: ScenarioContext) -> None:
    """Tear down device, HWPT, mappings and IOAS in every legal order (and by closing the fd).

    Each illegal step on the way must be refused with EBUSY, DMA must fault once the device
    is detached, and the device must be bindable again afterwards.
    """
    for order in [*_teardown_orders(), ("close",)]:
        _teardown_once(ctx.rig(), order)


def _teardown_once(rig: Rig, order: tuple[str, ...]) -> None:
    ioas = rig.ioas_alloc()
    hwpt = rig.hwpt_alloc(ioas)
    rig.fd.attach(rig.dev_id, hwpt)
    iova = rig.ioas_map(ioas, rig.buffer(BUF, 8), BUF)
    check(rig.dev.dma_read(iova, 8) == pattern(8, 8), f"{order}: no DMA before teardown")
    hwpt_live = True
    for step in order:
        if hwpt_live:
            expect_errno(errno.EBUSY, lambda: rig.destroy(ioas), f"{order}: IOAS under HWPT")
        if step in ("detach", "unbind", "close"):
            if step == "detach":
                rig.fd.detach(rig.dev_id)
            elif step == "unbind":
                rig.fd.unbind(rig.dev_id)
            else:
                rig.fd.close()
            expect_fault(lambda: rig.dev.dma_read(iova, 8), f"{order}: DMA after {step}")
        elif step == "destroy_hwpt":
            rig.destroy(hwpt)
            hwpt_live = False
        elif step == "unmap":
            rig.ioas_unmap(ioas, iova, BUF)
        else:
            rig.destroy(ioas)
    if order != ("close",):
        expect_errno(errno.ENOENT, lambda: rig.destroy(ioas), f"{order}: IOAS survived")
        rig.fd.close()
    again = rig.rebind()
    ioas = again.ioas_alloc()
    again.fd.attach(again.dev_id, ioas)
    iova = again.ioas_map(ioas, again.buffer(BUF, 9), BUF)
    check(again.dev.dma_read(iova, 8) == pattern(9, 8), f"{order}: device not reusable")


def _nest_parent(ctx: ScenarioContext, rig: Rig) -> tuple[int, int]:
    """A NEST_PARENT HWPT: ``(hwpt, its ioas)``."""
    ioas = rig.ioas_alloc()
    flags = U.IOMMU_HWPT_ALLOC_NEST_PARENT
    ctx.need(Feature.NEST_PARENT, lambda: rig.hwpt_alloc(ioas, flags))
    return rig.hwpt_alloc(ioas, flags), ioas


def vendor_data(dtype: int) -> bytes:
    """Zeroed vendor data of the exact uAPI size of ``dtype``: drivers copy it with
    ``iommu_copy_struct_from_user()``, which refuses data longer than their struct (EINVAL).
    Unknown (driver-private) types get 8 bytes, the size of the self-test's
    ``struct iommu_hwpt_selftest``."""
    sizes = {
        U.IOMMU_HWPT_DATA_VTD_S1: U.IommuHwptVtdS1.SIZE,
        U.IOMMU_HWPT_DATA_ARM_SMMUV3: U.IommuHwptArmSmmuv3.SIZE,
        U.IOMMU_HWPT_DATA_AMD_GUEST: U.IommuHwptAmdGuest.SIZE,
    }
    return bytes(sizes.get(dtype, 8))


def _viommu_data(vtype: int) -> bytes:
    """The driver data a vIOMMU type takes (Tegra241 CMDQV's; AMD's, mandatory in AMD's tree)."""
    sizes = {
        U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV: U.IommuViommuTegra241Cmdqv.SIZE,
        U.IOMMU_VIOMMU_TYPE_AMD: U.IommuViommuAmd.SIZE,
    }
    return bytes(sizes.get(vtype, 0))


def _viommu_type(ctx: ScenarioContext, rig: Rig, parent: int) -> int:
    def probe(vtype: int) -> int:
        return rig.viommu_alloc(parent, vtype, _viommu_data(vtype))

    return ctx.driver_type(
        Feature.VIOMMU, ctx.info.viommu_types, probe, U.IOMMU_VIOMMU_TYPE_DEFAULT
    )


def _viommu(ctx: ScenarioContext, rig: Rig) -> tuple[int, int]:
    """A vIOMMU of the driver's own type over a nest parent: ``(viommu, parent)``."""
    parent, _ = _nest_parent(ctx, rig)
    vtype = _viommu_type(ctx, rig, parent)
    return rig.viommu_alloc(parent, vtype, _viommu_data(vtype)), parent


def _nested(ctx: ScenarioContext, rig: Rig) -> tuple[int, int, int]:
    """Where a nested HWPT goes and its data type: ``(pt_id, data_type, parent)``.

    On a vIOMMU when the driver has vIOMMU types (AMD and SMMUv3 allocate nested domains
    there), on the nest parent otherwise (VT-d).
    """
    parent, _ = _nest_parent(ctx, rig)
    pt = parent
    if ctx.has(Feature.VIOMMU) and ctx.info.viommu_types:
        vtype = min(ctx.info.viommu_types)
        pt = rig.viommu_alloc(parent, vtype, _viommu_data(vtype))

    def probe(dtype: int) -> int:
        return rig.hwpt_alloc(pt, 0, dtype, bytes(32))

    dtype = ctx.driver_type(Feature.NESTED, ctx.info.hwpt_data_types, probe, GARBAGE_DATA_TYPE)
    return pt, dtype, parent


@scenario(Feature.PAGING, Feature.NEST_PARENT, Feature.NESTED)
def nested_alloc(ctx: ScenarioContext) -> None:
    """Nested HWPT of the driver's data type: vendor data is validated like the kernel does."""
    rig = ctx.rig()
    pt, dtype, parent = _nested(ctx, rig)
    rig.hwpt_alloc(pt, 0, dtype, vendor_data(dtype))
    expect_errno(
        (errno.EOPNOTSUPP, errno.EINVAL),
        lambda: rig.hwpt_alloc(pt, 0, GARBAGE_DATA_TYPE, bytes(32)),
        "nested HWPT with a garbage data_type",
    )
    plain = rig.hwpt_alloc(rig.ioas_alloc())
    if pt == parent:
        what = "nested HWPT over a parent without NEST_PARENT"
        expect_errno(errno.EINVAL, lambda: rig.hwpt_alloc(plain, 0, dtype, bytes(32)), what)
    else:
        vtype = min(ctx.info.viommu_types)
        what = "vIOMMU over a parent without NEST_PARENT"
        expect_errno(
            errno.EINVAL, lambda: rig.viommu_alloc(plain, vtype, _viommu_data(vtype)), what
        )


@scenario(Feature.PAGING, Feature.NEST_PARENT, Feature.VIOMMU, Feature.VDEVICE)
def viommu_vdevice_lifetime(ctx: ScenarioContext) -> None:
    """vIOMMU of the driver's type with a vDEVICE: destroy order is enforced with EBUSY."""
    rig = ctx.rig()
    viommu, parent = _viommu(ctx, rig)
    ctx.need(Feature.VDEVICE, lambda: rig.vdevice_alloc(viommu, 0x10))
    vdev = rig.vdevice_alloc(viommu, 0x10)
    expect_errno(errno.EBUSY, lambda: rig.destroy(parent), "nest parent destroyed under a vIOMMU")
    expect_errno(errno.EBUSY, lambda: rig.destroy(viommu), "vIOMMU destroyed under a vDEVICE")
    rig.destroy(vdev)
    rig.destroy(viommu)
    rig.destroy(parent)


@scenario(Feature.PAGING, Feature.NEST_PARENT, Feature.VIOMMU, Feature.VEVENTQ)
def veventq_alloc(ctx: ScenarioContext) -> None:
    """vEVENTQ of the driver's type: one per type per vIOMMU, and it pins the vIOMMU."""
    rig = ctx.rig()
    viommu, _ = _viommu(ctx, rig)

    def alloc(qtype: int) -> tuple[int, int]:
        return rig.fd.veventq_alloc(viommu, qtype, 16)

    qtype = ctx.driver_type(
        Feature.VEVENTQ, ctx.info.veventq_types, alloc, U.IOMMU_VEVENTQ_TYPE_DEFAULT
    )
    q, qfd = alloc(qtype)
    expect_errno(errno.EEXIST, lambda: alloc(qtype), "second vEVENTQ of one type")
    expect_errno(errno.EBUSY, lambda: rig.destroy(viommu), "vIOMMU destroyed under a vEVENTQ")
    expect_errno(errno.EBUSY, lambda: rig.destroy(q), "vEVENTQ destroyed while its fd is open")
    rig.proc.close(qfd)
    rig.destroy(q)
    rig.destroy(viommu)


@scenario(Feature.PAGING, Feature.NEST_PARENT, Feature.VIOMMU, Feature.HW_QUEUE)
def hw_queue_alloc(ctx: ScenarioContext) -> None:
    """HW queue of the driver's type in guest memory: it pins that memory and its vIOMMU;
    a queue type the vIOMMU does not know is refused (any errno) and leaks no pin."""
    rig = ctx.rig()
    parent, ioas = _nest_parent(ctx, rig)
    iova = rig.ioas_map(ioas, rig.buffer(PAGE_SIZE, 10), PAGE_SIZE)
    first = _viommu_type(ctx, rig, parent)

    def alloc(viommu: int, qtype: int) -> int:
        return rig.fd.hw_queue_alloc(viommu, qtype, 0, iova, PAGE_SIZE)

    def probe(qtype: int) -> int:
        return alloc(rig.viommu_alloc(parent, first, _viommu_data(first)), qtype)

    qtype = ctx.driver_type(
        Feature.HW_QUEUE, ctx.info.hw_queue_types, probe, U.IOMMU_HW_QUEUE_TYPE_DEFAULT
    )
    viommu, queue = _queue_on_some_viommu(ctx, rig, parent, lambda v: alloc(v, qtype))
    expect_errno(errno.EBUSY, lambda: rig.ioas_unmap(ioas, iova, PAGE_SIZE), "unmap queue memory")
    expect_errno(errno.EBUSY, lambda: rig.destroy(viommu), "vIOMMU destroyed under its queue")
    expect_refused(lambda: alloc(viommu, GARBAGE_DATA_TYPE), "HW queue of a garbage type")
    rig.destroy(queue)
    check(rig.ioas_unmap(ioas, iova, PAGE_SIZE) == PAGE_SIZE, "queue memory still pinned")
    rig.destroy(viommu)


def _queue_on_some_viommu(
    ctx: ScenarioContext, rig: Rig, parent: int, alloc: Callable[[int], int]
) -> tuple[int, int]:
    """The first declared vIOMMU type that takes the queue (SMMUv3: only the CMDQV one)."""
    for vtype in sorted(ctx.info.viommu_types):
        viommu = rig.viommu_alloc(parent, vtype, _viommu_data(vtype))
        try:
            return viommu, alloc(viommu)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            rig.destroy(viommu)
    raise Divergence(f"no declared vIOMMU type takes HW queue types {ctx.info.hw_queue_types}")


def _invalidate(rig: Rig, target: int, data_type: int) -> int:
    return rig.fd.hwpt_invalidate(target, data_type, [bytes(U.IommuHwptVtdS1Invalidate.SIZE)])


@scenario(Feature.PAGING, Feature.NEST_PARENT, Feature.NESTED, Feature.HWPT_INVALIDATE)
def hwpt_invalidate(ctx: ScenarioContext) -> None:
    """IOMMU_HWPT_INVALIDATE on a nested HWPT: a garbage entry type handles nothing."""
    rig = ctx.rig()
    pt, dtype, _ = _nested(ctx, rig)
    nested = rig.hwpt_alloc(pt, 0, dtype, vendor_data(dtype))
    ctx.need(
        Feature.HWPT_INVALIDATE,
        lambda: _invalidate(rig, nested, U.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1),
    )
    expect_errno(
        (errno.EOPNOTSUPP, errno.EINVAL),
        lambda: _invalidate(rig, nested, GARBAGE_DATA_TYPE),
        "invalidation with a garbage data_type",
    )
