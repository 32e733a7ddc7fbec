"""PciFunction: config space attributes, BAR sizing, capabilities, MSI/MSI-X, FLR, bus master."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import iommufd_model as im
from iommufd_model.devices import DmaBlocked, PciFunction
from iommufd_model.devices import pci_regs as R
from iommufd_model.devices.function import EXP_CAP, MSI_CAP, MSIX_CAP
from iommufd_model.testing import assert_errno

from .conftest import dma_setup


def make(kind: str = "generic", vendor: str = "mock", **opts: Any) -> PciFunction:
    machine = im.Machine.build(iommus=[vendor])
    return machine.add_pci_function(kind, 0, **opts)


def test_identity_and_header() -> None:
    fn = make()
    assert fn.bdf == "0000:01:00.0"
    assert fn.config_read(R.PCI_VENDOR_ID, 2) == fn.vendor_id == 0x1B36
    assert fn.config_read(R.PCI_DEVICE_ID, 2) == fn.device_id == 0x0005
    assert fn.config_read(R.PCI_CLASS_PROG, 1) == 0x00
    assert fn.config_read(0x08, 4) >> 8 == 0x00FF00
    assert fn.config_read(R.PCI_HEADER_TYPE, 1) == 0
    assert fn.config_size == 4096
    # RO registers ignore writes
    fn.config_write(R.PCI_VENDOR_ID, 4, 0xDEADBEEF)
    assert fn.config_read(R.PCI_VENDOR_ID, 4) == 0x00051B36
    assert_errno(errno.EINVAL, lambda: fn.config_read(4095, 2))
    assert_errno(errno.EINVAL, lambda: fn.config_read(0, 3))


def test_command_rw_and_status_rw1c() -> None:
    fn = make()
    fn.config_write(R.PCI_COMMAND, 2, 0xFFFF)
    cmd = fn.config_read(R.PCI_COMMAND, 2)
    assert cmd & R.PCI_COMMAND_MEMORY and cmd & R.PCI_COMMAND_MASTER
    assert cmd & R.PCI_COMMAND_INTX_DISABLE
    assert not cmd & R.PCI_COMMAND_IO  # no I/O BAR: RO zero
    assert not cmd & 0x0008  # special cycles: RO zero
    status = fn.config_read(R.PCI_STATUS, 2)
    assert status & R.PCI_STATUS_CAP_LIST
    # RW1C: the device sets an error bit, writing 0 keeps it, writing 1 clears it
    fn.config.poke(R.PCI_STATUS, 2, status | R.PCI_STATUS_REC_MASTER_ABORT)
    fn.config_write(R.PCI_STATUS, 2, 0)
    assert fn.config_read(R.PCI_STATUS, 2) & R.PCI_STATUS_REC_MASTER_ABORT
    fn.config_write(R.PCI_STATUS, 2, R.PCI_STATUS_REC_MASTER_ABORT | R.PCI_STATUS_CAP_LIST)
    after = fn.config_read(R.PCI_STATUS, 2)
    assert not after & R.PCI_STATUS_REC_MASTER_ABORT and after & R.PCI_STATUS_CAP_LIST


def test_bar_sizing_64bit_and_32bit() -> None:
    fn = make()
    bar0 = fn.bars[0]
    assert bar0 is not None and bar0.mem64 and bar0.size == 0x4000
    assert fn.config_read(R.PCI_BASE_ADDRESS_0, 4) == R.PCI_BASE_ADDRESS_MEM_TYPE_64
    fn.config_write(R.PCI_BASE_ADDRESS_0, 4, 0xFFFFFFFF)
    fn.config_write(R.PCI_BASE_ADDRESS_0 + 4, 4, 0xFFFFFFFF)
    low = fn.config_read(R.PCI_BASE_ADDRESS_0, 4)
    high = fn.config_read(R.PCI_BASE_ADDRESS_0 + 4, 4)
    assert low == (0xFFFFC000 | R.PCI_BASE_ADDRESS_MEM_TYPE_64)
    assert high == 0xFFFFFFFF
    size = ~(((high << 32) | low) & ~0xF) & ((1 << 64) - 1)
    assert size + 1 == 0x4000
    # BAR2: 32-bit prefetchable 4 KiB; BAR1 (upper half of BAR0), BAR3..5 absent
    fn.config_write(R.PCI_BASE_ADDRESS_0 + 8, 4, 0xFFFFFFFF)
    assert fn.config_read(R.PCI_BASE_ADDRESS_0 + 8, 4) == 0xFFFFF000 | 0x8
    for i in (3, 4, 5):
        fn.config_write(R.PCI_BASE_ADDRESS_0 + 4 * i, 4, 0xFFFFFFFF)
        assert fn.config_read(R.PCI_BASE_ADDRESS_0 + 4 * i, 4) == 0
    fn.config_write(R.PCI_BASE_ADDRESS_0, 4, 0xFEB00000)
    assert fn.config_read(R.PCI_BASE_ADDRESS_0, 4) == 0xFEB00004


def walk_caps(fn: PciFunction) -> list[tuple[int, int]]:
    caps = []
    pos = fn.config_read(R.PCI_CAPABILITY_LIST, 1)
    while pos:
        caps.append((pos, fn.config_read(pos, 1)))
        pos = fn.config_read(pos + 1, 1)
    return caps


def test_capability_lists() -> None:
    fn = make(total_vfs=4)
    ids = [cap_id for _, cap_id in walk_caps(fn)]
    assert ids == [R.PCI_CAP_ID_PM, R.PCI_CAP_ID_MSI, R.PCI_CAP_ID_MSIX, R.PCI_CAP_ID_EXP]
    devcap = fn.config_read(EXP_CAP + R.PCI_EXP_DEVCAP, 4)
    assert devcap & R.PCI_EXP_DEVCAP_FLR
    header = fn.config_read(0x100, 4)
    assert header & 0xFFFF == R.PCI_EXT_CAP_ID_SRIOV and (header >> 16) & 0xF == 1
    assert header >> 20 == 0  # last one
    table = fn.config_read(MSIX_CAP + R.PCI_MSIX_TABLE, 4)
    pba = fn.config_read(MSIX_CAP + R.PCI_MSIX_PBA, 4)
    assert (table & 7, table & ~7) == (0, 0x2000) and (pba & 7, pba & ~7) == (0, 0x3000)
    assert fn.config_read(MSIX_CAP + R.PCI_MSIX_FLAGS, 2) & R.PCI_MSIX_FLAGS_QSIZE == 15
    # MSI-X table size is RO
    fn.config_write(MSIX_CAP + R.PCI_MSIX_FLAGS, 2, 0x47FF)
    assert fn.config_read(MSIX_CAP + R.PCI_MSIX_FLAGS, 2) == 15 | R.PCI_MSIX_FLAGS_MASKALL


def test_no_sriov_means_empty_extended_space() -> None:
    fn = make()
    assert fn.config_read(0x100, 4) == 0


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, int]] = []

    def __call__(self, kind: str, vector: int) -> None:
        self.got.append((kind, vector))


def test_msix_delivery_masks_and_pending() -> None:
    fn = make()
    sink = Sink()
    fn.irq_sink = sink
    fn.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER)
    flags = fn.config_read(MSIX_CAP + R.PCI_MSIX_FLAGS, 2)
    fn.config_write(MSIX_CAP + R.PCI_MSIX_FLAGS, 2, flags | R.PCI_MSIX_FLAGS_ENABLE)
    # every vector starts masked: the message is held pending in the PBA
    assert fn.mmio_read(0, 0x2000 + 3 * 16 + 12, 4) == 1
    assert not fn.signal(3)
    assert fn.mmio_read(0, 0x3000, 8) == 1 << 3 and sink.got == []
    fn.mmio_write(0, 0x2000 + 3 * 16 + 12, 4, 0)  # unmask: the pending message goes out
    assert sink.got == [("msix", 3)] and fn.mmio_read(0, 0x3000, 8) == 0
    # function mask holds every vector
    fn.config_write(
        MSIX_CAP + R.PCI_MSIX_FLAGS, 2, R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL
    )
    assert not fn.signal(3)
    assert sink.got == [("msix", 3)]
    fn.config_write(MSIX_CAP + R.PCI_MSIX_FLAGS, 2, R.PCI_MSIX_FLAGS_ENABLE)
    assert sink.got == [("msix", 3), ("msix", 3)]
    assert fn.signal(3) and not fn.signal(16)  # beyond the table: nothing
    # the PBA is read-only
    fn.mmio_write(0, 0x3000, 8, 0xFF)
    assert fn.mmio_read(0, 0x3000, 8) == 0


def test_msi_and_intx_delivery() -> None:
    fn = make()
    sink = Sink()
    fn.irq_sink = sink
    fn.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MASTER)
    assert fn.signal(0) and sink.got == [("intx", 0)]  # no MSI/MSI-X: INTx
    assert fn.config_read(R.PCI_STATUS, 2) & R.PCI_STATUS_INTERRUPT
    fn.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MASTER | R.PCI_COMMAND_INTX_DISABLE)
    assert not fn.signal(0)
    fn.irq_setup("msi", 4)  # as the host PCI core does for 4 vectors
    assert fn.config_read(MSI_CAP + R.PCI_MSI_FLAGS, 2) & R.PCI_MSI_FLAGS_QSIZE == 2 << 4
    assert fn.signal(2) and sink.got[-1] == ("msi", 2)
    assert not fn.signal(4)  # only 4 enabled
    fn.config_write(MSI_CAP + R.PCI_MSI_MASK_64, 4, 1 << 1)
    assert not fn.signal(1)
    assert fn.config_read(MSI_CAP + R.PCI_MSI_PENDING_64, 4) == 1 << 1
    fn.config_write(MSI_CAP + R.PCI_MSI_MASK_64, 4, 0)
    assert sink.got[-1] == ("msi", 1)
    assert fn.config_read(MSI_CAP + R.PCI_MSI_PENDING_64, 4) == 0
    fn.irq_setup("msix", 2)  # MSI-X replaces MSI
    assert not fn.msi_enabled() and fn.signal(1) and sink.got[-1] == ("msix", 1)
    assert not fn.signal(2)  # entry 2 left masked
    fn.irq_teardown("msix")
    assert not fn.msix_enabled()


def test_no_interrupt_message_without_bus_master() -> None:
    fn = make()
    sink = Sink()
    fn.irq_sink = sink
    fn.irq_setup("msix", 1)
    assert not fn.signal(0) and sink.got == []
    fn.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MASTER)  # the held message goes out
    assert sink.got == [("msix", 0)]


def test_flr_restores_power_on_state() -> None:
    fn = make()
    fn.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER)
    fn.config_write(R.PCI_BASE_ADDRESS_0, 4, 0xFEB00000)
    fn.irq_setup("msix", 4)
    fn.mmio_write(0, 0x10, 4, 0x1234)
    assert fn.mmio_read(0, 0x10, 4) == 0x1234
    devctl = fn.config_read(EXP_CAP + R.PCI_EXP_DEVCTL, 2)
    fn.config_write(EXP_CAP + R.PCI_EXP_DEVCTL, 2, devctl | R.PCI_EXP_DEVCTL_BCR_FLR)
    assert fn.resets == 1
    assert fn.config_read(R.PCI_COMMAND, 2) == 0
    assert fn.config_read(R.PCI_BASE_ADDRESS_0, 4) == R.PCI_BASE_ADDRESS_MEM_TYPE_64
    assert not fn.msix_enabled()
    assert fn.config_read(EXP_CAP + R.PCI_EXP_DEVCTL, 2) & R.PCI_EXP_DEVCTL_BCR_FLR == 0
    fn.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MEMORY)
    assert fn.mmio_read(0, 0x10, 4) == 0
    assert fn.mmio_read(0, 0x2000 + 12, 4) == 1  # vectors masked again


def test_mmio_needs_memory_space_and_checks_access() -> None:
    fn = make()
    assert fn.mmio_read(0, 0, 4) == 0xFFFFFFFF
    fn.mmio_write(0, 0, 4, 5)
    fn.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MEMORY)
    assert fn.mmio_read(0, 0, 4) == 0
    assert_errno(errno.EINVAL, lambda: fn.mmio_read(1, 0, 4))  # upper half of BAR0
    assert_errno(errno.EINVAL, lambda: fn.mmio_read(0, 0x4000, 4))
    assert_errno(errno.EINVAL, lambda: fn.mmio_read(0, 2, 4))
    assert_errno(errno.EINVAL, lambda: fn.mmio_write64b(0, 0, b"x" * 63))


def test_dma_needs_bus_master(vendor: str) -> None:
    s = dma_setup(vendor, "generic")
    s.write(s.iova, b"hello")
    with pytest.raises(DmaBlocked):
        s.fn.dma_read(s.iova, 5)
    faults = s.fn.iommu.stats.faults
    s.fn.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MASTER)
    assert s.fn.dma_read(s.iova, 5) == b"hello"
    s.fn.dma_write(s.iova + 8, b"world")
    assert s.read(s.iova + 8, 5) == b"world"
    assert s.fn.iommu.stats.faults == faults


def test_add_pci_function_places_and_refuses() -> None:
    m = im.Machine.build(iommus=["mock", "amd"])
    a = m.add_pci_function("generic", 0)
    b = m.add_pci_function("generic", 0)
    c = m.add_pci_function("generic", 1)
    assert [f.bdf for f in (a, b, c)] == ["0000:01:00.0", "0000:01:01.0", "0000:02:00.0"]
    assert c.iommu is m.iommus[1] and c.iommu_priv is not None
    assert m.pci_functions() == [a, b, c]
    assert_errno(errno.EEXIST, lambda: m.add_pci_function("generic", 1, rid=a.rid))
    assert_errno(errno.ENODEV, lambda: m.add_pci_function("generic", 2))
    with pytest.raises(ValueError):
        m.add_pci_function("no-such-kind", 0)


@given(
    st.lists(
        st.tuples(st.integers(0, 4095), st.sampled_from([1, 2, 4]), st.integers(0, (1 << 32) - 1)),
        max_size=40,
    )
)
@settings(max_examples=60, deadline=None)
def test_config_writes_obey_the_bit_attributes(writes: list[tuple[int, int, int]]) -> None:
    """Whatever software writes, RO bits keep their value and RW1C bits only clear."""
    fn = make(total_vfs=2, pasid=True)
    for offset, size, value in writes:
        offset -= offset % size
        cfg = fn.config
        before, wmask, w1c = bytes(cfg.data), bytes(cfg.wmask), bytes(cfg.w1cmask)
        fn.config_write(offset, size, value)
        if fn.resets or fn.sriov_vfs:
            return  # an FLR or VF Enable: side effects this property does not cover
        for i in range(cfg.size):
            ro = ~(wmask[i] | w1c[i]) & 0xFF
            assert cfg.data[i] & ro == before[i] & ro, hex(i)
            assert cfg.data[i] & w1c[i] & ~before[i] == 0, hex(i)
