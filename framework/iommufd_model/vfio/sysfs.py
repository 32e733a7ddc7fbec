"""The sysfs a VFIO user reads: what Linux 7.2 shows for PCI functions bound to vfio-pci.

The paths are those the kernel's VFIO selftests read or write (tools/testing/selftests/vfio
lib/sysfs.c and lib/vfio_pci_device.c) and the links around them, laid out as sysfs does:

- ``/sys/devices/pci0000:BB/<bdf>/``: ``vendor``, ``device``, ``subsystem_vendor``,
  ``subsystem_device`` (``0x%04x``), ``class`` (``0x%06x``), ``revision`` (``0x%02x``)
  (drivers/pci/pci-sysfs.c), ``iommu_group`` -> ``../../../kernel/iommu_groups/N``,
  ``driver`` -> ``../../../bus/pci/drivers/vfio-pci``, ``vfio-dev/vfioN/`` (the cdev's class
  device, drivers/vfio/device_cdev.c), and for an SR-IOV PF ``sriov_totalvfs``,
  ``sriov_numvfs`` (writable), ``sriov_offset``, ``sriov_stride``, ``sriov_vf_device`` and
  ``virtfnI`` -> the VF; a VF has ``physfn`` -> its PF (drivers/pci/iov.c);
- ``/sys/bus/pci/devices/<bdf>`` -> ``../../../devices/pci0000:BB/<bdf>``, the driver's
  directory ``/sys/bus/pci/drivers/vfio-pci/<bdf>`` -> the device;
- ``/sys/kernel/iommu_groups/N/devices/<bdf>`` -> the device (drivers/iommu/iommu.c).

The model's own choices: every function sits directly on a root bus ``pci0000:BB`` of its
own bus number (no bridges), every function is bound to vfio-pci, one function per group.

:func:`tree` gives the whole view as path -> node (the node types are the run's sysfs view,
run/sysfs.py); :func:`write` is a write to an attribute (``sriov_numvfs`` only: kstrtou16 then
drivers/pci/iov.c ``sriov_numvfs_store`` with vfio-pci's sriov_configure).
"""

from __future__ import annotations

import errno
import posixpath
from typing import TYPE_CHECKING

from iommufd_model.errors import err
from iommufd_model.run.sysfs import Dir, File, Link, Node
from iommufd_model.vfio.registry import registry

if TYPE_CHECKING:
    from iommufd_model.devices import PciFunction
    from iommufd_model.machine import Machine

DRIVER = "/sys/bus/pci/drivers/vfio-pci"
GROUPS = "/sys/kernel/iommu_groups"


def device_dir(fn: PciFunction) -> str:
    """The function's directory under /sys/devices."""
    return f"/sys/devices/pci0000:{fn.rid >> 8:02x}/{fn.bdf}"


def _link(src: str, dst: str) -> Link:
    """A symlink at ``src`` to ``dst``, relative as sysfs makes them."""
    return Link(posixpath.relpath(dst, posixpath.dirname(src)))


def _text(value: str) -> File:
    return File((value + "\n").encode())


def tree(machine: Machine) -> dict[str, Node]:
    """Every sysfs node of the machine's VFIO devices, now."""
    out: dict[str, Node] = {DRIVER: Dir(), GROUPS: Dir(), "/sys/bus/pci/devices": Dir()}
    for vdev in registry(machine).sync():
        fn = vdev.fn
        spec = fn.spec
        d = device_dir(fn)
        out[d] = Dir()
        out[f"{d}/vendor"] = _text(f"0x{fn.vendor_id:04x}")
        out[f"{d}/device"] = _text(f"0x{fn.device_id:04x}")
        out[f"{d}/subsystem_vendor"] = _text(f"0x{spec.subsystem_vendor_id:04x}")
        out[f"{d}/subsystem_device"] = _text(f"0x{spec.subsystem_id:04x}")
        out[f"{d}/class"] = _text(f"0x{spec.class_code:06x}")
        out[f"{d}/revision"] = _text(f"0x{spec.revision:02x}")
        group = f"{GROUPS}/{vdev.group.id}"
        out[f"{d}/iommu_group"] = _link(f"{d}/iommu_group", group)
        out[f"{d}/driver"] = _link(f"{d}/driver", DRIVER)
        out[f"{d}/vfio-dev"] = Dir()
        out[f"{d}/vfio-dev/{vdev.name}"] = Dir()
        if vdev.vf_token is not None:  # an SR-IOV PF
            out[f"{d}/sriov_totalvfs"] = _text(str(spec.total_vfs))
            out[f"{d}/sriov_numvfs"] = File(f"{len(fn.sriov_vfs)}\n".encode(), writable=True)
            out[f"{d}/sriov_offset"] = _text(str(spec.vf_offset))
            out[f"{d}/sriov_stride"] = _text(str(spec.vf_stride))
            out[f"{d}/sriov_vf_device"] = _text(f"{spec.vf_device_id:x}")
            for i, vf in enumerate(fn.sriov_vfs):
                out[f"{d}/virtfn{i}"] = _link(f"{d}/virtfn{i}", device_dir(vf))
        if fn.physfn is not None:
            out[f"{d}/physfn"] = _link(f"{d}/physfn", device_dir(fn.physfn))
        bus_link = f"/sys/bus/pci/devices/{fn.bdf}"
        out[bus_link] = _link(bus_link, d)
        out[f"{DRIVER}/{fn.bdf}"] = _link(f"{DRIVER}/{fn.bdf}", d)
        out[group] = Dir()
        out[f"{group}/devices"] = Dir()
        out[f"{group}/devices/{fn.bdf}"] = _link(f"{group}/devices/{fn.bdf}", d)
    return out


def kstrtou16(data: bytes) -> int:
    """The kernel's kstrtou16(buf, 0): an optional ``+``, base from the prefix (0x hex, 0
    octal), one trailing newline; EINVAL for anything else, ERANGE above 0xffff."""
    text = data.decode("latin-1")
    if text.endswith("\n"):
        text = text[:-1]
    text = text.removeprefix("+")
    base = 10
    if text[:2].lower() == "0x" and len(text) > 2:
        base, text = 16, text[2:]
    elif text.startswith("0") and len(text) > 1:
        base, text = 8, text[1:]
    digits = "0123456789abcdef"[:base]
    if not text or any(c not in digits for c in text.lower()):
        raise err(errno.EINVAL, f"{data!r} is not a number")
    value = int(text, base)
    if value > 0xFFFF:
        raise err(errno.ERANGE, f"{value} does not fit a u16")
    return value


def write(machine: Machine, path: str, data: bytes) -> int:
    """A write to a sysfs attribute: ``sriov_numvfs`` of a PF creates or removes its VFs.

    ``path`` is the attribute under ``/sys/devices/...`` or ``/sys/bus/pci/devices/<bdf>``;
    ENOENT for no such attribute, EACCES for one without a store."""
    head, name = posixpath.split(posixpath.normpath(path))
    fn = next(
        (
            f
            for f in machine.pci_functions()
            if head in (device_dir(f), f"/sys/bus/pci/devices/{f.bdf}")
        ),
        None,
    )
    node = tree(machine).get(f"{device_dir(fn)}/{name}") if fn is not None else None
    if fn is None or not isinstance(node, File):
        raise err(errno.ENOENT, f"no sysfs attribute {path}")
    if not node.writable:
        raise err(errno.EACCES, f"{path} has no store")
    fn.sriov_set_num_vfs(kstrtou16(data))
    registry(machine).sync()
    return len(data)
