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
from iommufd_model.machine import Machine
from iommufd_model.plugins import DriverRegistry
from iommufd_model.scenarios import FAIL, SCENARIOS, UNSUPPORTED, Rig, run_scenario
from iommufd_model.scenarios.base import errno_name, pattern
from iommufd_model.testing import MARKER
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
    with pytest.raises(OSError) as exc:
        Machine.build(
            iommus=[iommu_driver],
            registry=iommu_registry,
            options={iommu_driver: {"no_such_option_xyz": 1}},
        )
    assert exc.value.errno == errno.EINVAL


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
    with pytest.raises(OSError) as exc:
        rig.destroy(hwpt_b)  # attached: the kernel refuses
    assert exc.value.errno == errno.EBUSY
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
    with pytest.raises(OSError) as exc:  # the kernel never splits an area on unmap
        rig.ioas_unmap(ioas, iova, PAGE_SIZE)
    assert exc.value.errno == errno.ENOENT
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
    with pytest.raises(OSError) as exc:
        rig.dirty_pages(hwpt, iova, BUF)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_bad_paging_vendor_data(rig: Rig) -> None:
    ioas = rig.ioas_alloc()
    with pytest.raises(OSError) as exc:
        rig.hwpt_alloc(ioas, 0, GARBAGE, bytes(32))
    assert exc.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)


@requires(Feature.NEST_PARENT)
def test_bad_nested_vendor_data(rig: Rig) -> None:
    parent = rig.hwpt_alloc(rig.ioas_alloc(), U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    with pytest.raises(OSError) as exc:
        rig.hwpt_alloc(parent, 0, GARBAGE, bytes(32))
    assert exc.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)


def test_unknown_hwpt_flags(rig: Rig) -> None:
    with pytest.raises(OSError) as exc:
        rig.hwpt_alloc(rig.ioas_alloc(), 1 << 30)
    assert exc.value.errno == errno.EOPNOTSUPP
