"""The driver contract, checked through the public API against each selected driver.

Every test takes ``iommu_driver`` (parametrised by the kit). Feature needs are declared with
``requires_feature``; scenario tests run the matrix scenarios and turn "unsupported" into a
skip that carries the feature and the errno the driver gave.
"""

from __future__ import annotations

import errno

import pytest

from iommufd_model.driver import DriverInfo, Feature
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.hw.pci import PciDevice
from iommufd_model.machine import Machine
from iommufd_model.plugins import DriverRegistry
from iommufd_model.process import Process
from iommufd_model.scenarios import FAIL, SCENARIOS, UNSUPPORTED, Rig, run_scenario
from iommufd_model.scenarios.base import errno_name, pattern
from iommufd_model.testing import MARKER, assert_errno
from iommufd_model.uapi import iommufd as U

requires: pytest.MarkDecorator = getattr(pytest.mark, MARKER)
GARBAGE = 0xBAD0_DA7A
BUF = 4 * PAGE_SIZE


@pytest.fixture
def rig(iommu_registry: DriverRegistry, iommu_driver: str) -> Rig:
    return Rig(Machine.build(iommus=[iommu_driver], registry=iommu_registry))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str, iommu_driver: str, iommu_registry: DriverRegistry) -> None:
    result = run_scenario(SCENARIOS[name], iommu_driver, iommu_registry)
    if result.status == UNSUPPORTED:
        pytest.skip(f"unsupported: {result.feature} ({errno_name(result.errno)}) in {name}")
    assert result.status != FAIL, result.detail


def test_driver_info(iommu_driver: str, iommu_driver_info: DriverInfo) -> None:
    assert iommu_driver_info.name == iommu_driver, "DriverInfo.name must be the entry-point name"
    assert Feature.PAGING in iommu_driver_info.features, "every driver must do paging"


def test_probe_rejects_unknown_option(iommu_driver: str, iommu_registry: DriverRegistry) -> None:
    options = {iommu_driver: {"no_such_option_xyz": 1}}
    assert_errno(
        errno.EINVAL,
        lambda: Machine.build(iommus=[iommu_driver], registry=iommu_registry, options=options),
        "probe with an unknown option",
    )


def test_blocked_until_attached(rig: Rig) -> None:
    ioas = rig.ioas_alloc()
    iova_probe = rig.hwpt_alloc(ioas)  # a domain exists, but the device is not attached
    assert iova_probe
    with pytest.raises(DmaFault):
        rig.dev.dma_read(0x100000, 8)


def test_attach_detach_replace(rig: Rig) -> None:
    ioas_a, ioas_b = rig.ioas_alloc(), rig.ioas_alloc()
    hwpt_a, hwpt_b = rig.hwpt_alloc(ioas_a), rig.hwpt_alloc(ioas_b)
    rig.fd.attach(rig.dev_id, hwpt_a)
    iova = rig.ioas_map(ioas_a, rig.buffer(BUF, 1), BUF)
    rig.ioas_map(ioas_b, rig.buffer(BUF, 2), BUF, iova)
    assert rig.dev.dma_read(iova, 32) == pattern(1, 32)
    rig.fd.attach(rig.dev_id, hwpt_b)
    assert rig.dev.dma_read(iova, 32) == pattern(2, 32)
    assert_errno(errno.EBUSY, lambda: rig.destroy(hwpt_b), "destroy an attached HWPT")
    rig.fd.detach(rig.dev_id)
    with pytest.raises(DmaFault):
        rig.dev.dma_read(iova, 8)
    rig.fd.attach(rig.dev_id, hwpt_a)
    assert rig.dev.dma_read(iova + BUF - 32, 32) == pattern(1, BUF)[-32:]


