"""Fault delivery to a vEVENTQ, the accelerated guest queue and two isolated VMs, per driver."""

from __future__ import annotations

import errno

import pytest

from iommufd_model.scenarios import FAIL, GUEST_SCENARIOS, PASS, UNSUPPORTED, run_scenario
from iommufd_model.scenarios import guest_events as G
from iommufd_model.scenarios.catalog import SCENARIOS
from iommufd_model.scenarios.nested import NESTED_SCENARIOS, VIRT_ID, Guest
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm import GuestDomain

NAMES = ["guest_fault_delivery", "guest_accelerated_queue", "two_vms_isolated"]
DRIVERS = ["amd", "arm_smmuv3", "intel_vtd", "mock"]

# (status, feature, errno, VMM traps) per cell. AMD: 3 trapped MMIO writes at boot + the
# gDTE; SMMUv3: the trapped CFGI_STE/CMD_SYNC of the attach. Mediated cells also count the
# guest's invalidations. VT-d's unsupported cells still booted its (mediated) guest driver.
EXPECTED: dict[tuple[str, str], tuple[str, str | None, int | None, int]] = {
    ("guest_fault_delivery", "amd"): (PASS, None, None, 4),
    ("guest_fault_delivery", "arm_smmuv3"): (PASS, None, None, 1),
    ("guest_fault_delivery", "intel_vtd"): (UNSUPPORTED, "veventq", errno.EOPNOTSUPP, 10),
    ("guest_fault_delivery", "mock"): (UNSUPPORTED, "nested", errno.EOPNOTSUPP, 0),
    ("guest_accelerated_queue", "amd"): (PASS, None, None, 4),
    ("guest_accelerated_queue", "arm_smmuv3"): (PASS, None, None, 1),
    ("guest_accelerated_queue", "intel_vtd"): (UNSUPPORTED, "hw_queue", errno.EOPNOTSUPP, 9),
    ("guest_accelerated_queue", "mock"): (UNSUPPORTED, "nested", errno.EOPNOTSUPP, 0),
    ("two_vms_isolated", "amd"): (PASS, None, None, 10),
    ("two_vms_isolated", "arm_smmuv3"): (PASS, None, None, 4),
    ("two_vms_isolated", "intel_vtd"): (PASS, None, None, 26),
    ("two_vms_isolated", "mock"): (UNSUPPORTED, "nested", errno.EOPNOTSUPP, 0),
}


def test_guest_scenarios_are_cells_of_the_catalog() -> None:
    assert [sc.name for sc in GUEST_SCENARIOS] == NAMES
    assert list(SCENARIOS)[-3:] == NAMES  # after the nested rows in the matrix
    for sc in GUEST_SCENARIOS:
        assert SCENARIOS[sc.name] is sc and sc not in NESTED_SCENARIOS
        assert sc.doc and {"nested", "nest_parent", "paging"} <= {f.value for f in sc.features}


@pytest.mark.parametrize(("name", "driver"), list(EXPECTED))
def test_status_per_driver(name: str, driver: str) -> None:
    status, feature, code, traps = EXPECTED[(name, driver)]
    result = run_scenario(SCENARIOS[name], driver)
    assert result.status == status, result.detail
    assert result.feature == feature and result.errno == code
    assert result.costs["traps"] == traps
    if status == PASS:
        assert result.costs["translations"] > 0
        assert (result.costs["faults"] > 0) == (name != "guest_accelerated_queue")
    if feature == "nested":
        assert "no guest IOMMU model" in result.detail


def test_unsupported_reasons_name_what_the_driver_said() -> None:
    vtd_q = run_scenario(SCENARIOS["guest_accelerated_queue"], "intel_vtd")
    assert vtd_q.detail.startswith(
        "hw_queue: EOPNOTSUPP: VT-d has no hardware-accelerated guest queue (Linux 7.2 "
    )
    vtd_ev = run_scenario(SCENARIOS["guest_fault_delivery"], "intel_vtd")
    assert vtd_ev.detail.startswith("veventq: no vIOMMU to carry one: EOPNOTSUPP")


@pytest.mark.parametrize("driver", ["amd", "arm_smmuv3"])
def test_accelerated_queue_forwards_nothing(driver: str) -> None:
    """The mediated flow re-issues every guest invalidation; the accelerated one none."""
    fast = run_scenario(SCENARIOS["guest_accelerated_queue"], driver)
    slow = run_scenario(SCENARIOS["nested_invalidation"], driver)
    assert fast.costs["forwarded"] == 0 < slow.costs["forwarded"]
    assert fast.costs["traps"] < slow.costs["traps"]


def test_vevent_records_decode_the_vendor_layouts() -> None:
    smmu = G.VEVENT_RECORDS[U.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3]
    raw = (0x10 | VIRT_ID << 32).to_bytes(8, "little") + bytes(8)
    raw += (0x4000_1000).to_bytes(8, "little") + bytes(8)
    assert smmu.size == len(raw) and smmu.dev_id(raw) == VIRT_ID
    assert smmu.address(raw) == 0x4000_1000
    amd = G.VEVENT_RECORDS[U.IOMMU_VEVENTQ_TYPE_AMD]
    raw = (VIRT_ID | 0x2000_0001 << 32).to_bytes(8, "little") + (1 << 40).to_bytes(8, "little")
    assert amd.size == len(raw) and amd.dev_id(raw) == VIRT_ID and amd.address(raw) == 1 << 40


def test_fault_delivery_catches_a_physical_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record naming anything but the virtual ID is a divergence, not a pass."""
    real = G.VEVENT_RECORDS[U.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3]
    wrong = G.VeventRecord(real.size, lambda r: real.dev_id(r) + 1, real.address)
    monkeypatch.setitem(G.VEVENT_RECORDS, U.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, wrong)
    result = run_scenario(SCENARIOS["guest_fault_delivery"], "arm_smmuv3")
    assert result.status == FAIL and "not vID 0x18" in result.detail


@pytest.mark.parametrize("driver", ["amd", "arm_smmuv3", "intel_vtd"])
def test_hostile_storm_both_lands_and_faults(driver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The garbage tables are not all-faulting noise: some of A's DMAs go through (and the
    scenario found them in A's RAM), most fault."""
    seen: list[tuple[int, int]] = []
    real = G.hostile_storm

    def spy(a: Guest, dom: GuestDomain, tables: list[int]) -> list[bytes]:
        landed = real(a, dom, tables)
        seen.append((len(tables), len(landed)))
        return landed

    monkeypatch.setattr(G, "hostile_storm", spy)
    result = run_scenario(SCENARIOS["two_vms_isolated"], driver)
    assert result.status == PASS, result.detail
    ((tables, landed),) = seen
    assert tables >= 4 and 0 < landed < G.STORM // 4
