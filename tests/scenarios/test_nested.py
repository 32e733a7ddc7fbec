"""The nested scenarios: VT-d passes every one, the mock (no guest model) is unsupported."""

from __future__ import annotations

import errno

import pytest

from iommufd_model.plugins import default_registry
from iommufd_model.scenarios import PASS, UNSUPPORTED, run_scenario
from iommufd_model.scenarios.base import COST_KEYS, VMM_COST_KEYS, Scenario, ScenarioContext
from iommufd_model.scenarios.catalog import SCENARIOS
from iommufd_model.scenarios.nested import (
    NESTED_SCENARIOS,
    big_pattern,
    boot,
    teardown_orders,
)

NAMES = [sc.name for sc in NESTED_SCENARIOS]

# What the VT-d emulation exits for, per cell (every guest register write is one exit; an IQT
# write is one exit whatever it carries). Boot: 5 register writes + 3 global flushes; adding
# the device: 1 context-cache flush; each attach/detach: a PASID-cache flush + a PIOTLB flush.
VTD_TRAPS = {
    "nested_dma": 12,
    "nested_invalidation": 15,
    "nested_unmap_faults": 13,
    "nested_large_pages": 13,
    "nested_pasid": 19,
    "nested_guest_isolation": 12,
}


def test_nested_scenarios_are_cells_of_the_catalog() -> None:
    assert NAMES == [
        "nested_dma",
        "nested_invalidation",
        "nested_unmap_faults",
        "nested_large_pages",
        "nested_pasid",
        "nested_guest_isolation",
        "nested_teardown",
    ]
    for sc in NESTED_SCENARIOS:
        assert isinstance(sc, Scenario) and SCENARIOS[sc.name] is sc
        assert sc.doc and sc.features


@pytest.mark.parametrize("name", NAMES)
def test_intel_vtd_passes(name: str) -> None:
    result = run_scenario(SCENARIOS[name], "intel_vtd")
    assert result.status == PASS, result.detail
    costs = result.costs
    assert set(COST_KEYS) | set(VMM_COST_KEYS) <= set(costs)
    assert costs["translations"] > 0 and costs["commands"] > 0
    if name in VTD_TRAPS:
        assert costs["traps"] == VTD_TRAPS[name]
    assert 0 < costs["forwarded"] < costs["traps"]


@pytest.mark.parametrize("name", NAMES)
def test_mock_has_no_guest_model(name: str) -> None:
    result = run_scenario(SCENARIOS[name], "mock")
    assert result.status == UNSUPPORTED, result.detail
    assert result.errno == errno.EOPNOTSUPP and result.feature == "nested"
    assert "no guest IOMMU model" in result.detail
    assert result.costs["traps"] == 0 and result.costs["forwarded"] == 0


def test_intel_vtd_costs_what_the_design_says() -> None:
    """The invalidation cell: 4 guest flushes, each one exit and one forwarded entry."""
    result = run_scenario(SCENARIOS["nested_invalidation"], "intel_vtd")
    base = run_scenario(SCENARIOS["nested_dma"], "intel_vtd")
    assert result.costs["traps"] - base.costs["traps"] == 3  # page, range, all (+ attach's)
    assert result.costs["forwarded"] == 4  # the attach's flush and the three above
    assert result.costs["iotlb_hits"] > 0  # the stale reads were served from the IOTLB


def test_intel_vtd_serves_stale_translations_until_invalidated() -> None:
    """Where the IOTLB makes it deterministic (VT-d caches every nested translation), the
    uninvalidated DMA is stale -- and fresh right after the guest's invalidation."""
    ctx = ScenarioContext("intel_vtd", default_registry())
    g = boot(ctx)
    dom = g.domain()
    a, b = g.buffer(4096, 1), g.buffer(4096, 2)
    g.iommu.map(dom, 0x10000, a, 4096)
    assert g.dma_read(0x10000, 8) == big_pattern(1, 8)
    g.iommu.unmap(dom, 0x10000, 4096)
    g.iommu.map(dom, 0x10000, b, 4096)
    assert g.dma_read(0x10000, 8) == big_pattern(1, 8)  # stale: no invalidation yet
    g.iommu.invalidate(dom, 0x10000, 4096)
    assert g.dma_read(0x10000, 8) == big_pattern(2, 8)
    assert ctx.costs()["traps"] == g.vm.stats.traps


def test_teardown_orders() -> None:
    assert teardown_orders(False) == [
        ("close",),
        ("detach_rid", "close"),
        ("detach_rid", "unbind", "close"),
        ("unbind", "close"),
        ("unbind", "detach_rid", "close"),
    ]
    orders = teardown_orders(True)
    assert len(orders) == len(set(orders)) == 14
    assert ("detach_pasid", "detach_rid", "close") in orders
    assert ("detach_rid", "close") not in orders  # the PASID domain would still be live


def test_big_pattern_pages_differ() -> None:
    data = big_pattern(3, 3 * 4096)
    pages = [data[i * 4096 : (i + 1) * 4096] for i in range(3)]
    assert len(set(pages)) == 3 and big_pattern(3, 100) == data[:100]
