"""VFIO_DEVICE_GET_IRQ_INFO / VFIO_DEVICE_SET_IRQS and the interrupt path to eventfds.

Semantics of drivers/vfio/pci/vfio_pci_intrs.c and vfio_set_irqs_validate_and_prepare() in
drivers/vfio/vfio_main.c (Linux 7.2): one interrupt type at a time (INTx, MSI or MSI-X;
switching needs the current one disabled with DATA_NONE and count 0); DATA_EVENTFD installs or
(fd -1) removes triggers, enabling the type first when none is on; DATA_NONE / DATA_BOOL fire
the triggers by hand (loopback); INTx is maskable and auto-masked when it fires, MSI and
MSI-X have no MASK/UNMASK (ENOTTY); ERR (PCIe only) and REQ hold one trigger each.

The host PCI core's part (pci_alloc_irq_vectors, INTx masking by the Interrupt Disable bit)
is the function's :meth:`irq_setup` / :meth:`irq_teardown`; the function calls
:meth:`VfioIrqs.deliver` (its ``irq_sink``) when it sends an interrupt, and the trigger's
eventfd is signalled as the kernel's ``eventfd_signal`` does: its counter grows by one.

Eventfds come from the caller's fd table: ``proc.get_fd(fd)`` gives the model its own copy
(under ``iommufd-model run`` the server takes it with pidfd_getfd); a Python process of the
model has none, so the fd is the test's own and is ``os.dup``-ed (model).
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from typing import TYPE_CHECKING, Any

from iommufd_model.devices import pci_regs as R
from iommufd_model.errors import err
from iommufd_model.uapi import vfio as V

if TYPE_CHECKING:
    from iommufd_model.process import Process
    from iommufd_model.vfio.pci_core import VfioPciDevice

INTX, MSI, MSIX = V.VFIO_PCI_INTX_IRQ_INDEX, V.VFIO_PCI_MSI_IRQ_INDEX, V.VFIO_PCI_MSIX_IRQ_INDEX
ERR, REQ = V.VFIO_PCI_ERR_IRQ_INDEX, V.VFIO_PCI_REQ_IRQ_INDEX
NONE = V.VFIO_PCI_NUM_IRQS  # vdev->irq_type when no interrupt type is on
_KIND = {INTX: "intx", MSI: "msi", MSIX: "msix"}


def eventfd_get(proc: Process, fd: int) -> int:
    """``eventfd_ctx_fdget(fd)``: the model's own descriptor for the caller's eventfd.

    EBADF when ``fd`` is not open in the caller, EINVAL when it is not an eventfd."""
    if fd < 0:
        raise err(errno.EBADF, f"fd {fd}")
    getter = getattr(proc, "get_fd", None)
    try:
        mine = int(getter(fd)) if getter is not None else os.dup(fd)
    except OSError as exc:
        raise err(errno.EBADF, f"fd {fd} is not open: {exc.strerror}") from None
    try:
        with open(f"/proc/self/fdinfo/{mine}") as info:
            is_eventfd = "eventfd-count" in info.read()
    except OSError:
        is_eventfd = False
    if not is_eventfd:
        os.close(mine)
        raise err(errno.EINVAL, f"fd {fd} is not an eventfd")
    return mine


def eventfd_signal(fd: int) -> None:
    """``eventfd_signal()``: add one to the counter (a full counter is left as it is)."""
    with contextlib.suppress(BlockingIOError):
        os.write(fd, struct.pack("<Q", 1))


class VfioIrqs:
    """The interrupt state of one open VFIO PCI device (``vdev->irq_type``, ``ctx``...)."""

    def __init__(self, vdev: VfioPciDevice) -> None:
        self.vdev = vdev
        self.irq_type = NONE
        self.ctx: dict[int, int] = {}  # vector -> trigger eventfd (MSI/MSI-X)
        self.intx_trigger: int | None = None
        self.intx_masked = False
        self.virq_disabled = False  # the user's virtual INTx Disable
        self.err_trigger: int | None = None
        self.req_trigger: int | None = None
        self.nvec = 0  # vectors the host allocated for MSI / MSI-X

    # -- counts and info ----------------------------------------------------------------
    def count(self, index: int) -> int:
        """vfio_pci_get_irq_count()."""
        fn = self.vdev.fn
        cfg = fn.config
        if index == INTX:
            if fn.is_virtfn:
                return 0
            return 1 if fn.config_read(R.PCI_INTERRUPT_PIN, 1) else 0
        if index == MSI:
            pos = cfg.find_cap(R.PCI_CAP_ID_MSI)
            if pos is None:
                return 0
            flags = fn.config_read(pos + R.PCI_MSI_FLAGS, 2)
            return 1 << ((flags & R.PCI_MSI_FLAGS_QMASK) >> 1)
        if index == MSIX:
            pos = cfg.find_cap(R.PCI_CAP_ID_MSIX)
            if pos is None:
                return 0
            return (fn.config_read(pos + R.PCI_MSIX_FLAGS, 2) & R.PCI_MSIX_FLAGS_QSIZE) + 1
        if index == ERR:
            return 1 if fn.spec.pcie else 0
        if index == REQ:
            return 1
        return 0

    def info(self, arg: Any) -> int:
        """vfio_pci_ioctl_get_irq_info()."""
        from iommufd_model.vfio.uarg import struct_from, struct_to

        minsz = V.VfioIrqInfo.offsetofend("count")
        info = struct_from(arg, V.VfioIrqInfo, minsz)
        if info.argsz < minsz or info.index >= V.VFIO_PCI_NUM_IRQS:
            raise err(errno.EINVAL, "bad argsz or IRQ index")
        if info.index == ERR and not self.vdev.fn.spec.pcie:
            raise err(errno.EINVAL, "ERR IRQ only for PCI Express")
        info.flags = V.VFIO_IRQ_INFO_EVENTFD
        info.count = self.count(info.index)
        if info.index == INTX:
            info.flags |= V.VFIO_IRQ_INFO_MASKABLE | V.VFIO_IRQ_INFO_AUTOMASKED
        elif info.index != MSIX or not self.vdev.has_dyn_msix:
            info.flags |= V.VFIO_IRQ_INFO_NORESIZE
        struct_to(arg, info, minsz)
        return 0

    # -- SET_IRQS ---------------------------------------------------------------------
    def set_irqs(self, arg: Any, proc: Process) -> int:
        """vfio_pci_ioctl_set_irqs(): validate, copy the data, act."""
        from iommufd_model.vfio.uarg import copy_from, struct_from

        minsz = V.VfioIrqSet.offsetofend("count")
        hdr = struct_from(arg, V.VfioIrqSet, minsz)
        nmax = self.count(hdr.index) if hdr.index < V.VFIO_PCI_NUM_IRQS else 0
        # vfio_set_irqs_validate_and_prepare()
        if (
            hdr.argsz < minsz
            or hdr.index >= V.VFIO_PCI_NUM_IRQS
            or hdr.count >= (0xFFFFFFFF - hdr.start)
            or hdr.flags & ~(V.VFIO_IRQ_SET_DATA_TYPE_MASK | V.VFIO_IRQ_SET_ACTION_TYPE_MASK)
        ):
            raise err(errno.EINVAL, "bad argsz, index, range or flags")
        if hdr.start >= nmax or hdr.start + hdr.count > nmax:
            raise err(errno.EINVAL, f"vectors {hdr.start}+{hdr.count} beyond {nmax}")
        dtype = hdr.flags & V.VFIO_IRQ_SET_DATA_TYPE_MASK
        size = {V.VFIO_IRQ_SET_DATA_NONE: 0, V.VFIO_IRQ_SET_DATA_BOOL: 1}.get(dtype)
        if dtype == V.VFIO_IRQ_SET_DATA_EVENTFD:
            size = 4
        if size is None:
            raise err(errno.EINVAL, "exactly one data type")
        data = b""
        if size:
            if hdr.argsz - minsz < hdr.count * size:
                raise err(errno.EINVAL, "argsz too small for the data")
            data = copy_from(arg, minsz + hdr.count * size)[minsz:]
        action = hdr.flags & V.VFIO_IRQ_SET_ACTION_TYPE_MASK
        return self._dispatch(hdr.index, action, dtype, hdr.start, hdr.count, data, proc)

    def _dispatch(
        self,
        index: int,
        action: int,
        dtype: int,
        start: int,
        count: int,
        data: bytes,
        proc: Process,
    ) -> int:
        """vfio_pci_set_irqs_ioctl(): the handler for index and action, else ENOTTY."""
        trigger = action == V.VFIO_IRQ_SET_ACTION_TRIGGER
        if index == INTX:
            if action == V.VFIO_IRQ_SET_ACTION_MASK:
                return self._intx_mask_action(False, start, count, dtype, data)
            if action == V.VFIO_IRQ_SET_ACTION_UNMASK:
                return self._intx_mask_action(True, start, count, dtype, data)
            if trigger:
                return self._intx_trigger(start, count, dtype, data, proc)
        elif index in (MSI, MSIX):
            if trigger:
                return self._msi_trigger(index, start, count, dtype, data, proc)
        elif index == ERR:
            if trigger and self.vdev.fn.spec.pcie:
                if start != 0 or count > 1:
                    raise err(errno.EINVAL, "one ERR trigger")
                self.err_trigger = self._single(self.err_trigger, count, dtype, data, proc)
                return 0
        elif index == REQ and trigger:
            if start != 0 or count > 1:
                raise err(errno.EINVAL, "one REQ trigger")
            self.req_trigger = self._single(self.req_trigger, count, dtype, data, proc)
            return 0
        raise err(errno.ENOTTY, f"no handler for IRQ index {index} action {action:#x}")

    @staticmethod
    def _fds(data: bytes, count: int) -> list[int]:
        return list(struct.unpack(f"<{count}i", data[: 4 * count]))

    def _single(
        self, ctx: int | None, count: int, dtype: int, data: bytes, proc: Process
    ) -> int | None:
        """vfio_pci_set_ctx_trigger_single(): ERR and REQ."""
        if dtype == V.VFIO_IRQ_SET_DATA_NONE:
            if ctx is not None:
                if count:
                    eventfd_signal(ctx)
                    return ctx
                os.close(ctx)
                return None
        elif dtype == V.VFIO_IRQ_SET_DATA_BOOL:
            if not count:
                raise err(errno.EINVAL, "BOOL needs a count")
            if data[0] and ctx is not None:
                eventfd_signal(ctx)
            return ctx
        elif dtype == V.VFIO_IRQ_SET_DATA_EVENTFD:
            if not count:
                raise err(errno.EINVAL, "EVENTFD needs a count")
            (fd,) = self._fds(data, 1)
            if fd == -1:
                if ctx is not None:
                    os.close(ctx)
                return None
            if fd >= 0:
                new = eventfd_get(proc, fd)
                if ctx is not None:
                    os.close(ctx)
                return new
            return ctx
        raise err(errno.EINVAL, "no trigger to act on")

    # -- INTx -------------------------------------------------------------------------
    def _intx_mask_action(
        self, unmask: bool, start: int, count: int, dtype: int, data: bytes
    ) -> int:
        """vfio_pci_set_intx_mask() / vfio_pci_set_intx_unmask()."""
        if self.irq_type != INTX or start != 0 or count != 1:
            raise err(errno.EINVAL, "INTx (un)mask needs INTx on, vector 0, count 1")
        if dtype == V.VFIO_IRQ_SET_DATA_EVENTFD:
            if not unmask:
                raise err(errno.EINVAL, "INTx mask by eventfd is not implemented by Linux")
            # vfio_virqfd_enable(): unmask on an eventfd's signal needs KVM's irqfd path,
            # which the model has no waiter for.
            raise err(errno.EOPNOTSUPP, "the model has no virqfd for INTx unmask")
        if dtype == V.VFIO_IRQ_SET_DATA_NONE or data[0]:
            if unmask:
                self.intx_unmask()
            else:
                self.intx_mask()
        return 0

    def _intx_trigger(self, start: int, count: int, dtype: int, data: bytes, proc: Process) -> int:
        if self.irq_type == INTX and not count and dtype == V.VFIO_IRQ_SET_DATA_NONE:
            self.intx_disable()
            return 0
        if self.irq_type not in (INTX, NONE) or start != 0 or count != 1:
            raise err(errno.EINVAL, "INTx trigger needs vector 0, count 1")
        if dtype == V.VFIO_IRQ_SET_DATA_EVENTFD:
            (fd,) = self._fds(data, 1)
            new = eventfd_get(proc, fd) if fd >= 0 else None
            if self.irq_type == INTX:
                if self.intx_trigger is not None:
                    os.close(self.intx_trigger)
                self.intx_trigger = new
                return 0
            try:
                self._intx_enable(new)
            except OSError:
                if new is not None:
                    os.close(new)
                raise
            return 0
        if self.irq_type != INTX:
            raise err(errno.EINVAL, "INTx is not on")
        if dtype == V.VFIO_IRQ_SET_DATA_NONE or data[0]:
            self._send_intx()
        return 0

    def _intx_enable(self, trigger: int | None) -> None:
        """vfio_intx_enable()."""
        if self.irq_type != NONE:
            raise err(errno.EINVAL, "another interrupt type is on")
        if not self.count(INTX):
            raise err(errno.ENODEV, "the function has no INTx")
        self.intx_trigger = trigger
        self.irq_type = INTX
        self.intx_masked = self.virq_disabled
        if not self.intx_masked:
            self.vdev.fn.irq_setup("intx", 1)

    def intx_disable(self) -> None:
        """vfio_intx_disable()."""
        self.vdev.fn.irq_teardown("intx")
        if self.intx_trigger is not None:
            os.close(self.intx_trigger)
        self.intx_trigger = None
        self.intx_masked = False
        self.irq_type = NONE

    def _send_intx(self) -> None:
        if self.irq_type == INTX and not self.virq_disabled and self.intx_trigger is not None:
            eventfd_signal(self.intx_trigger)

    def intx_mask(self) -> None:
        """vfio_pci_intx_mask(): Interrupt Disable set in the hardware."""
        if self.irq_type == INTX and not self.intx_masked:
            self.vdev.fn.irq_teardown("intx")
            self.intx_masked = True

    def intx_unmask(self) -> None:
        """vfio_pci_intx_unmask(): a still asserted line re-signals instead of unmasking
        (pci_check_and_unmask_intx)."""
        if self.irq_type != INTX or not self.intx_masked or self.virq_disabled:
            return
        fn = self.vdev.fn
        if fn.config_read(R.PCI_STATUS, 2) & R.PCI_STATUS_INTERRUPT:
            self._send_intx()
            return
        self.intx_masked = False
        fn.irq_setup("intx", 1)

    def virq_disable(self, disabled: bool) -> None:
        """The user's virtual INTx Disable bit changed (vfio_basic_config_write)."""
        if disabled and not self.virq_disabled:
            self.virq_disabled = True
            self.intx_mask()
        elif not disabled and self.virq_disabled:
            self.virq_disabled = False
            self.intx_unmask()

    # -- MSI / MSI-X ------------------------------------------------------------------
    def _msi_trigger(
        self, index: int, start: int, count: int, dtype: int, data: bytes, proc: Process
    ) -> int:
        """vfio_pci_set_msi_trigger()."""
        if self.irq_type == index and not count and dtype == V.VFIO_IRQ_SET_DATA_NONE:
            self.msi_disable()
            return 0
        if self.irq_type not in (index, NONE):
            raise err(errno.EINVAL, "another interrupt type is on")
        if dtype == V.VFIO_IRQ_SET_DATA_EVENTFD:
            fds = self._fds(data, count)
            if self.irq_type == index:
                self._set_block(index, start, fds, proc)
                return 0
            self._msi_enable(index, start + count)
            try:
                self._set_block(index, start, fds, proc)
            except OSError:
                self.msi_disable()
                raise
            return 0
        if self.irq_type != index:
            raise err(errno.EINVAL, "this interrupt type is not on")
        for i in range(start, start + count):
            fd = self.ctx.get(i)
            if fd is None:
                continue
            if dtype == V.VFIO_IRQ_SET_DATA_NONE or data[i - start]:
                eventfd_signal(fd)
        return 0

    def _msi_enable(self, index: int, nvec: int) -> None:
        """vfio_msi_enable(): the host allocates ``nvec`` vectors (pci_alloc_irq_vectors)."""
        if self.irq_type != NONE:
            raise err(errno.EINVAL, "another interrupt type is on")
        if nvec <= 0:
            raise err(errno.ERANGE, "no vectors asked")
        self.vdev.fn.irq_setup(_KIND[index], nvec)
        self.irq_type = index
        self.nvec = nvec
        if index == MSI and self.vdev.vconfig is not None:
            self.vdev.vconfig.msi_qmax = (nvec * 2 - 1).bit_length() - 1

    def _set_block(self, index: int, start: int, fds: list[int], proc: Process) -> None:
        """vfio_msi_set_block(): all or nothing; on failure the vectors set so far go."""
        for j, fd in enumerate(fds):
            try:
                self._set_vector_signal(index, start + j, fd, proc)
            except OSError:
                for i in range(start, start + j):
                    self._set_vector_signal(index, i, -1, proc)
                raise

    def _set_vector_signal(self, index: int, vector: int, fd: int, proc: Process) -> None:
        """vfio_msi_set_vector_signal(): drop the vector's trigger, then install ``fd``.

        MSI vectors past those allocated are EINVAL; MSI-X ones are allocated on demand as
        with dynamic MSI-X (``has_dyn_msix``)."""
        old = self.ctx.pop(vector, None)
        if old is not None:
            os.close(old)
        if fd < 0:
            return
        if index == MSI and vector >= self.nvec:
            raise err(errno.EINVAL, f"MSI vector {vector} not allocated")
        self.ctx[vector] = eventfd_get(proc, fd)

    def msi_disable(self) -> None:
        """vfio_msi_disable(): every trigger goes, the host frees the vectors."""
        for fd in self.ctx.values():
            os.close(fd)
        self.ctx.clear()
        if self.irq_type in (MSI, MSIX):
            self.vdev.fn.irq_teardown(_KIND[self.irq_type])
        self.irq_type = NONE
        self.nvec = 0
        if self.vdev.vconfig is not None:
            self.vdev.vconfig.msi_qmax = 0

    # -- delivery and teardown ---------------------------------------------------------
    def deliver(self, kind: str, vector: int) -> None:
        """The function sent interrupt ``vector`` (its ``irq_sink``): the host handler runs."""
        if kind == "intx":
            if self.irq_type == INTX and not self.intx_masked:
                self.intx_mask()  # vfio_intx_handler(): auto-masked
                self._send_intx()
            return
        index = MSIX if kind == "msix" else MSI
        if self.irq_type == index:
            fd = self.ctx.get(vector)
            if fd is not None:
                eventfd_signal(fd)

    def disable_all(self) -> None:
        """vfio_pci_core_disable(): the interrupt type off, ERR and REQ triggers dropped."""
        if self.irq_type == INTX:
            self.intx_disable()
        elif self.irq_type in (MSI, MSIX):
            self.msi_disable()
        for fd in (self.err_trigger, self.req_trigger):
            if fd is not None:
                os.close(fd)
        self.err_trigger = self.req_trigger = None
        self.virq_disabled = False
