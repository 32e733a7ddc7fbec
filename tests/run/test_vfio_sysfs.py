"""The sysfs view under ``iommufd-model run`` (run/sysfs.py): the model's tree as the program
sees it through open/read/write, readlink, opendir/readdir, stat and access, with attribute
writes reaching the model and the tree following them. The tree here is the test's own, in
the shape of Linux's (/sys/bus/pci/devices/<bdf> -> ../../../devices/...)."""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from pathlib import Path

from iommufd_model.errors import err
from iommufd_model.machine import Machine
from iommufd_model.run.launch import build_machine, run_program
from iommufd_model.run.sysfs import Dir, File, Link, Node

Build = Callable[[str, str], Path]
C = Path(__file__).parent / "c"


class Sriov:
    """A PF at 0000:01:00.0 (group 7, vfio3) whose VFs appear with sriov_numvfs."""

    def __init__(self) -> None:
        self.numvfs = 0
        self.writes: list[bytes] = []

    def device(self, bdf: str, group: int) -> dict[str, Node]:
        dev = f"/sys/devices/pci0000:00/{bdf}"
        return {
            f"/sys/bus/pci/devices/{bdf}": Link(f"../../../devices/pci0000:00/{bdf}"),
            f"{dev}/vendor": File(b"0x8086\n"),
            f"{dev}/iommu_group": Link(f"../../../kernel/iommu_groups/{group}"),
            f"{dev}/driver": Link("../../../bus/pci/drivers/vfio-pci"),
            f"/sys/kernel/iommu_groups/{group}/devices/{bdf}": Link(
                f"../../../../devices/pci0000:00/{bdf}"
            ),
        }

    def tree(self, machine: Machine) -> Mapping[str, Node]:
        pf = "0000:01:00.0"
        out = self.device(pf, 7)
        out["/sys/bus/pci/drivers/vfio-pci"] = Dir()
        out[f"/sys/devices/pci0000:00/{pf}/vfio-dev/vfio3"] = Dir()
        out[f"/sys/devices/pci0000:00/{pf}/sriov_numvfs"] = File(
            f"{self.numvfs}\n".encode(), writable=True
        )
        for i in range(self.numvfs):
            vf = f"0000:01:00.{i + 1}"
            out.update(self.device(vf, 8 + i))
            out[f"/sys/devices/pci0000:00/{pf}/virtfn{i}"] = Link(f"../{vf}")
        return out

    def write(self, machine: Machine, path: str, data: bytes) -> int:
        self.writes.append(data)
        if not path.endswith("/sriov_numvfs"):
            raise err(errno.EACCES, "read-only")
        n = int(data)
        if n > 4:
            raise err(errno.ERANGE, "above sriov_totalvfs")
        self.numvfs = n
        return len(data)


def test_a_program_walks_the_model_sysfs(cc: Build) -> None:
    model = Sriov()
    machine = build_machine(["mock"], 0)
    prog = cc("sysfs", (C / "sysfs.c").read_text())
    rc, server = run_program([str(prog)], machine=machine, sysfs=(model.tree, model.write))
    assert rc == 0
    assert server.internal_errors == [] and server.files == {}
    assert model.writes == [b"9", b"2"] and model.numvfs == 2
