"""The VM model: guest RAM at IOVA = GPA, guest-built tables, the guest IOMMU hook."""

from __future__ import annotations

import errno

import pytest

import iommufd_model as im
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.compiled import load_walker
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.x86_64 import X86_64Format
from iommufd_model.testing import assert_errno
from iommufd_model.vmm import Vm

walk_x86 = load_walker("iommufd_model.hw.walk_x86")
MIB = 1 << 20


def test_guest_ram_is_mapped_at_iova_equal_gpa() -> None:
    machine = im.Machine.build(iommus=["mock"])
    vm = Vm(machine, 16 * MIB, table_pool=2 * MIB)
    areas = [(a[0], a[1]) for a in vm.fd.objects.get(vm.ioas_id).iopt.areas()]  # type: ignore[attr-defined]
    assert areas == [(0, 16 * MIB - 1)]  # all of guest RAM, at IOVA = GPA
    vm.memory.write(0x1000, b"guest")
    assert vm.vmm.read(vm.ram_va + 0x1000, 5) == b"guest"
    assert_errno(errno.EFAULT, lambda: vm.memory.read(16 * MIB - 4, 8))


def test_guest_tables_are_real_bytes_a_nested_walk_finds() -> None:
    machine = im.Machine.build(iommus=["mock"])
    vm = Vm(machine, 16 * MIB, table_pool=2 * MIB)
    buf = vm.alloc_buffer(4096)
    vm.memory.write(buf, b"payload")
    s1 = RadixPageTable(vm.memory, X86_64Format(4))  # the guest driver's stage-1 tables
    s1.map(0x4000_0000, buf, 4096, IOMMU_READ | IOMMU_WRITE)
    assert s1.root >= vm.memory.pool_start << 12  # tables live in the guest's table pool
    iopt = vm.fd.objects.get(vm.ioas_id).iopt  # type: ignore[attr-defined]
    iopt.access_pin(0, 16 * MIB, True)  # make stage 2 (the IOAS) resolvable by lookup

    def stage2(gpa: int, write: bool) -> tuple[int, int, int]:
        hit = iopt.lookup(gpa)
        if hit is None:
            return 1, 0, 1
        return 0, (hit[0] << 12) | (gpa & 0xFFF), 1

    mem = machine.memory
    res = walk_x86.walk_x86(mem._pages, mem.size, s1.root, 0x4000_0003, 4, False, stage2)
    assert res[0] == walk_x86.OK
    assert mem.read(res[1], 4) == b"load"  # host memory behind guest buffer + 3
    assert res[3] == 4 + 5  # four stage-1 reads plus five stage-2 translations


def test_viommu_of_a_driver_without_a_guest_model_is_eopnotsupp() -> None:
    machine = im.Machine.build(iommus=["mock"])
    vm = Vm(machine, 16 * MIB, table_pool=2 * MIB)
    with pytest.raises(OSError) as exc:
        vm.viommu(machine.iommus[0])
    assert exc.value.errno == errno.EOPNOTSUPP


def test_guest_table_pool_is_bounded_and_reused() -> None:
    machine = im.Machine.build(iommus=["mock"])
    vm = Vm(machine, 4 * MIB, table_pool=8192)
    a, b = vm.memory.alloc_frame(), vm.memory.alloc_frame()
    assert_errno(errno.ENOMEM, lambda: vm.memory.alloc_frame())
    vm.memory.put_frame(a)
    assert vm.memory.alloc_frame() == a and b != a
    with pytest.raises(OSError):
        vm.alloc_buffer(4 * MIB)


def test_bind_vdevice_leaves_the_device_unbound_when_the_vdevice_fails() -> None:
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.vmm import GuestDevice, GuestDomain, GuestIommu

    class NoViommu(GuestIommu):  # a design whose vIOMMU cannot be created
        def add_device(self, dev: PciDevice, virt_id: int) -> GuestDevice:
            return self.bind_vdevice(dev, virt_id)

        def attach(self, gdev: GuestDevice, *, pasid: int | None = None) -> GuestDomain:
            raise AssertionError

        def map(
            self, dom: GuestDomain, iova: int, gpa: int, size: int, *, write: bool = True
        ) -> None:
            raise AssertionError

        def unmap(self, dom: GuestDomain, iova: int, size: int) -> None:
            raise AssertionError

        def invalidate(self, dom: GuestDomain, iova: int | None = None, size: int = 0) -> None:
            raise AssertionError

        def detach(self, dom: GuestDomain) -> None:
            raise AssertionError

    machine = im.Machine.build(iommus=["mock"])
    vm = Vm(machine, 16 * MIB, table_pool=2 * MIB)
    dev = machine.add_pci_device()
    guest = NoViommu(vm, machine.iommus[0], accelerated=False)
    assert_errno(errno.EOPNOTSUPP, lambda: guest.add_device(dev, 0x18))
    assert dev.bound_to is None  # free to be bound again
    assert vm.fd.bind(dev) > 0


@pytest.mark.parametrize(
    ("driver", "accelerated"),
    [
        ("amd", False),
        ("amd", True),
        ("arm_smmuv3", False),
        ("arm_smmuv3", True),
        ("intel_vtd", False),
    ],
)
def test_vm_close_releases_everything_it_created(driver: str, accelerated: bool) -> None:
    """``Vm.close()`` (a VMM's exit): mappings of the iommufd, its files, its objects and bound
    devices, the guest RAM; a ``with`` block does the same, and a second close does nothing."""
    machine = im.Machine.build(iommus=[driver])
    dev = machine.add_pci_device(iommu=0)
    frames = machine.memory.frames_in_use
    with Vm(machine, 16 * MIB, table_pool=4 * MIB) as vm:
        g = vm.viommu(machine.iommus[0], accelerated=accelerated)
        gdev = g.add_device(dev, 3)
        dom = g.attach(gdev)
        g.map(dom, 0x40_0000, vm.alloc_buffer(4096), 4096)
        g.invalidate(dom)
        dev.dma_read(0x40_0000, 8)
        assert dev.bound_to is vm.fd
    assert vm.closed and vm.fd.closed and not vm.vmm.files
    assert dev.bound_to is None and not vm.vmm.is_mapped(vm.ram_va, 4096)
    if driver != "intel_vtd":  # VT-d keeps a PASID-table page it gave the device: the driver's
        assert machine.memory.frames_in_use == frames
    vm.close()
