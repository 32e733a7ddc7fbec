"""The guest model (framework GuestIommu): a guest arm-smmu-v3 driver on a vSMMU, what traps
into the VMM, and the CMDQV-accelerated variant where invalidations do not trap."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3.guest import GuestSmmuv3

from iommufd_model.hw.iommu import DmaFault
from iommufd_model.vmm import Vm

IOVA = 0x10_0000


def guest(smmu_machine: Any, accelerated: bool, **options: Any) -> tuple[Any, ...]:
    m, hw, _smmu = smmu_machine(**options)
    dev = m.add_pci_device(iommu=0)
    vm = Vm(m)
    g = vm.viommu(hw, accelerated=accelerated)
    assert isinstance(g, GuestSmmuv3)
    gdev = g.add_device(dev, 0x10)
    dom = g.attach(gdev)
    gpa = vm.alloc_buffer(4 * 4096)
    data = bytes(range(256)) * 64
    vm.memory.write(gpa, data)
    g.map(dom, IOVA, gpa, 4 * 4096)
    return vm, hw, dev, g, dom, data


@pytest.mark.parametrize("accelerated", [False, True])
def test_guest_domain_dma_invalidation_and_traps(smmu_machine: Any, accelerated: bool) -> None:
    vm, hw, dev, g, dom, data = guest(smmu_machine, accelerated)
    assert dev.dma_read(IOVA, 4 * 4096) == data
    traps, forwarded = vm.stats.traps, vm.stats.forwarded
    g.unmap(dom, IOVA + 4096, 4096)
    assert dev.dma_read(IOVA + 4096, 4) == data[4096:4100]  # stale until the guest invalidates
    hw.executed.clear()
    g.invalidate(dom, IOVA + 4096, 4096)
    with pytest.raises(DmaFault, match="F_TRANSLATION"):
        dev.dma_read(IOVA + 4096, 4)
    assert C.op(hw.executed[0][0]) == C.TLBI_NH_VA
    if accelerated:  # the hardware consumed the guest's VCMDQ: no exit to the VMM
        assert (vm.stats.traps, vm.stats.forwarded) == (traps, forwarded)
    else:  # one CMDQ_PROD trap, one command forwarded (the CMD_SYNC is emulated)
        assert (vm.stats.traps, vm.stats.forwarded) == (traps + 1, forwarded + 1)
    g.invalidate(dom)  # everything of the ASID
    g.detach(dom)  # an abort vSTE: configuration always traps
    assert vm.stats.by_kind["CMDQ_PROD"] >= 2
    with pytest.raises(DmaFault, match="abort"):
        dev.dma_read(IOVA, 4)


def test_guest_model_limits(smmu_machine: Any) -> None:
    m, hw, _smmu = smmu_machine(cmdqv=False)
    vm = Vm(m)
    with pytest.raises(OSError) as exc:
        vm.viommu(hw, accelerated=True)
    assert exc.value.errno == errno.EOPNOTSUPP
    g = vm.viommu(hw)
    gdev = g.add_device(m.add_pci_device(iommu=0), 3)
    with pytest.raises(OSError) as exc:
        g.attach(gdev, pasid=64)  # beyond the guest driver's 64-entry CD table
    assert exc.value.errno == errno.EOPNOTSUPP
