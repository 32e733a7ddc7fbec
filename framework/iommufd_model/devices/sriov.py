"""SR-IOV physical functions: VF Enable creates the virtual functions, sriov_numvfs refuses as
Linux does.

The hardware side (:func:`vf_enable_changed`) follows the SR-IOV spec: setting VF Enable in
the PF's SR-IOV Control makes NumVFs functions appear at Routing IDs First VF Offset + i *
VF Stride from the PF's; clearing it makes them vanish. The kernel side (:func:`set_num_vfs`)
follows drivers/pci/iov.c of Linux 7.2: ``sriov_numvfs_store`` (ERANGE above TotalVFs, no-op
for the current count, EBUSY when VFs are enabled and a different non-zero count is asked)
then ``sriov_enable`` (NumVFs written, then VF Enable | VF MSE) or ``sriov_disable``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import attrs

from iommufd_model.devices import pci_regs as R
from iommufd_model.errors import err

if TYPE_CHECKING:
    from iommufd_model.devices.function import PciFunction


def vf_enable_changed(pf: PciFunction, before: int, after: int) -> None:
    """The PF's SR-IOV Control changed from ``before`` to ``after``."""
    was, now = before & R.PCI_SRIOV_CTRL_VFE, after & R.PCI_SRIOV_CTRL_VFE
    if was and not now:
        _remove_vfs(pf)
    elif now and not was:
        pos = pf._sriov_pos()
        total = pf.config.read(pos + R.PCI_SRIOV_TOTAL_VF, 2)
        count = min(pf.config.read(pos + R.PCI_SRIOV_NUM_VF, 2), total)
        _add_vfs(pf, count)


def _vf_spec(pf: PciFunction) -> object:
    spec = pf.spec
    return attrs.evolve(
        spec,
        device_id=spec.vf_device_id,
        bars=spec.vf_bars,
        msi_vectors=0,  # VFs have no MSI capability here; MSI-X only (model)
        total_vfs=0,
        pasid=False,
    )


def _add_vfs(pf: PciFunction, count: int) -> None:
    from iommufd_model.devices.function import FunctionSpec, PciFunction

    machine = pf.iommu.machine
    spec = _vf_spec(pf)
    assert isinstance(spec, FunctionSpec)
    added: list[PciFunction] = []
    for i in range(count):
        vf = PciFunction(
            pf.iommu,
            pf.vf_rid(i),
            spec,
            pasid_bits=pf.pasid_bits,
            ats=pf.ats,
            physfn=pf,
            vf_index=i,
        )
        try:
            machine.plug_pci_function(vf)
        except OSError:  # a Routing ID taken (model): no VF appears (pci_iov_add_virtfn unwinds)
            for done in reversed(added):
                machine.unplug_pci_function(done)
            return
        added.append(vf)
    pf.sriov_vfs = added


def _remove_vfs(pf: PciFunction) -> None:
    machine = pf.iommu.machine
    for vf in reversed(pf.sriov_vfs):
        machine.unplug_pci_function(vf, force=True)
    pf.sriov_vfs = []


def set_num_vfs(pf: PciFunction, n: int) -> None:
    """``echo n > sriov_numvfs``."""
    pos = pf._sriov_pos()
    if not pos:
        raise err(errno.ENODEV, f"{pf.bdf} is not an SR-IOV PF")
    if n < 0:
        raise err(errno.EINVAL, "kstrtou16: not an unsigned number")
    if n > 0xFFFF:
        raise err(errno.ERANGE, "kstrtou16: overflow")
    if n > pf.config.read(pos + R.PCI_SRIOV_TOTAL_VF, 2):
        raise err(errno.ERANGE, f"{n} VFs > TotalVFs")
    current = len(pf.sriov_vfs)
    if n == current:
        return
    ctrl = pf.config.read(pos + R.PCI_SRIOV_CTRL, 2)
    if n == 0:
        if any(vf.bound_to is not None for vf in pf.sriov_vfs):
            # Model: Linux would wait in the VF driver's remove for its users to close.
            raise err(errno.EBUSY, "a VF is still bound")
        pf.config_write(
            pos + R.PCI_SRIOV_CTRL, 2, ctrl & ~(R.PCI_SRIOV_CTRL_VFE | R.PCI_SRIOV_CTRL_MSE)
        )
        pf.config_write(pos + R.PCI_SRIOV_NUM_VF, 2, 0)
        return
    if current:
        raise err(errno.EBUSY, f"{current} VFs already enabled")
    last = pf.vf_rid(n - 1)
    if last < pf.rid:  # sriov_enable: the last VF's bus must exist (wrapped past bus 0xff)
        raise err(errno.ENOMEM, "VF Routing IDs beyond the last bus")
    pf.config_write(pos + R.PCI_SRIOV_NUM_VF, 2, n)
    pf.config_write(pos + R.PCI_SRIOV_CTRL, 2, ctrl | R.PCI_SRIOV_CTRL_VFE | R.PCI_SRIOV_CTRL_MSE)
    if len(pf.sriov_vfs) != n:  # creation failed and rolled back: leave VF Enable clear
        pf.config_write(pos + R.PCI_SRIOV_CTRL, 2, ctrl)
        pf.config_write(pos + R.PCI_SRIOV_NUM_VF, 2, 0)
        raise err(errno.EBUSY, "a VF Routing ID is taken")
