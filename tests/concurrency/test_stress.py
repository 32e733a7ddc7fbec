"""Stress per driver: threads mixing every kind of call on disjoint and overlapping ranges.

Each driver gets one machine with two host threads on disjoint IOVA windows (map, DMA, copy
to a second IOAS, unmap), two on one shared window (maps and unmaps of random sub-ranges that
collide: EEXIST, ENOENT and EINVAL are the kernel's answers), one attaching, replacing and
detaching a second device between HWPTs and IOASes while allocating and destroying HWPTs, one
device doing DMA across every window, and an invalidation source: for the vendors two guest
threads whose guest driver shares its command queue (map, DMA, unmap, invalidate: doorbells,
traps and completion waits), for the mock nested-HWPT IOMMU_HWPT_INVALIDATE calls. After the
join every invariant holds exactly: object table and users counts, pins and frame references,
and each translation through IOTLB and tables against what the IOAS maps.
"""

from __future__ import annotations

import errno
import random
import struct
from collections import Counter

import pytest

from iommufd_model.hw.iommu import DmaFault
from iommufd_model.mock import selftest as T
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm import Vm

from .threads import (
    DRIVERS,
    HostWorld,
    check_all,
    check_translations,
    run_threads,
)

PAGE = 4096
NPAGES = 16
IOVA = 1 << 24
FAR = 1 << 20
ROUNDS = 20
GUEST_IOVA = 0x4000_0000


def window(i: int) -> int:
    return IOVA + i * FAR


