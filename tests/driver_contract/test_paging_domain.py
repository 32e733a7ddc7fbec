"""The framework's paging-domain base (``iommufd_model.paging``): map / map_pages / unmap /
iova_to_phys implemented once over the domain's table, with the vendor's ``check_map`` before
a map and its ``iotlb_sync`` after an unmap, given the gather the table filled; and every
in-tree driver builds its paging domains on it and takes its domain hooks from it.
"""

from __future__ import annotations

import errno

import pytest

from iommufd_model.api import (
    IOMMU_READ,
    IOMMU_WRITE,
    Domain,
    DomainType,
    IommuHw,
    IotlbGather,
    Machine,
    PagingDomain,
    PagingDomainOps,
    PhysicalMemory,
    RadixPageTable,
    paging_domain,
)
from iommufd_model.hw.x86_64 import X86_64Format
from iommufd_model.plugins import default_registry
from iommufd_model.testing import assert_errno

RW = IOMMU_READ | IOMMU_WRITE
K4, M2 = 1 << 12, 1 << 21


class Recorder(PagingDomain[RadixPageTable]):
    """A vendor domain that refuses read-only maps and records its flushes."""

    def __init__(self, owner: IommuHw, memory: PhysicalMemory) -> None:
        super().__init__(
            owner,
            RadixPageTable(memory, X86_64Format(4)),
            pgsize_bitmap=K4 | M2,
            aperture_end=(1 << 47) - 1,
        )
        self.syncs: list[IotlbGather] = []

    def check_map(self, iova: int, size: int, prot: int) -> None:
        if not prot & IOMMU_WRITE:
            raise OSError(errno.EINVAL, "read-only")

    def iotlb_sync(self, gather: IotlbGather) -> None:
        self.syncs.append(gather)


@pytest.fixture
def dom() -> Recorder:
    machine = Machine.build(iommus=["mock"])
    return Recorder(machine.iommus[0], machine.memory)


def test_map_unmap_gather_and_sync(dom: Recorder) -> None:
    pa = 64 * M2
    dom.map(0, pa, 2 * M2 + 2 * K4, RW)  # two 2 MiB leaves, then two 4 KiB ones
    assert dom.iova_to_phys(M2 + 5) == pa + M2 + 5
    assert dom.type is DomainType.PAGING
    done = dom.unmap(0, 2 * M2 + 2 * K4)
    assert done == 2 * M2 + 2 * K4
    (gather,) = dom.syncs
    assert (gather.first, gather.last) == (0, 2 * M2 + 2 * K4 - 1)
    assert gather.runs == [(0, 2 * M2, M2), (2 * M2, 2 * K4, K4)]
    assert gather.size == done
    assert dom.iova_to_phys(0) == -1


def test_map_pages_caps_the_leaves(dom: Recorder) -> None:
    dom.map_pages(0, 64 * M2, K4, 1024, RW)  # 4 MiB in 4 KiB pages: no 2 MiB leaf
    dom.unmap(0, 4 * M2)
    assert {pgsize for _iova, _size, pgsize in dom.syncs[0].runs} == {K4}


def test_check_map_refuses_before_the_table(dom: Recorder) -> None:
    assert isinstance(dom.pt.memory, PhysicalMemory)
    frames = dom.pt.memory.frames_in_use
    assert_errno(errno.EINVAL, lambda: dom.map(0, 64 * M2, K4, IOMMU_READ))
    assert dom.iova_to_phys(0) == -1 and dom.pt.memory.frames_in_use == frames
    dom.free()
    assert not dom.pt.tables


def test_paging_domain_refuses_other_kinds(dom: Recorder) -> None:
    assert paging_domain(dom) is dom
    nested = Domain(dom.owner, DomainType.NESTED, parent=dom)
    assert_errno(errno.EINVAL, lambda: paging_domain(nested))


@pytest.mark.parametrize("driver", ["amd", "arm_smmuv3", "intel_vtd", "mock"])
def test_in_tree_drivers_build_on_the_base(driver: str) -> None:
    assert isinstance(default_registry().drivers[driver].plugin, PagingDomainOps)
    machine = Machine.build(iommus=[driver])
    dev = machine.add_pci_device(iommu=0)
    fd = machine.new_process().open_iommufd()
    dev_id = fd.bind(dev)
    hwpt = fd.hwpt_alloc(dev_id, fd.ioas_alloc())
    fd.attach(dev_id, hwpt)
    domain = fd.objects.get_hwpt_paging(hwpt).domain
    assert isinstance(domain, PagingDomain), type(domain).__mro__