def test_unmap_one_area_visible_through_dma(rig: Rig) -> None:
    ioas = rig.ioas_alloc()
    rig.fd.attach(rig.dev_id, ioas)
    half = BUF // 2
    va = rig.buffer(BUF, 3)
    iova = rig.ioas_map(ioas, va, half)
    rig.ioas_map(ioas, va + half, half, iova + half)
    # the kernel never splits an area on unmap
    assert_errno(errno.ENOENT, lambda: rig.ioas_unmap(ioas, iova, PAGE_SIZE), "split unmap")
    assert rig.ioas_unmap(ioas, iova, half) == half
    for off in (16, half - 8):
        with pytest.raises(DmaFault):
            rig.dev.dma_read(iova + off, 8)
    assert rig.dev.dma_read(iova + half, half) == pattern(3, BUF)[half:]
    with pytest.raises(DmaFault):  # a DMA straddling the hole must not land half of it
        rig.dev.dma_write(iova + half - 4, b"12345678")
    assert rig.proc.read(va + half, 4) == pattern(3, BUF)[half : half + 4]


def test_faulting_write_writes_nothing(rig: Rig) -> None:
    ioas = rig.ioas_alloc()
    rig.fd.attach(rig.dev_id, ioas)
    va = rig.buffer(BUF, 4)
    iova = rig.ioas_map(ioas, va, BUF)
    with pytest.raises(DmaFault):
        rig.dev.dma_write(iova + BUF - 4, b"12345678")
    assert rig.proc.read(va, BUF) == pattern(4, BUF)


@requires(Feature.PASID)
def test_pasid_replace(rig: Rig) -> None:
    ioas_a, ioas_b = rig.ioas_alloc(), rig.ioas_alloc()
    hwpt_a = rig.hwpt_alloc(ioas_a, U.IOMMU_HWPT_ALLOC_PASID)
    hwpt_b = rig.hwpt_alloc(ioas_b, U.IOMMU_HWPT_ALLOC_PASID)
    rig.fd.attach(rig.dev_id, hwpt_a, pasid=7)
    iova = rig.ioas_map(ioas_a, rig.buffer(BUF, 5), BUF)
    rig.ioas_map(ioas_b, rig.buffer(BUF, 6), BUF, iova)
    assert rig.dev.dma_read(iova, 16, pasid=7) == pattern(5, 16)
    with pytest.raises(DmaFault):  # the RID itself is still blocked
        rig.dev.dma_read(iova, 16)
    rig.fd.attach(rig.dev_id, hwpt_b, pasid=7)
    assert rig.dev.dma_read(iova, 16, pasid=7) == pattern(6, 16)


@requires(Feature.DIRTY_TRACKING)
def test_dirty_bitmap_needs_dirty_hwpt(rig: Rig) -> None:
    ioas = rig.ioas_alloc()
    hwpt = rig.hwpt_alloc(ioas)  # no IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    rig.fd.attach(rig.dev_id, hwpt)
    iova = rig.ioas_map(ioas, rig.buffer(BUF, 7), BUF)
    assert_errno(errno.EOPNOTSUPP, lambda: rig.dirty_pages(hwpt, iova, BUF))


def test_bad_paging_vendor_data(rig: Rig) -> None:
    ioas = rig.ioas_alloc()
    assert_errno(
        (errno.EOPNOTSUPP, errno.EINVAL), lambda: rig.hwpt_alloc(ioas, 0, GARBAGE, bytes(32))
    )