def window_pages(i: int) -> range:
    return range(window(i) // PAGE, window(i) // PAGE + NPAGES)


def dma_page(dev: object, iova: int, seeds: tuple[int, ...], index: int) -> None:
    """A DMA read of one page is a fault or the header of page ``index`` of a buffer with
    one of ``seeds`` (never another page, never a freed frame)."""
    try:
        head = dev.dma_read(iova, 16)  # type: ignore[attr-defined]
    except DmaFault:
        return
    seed, idx = struct.unpack("<QQ", head)
    assert seed in seeds and idx == index, (hex(iova), seed, idx)


@pytest.mark.parametrize("driver", DRIVERS)
def test_stress(driver: str) -> None:
    ops = stress(driver)
    assert ops["map"] and ops["dma"] and ops["attach"] and ops["invalidate"], ops


def stress(driver: str, rounds: int = ROUNDS, seed: int = 0) -> Counter[str]:
    """One stress run of ``rounds`` per thread (tests/concurrency/soak.py loops it): the
    calls made, by kind. Raises on any failure, in a thread or in the checks after."""
    w = HostWorld(driver, ndev=3)
    counts = [Counter[str]() for _ in range(10)]
    fd, proc = w.fd, w.proc
    a, b = w.ioas, fd.ioas_alloc()
    fd.attach(w.dev_ids[0], a)
    dev0 = w.devs[0]
    bufs = [w.buffer(NPAGES, seed) for seed in range(4)]
    size = NPAGES * PAGE

    def disjoint(i: int) -> None:
        ops = counts[i]
        for _ in range(rounds):
            ops.update(("map", "dma", "copy", "unmap", "unmap"))
            fd.ioas_map(a, bufs[i], size, iova=window(i))
            assert dev0.dma_read(window(i), size) == proc.read(bufs[i], size)
            fd.ioas_copy(b, a, window(i), size, dst_iova=window(i))
            fd.ioas_unmap(a, window(i), size)
            fd.ioas_unmap(b, window(i), size)

    def overlapping(i: int) -> None:
        rng = random.Random(seed * 8 + i)
        base = window(2)
        ops = counts[i]
        for _ in range(rounds):
            ops.update({"map": 1, "unmap": 1, "dma": NPAGES // 3 + 1})
            off, n = rng.randrange(NPAGES // 2), rng.randrange(1, NPAGES // 2)
            try:
                fd.ioas_map(a, bufs[i] + off * PAGE, n * PAGE, iova=base + off * PAGE)
            except OSError as exc:
                assert exc.errno == errno.EEXIST, exc
            for p in range(0, NPAGES, 3):
                dma_page(dev0, base + p * PAGE, (2, 3), p)
            off, n = rng.randrange(NPAGES), rng.randrange(1, NPAGES)
            try:
                fd.ioas_unmap(a, base + off * PAGE, n * PAGE)
            except OSError as exc:
                assert exc.errno in (errno.ENOENT, errno.EINVAL), exc

    def attacher() -> None:
        dev_id = w.dev_ids[1]
        for r in range(rounds):
            counts[4].update({"hwpt_alloc": 1, "attach": 3, "dma": 2, "detach": 1, "destroy": 1})
            hwpt = fd.hwpt_alloc(dev_id, a)
            fd.attach(dev_id, hwpt)
            fd.attach(dev_id, b)
            for i in (0, 1):
                dma_page(w.devs[1], window(i) + r % NPAGES * PAGE, (i,), r % NPAGES)
            fd.attach(dev_id, a)
            fd.detach(dev_id)
            fd.destroy(hwpt)

    def dma() -> None:
        for r in range(rounds * 4):
            counts[5]["dma"] += 2
            for i in (0, 1):
                dma_page(dev0, window(i) + r % NPAGES * PAGE, (i,), r % NPAGES)

    bodies = [
        lambda: disjoint(0),
        lambda: disjoint(1),
        lambda: overlapping(2),
        lambda: overlapping(3),
        attacher,
        dma,
    ]
    vm = None
    if driver == "mock":
        bodies.append(lambda: mock_invalidations(w, rounds, counts[6]))
    else:
        vm = Vm(w.machine, ram_size=8 << 20, table_pool=2 << 20)
        gi = vm.viommu(w.machine.iommus[0])
        gdevs = [gi.add_device(w.machine.add_pci_device(iommu=0), 0x18 + 8 * i) for i in (0, 1)]

        def guest(i: int) -> None:
            dom = gi.attach(gdevs[i])
            gpa = (i + 1) << 20
            data = bytes([0x40 + i]) * (4 * PAGE)
            vm.memory.write(gpa, data)
            ops = counts[6 + i]
            for _ in range(max(1, rounds // 2)):
                ops.update({"guest_map": 1, "dma": 2, "guest_unmap": 1, "invalidate": 1})
                gi.map(dom, GUEST_IOVA, gpa, 4 * PAGE)
                assert gdevs[i].dev.dma_read(GUEST_IOVA, 4 * PAGE) == data
                gi.unmap(dom, GUEST_IOVA, 4 * PAGE)
                gi.invalidate(dom, GUEST_IOVA, 4 * PAGE)
                with pytest.raises(DmaFault):
                    gdevs[i].dev.dma_read(GUEST_IOVA, 8)
            gi.detach(dom)

        bodies += [lambda: guest(0), lambda: guest(1)]

    run_threads(bodies)
    check_all([fd] + ([vm.fd] if vm is not None else []))
    pages = [p for i in range(3) for p in window_pages(i)]
    check_translations(fd, dev0, a, pages)
    fd.attach(w.dev_ids[1], b)
    check_translations(fd, w.devs[1], b, pages)
    return sum(counts, Counter[str]())


def mock_invalidations(w: HostWorld, rounds: int, ops: Counter[str]) -> None:
    """Nested HWPTs of the mock on a nest parent: allocate, attach, invalidate, destroy."""
    fd, dev_id = w.fd, w.dev_ids[2]
    parent = fd.hwpt_alloc(dev_id, w.ioas, flags=U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    data = struct.pack("<II", T.IOMMU_TEST_IOTLB_DEFAULT, 0)
    flush_all = struct.pack("<II", T.IOMMU_TEST_INVALIDATE_FLAG_ALL, 0)
    for _ in range(rounds):
        ops.update({"hwpt_alloc": 1, "attach": 2, "invalidate": 1, "destroy": 1})
        nested = fd.hwpt_alloc(dev_id, parent, data_type=T.IOMMU_HWPT_DATA_SELFTEST, data=data)
        fd.attach(dev_id, nested)
        assert fd.hwpt_invalidate(nested, T.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, [flush_all]) == 1
        fd.attach(dev_id, parent)
        fd.destroy(nested)
    fd.detach(dev_id)
    fd.destroy(parent)
