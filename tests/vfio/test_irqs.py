"""Interrupts of a vfio-pci device: GET_IRQ_INFO, SET_IRQS with eventfds (vfio_pci_intrs.c and
vfio_set_irqs_validate_and_prepare() of Linux 7.2), the device's messages reaching them; the
case of vfio_pci_device_test's vfio_pci_irq_test (enable, trigger, disable) for MSI and MSI-X."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from iommufd_model.devices import pci_regs as R
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import vfio as V

from .conftest import VfioSetup, call, fds, irq_set

TRIGGER = V.VFIO_IRQ_SET_ACTION_TRIGGER
EVENTFD, NONE, BOOL = (
    V.VFIO_IRQ_SET_DATA_EVENTFD,
    V.VFIO_IRQ_SET_DATA_NONE,
    V.VFIO_IRQ_SET_DATA_BOOL,
)


@pytest.fixture
def efds() -> Iterator[list[int]]:
    made = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(20)]
    yield made
    for fd in made:
        os.close(fd)


def _read(fd: int) -> int | None:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return None


def _bound(setup: VfioSetup) -> Any:
    df = setup.open_cdev()
    setup.bind(df)
    return df


def _info(df: Any, proc: Any, index: int) -> Any:
    return call(df, V.VFIO_DEVICE_GET_IRQ_INFO, V.VfioIrqInfo(argsz=16, index=index), proc)


def test_irq_info(setup: VfioSetup) -> None:
    df = _bound(setup)
    p = setup.proc
    intx = _info(df, p, V.VFIO_PCI_INTX_IRQ_INDEX)
    assert intx.count == 1
    assert intx.flags == (
        V.VFIO_IRQ_INFO_EVENTFD | V.VFIO_IRQ_INFO_MASKABLE | V.VFIO_IRQ_INFO_AUTOMASKED
    )
    msi = _info(df, p, V.VFIO_PCI_MSI_IRQ_INDEX)
    assert (msi.count, msi.flags) == (8, V.VFIO_IRQ_INFO_EVENTFD | V.VFIO_IRQ_INFO_NORESIZE)
    msix = _info(df, p, V.VFIO_PCI_MSIX_IRQ_INDEX)
    assert (msix.count, msix.flags) == (16, V.VFIO_IRQ_INFO_EVENTFD)
    assert _info(df, p, V.VFIO_PCI_ERR_IRQ_INDEX).count == 1
    assert _info(df, p, V.VFIO_PCI_REQ_IRQ_INDEX).count == 1
    assert_errno(errno.EINVAL, lambda: _info(df, p, 5))


@pytest.mark.parametrize("index", [V.VFIO_PCI_MSI_IRQ_INDEX, V.VFIO_PCI_MSIX_IRQ_INDEX])
def test_enable_trigger_disable(setup: VfioSetup, efds: list[int], index: int) -> None:
    df = _bound(setup)
    p = setup.proc
    count = _info(df, p, index).count
    df.ioctl(
        V.VFIO_DEVICE_SET_IRQS, irq_set(index, TRIGGER | EVENTFD, 0, count, fds(*efds[:count])), p
    )
    kind = "msix" if index == V.VFIO_PCI_MSIX_IRQ_INDEX else "msi"
    assert getattr(setup.fn, f"{kind}_enabled")()
    for i in range(count):
        assert _read(efds[i]) is None
        df.ioctl(V.VFIO_DEVICE_SET_IRQS, irq_set(index, TRIGGER | NONE, i, 1), p)
        assert _read(efds[i]) == 1
    # the device's own message reaches the eventfd (Bus Master on: MSI is a memory write)
    command = int.from_bytes(df.read(2, (7 << 40) + R.PCI_COMMAND), "little")
    df.write((command | R.PCI_COMMAND_MASTER).to_bytes(2, "little"), (7 << 40) + R.PCI_COMMAND)
    assert setup.fn.signal(3)
    assert _read(efds[3]) == 1
    # BOOL fires only the vectors whose byte is set
    df.ioctl(V.VFIO_DEVICE_SET_IRQS, irq_set(index, TRIGGER | BOOL, 0, 2, b"\0\1"), p)
    assert (_read(efds[0]), _read(efds[1])) == (None, 1)
    # switching to the other type needs this one disabled
    other = V.VFIO_PCI_MSI_IRQ_INDEX + V.VFIO_PCI_MSIX_IRQ_INDEX - index
    assert_errno(
        errno.EINVAL,
        lambda: df.ioctl(
            V.VFIO_DEVICE_SET_IRQS, irq_set(other, TRIGGER | EVENTFD, 0, 1, fds(efds[19])), p
        ),
    )
    # MSI / MSI-X have no mask action
    assert_errno(
        errno.ENOTTY,
        lambda: df.ioctl(
            V.VFIO_DEVICE_SET_IRQS, irq_set(index, V.VFIO_IRQ_SET_ACTION_MASK | NONE, 0, 1), p
        ),
    )
    df.ioctl(V.VFIO_DEVICE_SET_IRQS, irq_set(index, TRIGGER | NONE, 0, 0), p)
    assert not getattr(setup.fn, f"{kind}_enabled")()
    assert_errno(
        errno.EINVAL,
        lambda: df.ioctl(V.VFIO_DEVICE_SET_IRQS, irq_set(index, TRIGGER | NONE, 0, 0), p),
    )


def test_set_irqs_validation_and_bad_fds(setup: VfioSetup, efds: list[int]) -> None:
    df = _bound(setup)
    p = setup.proc
    msix = V.VFIO_PCI_MSIX_IRQ_INDEX

    def set_irqs(buf: bytearray) -> Any:
        return lambda: df.ioctl(V.VFIO_DEVICE_SET_IRQS, buf, p)

    assert_errno(errno.EINVAL, set_irqs(irq_set(msix, TRIGGER | EVENTFD, 15, 2, fds(-1, -1))))
    assert_errno(errno.EINVAL, set_irqs(irq_set(msix, TRIGGER | EVENTFD | NONE, 0, 1, fds(-1))))
    assert_errno(errno.EINVAL, set_irqs(irq_set(msix, 1 << 6, 0, 1, fds(-1))))
    assert_errno(errno.EINVAL, set_irqs(irq_set(9, TRIGGER | NONE, 0, 1)))
    short = irq_set(msix, TRIGGER | EVENTFD, 0, 2, fds(efds[0]))  # argsz holds one fd of two
    assert_errno(errno.EINVAL, set_irqs(short))
    # a bad fd in the middle: nothing stays installed and MSI-X is off again
    bad = irq_set(msix, TRIGGER | EVENTFD, 0, 3, fds(efds[0], 1000, efds[2]))
    assert_errno(errno.EBADF, set_irqs(bad))
    assert not setup.fn.msix_enabled() and not df.vdev.irqs.ctx
    memfd = p.memfd_create(4096)
    notev = os.memfd_create("x")
    try:
        assert_errno(errno.EINVAL, set_irqs(irq_set(msix, TRIGGER | EVENTFD, 0, 1, fds(notev))))
    finally:
        os.close(notev)
    assert memfd and not setup.fn.msix_enabled()
    # -1 entries leave vectors without a trigger; a later call fills them in
    set_irqs(irq_set(msix, TRIGGER | EVENTFD, 0, 2, fds(-1, efds[1])))()
    assert sorted(df.vdev.irqs.ctx) == [1]
    set_irqs(irq_set(msix, TRIGGER | EVENTFD, 0, 1, fds(efds[0])))()
    assert sorted(df.vdev.irqs.ctx) == [0, 1]
    set_irqs(irq_set(msix, TRIGGER | EVENTFD, 1, 1, fds(-1)))()
    assert sorted(df.vdev.irqs.ctx) == [0]


def test_intx_automask_and_unmask(setup: VfioSetup, efds: list[int]) -> None:
    df = _bound(setup)
    p = setup.proc
    intx = V.VFIO_PCI_INTX_IRQ_INDEX
    fn = setup.fn
    df.ioctl(V.VFIO_DEVICE_SET_IRQS, irq_set(intx, TRIGGER | EVENTFD, 0, 1, fds(efds[0])), p)
    assert fn.signal(0)
    assert _read(efds[0]) == 1
    assert not fn.signal(0)  # auto-masked: Interrupt Disable is set
    assert _read(efds[0]) is None
    fn.intx_deassert()
    df.ioctl(V.VFIO_DEVICE_SET_IRQS, irq_set(intx, V.VFIO_IRQ_SET_ACTION_UNMASK | NONE, 0, 1), p)
    assert fn.signal(0) and _read(efds[0]) == 1
    # still asserted at unmask: re-signalled, stays masked
    df.ioctl(V.VFIO_DEVICE_SET_IRQS, irq_set(intx, V.VFIO_IRQ_SET_ACTION_UNMASK | NONE, 0, 1), p)
    assert _read(efds[0]) == 1
    assert_errno(
        errno.EINVAL,
        lambda: df.ioctl(
            V.VFIO_DEVICE_SET_IRQS, irq_set(intx, V.VFIO_IRQ_SET_ACTION_MASK | NONE, 0, 0), p
        ),
    )
    df.ioctl(V.VFIO_DEVICE_SET_IRQS, irq_set(intx, TRIGGER | NONE, 0, 0), p)
    assert df.vdev.irqs.intx_trigger is None


def test_err_req_triggers_and_close(setup: VfioSetup, efds: list[int]) -> None:
    df = _bound(setup)
    p = setup.proc
    for index in (V.VFIO_PCI_ERR_IRQ_INDEX, V.VFIO_PCI_REQ_IRQ_INDEX):
        assert_errno(
            errno.EINVAL,
            partial(df.ioctl, V.VFIO_DEVICE_SET_IRQS, irq_set(index, TRIGGER | NONE, 0, 1), p),
        )
        df.ioctl(
            V.VFIO_DEVICE_SET_IRQS, irq_set(index, TRIGGER | EVENTFD, 0, 1, fds(efds[index])), p
        )
        df.ioctl(V.VFIO_DEVICE_SET_IRQS, irq_set(index, TRIGGER | NONE, 0, 1), p)
        assert _read(efds[index]) == 1
    msix = V.VFIO_PCI_MSIX_IRQ_INDEX
    df.ioctl(V.VFIO_DEVICE_SET_IRQS, irq_set(msix, TRIGGER | EVENTFD, 0, 1, fds(efds[0])), p)
    irqs = df.vdev.irqs
    mine = [*irqs.ctx.values(), irqs.err_trigger, irqs.req_trigger]
    df.release()  # closing the device turns interrupts off and drops the model's eventfd copies
    assert not setup.fn.msix_enabled()
    for fd in mine:
        with pytest.raises(OSError):
            os.fstat(fd)
