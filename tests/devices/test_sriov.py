"""SR-IOV PF: VF Enable creates VFs at First VF Offset + i * Stride; sriov_numvfs errnos."""

from __future__ import annotations

import errno

import iommufd_model as im
from iommufd_model.devices import PciFunction
from iommufd_model.devices import pci_regs as R
from iommufd_model.testing import assert_errno


def pf_machine(vendor: str = "mock") -> tuple[im.Machine, PciFunction]:
    m = im.Machine.build(iommus=[vendor])
    return m, m.add_pci_function("generic", 0, total_vfs=4)


def test_vfs_created_and_removed(vendor: str) -> None:
    m, pf = pf_machine(vendor)
    assert pf.config_read(0x100 + R.PCI_SRIOV_TOTAL_VF, 2) == 4
    pf.sriov_set_num_vfs(3)
    assert [vf.bdf for vf in pf.sriov_vfs] == ["0000:01:00.1", "0000:01:00.2", "0000:01:00.3"]
    assert pf.config_read(0x100 + R.PCI_SRIOV_NUM_VF, 2) == 3
    ctrl = pf.config_read(0x100 + R.PCI_SRIOV_CTRL, 2)
    assert ctrl & R.PCI_SRIOV_CTRL_VFE and ctrl & R.PCI_SRIOV_CTRL_MSE
    vf = pf.sriov_vfs[1]
    assert vf.physfn is pf and vf.vf_index == 1 and vf.is_virtfn
    assert vf.iommu is pf.iommu and pf.iommu.devices[vf.rid] is vf and vf.iommu_priv is not None
    # the kernel's view of the IDs vs the VF's own registers (all ones)
    assert (vf.vendor_id, vf.device_id) == (0x1B36, 0x0006)
    assert vf.config_read(R.PCI_VENDOR_ID, 4) == 0xFFFFFFFF
    # a VF's Memory Space Enable is RO zero; the PF's VF MSE decodes its BARs
    vf.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER)
    assert vf.config_read(R.PCI_COMMAND, 2) == R.PCI_COMMAND_MASTER
    vf.mmio_write(0, 8, 4, 7)
    assert vf.mmio_read(0, 8, 4) == 7
    assert m.pci_functions() == [pf, *pf.sriov_vfs]
    pf.sriov_set_num_vfs(0)
    assert pf.sriov_vfs == [] and vf.rid not in pf.iommu.devices
    assert pf.config_read(0x100 + R.PCI_SRIOV_CTRL, 2) & R.PCI_SRIOV_CTRL_VFE == 0


def test_numvfs_refusals_as_sriov_numvfs_store() -> None:
    _, pf = pf_machine()
    assert_errno(errno.ERANGE, lambda: pf.sriov_set_num_vfs(5))
    assert_errno(errno.ERANGE, lambda: pf.sriov_set_num_vfs(1 << 16))
    assert_errno(errno.EINVAL, lambda: pf.sriov_set_num_vfs(-1))
    pf.sriov_set_num_vfs(2)
    pf.sriov_set_num_vfs(2)  # same count: nothing happens
    assert len(pf.sriov_vfs) == 2
    assert_errno(errno.EBUSY, lambda: pf.sriov_set_num_vfs(3))
    assert len(pf.sriov_vfs) == 2
    pf.sriov_set_num_vfs(0)
    pf.sriov_set_num_vfs(4)
    assert len(pf.sriov_vfs) == 4


def test_not_a_pf_and_bound_vf() -> None:
    m, pf = pf_machine()
    other = m.add_pci_function("generic", 0)
    assert other.bdf == "0000:01:01.0"  # slot 0 functions 1..4 are the PF's VFs
    assert_errno(errno.ENODEV, lambda: other.sriov_set_num_vfs(1))
    pf.sriov_set_num_vfs(1)
    fd = m.new_process().open_iommufd()
    fd.bind(pf.sriov_vfs[0])
    assert_errno(errno.EBUSY, lambda: pf.sriov_set_num_vfs(0))
    assert len(pf.sriov_vfs) == 1


def test_flr_keeps_vfs() -> None:
    _, pf = pf_machine()
    pf.sriov_set_num_vfs(2)
    pf.reset()
    assert len(pf.sriov_vfs) == 2
    assert pf.config_read(0x100 + R.PCI_SRIOV_NUM_VF, 2) == 2


def test_vf_rid_collision_refused() -> None:
    m, pf = pf_machine()
    m.add_pci_function("generic", 0, rid=pf.rid + 2)
    assert_errno(errno.EBUSY, lambda: pf.sriov_set_num_vfs(3))
    assert pf.sriov_vfs == []
    assert pf.config_read(0x100 + R.PCI_SRIOV_CTRL, 2) & R.PCI_SRIOV_CTRL_VFE == 0
    assert pf.rid + 1 not in pf.iommu.devices
