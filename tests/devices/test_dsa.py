"""DSA driven through its registers exactly as the VFIO selftest driver (lib/drivers/dsa/dsa.c)
programs it, behind the mock and AMD IOMMUs: memmove and batches copied by DMA, completion
records, the completion interrupt, a read fault reported in the record and the IOMMU's log."""

from __future__ import annotations

import struct

import pytest

from iommufd_model.devices import pci_regs as R
from iommufd_model.devices.dsa import (
    DSA_COMP_BATCH_FAIL,
    DSA_COMP_HW_ERR1,
    DSA_COMP_SUCCESS,
    DSA_OPCODE_BATCH,
    DSA_OPCODE_MEMMOVE,
    IDXD_CMD_ENABLE_DEVICE,
    IDXD_CMD_ENABLE_WQ,
    IDXD_CMD_OFFSET,
    IDXD_CMD_REQUEST_INT_HANDLE,
    IDXD_CMD_RESET_DEVICE,
    IDXD_CMDCAP_OFFSET,
    IDXD_CMDSTS_ACTIVE,
    IDXD_CMDSTS_ERR_BUSMASTER_EN,
    IDXD_CMDSTS_ERR_DEV_NOTEN,
    IDXD_CMDSTS_OFFSET,
    IDXD_ENGCAP_OFFSET,
    IDXD_GENCAP_OFFSET,
    IDXD_GRPCAP_OFFSET,
    IDXD_OP_FLAG_CRAV,
    IDXD_OP_FLAG_RCI,
    IDXD_OP_FLAG_RCR,
    IDXD_SWERR_OFFSET,
    IDXD_TABLE_MULT,
    IDXD_TABLE_OFFSET,
    IDXD_WQCAP_OFFSET,
    IDXD_WQCFG_MIN,
    PCI_DEVICE_ID_INTEL_DSA_SPR0,
    DsaFunction,
)
from iommufd_model.hw import bits

from .conftest import DmaSetup, dma_setup, driver_setup

MSIX_VECTOR = 1
# struct dsa_state offsets in the driver region
BATCH = 0  # struct dsa_hw_desc batch[32]
COPY = 32 * 64  # struct dsa_hw_desc copy[1024]
COPY_COMPLETION = COPY + 1024 * 64
BATCH_COMPLETION = COPY_COMPLETION + 32
MSI_SRC = BATCH_COMPLETION + 32
MSI_DST = MSI_SRC + 8


def desc(
    opcode: int, flags: int, cra: int, src: int, dst: int, size: int, handle: int = 0
) -> bytes:
    dw0 = 1 << 31  # .priv = 1
    return struct.pack("<IIQQQIH", dw0, flags | opcode << 24, cra, src, dst, size, handle).ljust(
        64, b"\0"
    )


