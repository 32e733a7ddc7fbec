"""AMD HW-vIOMMU against VMM-mediated invalidation: the same guest workload on the same AMD
model, once with the guest command buffer consumed by the hardware (accelerated) and once
with every guest CMD_TAIL store trapping into the VMM, which re-issues the invalidations
through IOMMU_HWPT_INVALIDATE on the vIOMMU.

Workload per round: the guest maps a page in its v2 tables, the device DMAs through the
nested translation, the guest unmaps and invalidates (INVALIDATE_IOMMU_PAGES +
COMPLETION_WAIT in its command buffer). ``--invalidations`` rounds (default 10,000).
Prints traps per invalidation, commands forwarded by the VMM and the throughput of each
path; no assertions (figures, not a timed test). Run: ``python benchmarks/bench_amd_viommu.py``.
"""

from __future__ import annotations

import argparse
import time

from iommufd_amd.guest import GuestAmd

import iommufd_model as im
from iommufd_model.vmm import Vm

PAGE = 4096
MIB = 1 << 20
IOVA = 0x100_0000


def run(accelerated: bool, rounds: int) -> dict[str, float]:
    m = im.Machine.build(iommus=["amd"])
    vm = Vm(m, 16 * MIB, table_pool=4 * MIB)
    dev = m.add_pci_device(iommu=0)
    g = vm.viommu(m.iommus[0], accelerated=accelerated)
    assert isinstance(g, GuestAmd)
    dom = g.attach(g.add_device(dev, 0x10))
    bufs = [vm.alloc_buffer(PAGE) for _ in range(2)]
    for i, gpa in enumerate(bufs):
        vm.memory.write(gpa, bytes([i + 1]) * 8)
    hw = m.iommus[0]
    traps0, fwd0, cmds0 = vm.stats.traps, vm.stats.forwarded, hw.stats.commands
    t0 = time.perf_counter()
    for i in range(rounds):
        gpa = bufs[i & 1]
        g.map(dom, IOVA, gpa, PAGE)
        if dev.dma_read(IOVA, 1)[0] != (i & 1) + 1:
            raise SystemExit(f"round {i}: stale translation, invalidation lost")
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--invalidations", type=int, default=10_000)
    args = ap.parse_args()
    n = args.invalidations
    print(f"AMD vIOMMU, {n} rounds of map + DMA + unmap + invalidate (one invalidation each)")
    print(f"{'path':<14}{'traps/inv':>10}{'fwd/inv':>9}{'hw cmds/inv':>13}"
          f"{'inv/s':>10}{'seconds':>9}")
    rows = {}
    for name, acc in (("HW-vIOMMU", True), ("VMM-mediated", False)):
        r = rows[name] = run(acc, n)
        print(f"{name:<14}{r['traps']:>10.2f}{r['forwarded']:>9.2f}{r['hw_commands']:>13.2f}"
              f"{r['rate']:>10.0f}{r['seconds']:>9.2f}")
    ratio = rows["HW-vIOMMU"]["rate"] / rows["VMM-mediated"]["rate"]
    print(f"HW-vIOMMU throughput / mediated throughput: {ratio:.2f}x "
          "(model time only: a real trap also costs a VM exit and a syscall)")


if __name__ == "__main__":
    main()
