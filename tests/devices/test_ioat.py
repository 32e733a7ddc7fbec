"""IOAT driven through its registers exactly as the VFIO selftest driver (lib/drivers/ioat/
ioat.c) programs it, behind the mock and AMD IOMMUs: bytes copied by DMA, MSI-X on request,
errors halting the channel and the IOMMU logging the fault."""

from __future__ import annotations

import struct

from iommufd_model.devices import pci_regs as R
from iommufd_model.devices.ioat import (
    CHAN,
    IOAT2_CHAINADDR_OFFSET,
    IOAT2_CHANCMD_OFFSET,
    IOAT_CHAN_DMACOUNT_OFFSET,
    IOAT_CHANCMD_RESET,
    IOAT_CHANCMD_SUSPEND,
    IOAT_CHANCMP_OFFSET,
    IOAT_CHANCTRL_ANY_ERR_ABORT_EN,
    IOAT_CHANCTRL_INT_REARM,
    IOAT_CHANCTRL_OFFSET,
    IOAT_CHANERR_OFFSET,
    IOAT_CHANERR_READ_DATA_ERR,
    IOAT_CHANSTS_DONE,
    IOAT_CHANSTS_HALTED,
    IOAT_CHANSTS_OFFSET,
    IOAT_CHANSTS_STATUS,
    IOAT_CHANSTS_SUSPENDED,
    IOAT_INTRCTRL_MSIX_VECTOR_CONTROL,
    IOAT_INTRCTRL_OFFSET,
    IOAT_PCI_CHANERR_INT_OFFSET,
    IOAT_PCI_DMAUNCERRSTS_OFFSET,
    IOAT_VER_OFFSET,
    IOAT_XFERCAP_OFFSET,
    PCI_DEVICE_ID_INTEL_IOAT_SKX,
    IoatFunction,
)

from .conftest import DmaSetup, driver_setup

DESC = 0  # driver region offsets: struct ioat_state { desc; send_msi_src; send_msi_dst; }
MSI_SRC = 64
MSI_DST = 72


class IoatDriver:
    """The selftest driver's register programming, in Python."""

    def __init__(self, s: DmaSetup) -> None:
        self.s = s
        self.fn = s.fn
        self.region = s.iova + (1 << 21)  # driver->region: the upper 2 MiB
        self.irqs: list[tuple[str, int]] = []
        self.fn.irq_sink = lambda kind, vector: self.irqs.append((kind, vector))
        # vfio_pci_core_enable: pci_enable_device sets Memory Space
        self.fn.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MEMORY)

    def readb(self, off: int) -> int:
        return self.fn.mmio_read(0, off, 1)

    def readq(self, off: int) -> int:
        return self.fn.mmio_read(0, off, 8)

    def status(self) -> int:
        return self.readq(CHAN + IOAT_CHANSTS_OFFSET) & IOAT_CHANSTS_STATUS

    def probe(self) -> bool:
        match = (self.fn.config_read(0, 2), self.fn.config_read(2, 2)) == (
            R.PCI_VENDOR_ID_INTEL,
            PCI_DEVICE_ID_INTEL_IOAT_SKX,
        )
        return match and self.readb(IOAT_VER_OFFSET) in (0x32, 0x33)

    def clear_errors(self) -> None:
        fn = self.fn
        errors = fn.config_read(IOAT_PCI_CHANERR_INT_OFFSET, 4)
        fn.config_write(IOAT_PCI_CHANERR_INT_OFFSET, 4, errors)
        errors = fn.config_read(IOAT_PCI_DMAUNCERRSTS_OFFSET, 4)
        fn.config_write(IOAT_PCI_CHANERR_INT_OFFSET, 4, errors)
        errors = fn.mmio_read(0, CHAN + IOAT_CHANERR_OFFSET, 4)
        fn.mmio_write(0, CHAN + IOAT_CHANERR_OFFSET, 4, errors)

    def reset(self) -> None:
        self.clear_errors()
        self.fn.mmio_write(0, CHAN + IOAT2_CHANCMD_OFFSET, 1, IOAT_CHANCMD_RESET)
        for _ in range(5000):
            if not self.readb(CHAN + IOAT2_CHANCMD_OFFSET) & IOAT_CHANCMD_RESET:
                break
        else:
            raise AssertionError("reset never completed")
        assert self.status() == IOAT_CHANSTS_HALTED

    def init(self) -> None:
        cmd = R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER | R.PCI_COMMAND_INTX_DISABLE
        self.fn.config_write(R.PCI_COMMAND, 2, cmd)
        self.reset()
        self.fn.mmio_write(0, IOAT_INTRCTRL_OFFSET, 1, IOAT_INTRCTRL_MSIX_VECTOR_CONTROL)
        self.fn.irq_setup("msix", 1)  # vfio_pci_msix_enable (the VFIO layer's part)
        self.max_memcpy_size = 1 << self.readb(IOAT_XFERCAP_OFFSET)

    def remove(self) -> None:
        self.reset()
        self.fn.irq_teardown("msix")

    def memcpy_start(self, src: int, dst: int, size: int, count: int, interrupt: bool) -> None:
        desc_iova = self.region + DESC
        ctl = 1 if interrupt else 0  # .ctl_f.op = IOAT_OP_COPY, .ctl_f.int_en
        desc = struct.pack("<IIQQQ", size, ctl, src, dst, desc_iova).ljust(64, b"\0")
        self.s.write(desc_iova, desc)
        self.fn.mmio_write(0, CHAN + IOAT2_CHAINADDR_OFFSET, 8, desc_iova)
        chanctrl = IOAT_CHANCTRL_INT_REARM | IOAT_CHANCTRL_ANY_ERR_ABORT_EN
        self.fn.mmio_write(0, CHAN + IOAT_CHANCTRL_OFFSET, 2, chanctrl)
        self.fn.mmio_write(0, CHAN + IOAT_CHAN_DMACOUNT_OFFSET, 2, count)

    def memcpy_wait(self) -> int:
        while True:
            status = self.status()
            if status == IOAT_CHANSTS_DONE:
                break
            if status == IOAT_CHANSTS_HALTED:
                self.reset()  # ioat_handle_error
                return -1
        self.fn.mmio_write(0, CHAN + IOAT2_CHANCMD_OFFSET, 1, IOAT_CHANCMD_SUSPEND)
        assert self.status() == IOAT_CHANSTS_SUSPENDED
        return 0

    def send_msi(self) -> None:
        self.memcpy_start(self.region + MSI_SRC, self.region + MSI_DST, 8, 1, True)
        assert self.memcpy_wait() == 0


