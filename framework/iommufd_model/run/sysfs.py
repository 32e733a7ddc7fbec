"""The sysfs view of a run: the model's sysfs tree as a real directory the preload redirects to.

The model's own design. A program finds its devices the way the kernel's VFIO selftests do
(``lib/sysfs.c``, ``lib/vfio_pci_device.c`` of Linux 7.2): ``readlink`` of
``/sys/bus/pci/devices/<bdf>/iommu_group`` and ``driver``, ``open``+``read`` of ``vendor``,
``sriov_totalvfs``..., ``opendir`` of ``vfio-dev/``, a ``write`` to ``sriov_numvfs``. The tree
(directories, symlinks, attribute files) is written into a directory of the run, so that every
lookup, ``readlink``, ``stat`` and ``readdir`` is the kernel's own on a real tree; the preload
redirects the tree's top directories (``/sys/bus/pci``, ``/sys/kernel/iommu_groups``...) there.
Attribute files are opened through the server instead (a model file per open): a read
returns the attribute as the model shows it *now*, a write goes to the model (``sriov_numvfs``
creating VFs), after which the directory is brought up to date (the VFs' directories appear).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from iommufd_model.errors import err
from iommufd_model.machine import Machine


@attrs.frozen
class File:
    """An attribute: its text now, and whether it has a ``store`` (mode 0644, else 0444)."""

    content: bytes
    writable: bool = False


@attrs.frozen
class Link:
    """A symlink; ``target`` as ``readlink`` returns it (relative, as sysfs makes them)."""

    target: str


@attrs.frozen
class Dir:
    """A directory (every parent of a listed path is one too)."""


Node = File | Link | Dir
#: the model's sysfs now: absolute path ("/sys/...") -> node
TreeFn = Callable[[Machine], Mapping[str, Node]]
#: a write to an attribute: bytes taken, or OSError with the kernel's errno
WriteFn = Callable[[Machine, str, bytes], int]

O_ACCMODE = os.O_RDONLY | os.O_WRONLY | os.O_RDWR


class SysfsView:
    """The run's copy of ``tree(machine)`` under ``root``; ``open`` serves its attributes."""

    def __init__(self, machine: Machine, root: Path, tree: TreeFn, write: WriteFn) -> None:
        self.machine = machine
        self.root = root
        self.tree = tree
        self.write_fn = write
        self._shown: dict[str, Node] = {}
        self.sync()

    def prefixes(self) -> list[str]:
        """The directories the preload redirects: each path's first three components
        (``/sys/bus/pci``, ``/sys/kernel/iommu_groups``)."""
        tops = {"/".join(path.split("/")[:4]) for path in self._shown}
        return sorted(t for t in tops if t.count("/") == 3)

    def host_path(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def sync(self) -> None:
        """Bring the directory up to date with the model's tree (paths gone are removed,
        new and changed ones written; files keep the content shown at open time)."""
        now = dict(self.tree(self.machine))
        for path in sorted(set(self._shown) - set(now), key=len, reverse=True):
            self._remove(self.host_path(path))
        for path in sorted(now, key=lambda p: p.count("/")):
            node = now[path]
            if self._shown.get(path) == node and self._exists(self.host_path(path)):
                continue
            self._make(self.host_path(path), node)
        self._shown = now

    @staticmethod
    def _exists(host: Path) -> bool:
        return host.is_symlink() or host.exists()

    @staticmethod
    def _remove(host: Path) -> None:
        if host.is_symlink() or host.is_file():
            host.unlink()
        elif host.is_dir():
            shutil.rmtree(host)

    def _make(self, host: Path, node: Node) -> None:
        host.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(node, Dir):
            if host.is_symlink() or host.is_file():
                host.unlink()
            host.mkdir(exist_ok=True)
            return
        if self._exists(host):
            self._remove(host)
        if isinstance(node, Link):
            host.symlink_to(node.target)
        else:
            host.write_bytes(node.content)
            host.chmod(0o644 if node.writable else 0o444)

    # -- the opener of the run's server ----------------------------------------------------
    def open(self, machine: Machine, path: str, flags: int, proc: Any = None) -> Any:
        """``open()`` of an attribute (the preload sends the redirected path): EACCES for
        writing one without a ``store``, as kernfs does."""
        root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if not real.startswith(root + "/"):
            return None
        name = "/" + os.path.relpath(real, root)
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return None
        if not stat.S_ISREG(mode):
            return None
        if flags & O_ACCMODE != os.O_RDONLY and not mode & stat.S_IWUSR:
            raise err(errno.EACCES, f"{name} is read-only")
        return Attribute(self, name)


class Attribute:
    """One open sysfs attribute: ``show`` at each read, ``store`` at each write."""

    def __init__(self, view: SysfsView, path: str) -> None:
        self.view = view
        self.path = path

    def read(self, count: int, offset: int) -> bytes:
        node = self.view.tree(self.view.machine).get(self.path)
        if not isinstance(node, File):
            raise err(errno.ENOENT, f"{self.path} is gone")
        return node.content[offset : offset + count]

    def write(self, data: bytes, offset: int) -> int:
        try:
            return self.view.write_fn(self.view.machine, self.path, data)
        finally:
            self.view.sync()

    def release(self) -> None:
        pass
