"""Both engines copy through, and fault at, every vendor's IOMMU (VT-d and SMMUv3 besides the
mock and AMD the engine tests already cover): the bytes a wrong translation would corrupt and
the fault each vendor logs."""

from __future__ import annotations

import pytest

from iommufd_model.devices.dsa import DSA_COMP_BATCH_FAIL, DSA_COMP_SUCCESS
from iommufd_model.devices.ioat import IOAT_CHANSTS_HALTED

from .conftest import driver_setup
from .test_dsa import BATCH_COMPLETION, DsaDriver
from .test_ioat import IoatDriver


@pytest.mark.parametrize("vendor", ["intel_vtd", "arm_smmuv3"])
def test_ioat_and_dsa_copy_and_fault(vendor: str) -> None:
    s, ioat = driver_setup(vendor, "ioat", IoatDriver)
    pattern = bytes(range(256)) * 16
    s.write(s.iova + 0x3000, pattern)  # crosses no page: one 4 KiB page at a time
    ioat.memcpy_start(s.iova + 0x3000, s.iova + 0x9000, 4096, 2, False)
    assert ioat.memcpy_wait() == 0 and s.read(s.iova + 0x9000, 4096) == pattern
    faults = len(s.fn.iommu.fault_log)
    ioat.memcpy_start(1 << 40, s.iova, 64, 1, False)
    assert ioat.status() == IOAT_CHANSTS_HALTED
    assert len(s.fn.iommu.fault_log) == faults + 1
    assert s.fn.iommu.fault_log[-1].iova == 1 << 40

    s, dsa = driver_setup(vendor, "dsa", DsaDriver)
    s.write(s.iova + 0x5000, pattern[::-1])
    dsa.memcpy_start(s.iova + 0x5000, s.iova + 0xB000, 4096, 3)
    assert dsa.memcpy_wait() == 0 and s.read(s.iova + 0xB000, 4096) == pattern[::-1]
    assert dsa.completion(BATCH_COMPLETION)[0] == DSA_COMP_SUCCESS
    dsa.memcpy_start(1 << 40, s.iova, 64, 2)
    assert dsa.memcpy_wait() == -1
    assert dsa.completion(BATCH_COMPLETION)[0] == DSA_COMP_BATCH_FAIL
    assert s.fn.iommu.fault_log[-1].iova == 1 << 40
