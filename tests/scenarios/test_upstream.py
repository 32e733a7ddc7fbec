"""Matrix cells where Linux 7.2 itself refuses a feature say "unsupported upstream", naming
the 7.2 source; a gap of the model stays a plain "unsupported"."""

from __future__ import annotations

import errno

import pytest

from iommufd_model.cli import cell_text, status_text
from iommufd_model.driver import Feature
from iommufd_model.plugins import default_registry
from iommufd_model.scenarios import UNSUPPORTED, ScenarioResult, run_scenario
from iommufd_model.scenarios.catalog import SCENARIOS


def test_smmuv3_nested_hwpt_invalidate_is_unsupported_upstream() -> None:
    r = run_scenario(SCENARIOS["hwpt_invalidate"], "arm_smmuv3")
    assert r.status == UNSUPPORTED
    assert r.feature == Feature.HWPT_INVALIDATE.value
    assert r.errno == errno.EOPNOTSUPP
    assert "arm-smmu-v3-iommufd.c" in r.upstream
    assert "arm_smmu_nested_ops" in r.upstream
    assert r.upstream in r.detail
    assert cell_text(r) == status_text(r) == "unsupported upstream"
    assert r.to_json()["upstream"] == r.upstream


@pytest.mark.parametrize(
    ("scenario", "feature", "source"),
    [
        ("pasid_side_by_side", Feature.PASID, "amdv1_ops"),
        ("hwpt_invalidate", Feature.HWPT_INVALIDATE, "nested_domain_ops"),
    ],
)
def test_amd_cells_refused_by_72_are_unsupported_upstream(
    scenario: str, feature: Feature, source: str
) -> None:
    """7.2's AMD paging domains have no set_dev_pasid and its nested domain no
    cache_invalidate_user: both cells are 7.2's refusal, not the model's gap."""
    r = run_scenario(SCENARIOS[scenario], "amd")
    assert r.status == UNSUPPORTED
    assert r.feature == feature.value
    assert r.errno == errno.EOPNOTSUPP
    assert source in r.upstream
    assert cell_text(r) == "unsupported upstream"


def test_upstream_labels_are_declared_refusals_only() -> None:
    """Each driver names a 7.2 source for every upstream refusal, never for a feature it
    declares; a refusal without one stays a plain "unsupported"."""
    for name, drv in default_registry().drivers.items():
        for feature, source in drv.info.unsupported_upstream.items():
            assert source.startswith("Linux 7.2 drivers/iommu/"), (name, feature)
            assert feature not in drv.info.features, (name, feature)
    plain = ScenarioResult("hwpt_invalidate", "x", UNSUPPORTED, feature="hwpt_invalidate")
    assert cell_text(plain) == status_text(plain) == "unsupported"


@pytest.mark.parametrize(
    "scenario",
    [
        "viommu_vdevice_lifetime",
        "veventq_alloc",
        "hw_queue_alloc",
        "guest_accelerated_queue",
        "guest_fault_delivery",
    ],
)
def test_vtd_viommu_cells_are_unsupported_upstream(scenario: str) -> None:
    """7.2's intel_iommu_ops has no vIOMMU ops: every cell that needs a vIOMMU is 7.2's
    refusal, named as such, with the errno the core gives."""
    r = run_scenario(SCENARIOS[scenario], "intel_vtd")
    assert r.status == UNSUPPORTED
    assert r.errno == errno.EOPNOTSUPP
    assert "intel_iommu_ops" in r.upstream
    assert cell_text(r) == "unsupported upstream"