def setup(vendor: str) -> tuple[DmaSetup, IoatDriver]:
    return driver_setup(vendor, "ioat", IoatDriver)


def test_memcpy_success_and_storm(vendor: str) -> None:
    s, drv = setup(vendor)
    size = drv.max_memcpy_size
    src, dst = s.copy_buffers(size)
    drv.memcpy_start(src, dst, size, 1, False)
    assert drv.memcpy_wait() == 0
    assert s.read(dst, size) == s.read(src, size)
    assert drv.irqs == []
    # several copies through the one self-linked descriptor
    assert isinstance(s.fn, IoatFunction)
    before = s.fn.copies
    drv.memcpy_start(src, dst, size, 50, False)
    assert drv.memcpy_wait() == 0
    assert s.fn.copies - before == 50
    drv.remove()


def test_send_msi_and_init_remove(vendor: str) -> None:
    s, drv = setup(vendor)
    for _ in range(3):
        drv.remove()
        drv.init()
    drv.send_msi()
    assert drv.irqs == [("msix", 0)]
    assert s.read(drv.region + MSI_DST, 8) == s.read(drv.region + MSI_SRC, 8)
    # the arm is consumed: a second int_en copy without re-arming stays silent
    desc = drv.region + DESC
    s.write(desc + 4, (1).to_bytes(4, "little"))
    s.fn.mmio_write(0, CHAN + IOAT2_CHAINADDR_OFFSET, 8, desc)
    s.fn.mmio_write(0, CHAN + IOAT_CHAN_DMACOUNT_OFFSET, 2, 1)
    assert drv.status() == IOAT_CHANSTS_DONE and drv.irqs == [("msix", 0)]