@requires(Feature.NEST_PARENT)
def test_bad_nested_vendor_data(rig: Rig) -> None:
    parent = rig.hwpt_alloc(rig.ioas_alloc(), U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    assert_errno(
        (errno.EOPNOTSUPP, errno.EINVAL), lambda: rig.hwpt_alloc(parent, 0, GARBAGE, bytes(32))
    )


def test_unknown_hwpt_flags(rig: Rig) -> None:
    assert_errno(errno.EOPNOTSUPP, lambda: rig.hwpt_alloc(rig.ioas_alloc(), 1 << 30))


def test_read_only_mapping_refuses_device_writes(rig: Rig) -> None:
    """IOAS_MAP without WRITEABLE: the device reads the pages, a DMA write faults and writes
    nothing (include/uapi/linux/iommufd.h: the mapping's permissions are the flags')."""
    ioas = rig.ioas_alloc()
    rig.fd.attach(rig.dev_id, ioas)
    va = rig.buffer(BUF, 9)
    iova = rig.fd.ioas_map(ioas, va, BUF, flags=U.IOMMU_IOAS_MAP_READABLE)
    assert rig.dev.dma_read(iova, 64) == pattern(9, 64)
    for off in (0, BUF - 8):
        try:
            rig.dev.dma_write(iova + off, b"WRITTEN!")
        except DmaFault:
            continue
        raise AssertionError(
            f"breach: the device wrote IOVA {iova + off:#x} of a mapping made without "
            "IOMMU_IOAS_MAP_WRITEABLE (read-only mappings must stay read-only)"
        )
    assert rig.proc.read(va, BUF) == pattern(9, BUF), "a faulting DMA write changed memory"


def _id_counts(machine: Machine) -> dict[str, int]:
    return {f"{hw.name} {ida.name}": len(ida) for hw in machine.iommus for ida in hw.id_spaces}


def _lifecycle(proc: Process, dev: PciDevice, info: DriverInfo, va: int) -> None:
    """A new fd with ``dev`` bound; every kind of paging object the driver declares, used by
    DMA and destroyed; then the fd is closed."""
    fd = proc.open_iommufd()
    dev_id = fd.bind(dev)
    ioas_a, ioas_b = fd.ioas_alloc(), fd.ioas_alloc()
    fd.attach(dev_id, ioas_b)  # an automatic domain, freed when the device leaves it
    hwpts = [fd.hwpt_alloc(dev_id, ioas_a)]
    for feature, flag in (
        (Feature.NEST_PARENT, U.IOMMU_HWPT_ALLOC_NEST_PARENT),
        (Feature.DIRTY_TRACKING, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING),
        (Feature.PASID, U.IOMMU_HWPT_ALLOC_PASID),
    ):
        if feature in info.features:
            hwpts.append(fd.hwpt_alloc(dev_id, ioas_a, flags=flag))
    half = BUF // 2  # mapped once the domains exist: IOVAs inside their apertures
    iova = fd.ioas_map(ioas_a, va, half)
    fd.ioas_map(ioas_a, va + half, half, iova=iova + half)
    fd.ioas_map(ioas_b, va, BUF, iova=iova)
    for hwpt in hwpts:  # each in turn: replace, DMA through it
        fd.attach(dev_id, hwpt)
        dev.dma_write(iova + 8, b"rid")
        if hwpt == hwpts[-1] and Feature.PASID in info.features:  # the PASID-capable one
            fd.attach(dev_id, hwpt, pasid=3)
            dev.dma_write(iova, b"pasid", pasid=3)
            fd.detach(dev_id, pasid=3)
    fd.ioas_unmap(ioas_a, iova, half)
    fd.detach(dev_id)
    for obj in [*hwpts, ioas_a]:
        fd.destroy(obj)
    left = sorted(set(fd.objects.ids()) - {dev_id, ioas_b})
    assert not left, f"breach: object ids {left} still live after their destroy"
    fd.close()  # ioas_b and its mapping go with the fd


def test_nothing_leaks_after_destroy_and_close(
    iommu_driver: str, iommu_registry: DriverRegistry, iommu_driver_info: DriverInfo
) -> None:
    """Page-table frames, domain IDs and pins are all back once every object is destroyed
    and the fd closed (after a first round, which may set up per-device tables for good)."""
    machine = Machine.build(iommus=[iommu_driver], registry=iommu_registry)
    dev = machine.add_pci_device(iommu=0)
    proc = machine.new_process()
    va = proc.mmap(BUF)
    proc.write(va, pattern(10, BUF))
    _lifecycle(proc, dev, iommu_driver_info, va)
    frames, ids = machine.memory.frames_in_use, _id_counts(machine)
    for _ in range(3):
        _lifecycle(proc, dev, iommu_driver_info, va)
        now = machine.memory.frames_in_use
        assert now == frames, (
            f"breach: {now - frames} frame(s) of physical memory still in use after every "
            f"object was destroyed and the fd closed (PhysicalMemory.frames_in_use {frames} "
            f"-> {now}): the driver leaks page-table or other frames"
        )
        assert _id_counts(machine) == ids, (
            f"breach: driver IDs leaked (in use {ids} -> {_id_counts(machine)})"
        )
        assert proc.locked_pages == 0, "breach: pinned pages left after close"
        assert machine.memory.frame_refs(proc.translate(va)) == 1, "breach: a pin leaked"
