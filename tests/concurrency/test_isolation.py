"""Bad input from one thread never breaks the others (the project's isolation rule, now with
threads): garbage structs and wrong ids on the shared iommufd, a second iommufd opened, used
and closed with live objects, and the shared iommufd closed under the others' feet."""

from __future__ import annotations

import contextlib
import errno
import functools
import random
import threading

from iommufd_model.core.main import registered_ops
from iommufd_model.failnth import fail_nth
from iommufd_model.hw.iommu import DmaFault

from .threads import HostWorld, check_all, run_threads

PAGE = 4096
IOVA = 1 << 24
LEN = 16 * PAGE


def garbage(rng: random.Random, fd: object, stop: threading.Event) -> None:
    """Every iommufd command with random bytes after a plausible size, and numbers that are
    not commands; only OSError may come back."""
    cmds = [*sorted(registered_ops()), 15104 + 127, 4660]
    while not stop.is_set():
        cmd = rng.choice(cmds)
        n = rng.randrange(4, 160)
        buf = bytearray(rng.randbytes(n))
        if rng.random() < 0.7:
            buf[0:4] = n.to_bytes(4, "little")
        try:
            fd.ioctl(cmd, buf)  # type: ignore[attr-defined]
        except OSError as exc:
            assert exc.errno
        try:
            fd.destroy(rng.choice([0, 9999, 1 << 31, rng.randrange(1 << 32)]))  # type: ignore[attr-defined]
        except OSError as exc:
            assert exc.errno in (errno.ENOENT, errno.EBUSY)


def working_thread(w: HostWorld, va: int, stop: threading.Event) -> None:
    """The thread that must not be disturbed: map, DMA and unmap 40 times, all succeeding
    with the right bytes; sets ``stop`` when done (or failed)."""
    fd, proc, dev = w.fd, w.proc, w.devs[0]
    try:
        for _ in range(40):
            assert fd.ioas_map(w.ioas, va, LEN, iova=IOVA) == IOVA
            assert dev.dma_read(IOVA, LEN) == proc.read(va, LEN)
            assert fd.ioas_unmap(w.ioas, IOVA, LEN) == LEN
    finally:
        stop.set()


def test_garbage_and_closed_fds_do_not_disturb_a_working_thread() -> None:
    w = HostWorld("mock")
    fd, proc = w.fd, w.proc
    spare = w.machine.add_pci_device(iommu=0)
    fd.attach(w.dev_ids[0], w.ioas)
    va = w.buffer(16, 7)
    stop = threading.Event()
    victim = functools.partial(working_thread, w, va, stop)

    def second_fd() -> None:
        """Open, bind the spare device, map, allocate a fault queue, then close it all."""
        while not stop.is_set():
            fd2 = proc.open_iommufd()
            dev_id = fd2.bind(spare)
            ioas = fd2.ioas_alloc()
            fd2.attach(dev_id, ioas)
            fd2.ioas_map(ioas, va, LEN, iova=IOVA)
            _, fault_fd = fd2.fault_queue_alloc()
            proc.close(fd2.fd)  # objects live: the release destroys them
            proc.close(fault_fd)  # the last file reference: now the context goes
            assert fd2.closed

    run_threads([victim, lambda: garbage(random.Random(1), fd, stop), second_fd])
    check_all([fd])
    assert spare.bound_to is None
    assert proc.locked_pages == 0, "pages still accounted after every mapping went"


def test_closing_the_shared_fd_gives_ebadf_and_releases_everything() -> None:
    """One thread closes the iommufd the others use: each call of theirs completes or fails
    with EBADF (a device's DMA faults once it is unbound), and nothing stays pinned."""
    w = HostWorld("mock")
    fd, proc, dev = w.fd, w.proc, w.devs[0]
    fd.attach(w.dev_ids[0], w.ioas)
    va = w.buffer(16, 3)
    errors: list[int] = []

    def user() -> None:
        for _ in range(60):
            try:
                fd.ioas_map(w.ioas, va, LEN, iova=IOVA)
                fd.ioas_unmap(w.ioas, IOVA, LEN)
            except OSError as exc:
                errors.append(exc.errno or 0)

    def device() -> None:
        for _ in range(200):
            with contextlib.suppress(DmaFault):
                dev.dma_read(IOVA, 64)

    def closer() -> None:
        for _ in range(20):  # let the others get going first
            fd.ioas_iova_ranges(w.ioas)
        proc.close(fd.fd)

    run_threads([user, device, closer])
    assert fd.closed
    assert set(errors) <= {errno.EBADF}, errors
    assert dev.bound_to is None and proc.locked_pages == 0
    assert not fd.objects.ids()


def test_fail_nth_of_one_thread_never_fails_another() -> None:
    """Fail-nth is per task (``/proc/self/task/<tid>/fail-nth``): a thread injecting failures
    into its own calls over and over leaves a working thread's calls alone."""
    w = HostWorld("mock")
    fd = w.fd
    fd.attach(w.dev_ids[0], w.ioas)
    va = w.buffer(16, 9)
    stop = threading.Event()
    victim = functools.partial(working_thread, w, va, stop)
    fired: list[str] = []

    def injector() -> None:
        while not stop.is_set():
            with fail_nth(1) as fp:
                try:
                    fd.destroy(fd.ioas_alloc())
                except OSError as exc:
                    assert exc.errno == fp.fired_errno
            if fp.fired_site is not None:
                fired.append(fp.fired_site)

    run_threads([victim, injector])
    assert fired, "the injector never injected"
    check_all([fd])
