"""VFIO in the model: ``/dev/vfio/vfio`` (iommufd's container compatibility), the groups
``/dev/vfio/N`` and the device cdevs ``/dev/vfio/devices/vfioN`` of every modelled PCI
function (each bound to vfio-pci, alone in its group), and the sysfs view of them
(:mod:`iommufd_model.vfio.sysfs`). docs/vfio.md describes what is modelled and from where.

:func:`open_path` is what ``open(2)`` of such a path does; :func:`open_fd` also installs the
file in a process of the model, as a Python test uses it.
"""

from __future__ import annotations

import errno
import posixpath
from typing import TYPE_CHECKING, Any

from iommufd_model.errors import err
from iommufd_model.vfio.device_file import VfioDeviceFile
from iommufd_model.vfio.group import VfioGroup, VfioGroupFile
from iommufd_model.vfio.pci_core import VfioPciDevice
from iommufd_model.vfio.registry import VfioRegistry, registry

if TYPE_CHECKING:
    from iommufd_model.machine import Machine
    from iommufd_model.process import Process

VFIO_DIR = "/dev/vfio"
CONTAINER_PATH = "/dev/vfio/vfio"
CDEV_DIR = "/dev/vfio/devices"


def open_path(machine: Machine, path: str, flags: int = 0, proc: Process | None = None) -> Any:
    """The file ``open(path, flags)`` gives, or None when ``path`` is not VFIO's.

    ``/dev/vfio/vfio`` is an iommufd (CONFIG_IOMMUFD_VFIO_CONTAINER): a new
    :class:`~iommufd_model.core.main.IommuFd` of ``proc`` (required for it), which the caller
    installs as it installs ``/dev/iommu``. A missing group or cdev is ENOENT, a group or
    device refusing the open raises its errno (EBUSY, ENODEV)."""
    path = posixpath.normpath(path)
    if path != VFIO_DIR and not path.startswith(VFIO_DIR + "/"):
        return None
    reg = registry(machine)
    if path == CONTAINER_PATH:
        from iommufd_model.core.main import IommuFd

        if proc is None:
            raise err(errno.EINVAL, "opening /dev/vfio/vfio needs the opening process")
        ictx = IommuFd(machine, proc)
        # iommufd_fops_open() (7.2 main.c): VFIO's accounting, IOPT_PAGES_ACCOUNT_MM
        ictx.account_mode = 1
        return ictx
    head, name = posixpath.split(path)
    if head == CDEV_DIR and name.startswith("vfio") and name[4:].isdigit():
        vdev = reg.by_index(int(name[4:]))
        if vdev is not None:
            return VfioDeviceFile(vdev)
    elif head == VFIO_DIR and name.isdigit():
        group = reg.group(int(name))
        if group is not None:
            return VfioGroupFile.open(group)
    raise err(errno.ENOENT, f"no {path}")


def open_fd(proc: Process, path: str, flags: int = 0) -> int:
    """``open(path)`` in ``proc``: the file installed at the lowest free descriptor."""
    file = open_path(proc.machine, path, flags, proc)
    if file is None:
        raise err(errno.ENOENT, f"{path} is not a VFIO path")
    fd = proc.install_file(file)
    if hasattr(file, "fd"):
        file.fd = fd  # an iommufd knows its descriptor
    return fd


__all__ = [
    "CDEV_DIR",
    "CONTAINER_PATH",
    "VfioDeviceFile",
    "VfioGroup",
    "VfioGroupFile",
    "VfioPciDevice",
    "VfioRegistry",
    "open_fd",
    "open_path",
    "registry",
]
