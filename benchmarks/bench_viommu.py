"""Hardware-accelerated guest queue against VMM-mediated invalidation, for every vendor with
both: the same guest workload on the same model, once with the guest's invalidation queue
consumed by the hardware (AMD HW-vIOMMU command buffer, SMMUv3 CMDQV virtual queue) and once
with every guest queue doorbell trapping into the VMM, which re-issues the invalidations
through iommufd (IOMMU_HWPT_INVALIDATE on the vIOMMU).

Workload per round: the guest maps a page in its stage-1 tables, the device DMAs through the
nested translation, the guest unmaps and invalidates. ``--invalidations`` rounds (default
10,000). Prints traps per invalidation, commands the VMM forwarded, commands the hardware
processed and the throughput of each path; a vendor without an accelerated queue prints the
errno its guest model gave. No assertions (figures, not a timed test):
``python benchmarks/bench_viommu.py``.
"""

from __future__ import annotations

import argparse
import time

import iommufd_model as im
from iommufd_model.plugins import default_registry
from iommufd_model.scenarios.base import errno_name
from iommufd_model.vmm import Vm

PAGE = 4096
MIB = 1 << 20
IOVA = 0x100_0000
VIRT_ID = 0x10
PATHS = (("accelerated", True), ("VMM-mediated", False))


def run(driver: str, accelerated: bool, rounds: int) -> dict[str, float]:
    m = im.Machine.build(iommus=[driver])
    vm = Vm(m, 16 * MIB, table_pool=4 * MIB)
    dev = m.add_pci_device(iommu=0)
    g = vm.viommu(m.iommus[0], accelerated=accelerated)
    dom = g.attach(g.add_device(dev, VIRT_ID))
    bufs = [vm.alloc_buffer(PAGE) for _ in range(2)]
    for i, gpa in enumerate(bufs):
        vm.memory.write(gpa, bytes([i + 1]) * 8)
    hw = m.iommus[0]
    traps0, fwd0, cmds0 = vm.stats.traps, vm.stats.forwarded, hw.stats.commands
    t0 = time.perf_counter()
    for i in range(rounds):
        g.map(dom, IOVA, bufs[i & 1], PAGE)
        if dev.dma_read(IOVA, 1)[0] != (i & 1) + 1:
            raise SystemExit(f"{driver} round {i}: stale translation, invalidation lost")
        g.unmap(dom, IOVA, PAGE)
        g.invalidate(dom, IOVA, PAGE)
    dt = time.perf_counter() - t0
    return {
        "traps": (vm.stats.traps - traps0) / rounds,
        "forwarded": (vm.stats.forwarded - fwd0) / rounds,
        "hw_commands": (hw.stats.commands - cmds0) / rounds,
        "rate": rounds / dt,
        "seconds": dt,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--invalidations", type=int, default=10_000)
    n = ap.parse_args().invalidations
    print(f"{n} rounds of guest map + DMA + unmap + invalidate (one invalidation each)")
    print(
        f"{'driver':<12}{'path':<14}{'traps/inv':>10}{'fwd/inv':>9}{'hw cmds/inv':>13}"
        f"{'inv/s':>10}{'seconds':>9}"
    )
    for driver in sorted(default_registry().drivers):
        rates: dict[str, float] = {}
        for name, acc in PATHS:
            try:
                r = run(driver, acc, n)
            except OSError as e:
                print(f"{driver:<12}{name:<14}  unsupported: {errno_name(e.errno or 0)}")
                continue
            rates[name] = r["rate"]
            print(
                f"{driver:<12}{name:<14}{r['traps']:>10.2f}{r['forwarded']:>9.2f}"
                f"{r['hw_commands']:>13.2f}{r['rate']:>10.0f}{r['seconds']:>9.2f}"
            )
        if len(rates) == 2:
            print(
                f"{driver:<12}accelerated / mediated throughput: "
                f"{rates['accelerated'] / rates['VMM-mediated']:.2f}x "
                "(model time only: a real trap also costs a VM exit and a syscall)"
            )


if __name__ == "__main__":
    main()