def test_completion_writeback(vendor: str) -> None:
    s, drv = setup(vendor)
    cmp = drv.region + 0x1000
    s.fn.mmio_write(0, CHAN + IOAT_CHANCMP_OFFSET, 8, cmp)
    desc = drv.region + DESC
    s.write(s.iova, b"abcdefgh")
    # compl_write (ctl bit 3): the channel writes CHANSTS to CHANCMP
    s.write(desc, struct.pack("<IIQQQ", 8, 0x8, s.iova, s.iova + 64, desc).ljust(64, b"\0"))
    s.fn.mmio_write(0, CHAN + IOAT2_CHAINADDR_OFFSET, 8, desc)
    s.fn.mmio_write(0, CHAN + IOAT_CHAN_DMACOUNT_OFFSET, 2, 1)
    written = int.from_bytes(s.read(cmp, 8), "little")
    assert written & ~0x3F == desc  # the completed descriptor
    assert s.read(s.iova + 64, 8) == b"abcdefgh"
    assert drv.readq(CHAN + IOAT_CHANSTS_OFFSET) == desc | IOAT_CHANSTS_DONE


def test_unmapped_source_halts_and_iommu_logs(vendor: str) -> None:
    s, drv = setup(vendor)
    size = drv.max_memcpy_size
    va, buf = s.map_area(1 << 16)
    s.proc.write(va, b"z" * size)
    faults = s.fn.iommu.stats.faults
    log = len(s.fn.iommu.fault_log)
    # a first copy works, then the source goes away mid-stream
    drv.memcpy_start(buf, s.iova, size, 1, False)
    assert drv.memcpy_wait() == 0 and s.read(s.iova, size) == b"z" * size
    s.unmap(buf, 1 << 16)
    drv.memcpy_start(buf, s.iova, size, 3, False)
    assert drv.status() == IOAT_CHANSTS_HALTED
    chanerr = drv.fn.mmio_read(0, CHAN + IOAT_CHANERR_OFFSET, 4)
    assert chanerr == IOAT_CHANERR_READ_DATA_ERR
    assert drv.fn.config_read(IOAT_PCI_CHANERR_INT_OFFSET, 4) == IOAT_CHANERR_READ_DATA_ERR
    assert s.fn.iommu.stats.faults == faults + 1
    record = s.fn.iommu.fault_log[log]
    assert record.iova == buf and not record.write
    assert drv.irqs == []
    assert drv.memcpy_wait() == -1  # ioat_handle_error resets the channel
    assert drv.fn.mmio_read(0, CHAN + IOAT_CHANERR_OFFSET, 4) == 0
    assert drv.fn.config_read(IOAT_PCI_CHANERR_INT_OFFSET, 4) == 0
    # and the channel works again
    s.write(s.iova + 0x10000, b"q" * 64)
    drv.memcpy_start(s.iova + 0x10000, s.iova + 0x20000, 64, 1, False)
    assert drv.memcpy_wait() == 0 and s.read(s.iova + 0x20000, 64) == b"q" * 64


def test_unmapped_destination_is_a_lost_posted_write(vendor: str) -> None:
    s, drv = setup(vendor)
    faults = s.fn.iommu.stats.faults
    drv.memcpy_start(s.iova, 1 << 40, 64, 1, False)
    assert drv.memcpy_wait() == 0  # the channel never learns; the IOMMU logged it
    assert s.fn.iommu.stats.faults == faults + 1
    assert s.fn.iommu.fault_log[-1].write


def test_flr_resets_the_channel(vendor: str) -> None:
    s, drv = setup(vendor)
    drv.memcpy_start(s.iova, s.iova + 64, 64, 1, False)
    assert drv.memcpy_wait() == 0
    s.fn.reset()
    assert s.fn.config_read(R.PCI_COMMAND, 2) == 0 and not s.fn.msix_enabled()
    s.fn.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MEMORY)
    assert drv.status() == IOAT_CHANSTS_HALTED
    assert drv.readb(IOAT_INTRCTRL_OFFSET) == 0


def test_bus_master_off_stops_the_channel(vendor: str) -> None:
    s, drv = setup(vendor)
    s.write(s.iova, b"k" * 64)
    s.write(s.iova + 64, b"-" * 64)
    s.fn.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MEMORY)  # Bus Master off
    faults = s.fn.iommu.stats.faults
    drv.memcpy_start(s.iova, s.iova + 64, 64, 1, False)
    assert drv.status() == IOAT_CHANSTS_HALTED
    assert drv.fn.mmio_read(0, CHAN + IOAT_CHANERR_OFFSET, 4) == IOAT_CHANERR_READ_DATA_ERR
    assert s.fn.iommu.stats.faults == faults  # nothing reached the IOMMU
    assert s.read(s.iova + 64, 64) == b"-" * 64