class DsaDriver:
    """The selftest driver's register programming, in Python."""

    def __init__(self, s: DmaSetup) -> None:
        self.s = s
        self.fn = s.fn
        self.region = s.iova + (1 << 21)
        self.irqs: list[tuple[str, int]] = []
        self.fn.irq_sink = lambda kind, vector: self.irqs.append((kind, vector))
        self.fn.config_write(R.PCI_COMMAND, 2, R.PCI_COMMAND_MEMORY)  # pci_enable_device
        self.memcpy_count = 0

    def readq(self, off: int) -> int:
        return self.fn.mmio_read(0, off, 8)

    def check_sw_err(self) -> None:
        assert not self.readq(IDXD_SWERR_OFFSET) & 1, "Software Error Detected!"

    def probe(self) -> bool:
        if self.fn.config_read(0, 2) != R.PCI_VENDOR_ID_INTEL:
            return False
        if self.fn.config_read(2, 2) != PCI_DEVICE_ID_INTEL_DSA_SPR0:
            return False
        gencap = self.readq(IDXD_GENCAP_OFFSET)
        if bits.get(gencap, 4, 4):
            cmd_cap = self.fn.mmio_read(0, IDXD_CMDCAP_OFFSET, 4)
            return not cmd_cap >> IDXD_CMD_REQUEST_INT_HANDLE & 1
        return True

    def command(self, cmd: int) -> int:
        self.fn.mmio_write(0, IDXD_CMD_OFFSET, 4, cmd << 20)
        for _ in range(5000):
            self.check_sw_err()
            status = self.fn.mmio_read(0, IDXD_CMDSTS_OFFSET, 4)
            if not status & IDXD_CMDSTS_ACTIVE:
                return status & 0xFF
        raise AssertionError("command never completed")

    def init(self) -> None:
        cmd = R.PCI_COMMAND_MEMORY | R.PCI_COMMAND_MASTER | R.PCI_COMMAND_INTX_DISABLE
        self.fn.config_write(R.PCI_COMMAND, 2, cmd)
        assert self.command(IDXD_CMD_RESET_DEVICE) == 0
        # dsa_register_cache_init
        self.gen_cap = self.readq(IDXD_GENCAP_OFFSET)
        self.wq_cap = self.readq(IDXD_WQCAP_OFFSET)
        group_cap = self.readq(IDXD_GRPCAP_OFFSET)
        engine_cap = self.readq(IDXD_ENGCAP_OFFSET)
        offsets = self.readq(IDXD_TABLE_OFFSET)
        grpcfg = bits.get(offsets, 15, 0) * IDXD_TABLE_MULT
        wqcfg = bits.get(offsets, 31, 16) * IDXD_TABLE_MULT
        max_xfer_shift = bits.get(self.gen_cap, 20, 16)
        max_batch_shift = bits.get(self.gen_cap, 24, 21)
        total_wq_size = bits.get(self.wq_cap, 15, 0)
        self.max_batches = min(1 << ((total_wq_size + IDXD_WQCFG_MIN) & 31), 32)
        self.max_copies_per_batch = min(1 << max_batch_shift, 1024)
        # dsa_wq_init
        assert bits.get(self.wq_cap, 23, 16) > 0
        dw = [0] * 16
        dw[0] = total_wq_size
        dw[2] = 1 | (1 << 4) | (bits.get(self.wq_cap, 50, 50) << 2)  # mode, priority, ats
        dw[3] = max_xfer_shift | max_batch_shift << 5
        op_config = (1 << DSA_OPCODE_MEMMOVE) | (1 << DSA_OPCODE_BATCH)
        dw[8], dw[9] = op_config & 0xFFFFFFFF, op_config >> 32
        size = 1 << (bits.get(self.wq_cap, 27, 24) + IDXD_WQCFG_MIN)
        for i in range(size // 4):
            self.fn.mmio_write(0, wqcfg + 4 * i, 4, dw[i])
        # dsa_group_init
        assert group_cap & 0xFF and engine_cap & 0xFF
        self.fn.mmio_write(0, grpcfg, 8, 1)
        self.fn.mmio_write(0, grpcfg + 32, 8, 1)
        assert self.command(IDXD_CMD_ENABLE_DEVICE) == 0
        assert self.command(IDXD_CMD_ENABLE_WQ) == 0
        self.fn.irq_setup("msix", MSIX_VECTOR + 1)  # vfio_pci_msix_enable(device, 1, 1)
        self.max_memcpy_size = 1 << max_xfer_shift
        self.max_memcpy_count = self.max_batches * self.max_copies_per_batch

    def remove(self) -> None:
        assert self.command(IDXD_CMD_RESET_DEVICE) == 0
        self.fn.irq_teardown("msix")

    def submit(self, raw: bytes) -> None:
        self.fn.mmio_write64b(2, 0, raw)  # iosubmit_cmds512 to the WQ 0 portal

    def copy_desc(self, src: int, dst: int, size: int, interrupt: bool) -> bytes:
        flags = IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR | (IDXD_OP_FLAG_RCI if interrupt else 0)
        cra = self.region + COPY_COMPLETION
        return desc(DSA_OPCODE_MEMMOVE, flags, cra, src, dst, size, MSIX_VECTOR * interrupt)

    def memcpy_one(self, src: int, dst: int, size: int, interrupt: bool) -> None:
        self.s.write(self.region + COPY_COMPLETION, bytes(32))
        raw = self.copy_desc(src, dst, size, interrupt)
        self.s.write(self.region + COPY, raw)
        self.submit(raw)

    def memcpy_batch(self, src: int, dst: int, size: int, count: int) -> None:
        self.s.write(self.region + BATCH_COMPLETION, bytes(32))
        copy = bytearray(self.copy_desc(src, dst, size, False))
        copy[4] &= ~IDXD_OP_FLAG_RCR
        self.s.write(self.region + COPY, bytes(copy) * 1024)
        for i in range(32):
            if not count:
                break
            nr = min(count, self.max_copies_per_batch)
            count -= nr
            if count == 1:
                nr, count = nr - 1, count + 1
            flags = IDXD_OP_FLAG_CRAV | (0 if count else IDXD_OP_FLAG_RCR)
            raw = desc(
                DSA_OPCODE_BATCH, flags, self.region + BATCH_COMPLETION, self.region + COPY, 0, nr
            )
            self.s.write(self.region + BATCH + 64 * i, raw)
            self.submit(raw)
        assert count == 0

    def memcpy_start(self, src: int, dst: int, size: int, count: int) -> None:
        if count == 1:
            self.memcpy_one(src, dst, size, False)
        else:
            self.memcpy_batch(src, dst, size, count)
        self.memcpy_count = count

    def completion(self, which: int) -> tuple[int, int, int]:
        status, _, _, done, fault = struct.unpack("<BBHIQ", self.s.read(self.region + which, 16))
        return status, done, fault

    def memcpy_wait(self) -> int:
        which = COPY_COMPLETION if self.memcpy_count == 1 else BATCH_COMPLETION
        self.check_sw_err()
        status = self.completion(which)[0]
        assert status, "no completion record"
        return 0 if status == DSA_COMP_SUCCESS else -1

    def send_msi(self) -> None:
        self.memcpy_one(self.region + MSI_SRC, self.region + MSI_DST, 8, True)
        self.memcpy_count = 1
        assert self.memcpy_wait() == 0


def setup(vendor: str) -> tuple[DmaSetup, DsaDriver]:
    return driver_setup(vendor, "dsa", DsaDriver)


def test_memcpy_one_and_batches(vendor: str) -> None:
    s, drv = setup(vendor)
    size = drv.max_memcpy_size
    src, dst = s.copy_buffers(size)
    drv.memcpy_start(src, dst, size, 1)
    assert drv.memcpy_wait() == 0 and s.read(dst, size) == s.read(src, size)
    assert drv.irqs == []
    assert isinstance(s.fn, DsaFunction)
    before = s.fn.submissions
    s.write(dst, b"y" * size)
    drv.memcpy_start(src, dst, size, 2 * drv.max_copies_per_batch + 1)  # 3 batches: N, N-1, 2
    assert drv.memcpy_wait() == 0 and s.read(dst, size) == s.read(src, size)
    assert s.fn.submissions - before == 3
    assert drv.completion(BATCH_COMPLETION) == (DSA_COMP_SUCCESS, 2, 0)
    drv.remove()


def test_send_msi_and_init_remove(vendor: str) -> None:
    s, drv = setup(vendor)
    for _ in range(3):
        drv.remove()
        drv.init()
    drv.send_msi()
    assert drv.irqs == [("msix", MSIX_VECTOR)]
    assert s.read(drv.region + MSI_DST, 8) == s.read(drv.region + MSI_SRC, 8)


def test_identical_portal_writes_are_separate_submissions(vendor: str) -> None:
    s, drv = setup(vendor)
    s.write(s.iova, b"a" * 64)
    raw = drv.copy_desc(s.iova, s.iova + 64, 64, True)
    drv.submit(raw)
    drv.submit(raw)
    assert drv.irqs == [("msix", 1), ("msix", 1)]


def test_read_fault_mid_stream(vendor: str) -> None:
    s, drv = setup(vendor)
    va, buf = s.map_area(1 << 16)
    s.proc.write(va, b"s" * 4096)
    drv.memcpy_start(buf, s.iova, 4096, 4)
    assert drv.memcpy_wait() == 0 and s.read(s.iova, 4096) == b"s" * 4096
    log = len(s.fn.iommu.fault_log)
    s.unmap(buf, 1 << 16)
    drv.memcpy_start(buf, s.iova, 4096, 4)
    assert drv.memcpy_wait() == -1
    status, done, _ = drv.completion(BATCH_COMPLETION)
    assert (status, done) == (DSA_COMP_BATCH_FAIL, 0)
    status, _, fault = drv.completion(COPY_COMPLETION)  # the copies' shared record
    assert (status, fault) == (DSA_COMP_HW_ERR1, buf)
    assert len(s.fn.iommu.fault_log) == log + 4 and s.fn.iommu.fault_log[log].iova == buf
    assert drv.irqs == []
    drv.check_sw_err()  # reported in completion records, not SWERR
    # a single memmove from the hole reports it in its own record too
    drv.memcpy_start(buf, s.iova, 64, 1)
    assert drv.memcpy_wait() == -1
    assert drv.completion(COPY_COMPLETION) == (DSA_COMP_HW_ERR1, 0, buf)


def test_commands_refuse_as_cmdsts_says() -> None:
    s = dma_setup("mock", "dsa")
    drv = DsaDriver(s)
    assert drv.command(IDXD_CMD_RESET_DEVICE) == 0
    assert drv.command(IDXD_CMD_ENABLE_WQ) == IDXD_CMDSTS_ERR_DEV_NOTEN
    assert drv.command(IDXD_CMD_ENABLE_DEVICE) == IDXD_CMDSTS_ERR_BUSMASTER_EN
    # a descriptor to a disabled WQ is dropped
    drv.submit(desc(DSA_OPCODE_MEMMOVE, IDXD_OP_FLAG_RCI, 0, s.iova, s.iova, 8, 1))
    assert isinstance(s.fn, DsaFunction) and s.fn.submissions == 0


def test_misaligned_completion_record_goes_to_swerr() -> None:
    s, drv = setup("mock")
    raw = desc(DSA_OPCODE_MEMMOVE, IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR, s.iova + 8, 0, 0, 8)
    drv.submit(raw)
    with pytest.raises(AssertionError, match="Software Error"):
        drv.check_sw_err()
    swerr = drv.readq(IDXD_SWERR_OFFSET)
    assert bits.get(swerr, 15, 8) == 0x1B and bits.get(swerr, 39, 32) == DSA_OPCODE_MEMMOVE
    drv.fn.mmio_write(0, IDXD_SWERR_OFFSET, 8, 3)  # IDXD_SWERR_ACK
    drv.check_sw_err()


def test_pasid_from_wqcfg_tags_the_dma() -> None:
    s, drv = setup("mock")
    assert drv.command(IDXD_CMD_RESET_DEVICE) == 0
    drv.init()
    # WQ config with pasid_en: the engine's DMA carries the WQ's PASID (the mock has no
    # PASID table for 5, so the read faults with that PASID in the IOMMU's record)
    assert drv.command(2) == 0  # IDXD_CMD_DISABLE_DEVICE
    wqcfg = bits.get(drv.readq(IDXD_TABLE_OFFSET), 31, 16) * IDXD_TABLE_MULT
    dw2 = drv.fn.mmio_read(0, wqcfg + 8, 4)
    drv.fn.mmio_write(0, wqcfg + 8, 4, dw2 | 5 << 8 | 1 << 28)
    assert drv.command(IDXD_CMD_ENABLE_DEVICE) == 0
    assert drv.command(IDXD_CMD_ENABLE_WQ) == 0
    log = len(s.fn.iommu.fault_log)
    drv.memcpy_one(s.iova, s.iova + 64, 64, False)
    assert len(s.fn.iommu.fault_log) > log and s.fn.iommu.fault_log[log].pasid == 5
