"""``iommufd-model run --device KIND@IOMMU``: which modelled functions exist behind which IOMMU,
and how a program finds them (``VFIO_SELFTESTS_BDF``, ``--bdf-args``), as the kernel's VFIO
selftests find devices on a real machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from iommufd_model.run.launch import DeviceSpec, build_machine, iommus_for

CLI = Path(sys.executable).parent / "iommufd-model"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), "run", *args], capture_output=True, text=True, timeout=60)


def test_devices_get_bdfs_per_iommu_and_the_program_sees_them() -> None:
    done = run_cli(
        "--device",
        "ioat@amd",
        "--device",
        "generic@intel_vtd,ioat@amd",
        "--bdf-args",
        "--",
        "sh",
        "-c",
        'echo "$VFIO_SELFTESTS_BDF|$*"',
        "prog",
    )
    assert done.returncode == 0, done.stderr
    # one bus per IOMMU instance (bus 1 + index), slots in the order the devices were given
    assert done.stdout == "0000:01:00.0|0000:01:00.0 0000:01:01.0 0000:02:00.0\n"


def test_machine_from_device_specs() -> None:
    specs = DeviceSpec.parse("ioat@amd,generic@1")
    assert iommus_for(None, specs) == ["amd"]
    assert iommus_for(["mock", "amd"], specs) == ["mock", "amd"]
    machine = build_machine(["mock", "amd"], 0, functions=specs)
    fns = machine.pci_functions()
    assert [(fn.bdf, fn.iommu.driver_name) for fn in fns] == [
        ("0000:02:00.0", "amd"),
        ("0000:02:01.0", "amd"),
    ]
    assert fns[0].vendor_id == 0x8086  # the IOAT (Intel CBDMA)
    (pf,) = DeviceSpec.parse("generic@amd:total_vfs=3")
    assert pf.opts == (("total_vfs", 3),)
    machine = build_machine(["amd"], 0, functions=[pf])
    assert machine.pci_functions()[0].spec.total_vfs == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "ioat"], "expected KIND@IOMMU"),
        (["--device", "nosuch@amd"], "unknown PCI function kind"),
        (["--iommu", "amd", "--device", "ioat@arm_smmuv3"], "no arm_smmuv3 IOMMU"),
        (["--device", "ioat@3"], "no IOMMU instance 3"),
        (["--device", "generic@amd:total_vfs"], "is not NAME=VALUE"),
        (["--device", "generic@amd:nosuch=1"], "nosuch"),
    ],
)
def test_bad_device_options_are_refused(args: list[str], message: str) -> None:
    done = run_cli(*args, "--", "true")
    assert done.returncode == 2
    assert message in done.stderr
