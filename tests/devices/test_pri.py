"""The Page Request (PRI) extended capability of the model's PCI devices and the PCI core's
functions on it (devices/pri.py): register attributes, Stopped following Enable, the
``pci_*_pri`` errnos, a VF using its PF's capability, and the chain with SR-IOV and PASID."""

from __future__ import annotations

import errno

import pytest

import iommufd_model as im
from iommufd_model.devices import pci_regs as R
from iommufd_model.devices.pri import (
    PRI_CAPACITY,
    pci_disable_pri,
    pci_enable_pri,
    pci_prg_resp_pasid_required,
    pci_pri_enabled,
    pci_pri_supported,
    pci_reset_pri,
)
from iommufd_model.hw.pci import PciDevice


def _machine() -> im.Machine:
    return im.Machine.build(iommus=["mock"])


def test_bare_device_capability_and_register_attributes() -> None:
    dev = _machine().add_pci_device(ats=True, prg_resp_pasid_required=False)
    pos = dev.config.find_ext_cap(R.PCI_EXT_CAP_ID_PRI)
    assert pos == 0x100 and dev.config_read(pos, 4) & 0xF_FFFF == R.PCI_EXT_CAP_ID_PRI | 1 << 16
    ctrl, status = pos + R.PCI_PRI_CTRL, pos + R.PCI_PRI_STATUS
    assert dev.config_read(status, 2) == R.PCI_PRI_STATUS_STOPPED
    assert dev.config_read(pos + R.PCI_PRI_MAX_REQ, 4) == PRI_CAPACITY
    # Reset reads 0; Enable is RW; Stopped and PASID Required are RO; RF/UPRGI are RW1C.
    dev.config_write(ctrl, 2, 0xFFFF)
    assert dev.config_read(ctrl, 2) == R.PCI_PRI_CTRL_ENABLE
    assert dev.config_read(status, 2) == 0  # enabled: not stopped
    dev.config.poke(status, 2, R.PCI_PRI_STATUS_RF | R.PCI_PRI_STATUS_UPRGI)  # the device
    dev.config_write(status, 2, R.PCI_PRI_STATUS_RF | R.PCI_PRI_STATUS_PASID)
    assert dev.config_read(status, 2) == R.PCI_PRI_STATUS_UPRGI
    dev.config_write(pos + R.PCI_PRI_MAX_REQ, 4, 7)
    assert dev.config_read(pos + R.PCI_PRI_MAX_REQ, 4) == PRI_CAPACITY
    dev.config_write(ctrl, 2, 0)
    assert dev.config_read(status, 2) & R.PCI_PRI_STATUS_STOPPED


def test_pci_core_functions_and_errnos() -> None:
    m = _machine()
    dev = m.add_pci_device(ats=True)
    assert pci_pri_supported(dev) and pci_prg_resp_pasid_required(dev)
    assert pci_reset_pri(dev) == 0 and not pci_pri_enabled(dev)
    assert pci_enable_pri(dev, 32) == 0 and pci_pri_enabled(dev)
    pos = dev.config.find_ext_cap(R.PCI_EXT_CAP_ID_PRI)
    assert pos is not None
    assert dev.config_read(pos + R.PCI_PRI_ALLOC_REQ, 4) == 32
    assert pci_enable_pri(dev, 32) == -errno.EBUSY
    assert pci_reset_pri(dev) == -errno.EBUSY
    pci_disable_pri(dev)
    assert not pci_pri_enabled(dev)
    assert pci_enable_pri(dev, 1 << 20) == 0  # Allocation capped at the Capacity
    assert dev.config_read(pos + R.PCI_PRI_ALLOC_REQ, 4) == PRI_CAPACITY
    bare = m.add_pci_device(ats=False)
    assert bare.config.find_ext_cap(R.PCI_EXT_CAP_ID_PRI) is None
    assert not pci_pri_supported(bare) and not pci_prg_resp_pasid_required(bare)
    assert pci_reset_pri(bare) == pci_enable_pri(bare, 1) == -errno.EINVAL
    pci_disable_pri(bare)


@pytest.mark.parametrize(("total_vfs", "pasid", "where"), [(0, False, 0x100), (4, True, 0x150)])
def test_function_chains_pri_and_vfs_use_the_pfs(total_vfs: int, pasid: bool, where: int) -> None:
    m = _machine()
    pf = m.add_pci_function(
        "generic", 0, total_vfs=total_vfs, pasid=pasid, ats=True, prg_resp_pasid_required=False
    )
    assert pf.config.find_ext_cap(R.PCI_EXT_CAP_ID_PRI) == where
    if pasid:
        assert pf.config.find_ext_cap(R.PCI_EXT_CAP_ID_PASID) == 0x140
    assert pci_enable_pri(pf, 16) == 0
    pf.reset()  # FLR: the capability's power-on state
    assert not pci_pri_enabled(pf)
    assert pf.config_read(where + R.PCI_PRI_STATUS, 2) == R.PCI_PRI_STATUS_STOPPED
    if not total_vfs:
        return
    pf.sriov_set_num_vfs(1)
    vf = pf.sriov_vfs[0]
    assert isinstance(vf, PciDevice) and vf.config.find_ext_cap(R.PCI_EXT_CAP_ID_PRI) is None
    assert pci_pri_supported(vf) and not pci_prg_resp_pasid_required(vf)
    assert pci_reset_pri(vf) == 0
    assert pci_enable_pri(vf, 8) == -errno.EINVAL  # the PF's PRI is off
    assert pci_enable_pri(pf, 8) == 0
    assert pci_enable_pri(vf, 8) == 0 and pci_pri_enabled(vf)
    pci_disable_pri(vf)  # a VF's disable leaves the PF's alone
    assert pci_pri_enabled(pf)
