"""Vendor domain IDs live on the framework's ``Ida`` (AMD DomainID, VT-d DID, SMMUv3 ASID and
VMID), registered in their instance's ``id_spaces``: what the kit's leak check
(``test_nothing_leaks_after_destroy_and_close``) counts. Here, for every in-tree vendor: a
domain's ID shows there while the domain is attached, and every ID is back after destroy and
close, so the kit's check is not vacuous for them.
"""

from __future__ import annotations

import pytest

from iommufd_model.api import Machine
from iommufd_model.api import uapi as U

#: driver -> the ID spaces its paging domains take from (stage 1 / a nest parent)
SPACES = {
    "amd": {"DomainID"},
    "arm_smmuv3": {"ASID", "VMID"},
    "intel_vtd": {"DID"},
}


def _counts(machine: Machine) -> dict[str, int]:
    return {ida.name: len(ida) for hw in machine.iommus for ida in hw.id_spaces}


@pytest.mark.parametrize("driver", sorted(SPACES))
def test_domain_ids_are_taken_and_released(driver: str) -> None:
    machine = Machine.build(iommus=[driver])
    dev = machine.add_pci_device(iommu=0)
    assert SPACES[driver] <= set(_counts(machine)), "the driver's ID spaces are not registered"
    proc = machine.new_process()
    va = proc.mmap(1 << 21)
    before = _counts(machine)
    fd = proc.open_iommufd()
    dev_id = fd.bind(dev)
    ioas = fd.ioas_alloc()
    fd.ioas_map(ioas, va, 1 << 21)
    taken: set[str] = set()
    for flags in (0, U.IOMMU_HWPT_ALLOC_NEST_PARENT):
        hwpt = fd.hwpt_alloc(dev_id, ioas, flags=flags)
        fd.attach(dev_id, hwpt)
        now = _counts(machine)
        taken |= {name for name in now if now[name] > before[name]}
        fd.detach(dev_id)
        fd.destroy(hwpt)
    assert taken == SPACES[driver], f"IDs taken from {taken}, expected {SPACES[driver]}"
    fd.close()
    assert _counts(machine) == before, "IDs still taken after destroy and close"
