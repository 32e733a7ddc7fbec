"""Kernel semantics under races, one test each (docs/concurrency.md says why each holds).

Every test runs its threads with a tiny switch interval (:func:`run_threads`) and checks the
model's invariants after they join. A checker thread that takes the model lock itself sees
the state between two entry points, where the kernel's locks let another thread see it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import struct
import threading

import pytest

from helpers import check_invariants
from iommufd_model.core.eventq import EventFile
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.locking import MODEL_LOCK, wait_for
from iommufd_model.mock import selftest as T
from iommufd_model.scenarios.guest_events import HEADER, VEVENT_RECORDS
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm import Vm

from .threads import (
    DRIVERS,
    GUEST_DRIVERS,
    HostWorld,
    boot_guest,
    check_all,
    check_translations,
    run_threads,
)

PAGE = 4096
IOVA = 1 << 24
LEN = 16 * PAGE
FAR = 1 << 20  # a second window, far enough from the first
GUEST_IOVA = 0x4000_0000


@pytest.mark.parametrize("driver", DRIVERS)
def test_dma_racing_unmap_sees_the_old_translation_or_faults(driver: str) -> None:
    """A device reads and writes while another thread maps, unmaps and frees the buffers
    behind the IOVAs. Each read is one generation's bytes or a fault, never a mix; no write
    lands in a freed frame (frames are reused at once, for canaries that must stay intact)."""
    w = HostWorld(driver)
    fd, proc, dev = w.fd, w.proc, w.devs[0]
    fd.attach(w.dev_ids[0], w.ioas)
    stop = threading.Event()
    generations: set[bytes] = set()
    canary = b"\x5a" * LEN
    canaries: list[int] = []

    def mapper() -> None:
        try:
            for gen in range(1, 21):
                a, b = proc.mmap(LEN), proc.mmap(LEN)
                generations.add(bytes([gen]) * LEN)
                proc.write(a, bytes([gen]) * LEN)
                fd.ioas_map(w.ioas, a, LEN, iova=IOVA)
                fd.ioas_map(w.ioas, b, LEN, iova=IOVA + FAR)
                fd.ioas_unmap(w.ioas, IOVA, LEN)
                fd.ioas_unmap(w.ioas, IOVA + FAR, LEN)
                proc.munmap(a, LEN)
                proc.munmap(b, LEN)
                c = proc.mmap(2 * LEN)  # takes the frames a and b just freed
                proc.write(c, canary * 2)
                canaries.append(c)
        finally:
            stop.set()

    def reader() -> None:
        while not stop.is_set():
            try:
                data = dev.dma_read(IOVA, LEN)
            except DmaFault:
                continue
            assert data in generations, "a DMA mixed translations or read a foreign frame"

    def writer() -> None:
        while not stop.is_set():
            with contextlib.suppress(DmaFault):
                dev.dma_write(IOVA + FAR, b"\xee" * LEN)

    run_threads([mapper, reader, writer])
    for c in canaries:
        assert proc.read(c, 2 * LEN) == canary * 2, "a DMA wrote into a freed, reused frame"
    pages = [
        *range(IOVA // PAGE, IOVA // PAGE + 16),
        *range((IOVA + FAR) // PAGE, (IOVA + FAR) // PAGE + 16),
    ]
    check_translations(fd, dev, w.ioas, pages)
    check_all([fd])


ALLOWED = {errno.ENOENT, errno.EBUSY, errno.EINVAL}


@pytest.mark.parametrize("driver", DRIVERS)
def test_destroy_racing_use_is_ebusy_or_complete(driver: str) -> None:
    """IOMMU_DESTROY of every id, over and over, while another thread allocates HWPTs on an
    IOAS, attaches the device to them and maps: each destroy is EBUSY, ENOENT or complete,
    and a thread holding the model lock never sees a half-destroyed object."""
    w = HostWorld(driver)
    fd = w.fd
    stop = threading.Event()
    ioas_box = [w.ioas]
    va = w.buffer(4, 1)

    def user() -> None:
        try:
            for _ in range(30):
                ioas = ioas_box[0]
                try:
                    hwpt = fd.hwpt_alloc(w.dev_ids[0], ioas)
                    fd.attach(w.dev_ids[0], hwpt)
                    fd.ioas_map(ioas, va, 4 * PAGE, iova=IOVA)
                    fd.ioas_unmap(ioas, IOVA, 4 * PAGE)
                    fd.detach(w.dev_ids[0])
                except OSError as exc:
                    assert exc.errno in ALLOWED, exc
                    if exc.errno == errno.ENOENT and ioas not in fd.objects.ids():
                        ioas_box[0] = fd.ioas_alloc()
        finally:
            stop.set()

    destroyed = []

    def destroyer() -> None:
        while True:  # one more pass after the user is done
            done = stop.is_set()
            for obj_id in range(1, 16):
                try:
                    fd.destroy(obj_id)
                    destroyed.append(obj_id)
                except OSError as exc:
                    assert exc.errno in (errno.ENOENT, errno.EBUSY), exc
            if done:
                return

    def checker() -> None:
        while not stop.is_set():
            with MODEL_LOCK:
                check_invariants(fd, kernel_frames=driver == "mock")

    run_threads([user, destroyer, checker])
    assert destroyed, "nothing was ever destroyed: the test exercised nothing"
    check_all([fd])


@pytest.mark.parametrize("driver", DRIVERS)
def test_racing_attaches_end_with_one_winner(driver: str) -> None:
    """Two threads attach one device at once, to two HWPTs and then to an IOAS with no HWPT
    yet: both calls succeed (VFIO's attach replaces), the device ends on one of them, users
    counts add up, and the IOAS got exactly one automatic domain."""
    w = HostWorld(driver)
    fd, dev_id = w.fd, w.dev_ids[0]
    for _ in range(10):
        hwpts = [fd.hwpt_alloc(dev_id, w.ioas) for _ in range(2)]
        run_threads(lambda h=h: fd.attach(dev_id, h) for h in hwpts)  # type: ignore[misc]
        current = fd.device(dev_id).hwpt
        assert current is not None and current.id in hwpts
        check_all([fd])
        fresh = fd.ioas_alloc()
        got: list[int] = []
        attach = functools.partial(lambda out, pt: out.append(fd.attach(dev_id, pt)), got, fresh)
        run_threads([attach, attach])
        ioas = fd.objects.get_ioas(fresh, held=True)
        assert len(ioas.hwpt_list) == 1 and got[0] == got[1] == ioas.hwpt_list[0].id
        check_all([fd])
        fd.detach(dev_id)
        for obj in (*hwpts, fresh):
            fd.destroy(obj)
    check_all([fd])


@pytest.mark.parametrize("accelerated", [False, True], ids=["trapped", "accelerated"])
@pytest.mark.parametrize("driver", GUEST_DRIVERS)
def test_concurrent_guest_invalidations_all_complete(driver: str, accelerated: bool) -> None:
    """Three guest threads share the guest's command queue (each maps, DMAs, unmaps and
    invalidates its own device's domain) while a host thread maps and unmaps in the nest
    parent: no completion wait, CMD_SYNC or QI wait descriptor times out, and every
    invalidation is effective (the DMA after it faults)."""
    vm, gi, gdevs = boot_guest(driver, 3, accelerated=accelerated)
    size = 4 * PAGE

    def guest(i: int) -> None:
        dom = gi.attach(gdevs[i])
        gpa = (i + 1) << 20
        data = bytes([0x10 + i]) * size
        vm.memory.write(gpa, data)
        for _ in range(12):
            gi.map(dom, GUEST_IOVA, gpa, size)
            assert gdevs[i].dev.dma_read(GUEST_IOVA, size) == data
            gi.unmap(dom, GUEST_IOVA, size)
            gi.invalidate(dom, GUEST_IOVA, size)
            with pytest.raises(DmaFault):
                gdevs[i].dev.dma_read(GUEST_IOVA, 8)

    def host() -> None:
        va = vm.vmm.mmap(LEN)
        for _ in range(12):
            vm.fd.ioas_map(vm.ioas_id, va, LEN, iova=vm.ram_size + FAR)
            vm.fd.ioas_unmap(vm.ioas_id, vm.ram_size + FAR, LEN)

    run_threads([*(lambda i=i: guest(i) for i in range(3)), host])
    check_all([vm.fd])


@pytest.mark.parametrize("driver", [d for d in GUEST_DRIVERS if d != "intel_vtd"])
def test_vevents_arrive_exactly_once_and_in_order(driver: str) -> None:
    """Three devices fault on distinct guest IOVAs from three threads while a reader drains
    the vEVENTQ: every fault is one record, the sequence numbers count up from 0 with no
    gap, and each device's faults come in the order it made them."""
    vm, gi, gdevs = boot_guest(driver, 3)
    qtype = sorted(t for t in VEVENT_RECORDS if _supports(vm, t))[0]
    rec = VEVENT_RECORDS[qtype]
    _, qfd = vm.fd.veventq_alloc(gi.viommu_id, qtype, 1024)
    file = vm.vmm.files[qfd]
    assert isinstance(file, EventFile)
    nfaults = 20
    stop = threading.Event()
    records: list[tuple[int, int, int]] = []  # (sequence, virt id, address)

    def drain() -> None:
        data = file.read(64 * (HEADER.size + rec.size))
        pos = 0
        while pos < len(data):
            flags, seq = HEADER.unpack_from(data, pos)
            assert not flags & U.IOMMU_VEVENTQ_FLAG_LOST_EVENTS
            raw = data[pos + HEADER.size : pos + HEADER.size + rec.size]
            records.append((seq, rec.dev_id(raw), rec.address(raw)))
            pos += HEADER.size + rec.size

    def device(i: int) -> None:
        dom = gi.attach(gdevs[i])
        assert dom is not None
        for n in range(nfaults):
            with pytest.raises(DmaFault):
                gdevs[i].dev.dma_read(GUEST_IOVA + (n << 21) + i * PAGE, 8)

    def reader() -> None:
        while not stop.is_set():
            drain()

    def devices() -> None:
        try:
            run_threads(lambda i=i: device(i) for i in range(3))  # type: ignore[misc]
        finally:
            stop.set()

    run_threads([devices, reader])
    drain()
    assert [r[0] for r in records] == list(range(3 * nfaults)), "sequence numbers"
    for i, g in enumerate(gdevs):
        mine = [addr for _, vid, addr in records if vid == g.virt_id]
        assert mine == [GUEST_IOVA + (n << 21) + i * PAGE for n in range(nfaults)], i
    check_all([vm.fd])


def _supports(vm: Vm, qtype: int) -> bool:
    return qtype in vm.machine.registry.drivers[vm.machine.iommus[0].driver_name].info.veventq_types


def test_wait_for_sleeps_without_the_lock_until_an_event() -> None:
    """A reader waiting for a vEVENTQ record (``locking.wait_for``, as a blocking read or
    poll would) holds the model lock re-entrantly when it starts waiting, yet the device's
    thread gets in, faults, and its record wakes the reader."""
    vm, gi, gdevs = boot_guest("amd", 1)
    dom = gi.attach(gdevs[0])
    assert dom is not None
    qid, qfd = vm.fd.veventq_alloc(gi.viommu_id, U.IOMMU_VEVENTQ_TYPE_AMD, 16)
    queue = vm.fd.objects.get(qid, held=True)
    woke: list[bool] = []

    def reader() -> None:
        with MODEL_LOCK, MODEL_LOCK:
            woke.append(wait_for(lambda: bool(queue.events), timeout=60))  # type: ignore[attr-defined]

    def device() -> None:
        with pytest.raises(DmaFault):
            gdevs[0].dev.dma_read(GUEST_IOVA, 8)

    run_threads([reader, device])
    assert woke == [True]
    assert vm.vmm.files[qfd].read(4096)  # type: ignore[attr-defined]


def _trigger_iopf(fd: object, dev_id: int, grpid: int, addr: int) -> None:
    """IOMMU_TEST_OP_TRIGGER_IOPF: the mock device ``dev_id`` sends one page request."""
    perm = U.IOMMU_PGFAULT_PERM_READ | U.IOMMU_PGFAULT_PERM_WRITE
    payload = struct.pack("<IIIIQ", dev_id, T.IOMMU_NO_PASID, grpid, perm, addr).ljust(48, b"\0")
    buf = bytearray(struct.pack("<IIII", 72, T.IOMMU_TEST_OP_TRIGGER_IOPF, 0, 0) + payload)
    buf += bytes(8)
    fd.ioctl(T.IOMMU_TEST_CMD, buf)  # type: ignore[attr-defined]


def test_page_faults_arrive_exactly_once_and_in_order() -> None:
    """Three mock devices send page requests from three threads into one fault queue while a
    reader reads and answers them: each request is delivered once, with a cookie no other
    outstanding group holds (7.2 reuses answered ones: ``xa_alloc`` from 1), each device's
    requests in the order it sent them, and every response is accepted."""
    w = HostWorld("mock", ndev=3)
    fd = w.fd
    fault_id, fault_fd = fd.fault_queue_alloc()
    for dev_id in w.dev_ids:
        fd.attach(dev_id, fd.hwpt_alloc(dev_id, w.ioas, fault_id=fault_id))
    file = w.proc.files[fault_fd]
    assert isinstance(file, EventFile)
    nfaults = 25
    stop = threading.Event()
    got: list[tuple[int, int, int]] = []  # (dev_id, addr, cookie)
    size = U.IommuHwptPgfault.SIZE

    def drain() -> int:
        data = file.read(16 * size)
        batch = [U.IommuHwptPgfault.unpack(data[o : o + size]) for o in range(0, len(data), size)]
        assert len({f.cookie for f in batch}) == len(batch) and 0 not in {f.cookie for f in batch}
        for f in batch:
            got.append((f.dev_id, f.addr, f.cookie))
            answer = struct.pack("<II", f.cookie, U.IOMMUFD_PAGE_RESP_SUCCESS)
            assert file.write(answer) == len(answer)
        return len(data)

    def device(i: int) -> None:
        for n in range(nfaults):
            _trigger_iopf(fd, w.dev_ids[i], n & 0x1FF, (n + 1) << 21 | i << 12)

    def reader() -> None:
        while not stop.is_set():
            drain()

    def devices() -> None:
        try:
            run_threads(functools.partial(device, i) for i in range(3))
        finally:
            stop.set()

    run_threads([devices, reader])
    while drain():
        pass
    assert len(got) == 3 * nfaults, "each request delivered once"
    for i, dev_id in enumerate(w.dev_ids):
        mine = [addr for d, addr, _ in got if d == dev_id]
        assert mine == [(n + 1) << 21 | i << 12 for n in range(nfaults)], i
    fault = fd.objects.get(fault_id, held=True)
    assert not fault.deliver and not fault.response  # type: ignore[attr-defined]
    check_all([fd])
