"""The IOPF matrix row: the cells each driver gives, and a row that fails where it must.

Linux 7.2 delivers IO page faults to an IOMMU_FAULT_QUEUE on VT-d (PRI devices), on SMMUv3
only from stalling masters (PCIe page requests are denied), never on AMD (no handler at a
PASID, requests without one aborted); the mock delivers as IOMMU_TEST_OP_TRIGGER_IOPF does.
"""

from __future__ import annotations

import attrs
import pytest

from iommufd_model.cli import cell_text
from iommufd_model.driver import DEFAULT_OPTION_SET, Feature, OptionSet
from iommufd_model.hw.iommu import IommuHw
from iommufd_model.hw.pci import PageRequest
from iommufd_model.machine import Machine
from iommufd_model.plugins import default_registry
from iommufd_model.scenarios import FAIL, PASS, UNSUPPORTED, run_scenario
from iommufd_model.scenarios.catalog import SCENARIOS

ROW = SCENARIOS["iopf_fault_queue"]


def _option_set(driver: str, name: str) -> OptionSet:
    if name == DEFAULT_OPTION_SET.name:
        return DEFAULT_OPTION_SET
    info = default_registry().drivers[driver].info
    return next(o for o in info.option_sets if o.name == name)


@pytest.mark.parametrize(
    ("driver", "option_set", "status"),
    [
        ("mock", "default", PASS),
        ("intel_vtd", "default", PASS),
        ("arm_smmuv3", "stall", PASS),
        ("arm_smmuv3", "stall-dma", PASS),
        ("arm_smmuv3", "default", UNSUPPORTED),
        ("amd", "default", UNSUPPORTED),
    ],
)
def test_cells(driver: str, option_set: str, status: str) -> None:
    r = run_scenario(ROW, driver, option_set=_option_set(driver, option_set))
    assert r.status == status, r.detail
    if status == PASS:
        assert r.costs["faults"] >= 1  # the DMA before the page was served
        assert r.costs["translations"] >= 2  # ... and its successful retry
    else:
        assert r.feature == Feature.IOPF.value and r.errno is None
        assert r.upstream.startswith("Linux 7.2 drivers/iommu/")
        assert cell_text(r) == "unsupported upstream"


def test_smmuv3_declares_iopf_only_with_stalls() -> None:
    info = default_registry().drivers["arm_smmuv3"].info
    assert Feature.IOPF not in info.features
    assert "arm_smmu_handle_ppr" in info.unsupported_upstream[Feature.IOPF]
    assert Feature.IOPF in _option_set("arm_smmuv3", "stall").features(info.features)
    assert Feature.IOPF in _option_set("arm_smmuv3", "stall-dma").features(info.features)


def test_smmuv3_stall_model_0_without_dma_can_stall_gives_no_iopf() -> None:
    """IDR0.STALL_MODEL = 0b00 alone: no master is "dma-can-stall", none stalls, and a
    configuration claiming IOPF there fails the row (nothing reaches the fault queue)."""
    claims = OptionSet("stalls-only", {"stalls": True}, adds=frozenset({Feature.IOPF}))
    r = run_scenario(ROW, "arm_smmuv3", option_set=claims)
    assert r.status == FAIL


def test_a_driver_that_declares_iopf_but_delivers_nothing_fails() -> None:
    """VT-d without ECAP.PRS refuses the fault-capable attach (intel_iommu_enable_iopf): a
    configuration that still claimed IOPF would be a FAIL, not a quiet unsupported."""
    no_prs = OptionSet("no-prs", {"prs": False})
    r = run_scenario(ROW, "intel_vtd", option_set=no_prs)
    assert r.status == FAIL and "ENODEV" in r.detail


def test_an_undeclared_driver_that_delivers_fails() -> None:
    """The mock, told it lacks IOPF, still delivers the request: the row says FAIL."""
    r = run_scenario(ROW, "mock", option_set=OptionSet("x", lacks=frozenset({Feature.IOPF})))
    assert r.status == FAIL and "does not declare iopf" in r.detail


def test_page_request_carries_only_the_wire_fields() -> None:
    """The PCIe message: address bits 63:12, a 20-bit PASID, a 9-bit group index."""
    req = PageRequest((1 << 70) | 0x1234_5FFF, pasid=(1 << 24) | 7, grpid=0x3FF)
    assert (req.addr, req.pasid, req.grpid) == (0x1234_5000, 7, 0x1FF)
    assert attrs.evolve(req, pasid=None).pasid is None


def test_an_iommu_without_page_requests_loses_them() -> None:
    m = Machine.build(iommus=["mock"])
    dev = m.add_pci_device(iommu=0)
    assert IommuHw.page_request(m.iommus[0], dev, PageRequest(0x1000)) is False
    assert dev.page_request(0x1000) is False  # the mock: no fault-capable domain attached
