"""Intel I/OAT (Crystal Beach DMA, CBDMA) v3.3 with one channel, at register level.

Registers, bits, device IDs and the descriptor layout are those of Linux 7.2's
drivers/dma/ioat/{registers.h,hw.h} (mirrored in the VFIO selftest driver
tools/testing/selftests/vfio/lib/drivers/ioat/), and the behaviour is what that selftest
driver and drivers/dma/ioat/dma.c rely on:

- BAR0 holds the device registers (CHANCNT, XFERCAP, INTRCTRL, ATTNSTATUS, VER...) and the
  channel registers at 0x80 (IOAT_CHANNEL_MMIO_SIZE): CHANCTRL, CHANCMD, DMACOUNT, CHANSTS,
  CHAINADDR, CHANCMP, CDAR, CHANERR;
- software writes CHAINADDR (the first 64-byte descriptor), then DMACOUNT: the channel fetches
  and executes descriptors, following ``next``, until its completed count equals DMACOUNT
  (16 bits, wrapping); CHANSTS then reads DONE with the last completed descriptor's address;
- CHANCMD RESET resets the channel (CHANSTS HALTED, the reset bit reads back clear once
  done), SUSPEND parks it (SUSPENDED), ABORT halts it;
- a descriptor with ``compl_write`` has the channel write CHANSTS to the CHANCMP address; one
  with ``int_en`` interrupts when CHANCTRL's INT_REARM is armed (the arm is consumed);
- an error sets CHANERR and halts the channel (CHANSTS HALTED), as ioat_memcpy_wait expects.

Everything runs synchronously inside the MMIO write of DMACOUNT (or CHANCMD RESUME), so a
status read right after the doorbell sees the result.

Model choices (labelled in docs/devices.md): one channel; only the copy operation (and
``null`` descriptors); XFERCAP advertises 4 KiB by default; a DMA read the IOMMU refuses is a
Read Data Error (CHANERR bit 8) that halts the channel, a refused DMA write is a posted write
the IOMMU drops (the channel cannot see it; the IOMMU logs the fault); channel errors are also
latched in the config-space CHANERR_INT register (RW1C), DMAUNCERRSTS is never set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommufd_model.devices.config import ConfigSpace, RegisterBytes
from iommufd_model.devices.function import Bar, DmaBlocked, FunctionSpec, PciFunction
from iommufd_model.hw import bits
from iommufd_model.hw.iommu import DmaFault

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw

PCI_DEVICE_ID_INTEL_IOAT_SKX = 0x2021
PCI_DEVICE_ID_INTEL_IOAT_ICX = 0x0B00

# Config space (registers.h)
IOAT_PCI_DMAUNCERRSTS_OFFSET = 0x148
IOAT_PCI_CHANERR_INT_OFFSET = 0x180
IOAT_PCI_CHANERRMASK_INT_OFFSET = 0x184

# Device registers (BAR0)
IOAT_CHANCNT_OFFSET = 0x00
IOAT_XFERCAP_OFFSET = 0x01
IOAT_XFERCAP_4KB = 12
IOAT_GENCTRL_OFFSET = 0x02
IOAT_INTRCTRL_OFFSET = 0x03
IOAT_INTRCTRL_MASTER_INT_EN = 0x01
IOAT_INTRCTRL_INT_STATUS = 0x02
IOAT_INTRCTRL_INT = 0x04
IOAT_INTRCTRL_MSIX_VECTOR_CONTROL = 0x08
IOAT_ATTNSTATUS_OFFSET = 0x04
IOAT_VER_OFFSET = 0x08
IOAT_VER_3_3 = 0x33
IOAT_PERPORTOFFSET_OFFSET = 0x0A
IOAT_INTRDELAY_OFFSET = 0x0C
IOAT_DEVICE_STATUS_OFFSET = 0x0E
IOAT_DMA_CAP_OFFSET = 0x10
IOAT_CHANNEL_MMIO_SIZE = 0x80

# Channel registers (relative to the channel's block)
IOAT_CHANCTRL_OFFSET = 0x00
IOAT_CHANCTRL_INT_REARM = 0x0001
IOAT_CHANCTRL_ERR_COMPLETION_EN = 0x0004
IOAT_CHANCTRL_ANY_ERR_ABORT_EN = 0x0008
IOAT_CHANCTRL_ERR_INT_EN = 0x0010
IOAT_DMA_COMP_OFFSET = 0x02
IOAT_DMA_COMP_V2 = 0x0002
IOAT2_CHANCMD_OFFSET = 0x04
IOAT_CHANCMD_RESET = 0x20
IOAT_CHANCMD_RESUME = 0x10
IOAT_CHANCMD_ABORT = 0x08
IOAT_CHANCMD_SUSPEND = 0x04
IOAT_CHAN_DMACOUNT_OFFSET = 0x06
IOAT_CHANSTS_OFFSET = 0x08
IOAT_CHANSTS_STATUS = 0x7
IOAT_CHANSTS_ACTIVE = 0x0
IOAT_CHANSTS_DONE = 0x1
IOAT_CHANSTS_SUSPENDED = 0x2
IOAT_CHANSTS_HALTED = 0x3
IOAT2_CHAINADDR_OFFSET = 0x10
IOAT_CHANCMP_OFFSET = 0x18
IOAT_CDAR_OFFSET = 0x20
IOAT_CHANERR_OFFSET = 0x28
IOAT_CHANERR_NEXT_DESC_ALIGN_ERR = 0x0008
IOAT_CHANERR_CHAIN_ADDR_VALUE_ERR = 0x0010
IOAT_CHANERR_READ_DATA_ERR = 0x0100
IOAT_CHANERR_CONTROL_ERR = 0x0400
IOAT_CHANERR_LENGTH_ERR = 0x0800
IOAT_CHANERR_COMPLETION_ADDR_ERR = 0x1000
IOAT_CHANERR_MASK_OFFSET = 0x2C

# Descriptor (hw.h struct ioat_dma_descriptor)
IOAT_DESC_SZ = 64
IOAT_OP_COPY = 0x00
DESC_CTL_INT_EN = 0x01
DESC_CTL_COMPL_WRITE = 0x08
DESC_CTL_NULL = 0x20

CHAN = IOAT_CHANNEL_MMIO_SIZE  # channel 0's registers


class ChannelError(Exception):
    """A descriptor the channel cannot complete: ``chanerr`` holds the CHANERR bits."""

    def __init__(self, chanerr: int) -> None:
        super().__init__(f"CHANERR {chanerr:#x}")
        self.chanerr = chanerr


class IoatFunction(PciFunction):
    """A CBDMA function: BAR0 registers, one DMA channel, MSI-X vector 0 for it."""

    kind = "ioat"

    def __init__(
        self,
        iommu: IommuHw,
        rid: int,
        spec: FunctionSpec,
        *,
        xfercap: int = IOAT_XFERCAP_4KB,
        pasid_bits: int = 20,
        ats: bool = False,
    ) -> None:
        self.xfercap = xfercap
        self.regs = RegisterBytes(0x100)
        self._count = 0  # descriptors completed since CHAINADDR was written (16 bits)
        self._next = 0  # address of the next descriptor to fetch
        self._halted_on_error = False
        super().__init__(iommu, rid, spec, pasid_bits=pasid_bits, ats=ats)
        self.copies = 0  # descriptors executed since power-on (statistics)

    # -- power-on -----------------------------------------------------------------------
    def _build_config(self) -> ConfigSpace:
        cfg = super()._build_config()
        cfg.set(IOAT_PCI_DMAUNCERRSTS_OFFSET, 4, 0, w1c=0xFFFFFFFF)
        cfg.set(IOAT_PCI_CHANERR_INT_OFFSET, 4, 0, w1c=0xFFFFFFFF)
        cfg.set(IOAT_PCI_CHANERRMASK_INT_OFFSET, 4, 0, rw=0xFFFFFFFF)
        return cfg

    def reset_device(self) -> None:
        regs = RegisterBytes(0x100)
        regs.set(IOAT_CHANCNT_OFFSET, 1, 1)
        regs.set(IOAT_XFERCAP_OFFSET, 1, self.xfercap)
        regs.set(IOAT_GENCTRL_OFFSET, 1, 0, rw=0x01)
        regs.set(
            IOAT_INTRCTRL_OFFSET,
            1,
            0,
            rw=IOAT_INTRCTRL_MASTER_INT_EN | IOAT_INTRCTRL_MSIX_VECTOR_CONTROL,
        )
        regs.set(IOAT_VER_OFFSET, 1, IOAT_VER_3_3)
        regs.set(IOAT_PERPORTOFFSET_OFFSET, 2, IOAT_CHANNEL_MMIO_SIZE)
        regs.set(IOAT_INTRDELAY_OFFSET, 2, 0, rw=0x3FFF)
        regs.set(IOAT_DMA_CAP_OFFSET, 4, 0)  # no optional operations modelled
        regs.set(CHAN + IOAT_CHANCTRL_OFFSET, 2, 0, rw=0xF33D)
        regs.set(CHAN + IOAT_DMA_COMP_OFFSET, 2, IOAT_DMA_COMP_V2)
        regs.set(CHAN + IOAT2_CHANCMD_OFFSET, 1, 0, rw=0x3F)
        regs.set(CHAN + IOAT_CHAN_DMACOUNT_OFFSET, 2, 0, rw=0xFFFF)
        regs.set(CHAN + IOAT_CHANSTS_OFFSET, 8, IOAT_CHANSTS_HALTED)
        regs.set(CHAN + IOAT2_CHAINADDR_OFFSET, 8, 0, rw=(1 << 64) - 1)
        regs.set(CHAN + IOAT_CHANCMP_OFFSET, 8, 0, rw=(1 << 64) - 0x40)
        regs.set(CHAN + IOAT_CDAR_OFFSET, 8, 0)
        regs.set(CHAN + IOAT_CHANERR_OFFSET, 4, 0, w1c=0x7FFFF)
        regs.set(CHAN + IOAT_CHANERR_MASK_OFFSET, 4, 0, rw=0x7FFFF)
        self.regs = regs
        self._count = 0
        self._next = 0
        self._halted_on_error = False

    # -- MMIO -------------------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar != 0 or offset >= self.regs.size:
            return 0
        value = self.regs.read(offset, size)
        if offset <= IOAT_ATTNSTATUS_OFFSET < offset + size:
            self.regs.poke(IOAT_ATTNSTATUS_OFFSET, 4, 0)  # read clears (model)
        return value

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0 or offset >= self.regs.size:
            return
        self.regs.write(offset, size, value)

        def touched(reg: int, width: int = 1) -> bool:
            return offset < reg + width and reg < offset + size

        if touched(CHAN + IOAT2_CHAINADDR_OFFSET, 8):
            self._chainaddr_written()
        if touched(CHAN + IOAT2_CHANCMD_OFFSET):
            self._command(self.regs.peek(CHAN + IOAT2_CHANCMD_OFFSET, 1))
        if touched(CHAN + IOAT_CHAN_DMACOUNT_OFFSET, 2):
            self._run()

    # -- the channel ------------------------------------------------------------------
    @property
    def chansts(self) -> int:
        return self.regs.peek(CHAN + IOAT_CHANSTS_OFFSET, 8)

    def _status(self) -> int:
        return self.chansts & IOAT_CHANSTS_STATUS

    def _set_status(self, status: int, completed: int | None = None) -> None:
        old = self.chansts
        addr = old & ~0x3F if completed is None else completed & ~0x3F
        self.regs.poke(CHAN + IOAT_CHANSTS_OFFSET, 8, addr | status)

    def _chainaddr_written(self) -> None:
        """A new chain: the next fetch is CHAINADDR and the completed count restarts at 0
        (drivers/dma/ioat/dma.c zeroes its dmacount whenever it writes CHAINADDR)."""
        self._next = self.regs.peek(CHAN + IOAT2_CHAINADDR_OFFSET, 8)
        self._count = 0

    def _command(self, cmd: int) -> None:
        if cmd & IOAT_CHANCMD_RESET:
            self._channel_reset()
        elif cmd & IOAT_CHANCMD_ABORT:
            self._set_status(IOAT_CHANSTS_HALTED)
        elif cmd & IOAT_CHANCMD_SUSPEND:
            if self._status() != IOAT_CHANSTS_HALTED:
                self._set_status(IOAT_CHANSTS_SUSPENDED)
        elif cmd & IOAT_CHANCMD_RESUME and self._status() == IOAT_CHANSTS_SUSPENDED:
            self._run()
        # The command bits are self-clearing: the command completed synchronously.
        self.regs.poke(CHAN + IOAT2_CHANCMD_OFFSET, 1, 0)

    def _channel_reset(self) -> None:
        """CHANCMD RESET: the channel stops, forgets its chain and reads HALTED; CHANERR keeps
        its bits (software clears them, as ioat_clear_errors does before resetting)."""
        regs = self.regs
        regs.poke(CHAN + IOAT_CHANCTRL_OFFSET, 2, 0)
        regs.poke(CHAN + IOAT_CHAN_DMACOUNT_OFFSET, 2, 0)
        regs.poke(CHAN + IOAT2_CHAINADDR_OFFSET, 8, 0)
        regs.poke(CHAN + IOAT_CDAR_OFFSET, 8, 0)
        regs.poke(CHAN + IOAT_CHANSTS_OFFSET, 8, IOAT_CHANSTS_HALTED)
        self._count = 0
        self._next = 0
        self._halted_on_error = False

    def _run(self) -> None:
        """Execute descriptors until the completed count reaches DMACOUNT."""
        if self._halted_on_error:
            return
        target = self.regs.peek(CHAN + IOAT_CHAN_DMACOUNT_OFFSET, 2)
        if self._count == target:
            return
        if self._next & (IOAT_DESC_SZ - 1):
            self._error(IOAT_CHANERR_CHAIN_ADDR_VALUE_ERR)
            return
        self._set_status(IOAT_CHANSTS_ACTIVE)
        while self._count != target:
            addr = self._next
            self.regs.poke(CHAN + IOAT_CDAR_OFFSET, 8, addr)
            try:
                ctl, nxt = self._execute(addr)
            except ChannelError as exc:
                self._error(exc.chanerr)
                return
            self._count = (self._count + 1) & 0xFFFF
            self._next = nxt
            self._set_status(IOAT_CHANSTS_ACTIVE, addr)
            self.copies += 1
            if ctl & DESC_CTL_COMPL_WRITE and not self._write_completion():
                return
            if ctl & DESC_CTL_INT_EN:
                self._interrupt()
            if nxt & (IOAT_DESC_SZ - 1) and self._count != target:
                self._error(IOAT_CHANERR_NEXT_DESC_ALIGN_ERR)
                return
        self._set_status(IOAT_CHANSTS_DONE)

    def _execute(self, addr: int) -> tuple[int, int]:
        """Fetch and execute the descriptor at ``addr``: ``(ctl, next)``."""
        desc = self._read(addr, IOAT_DESC_SZ)
        size = int.from_bytes(desc[0:4], "little")
        ctl = int.from_bytes(desc[4:8], "little")
        src, dst, nxt = bits.words(desc[8:32])
        if ctl & DESC_CTL_NULL:
            return ctl, nxt
        if bits.get(ctl, 31, 24) != IOAT_OP_COPY:
            raise ChannelError(IOAT_CHANERR_CONTROL_ERR)
        if self.xfercap and size > 1 << self.xfercap:
            raise ChannelError(IOAT_CHANERR_LENGTH_ERR)
        if size:
            data = self._read(src, size)
            self._write(dst, data)
        return ctl, nxt

    def _read(self, iova: int, n: int) -> bytes:
        try:
            return self.dma_read(iova, n)
        except (DmaFault, DmaBlocked) as exc:
            raise ChannelError(IOAT_CHANERR_READ_DATA_ERR) from exc

    def _write(self, iova: int, data: bytes) -> None:
        self.posted_write(iova, data)

    def _write_completion(self) -> bool:
        """Write CHANSTS to the CHANCMP address; False (channel halted) if it has none."""
        cmp = self.regs.peek(CHAN + IOAT_CHANCMP_OFFSET, 8)
        if not cmp:
            self._error(IOAT_CHANERR_COMPLETION_ADDR_ERR)
            return False
        self._write(cmp, self.chansts.to_bytes(8, "little"))
        return True

    def _error(self, chanerr: int) -> None:
        regs = self.regs
        regs.poke(CHAN + IOAT_CHANERR_OFFSET, 4, regs.peek(CHAN + IOAT_CHANERR_OFFSET, 4) | chanerr)
        mirror = self.config.peek(IOAT_PCI_CHANERR_INT_OFFSET, 4)
        self.config.poke(IOAT_PCI_CHANERR_INT_OFFSET, 4, mirror | chanerr)
        self._set_status(IOAT_CHANSTS_HALTED)
        self._halted_on_error = True
        ctrl = regs.peek(CHAN + IOAT_CHANCTRL_OFFSET, 2)
        if ctrl & IOAT_CHANCTRL_ERR_COMPLETION_EN:
            cmp = regs.peek(CHAN + IOAT_CHANCMP_OFFSET, 8)
            if cmp:
                self._write(cmp, self.chansts.to_bytes(8, "little"))
        if ctrl & IOAT_CHANCTRL_ERR_INT_EN:
            self._interrupt(force=True)

    def _interrupt(self, force: bool = False) -> None:
        """The channel's interrupt: consumes CHANCTRL INT_REARM (error interrupts do not
        need it) and goes out as MSI-X vector 0 when INTRCTRL enables the MSI-X vectors, or
        through ATTNSTATUS and MSI/INTx when Master Interrupt Enable is set."""
        regs = self.regs
        ctrl = regs.peek(CHAN + IOAT_CHANCTRL_OFFSET, 2)
        if not (ctrl & IOAT_CHANCTRL_INT_REARM or force):
            return
        regs.poke(CHAN + IOAT_CHANCTRL_OFFSET, 2, ctrl & ~IOAT_CHANCTRL_INT_REARM)
        intrctrl = regs.peek(IOAT_INTRCTRL_OFFSET, 1)
        if self.msix_enabled():
            if intrctrl & IOAT_INTRCTRL_MSIX_VECTOR_CONTROL:
                self.signal(0)
            return
        regs.poke(IOAT_ATTNSTATUS_OFFSET, 4, regs.peek(IOAT_ATTNSTATUS_OFFSET, 4) | 1)
        status = intrctrl | IOAT_INTRCTRL_INT_STATUS
        if intrctrl & IOAT_INTRCTRL_MASTER_INT_EN:
            status |= IOAT_INTRCTRL_INT
            self.signal(0)
        regs.poke(IOAT_INTRCTRL_OFFSET, 1, status)


def ioat(
    iommu: IommuHw,
    rid: int,
    *,
    device_id: int = PCI_DEVICE_ID_INTEL_IOAT_SKX,
    xfercap: int = IOAT_XFERCAP_4KB,
    pasid_bits: int = 20,
    ats: bool = False,
) -> IoatFunction:
    """The ``ioat`` kind: a Skylake-SP CBDMA channel function (the ID the selftest matches)."""
    if not 0 <= xfercap <= 31:
        raise ValueError(f"XFERCAP {xfercap} is not a 5-bit shift")
    bars = (Bar(0x4000, mem64=True), None, None, None, None, None)
    spec = FunctionSpec.intel_dma_engine(device_id, 0x04, bars, 1, msi_vectors=1)
    return IoatFunction(iommu, rid, spec, xfercap=xfercap, pasid_bits=pasid_bits, ats=ats)
