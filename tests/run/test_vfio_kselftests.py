"""Linux 7.2's own VFIO selftests, built unmodified, run through ``iommufd-model run`` with an
Intel IOAT and an Intel DSA behind each vendor IOMMU (AMD, VT-d, SMMUv3).

The binaries find their device by BDF (``VFIO_SELFTESTS_BDF``, set by ``run --device``), open
it through VFIO (container/group and cdev + iommufd), map its BARs (trapped MMIO), and the
driver test makes the engine copy memory by DMA through the vendor's page tables and checks the
bytes. ``vfio_pci_sriov_uapi_test`` needs an SR-IOV PF, which neither engine is: it runs on a
generic function with VFs (``generic@VENDOR:total_vfs=2``).

Every case must pass except those named in vfio_expected_failures.txt (failed or skipped, with
the reason), and every case named there must still not pass (the file stays true). The kit
that builds the binaries lives beside the repository in CI; without it these tests skip.

CI cost (each run builds a machine and the driver test maps 1 GiB per case): every binary
runs behind every vendor with both engines, except two. ``vfio_dma_mapping_test`` makes no
device DMA, so one engine per vendor shows the same. ``vfio_pci_driver_test`` runs all its
IOMMU modes with one engine per vendor (alternating: IOAT behind AMD and SMMUv3, DSA behind
VT-d) and the native ``iommufd`` mode with the other. ``IOMMUFD_MODEL_VFIO_FULL=1`` runs every
binary whole on every cell.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from .test_kselftests import Tap, parse_tap

HERE = Path(__file__).parent
VENDORS = ("amd", "intel_vtd", "arm_smmuv3")
ENGINES = ("ioat", "dsa")
#: the seven binaries and the cases each plans (kselftest TAP plan)
BINARIES = {
    "vfio_dma_mapping_test": 30,
    "vfio_dma_mapping_mmio_test": 15,
    "vfio_iommufd_setup_test": 6,
    "vfio_pci_device_test": 5,
    "vfio_pci_device_init_perf_test": 5,
    "vfio_pci_driver_test": 35,
}
#: the engine whose driver test runs every IOMMU mode behind each vendor (the other: iommufd)
FULL_DRIVER = {"amd": "ioat", "intel_vtd": "dsa", "arm_smmuv3": "ioat"}
#: the driver test's cases in its native iommufd mode (-v iommufd)
DRIVER_IOMMUFD_CASES = 7
FULL = os.environ.get("IOMMUFD_MODEL_VFIO_FULL") == "1"
SRIOV = "vfio_pci_sriov_uapi_test"
SRIOV_CASES = 45
SRIOV_PF = "generic:total_vfs=2"


@attrs.frozen
class Expected:
    """One line of vfio_expected_failures.txt: ``BINARY CASE [on VENDORS] [with DEVICES] --
    why``; VENDORS and DEVICES are comma lists (absent: every one)."""

    binary: str
    case: str
    vendors: frozenset[str] | None
    devices: frozenset[str] | None
    why: str

    def applies(self, binary: str, vendor: str, device: str) -> bool:
        return (
            self.binary == binary
            and (self.vendors is None or vendor in self.vendors)
            and (self.devices is None or device in self.devices)
        )


def load_expected(path: Path = HERE / "vfio_expected_failures.txt") -> list[Expected]:
    out = []
    for raw in path.read_text().splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        head, sep, why = raw.partition(" -- ")
        assert sep and why.strip(), f"no reason given: {raw!r}"
        words = head.split()
        binary, case, quals = words[0], words[1], words[2:]
        found: dict[str, frozenset[str]] = {}
        while quals:
            key, value, *quals = quals
            assert key in ("on", "with") and key not in found, f"bad qualifier in {raw!r}"
            found[key] = frozenset(value.split(","))
        out.append(Expected(binary, case, found.get("on"), found.get("with"), why))
    return out


def expected_not_passing(binary: str, vendor: str, device: str) -> dict[str, str]:
    return {e.case: e.why for e in load_expected() if e.applies(binary, vendor, device)}


def run_selftest(
    binary: Path, device: str, timeout: float, args: tuple[str, ...] = ()
) -> tuple[int, str]:
    cli = Path(sys.executable).parent / "iommufd-model"
    done = subprocess.run(
        [str(cli), "run", "--device", device, "--", str(binary), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "VFIO_SELFTESTS_BDF"},
    )
    return done.returncode, done.stdout + done.stderr


def check(binary: Path, planned: int, vendor: str, device: str, args: tuple[str, ...] = ()) -> Tap:
    kind = device.split(":")[0]
    at = device.replace(kind, f"{kind}@{vendor}", 1)
    rc, out = run_selftest(binary, at, timeout=1800, args=args)
    tap = parse_tap(out)
    assert tap.planned == planned, out[-3000:]
    seen = tap.passed | tap.failed | tap.skipped
    assert len(seen) == planned, f"{planned - len(seen)} cases reported no result:\n{out[-3000:]}"
    expected = expected_not_passing(binary.name, vendor, kind)
    unexpected = sorted((tap.failed | tap.skipped) - expected.keys())
    stale = sorted(expected.keys() & tap.passed)
    unknown = sorted(expected.keys() - seen)
    assert not unexpected, f"cases not passing and not expected to: {unexpected}\n{out[-6000:]}"
    assert not stale, f"cases in vfio_expected_failures.txt that pass now: {stale}"
    assert not unknown, f"vfio_expected_failures.txt names cases that do not exist: {unknown}"
    assert "internal error" not in out and "iommufd-model preload" not in out, out[-3000:]
    assert rc == (1 if tap.failed else 0), out[-2000:]
    return tap


@pytest.mark.parametrize("binary", sorted(BINARIES))
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_vfio_selftest(vfio_bins: Path, vendor: str, engine: str, binary: str) -> None:
    planned = BINARIES[binary]
    args: tuple[str, ...] = ()
    if not FULL and binary == "vfio_dma_mapping_test" and engine != FULL_DRIVER[vendor]:
        pytest.skip("no device DMA in this binary: the other engine runs it (CI cost)")
    if not FULL and binary == "vfio_pci_driver_test" and engine != FULL_DRIVER[vendor]:
        planned, args = DRIVER_IOMMUFD_CASES, ("-v", "iommufd")
    check(vfio_bins / binary, planned, vendor, engine, args)


@pytest.mark.parametrize("vendor", VENDORS)
def test_vfio_sriov_selftest(vfio_bins: Path, vendor: str) -> None:
    check(vfio_bins / SRIOV, SRIOV_CASES, vendor, SRIOV_PF)


def test_expected_failures_file_is_well_formed() -> None:
    """Every entry names a known binary, vendor and device, and no case twice for one cell."""
    seen: set[tuple[str, str, str, str]] = set()
    devices = {*ENGINES, SRIOV_PF.split(":")[0]}
    for e in load_expected():
        assert e.binary in BINARIES or e.binary == SRIOV, e
        assert e.vendors is None or e.vendors <= set(VENDORS), e
        assert e.devices is None or e.devices <= devices, e
        for vendor in e.vendors or VENDORS:
            for device in e.devices or devices:
                key = (e.binary, e.case, vendor, device)
                assert key not in seen, f"listed twice: {key}"
                seen.add(key)
