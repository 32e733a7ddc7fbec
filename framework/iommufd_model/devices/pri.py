"""The PCIe Page Request extended capability (PRI) and what the PCI core does with it.

The capability (PCIe Base spec, "Page Request Extended Capability Structure"; offsets and bits
as Linux's ``include/uapi/linux/pci_regs.h`` names them, in :mod:`pci_regs`):

- Page Request Control: Enable (RW) and Reset (a write of 1 acts; it reads 0);
- Page Request Status: Response Failure and Unexpected Page Request Group Index (RW1C),
  Stopped (RO) and PRG Response PASID Required (RO, the device's own);
- Outstanding Page Request Capacity (RO) and Allocation (RW).

The functions named ``pci_*`` are the PCI core's (Linux ``drivers/pci/ats.c``, outside the
7.2 reference tree, which carries ``drivers/iommu`` only): the vendor driver models call them
where their 7.2 drivers do (AMD ``pdev_enable_cap_pri``, VT-d ``iommu_enable_pci_pri``).
They return 0 or a negative errno, as the kernel's do, because their callers only test for
success. A virtual function has no PRI capability of its own (SR-IOV: VFs share the PF's);
the functions read the PF's, as the kernel's do.

The model's own readings, where the spec leaves it to the device: Stopped reads 1 exactly
while Enable is clear (the model's device has no page request in flight once PRI is off),
and Reset has no other visible effect. The model's device does not hold its requests back
while Enable is clear or beyond the Allocation: tests send page requests as stimuli, also
to an SMMUv3 whose 7.2 driver never enables PRI and denies what comes ("unexpected PRI
request"), so those paths stay reachable.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from iommufd_model.devices import pci_regs as R

if TYPE_CHECKING:
    from iommufd_model.devices.config import ConfigSpace
    from iommufd_model.hw.pci import PciDevice

# The Outstanding Page Request Capacity a device has unless it says otherwise (model's own).
PRI_CAPACITY = 512
PRI_STATUS_W1C = R.PCI_PRI_STATUS_RF | R.PCI_PRI_STATUS_UPRGI


def add_pri_cap(cfg: ConfigSpace, pos: int, *, capacity: int, pasid_required: bool) -> None:
    """Chain the PRI capability at ``pos`` in its power-on state: disabled and stopped."""
    cfg.add_ext_cap(pos, R.PCI_EXT_CAP_ID_PRI, 1)
    cfg.set(pos + R.PCI_PRI_CTRL, 2, 0, rw=R.PCI_PRI_CTRL_ENABLE)
    status = R.PCI_PRI_STATUS_STOPPED | (R.PCI_PRI_STATUS_PASID if pasid_required else 0)
    cfg.set(pos + R.PCI_PRI_STATUS, 2, status, w1c=PRI_STATUS_W1C)
    cfg.set(pos + R.PCI_PRI_MAX_REQ, 4, capacity)
    cfg.set(pos + R.PCI_PRI_ALLOC_REQ, 4, 0, rw=0xFFFFFFFF)


def pri_control_written(cfg: ConfigSpace) -> None:
    """The device's side of a configuration write: Stopped follows Enable (model)."""
    pos = cfg.find_ext_cap(R.PCI_EXT_CAP_ID_PRI)
    if pos is None:
        return
    status = cfg.peek(pos + R.PCI_PRI_STATUS, 2)
    if cfg.peek(pos + R.PCI_PRI_CTRL, 2) & R.PCI_PRI_CTRL_ENABLE:
        status &= ~R.PCI_PRI_STATUS_STOPPED
    else:
        status |= R.PCI_PRI_STATUS_STOPPED
    cfg.poke(pos + R.PCI_PRI_STATUS, 2, status)


def _pri_pos(dev: PciDevice) -> int | None:
    return dev.config.find_ext_cap(R.PCI_EXT_CAP_ID_PRI)


def pci_pri_supported(dev: PciDevice) -> bool:
    """Whether the device (a VF: its PF) has the PRI capability."""
    return _pri_pos(dev.physical_function()) is not None


def pci_pri_enabled(dev: PciDevice) -> bool:
    """Whether the device's (a VF's: its PF's) PRI Enable is set."""
    pf = dev.physical_function()
    pos = _pri_pos(pf)
    return pos is not None and bool(pf.config_read(pos + R.PCI_PRI_CTRL, 2) & R.PCI_PRI_CTRL_ENABLE)


def pci_prg_resp_pasid_required(dev: PciDevice) -> bool:
    """The PF's "PRG Response PASID Required" status bit (``pci_prg_resp_pasid_required``)."""
    pf = dev.physical_function()
    pos = _pri_pos(pf)
    return pos is not None and bool(
        pf.config_read(pos + R.PCI_PRI_STATUS, 2) & R.PCI_PRI_STATUS_PASID
    )


def pci_reset_pri(dev: PciDevice) -> int:
    """``pci_reset_pri()``: Reset written to Control; EBUSY while enabled, EINVAL without the
    capability; nothing for a VF (the PF's is shared)."""
    if dev.physical_function() is not dev:
        return 0
    pos = _pri_pos(dev)
    if pos is None:
        return -errno.EINVAL
    if pci_pri_enabled(dev):
        return -errno.EBUSY
    dev.config_write(pos + R.PCI_PRI_CTRL, 2, R.PCI_PRI_CTRL_RESET)
    return 0


def pci_enable_pri(dev: PciDevice, reqs: int) -> int:
    """``pci_enable_pri()``: Allocation = min(Capacity, ``reqs``), then Enable. EINVAL without
    the capability, EBUSY while enabled or not Stopped; a VF succeeds when its PF's PRI is
    enabled (EINVAL otherwise)."""
    pf = dev.physical_function()
    if pf is not dev:
        return 0 if pci_pri_enabled(pf) else -errno.EINVAL
    pos = _pri_pos(dev)
    if pos is None:
        return -errno.EINVAL
    if pci_pri_enabled(dev):
        return -errno.EBUSY
    if not dev.config_read(pos + R.PCI_PRI_STATUS, 2) & R.PCI_PRI_STATUS_STOPPED:
        return -errno.EBUSY
    capacity = dev.config_read(pos + R.PCI_PRI_MAX_REQ, 4)
    dev.config_write(pos + R.PCI_PRI_ALLOC_REQ, 4, min(capacity, reqs))
    dev.config_write(pos + R.PCI_PRI_CTRL, 2, R.PCI_PRI_CTRL_ENABLE)
    return 0


def pci_disable_pri(dev: PciDevice) -> None:
    """``pci_disable_pri()``: Enable cleared (nothing for a VF or without the capability)."""
    pos = _pri_pos(dev)
    if dev.physical_function() is not dev or pos is None:
        return
    control = dev.config_read(pos + R.PCI_PRI_CTRL, 2)
    dev.config_write(pos + R.PCI_PRI_CTRL, 2, control & ~R.PCI_PRI_CTRL_ENABLE)
