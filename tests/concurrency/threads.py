"""Running model calls from several threads the way a VMM does, and checking what is left.

:func:`run_threads` starts every body behind one barrier with a tiny switch interval (so the
interpreter switches threads every few bytecodes and interleavings are dense), joins them with
a deadline, and re-raises the first failure of any thread. :func:`check_all` is the oracle
after the join: the object table, users counts, pins and frame references of every iommufd
(:func:`tests.helpers.check_invariants`).
"""

from __future__ import annotations

import errno
import struct
import sys
import threading
from collections.abc import Callable, Iterable

import pytest

import iommufd_model as im
from helpers import check_invariants
from iommufd_model.core.main import IommuFd
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.hw.iotlb import Iotlb
from iommufd_model.hw.memory import PAGE_SHIFT
from iommufd_model.hw.pci import PciDevice
from iommufd_model.vmm import GuestDevice, GuestIommu, Vm

DRIVERS = ("mock", "amd", "arm_smmuv3", "intel_vtd")
SWITCH = 1e-6  # seconds: sys.setswitchinterval while the threads run


def run_threads(bodies: Iterable[Callable[[], None]], *, deadline: float = 120.0) -> None:
    """Run each body in its own thread, all released at once; raise the first failure."""
    bodies = list(bodies)
    errors: list[BaseException] = []
    start = threading.Barrier(len(bodies))

    def main(body: Callable[[], None]) -> None:
        start.wait()
        try:
            body()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(b,), daemon=True) for b in bodies]
    old = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(deadline)
    finally:
        sys.setswitchinterval(old)
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"threads still running after {deadline} s (deadlock?): {hung}"
    if errors:
        raise errors[0]


def check_all(fds: Iterable[IommuFd]) -> None:
    """The invariants of every open iommufd, and that no ioctl hit a model bug."""
    for fd in fds:
        assert not fd.internal_errors, fd.internal_errors
        if not fd.closed:
            # The mock's tables are not in machine memory; a vendor's are (left out here).
            mock = all(hw.driver_name == "mock" for hw in fd.machine.iommus)
            check_invariants(fd, kernel_frames=mock)


# -- guests -------------------------------------------------------------------------------
GUEST_DRIVERS = ("amd", "arm_smmuv3", "intel_vtd")
GUEST_RAM = 8 << 20
VIRT_ID = 0x18  # the first passed-through device's guest ID; the next ones add 8


def boot_guest(
    driver: str, ndev: int, *, accelerated: bool = False
) -> tuple[Vm, GuestIommu, list[GuestDevice]]:
    """A VM on a fresh machine with ``driver``'s guest IOMMU and ``ndev`` passed-through
    devices; skips when the driver has no such guest model."""
    machine = im.Machine.build(iommus=[driver])
    vm = Vm(machine, ram_size=GUEST_RAM, table_pool=2 << 20)
    try:
        gi = vm.viommu(machine.iommus[0], accelerated=accelerated)
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        pytest.skip(f"{driver}: {exc.strerror}")
    gdevs = [gi.add_device(machine.add_pci_device(iommu=0), VIRT_ID + 8 * i) for i in range(ndev)]
    return vm, gi, gdevs


# -- translations against the tables ------------------------------------------------------
def flush_iotlbs(machine: im.Machine) -> None:
    """Empty every IOTLB of every IOMMU (what a global invalidation does)."""
    for hw in machine.iommus:
        for value in vars(hw).values():
            if isinstance(value, Iotlb):
                value.flush_all()


def check_translations(fd: IommuFd, dev: PciDevice, ioas_id: int, pages: Iterable[int]) -> None:
    """Every page of ``pages`` (IOVA page numbers) that the IOAS maps reads, through ``dev``,
    the frame the IOAS pinned for it; every other one faults. First with the IOTLBs as the
    threads left them (a stale entry shows), then with them flushed (the tables alone)."""

    iopt = fd.objects.get_ioas(ioas_id, held=True).iopt
    memory = fd.machine.memory
    for _ in range(2):
        for page in sorted(set(pages)):
            iova = page << PAGE_SHIFT
            got = iopt.lookup(iova)
            if got is None:
                with pytest.raises(DmaFault):
                    dev.dma_read(iova, 8)
            else:
                assert dev.dma_read(iova, 64) == memory.read(got[0] << PAGE_SHIFT, 64), hex(iova)
        flush_iotlbs(fd.machine)


class HostWorld:
    """A fresh machine with ``driver``, ``ndev`` devices bound to one iommufd, and an IOAS."""

    def __init__(self, driver: str, ndev: int = 1) -> None:
        self.machine = im.Machine.build(iommus=[driver])
        self.devs = [self.machine.add_pci_device(iommu=0) for _ in range(ndev)]
        self.proc = self.machine.new_process()
        self.fd = self.proc.open_iommufd()
        self.dev_ids = [self.fd.bind(d) for d in self.devs]
        self.ioas = self.fd.ioas_alloc()

    def buffer(self, npages: int, seed: int) -> int:
        """A user buffer whose every page holds different bytes (``seed`` mixed in)."""
        va = self.proc.mmap(npages << PAGE_SHIFT)
        for i in range(npages):
            self.proc.write(va + (i << PAGE_SHIFT), struct.pack("<QQ", seed, i) * 256)
        return va
