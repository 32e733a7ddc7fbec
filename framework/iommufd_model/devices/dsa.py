"""Intel Data Streaming Accelerator (DSA, idxd) at register level.

Register offsets, fields, commands, command status codes, descriptor and completion record
layouts are those of Linux 7.2's drivers/dma/idxd/registers.h (mirrored in the VFIO
selftest driver tools/testing/selftests/vfio/lib/drivers/dsa/registers.h) and
include/uapi/linux/idxd.h. The behaviour is what the selftest driver (lib/drivers/dsa/dsa.c)
relies on:

- BAR0: VER, GENCAP, WQCAP, GRPCAP, ENGCAP, OPCAP, TABLE_OFFSET (GRPCFG and WQCFG tables in
  units of IDXD_TABLE_MULT), GENCFG, GENCTRL, GENSTS, INTCAUSE, CMD + CMDSTS, CMDCAP, SWERR;
- CMD runs synchronously (CMDSTS reads not-active with the error code at once): reset
  device, enable/disable device, enable/disable/reset WQ, drain and abort commands;
- BAR2 holds the WQ portals, four 4 KiB pages per WQ (idxd's ``(wq * 4 + prot) <<
  PAGE_SHIFT``); each 64-byte write (MOVDIR64B) to an enabled dedicated WQ's portal is one
  submission, executed at once: memmove, batch (descriptor list fetched by DMA, at least 2
  and at most 2^max_batch_shift entries), drain and no-op;
- completion records (32 bytes) are written by DMA when Request Completion Record is set,
  or on error when the Completion Record Address is valid; Request Completion Interrupt
  sends MSI-X vector ``int_handle``;
- PASID: a dedicated WQ tags its DMA with the WQCFG PASID when ``pasid_en`` is set
  (untagged otherwise, as the selftest configures it); the descriptor's PASID field is
  ignored on a dedicated WQ.

Model choices (docs/devices.md): one group, one engine, ``num_wqs`` WQs (default 1)
sharing a total size of 32 entries; dedicated mode only (shared-WQ ENQCMD submission is not
modelled); max transfer 4 KiB (GENCAP max_xfer_shift 12) by default, batches of up to 1024;
a memory read the IOMMU refuses completes the descriptor with status DSA_COMP_HW_ERR1 and the
faulting address (ATS off, so no page-fault status); a refused write is a posted write
the IOMMU drops; descriptors that cannot be reported in a completion record (a bad
completion address alignment) go to SWERR.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import attrs

from iommufd_model.devices.config import RegisterBytes
from iommufd_model.devices.function import Bar, DmaBlocked, FunctionSpec, PciFunction
from iommufd_model.hw import bits
from iommufd_model.hw.iommu import DmaFault

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw

PCI_DEVICE_ID_INTEL_DSA_SPR0 = 0x0B25
PCI_DEVICE_ID_INTEL_DSA_GNRD = 0x11FB
PCI_DEVICE_ID_INTEL_DSA_DMR = 0x1212
DEVICE_VERSION_1 = 0x100

IDXD_VER_OFFSET = 0x00
IDXD_GENCAP_OFFSET = 0x10
IDXD_WQCAP_OFFSET = 0x20
IDXD_WQCFG_MIN = 5
IDXD_GRPCAP_OFFSET = 0x30
IDXD_ENGCAP_OFFSET = 0x38
IDXD_OPCAP_OFFSET = 0x40
IDXD_TABLE_OFFSET = 0x60
IDXD_TABLE_MULT = 0x100
IDXD_GENCFG_OFFSET = 0x80
IDXD_GENCTRL_OFFSET = 0x88
IDXD_GENSTATS_OFFSET = 0x90
IDXD_INTCAUSE_OFFSET = 0x98
IDXD_INTC_ERR = 0x01
IDXD_INTC_CMD = 0x02
IDXD_CMD_OFFSET = 0xA0
IDXD_CMDSTS_OFFSET = 0xA8
IDXD_CMDSTS_ACTIVE = 0x80000000
IDXD_CMDCAP_OFFSET = 0xB0
IDXD_SWERR_OFFSET = 0xC0
IDXD_SWERR_VALID = 0x1
IDXD_SWERR_OVERFLOW = 0x2

IDXD_DEVICE_STATE_DISABLED = 0
IDXD_DEVICE_STATE_ENABLED = 1
IDXD_DEVICE_STATE_HALT = 3

# enum idxd_cmd
IDXD_CMD_ENABLE_DEVICE = 1
IDXD_CMD_DISABLE_DEVICE = 2
IDXD_CMD_DRAIN_ALL = 3
IDXD_CMD_ABORT_ALL = 4
IDXD_CMD_RESET_DEVICE = 5
IDXD_CMD_ENABLE_WQ = 6
IDXD_CMD_DISABLE_WQ = 7
IDXD_CMD_DRAIN_WQ = 8
IDXD_CMD_ABORT_WQ = 9
IDXD_CMD_RESET_WQ = 10
IDXD_CMD_DRAIN_PASID = 11
IDXD_CMD_ABORT_PASID = 12
IDXD_CMD_REQUEST_INT_HANDLE = 13
SUPPORTED_COMMANDS = range(IDXD_CMD_ENABLE_DEVICE, IDXD_CMD_ABORT_PASID + 1)

# enum idxd_cmdsts_err
IDXD_CMDSTS_INVAL_CMD = 0x01
IDXD_CMDSTS_INVAL_WQIDX = 0x02
IDXD_CMDSTS_ERR_DEV_ENABLED = 0x10
IDXD_CMDSTS_ERR_BUSMASTER_EN = 0x12
IDXD_CMDSTS_ERR_WQ_SIZE_ERANGE = 0x14
IDXD_CMDSTS_ERR_GRP_CONFIG = 0x15
IDXD_CMDSTS_ERR_DEV_NOTEN = 0x20
IDXD_CMDSTS_ERR_WQ_ENABLED = 0x21
IDXD_CMDSTS_ERR_WQ_SIZE = 0x22
IDXD_CMDSTS_ERR_WQ_MODE = 0x24
IDXD_CMDSTS_ERR_MAX_BATCH_SIZE = 0x27
IDXD_CMDSTS_ERR_MAX_XFER_SIZE = 0x28
IDXD_CMDSTS_ERR_DIS_DEV_EN = 0x31
IDXD_CMDSTS_ERR_DEV_NOT_EN = 0x32

# include/uapi/linux/idxd.h
IDXD_OP_FLAG_CRAV = 0x0004
IDXD_OP_FLAG_RCR = 0x0008
IDXD_OP_FLAG_RCI = 0x0010
DSA_OPCODE_NOOP = 0
DSA_OPCODE_BATCH = 1
DSA_OPCODE_DRAIN = 2
DSA_OPCODE_MEMMOVE = 3
DSA_COMP_SUCCESS = 0x01
DSA_COMP_BATCH_FAIL = 0x05
DSA_COMP_BAD_OPCODE = 0x10
DSA_COMP_XFER_ERANGE = 0x13
DSA_COMP_DESC_CNT_ERANGE = 0x14
DSA_COMP_DESCLIST_ALIGN = 0x18
DSA_COMP_INT_HANDLE_INVAL = 0x19
DSA_COMP_CRA_ALIGN = 0x1B
DSA_COMP_HW_ERR1 = 0x20
DSA_COMPLETION_SIZE = 32
DSA_DESC_SIZE = 64

IDXD_PORTAL_SIZE = 0x1000
PORTALS_PER_WQ = 4

# Where this model puts its tables in BAR0 (TABLE_OFFSET reports them).
GRPCFG_TABLE = 0x400
WQCFG_TABLE = 0x500
WQCFG_SIZE_FIELD = 1  # WQCAP.wqcfg_size: 1 << (1 + IDXD_WQCFG_MIN) = 64-byte WQCFG entries
WQCFG_BYTES = 1 << (WQCFG_SIZE_FIELD + IDXD_WQCFG_MIN)
GRPCFG_SIZE = 64
TOTAL_WQ_SIZE = 32
MAX_BATCH_SHIFT = 10


@attrs.define
class Descriptor:
    """A 64-byte DSA descriptor (struct dsa_hw_desc), as the fields this model executes."""

    pasid: int
    priv: int
    flags: int
    opcode: int
    completion_addr: int
    src: int  # src_addr / desc_list_addr
    dst: int
    size: int  # xfer_size / desc_count
    int_handle: int

    @classmethod
    def decode(cls, raw: bytes) -> Descriptor:
        dw0, dw1, cra, src, dst, size, handle = struct.unpack_from("<IIQQQIH", raw)
        return cls(
            bits.get(dw0, 19, 0),
            bits.get(dw0, 31, 31),
            bits.get(dw1, 23, 0),
            bits.get(dw1, 31, 24),
            cra,
            src,
            dst,
            size,
            handle,
        )


class DescriptorError(Exception):
    """A descriptor that completes with ``status`` (``fault_addr`` when a read failed)."""

    def __init__(self, status: int, fault_addr: int = 0, done: int = 0) -> None:
        super().__init__(f"DSA status {status:#x}")
        self.status = status
        self.fault_addr = fault_addr
        self.done = done


class DsaFunction(PciFunction):
    """A DSA function: BAR0 registers and tables, BAR2 WQ portals, MSI-X 0 + one per WQ."""

    kind = "dsa"

    def __init__(
        self,
        iommu: IommuHw,
        rid: int,
        spec: FunctionSpec,
        *,
        num_wqs: int = 1,
        max_xfer_shift: int = 12,
        pasid_bits: int = 20,
        ats: bool = False,
    ) -> None:
        self.num_wqs = num_wqs
        self.max_xfer_shift = max_xfer_shift
        self.regs = RegisterBytes(0x1000)
        self.submissions = 0  # descriptors accepted through a portal (statistics)
        super().__init__(iommu, rid, spec, pasid_bits=pasid_bits, ats=ats)

    # -- power-on / RESET_DEVICE ---------------------------------------------------------
    def reset_device(self) -> None:
        regs = RegisterBytes(0x1000)
        regs.set(IDXD_VER_OFFSET, 4, DEVICE_VERSION_1)
        gencap = (
            bits.bit(1)  # overlap_copy
            | bits.bit(4)  # cmd_cap: CMDCAP lists the commands
            | bits.put(self.max_xfer_shift, 20, 16)
            | bits.put(MAX_BATCH_SHIFT, 24, 21)
            | bits.bit(31)  # config_en
        )
        regs.set(IDXD_GENCAP_OFFSET, 8, gencap)
        wqcap = (
            bits.put(TOTAL_WQ_SIZE, 15, 0)
            | bits.put(self.num_wqs, 23, 16)
            | bits.put(WQCFG_SIZE_FIELD, 27, 24)
            | bits.bit(49)  # dedicated_mode
            | bits.bit(51)  # priority
            | bits.bit(54)  # op_config
        )
        regs.set(IDXD_WQCAP_OFFSET, 8, wqcap)
        regs.set(IDXD_GRPCAP_OFFSET, 8, bits.put(1, 7, 0) | bits.put(8, 15, 8))
        regs.set(IDXD_ENGCAP_OFFSET, 8, 1)
        opcap = (1 << DSA_OPCODE_NOOP) | (1 << DSA_OPCODE_BATCH) | (1 << DSA_OPCODE_DRAIN)
        regs.set(IDXD_OPCAP_OFFSET, 8, opcap | (1 << DSA_OPCODE_MEMMOVE))
        offsets = bits.put(GRPCFG_TABLE // IDXD_TABLE_MULT, 15, 0) | bits.put(
            WQCFG_TABLE // IDXD_TABLE_MULT, 31, 16
        )
        regs.set(IDXD_TABLE_OFFSET, 8, offsets)
        regs.set(IDXD_GENCFG_OFFSET, 4, 0, rw=0x30FF)
        regs.set(IDXD_GENCTRL_OFFSET, 4, 0, rw=0x7)
        regs.set(IDXD_GENSTATS_OFFSET, 4, IDXD_DEVICE_STATE_DISABLED)
        regs.set(IDXD_INTCAUSE_OFFSET, 4, 0, w1c=0x3F)
        regs.set(IDXD_CMD_OFFSET, 4, 0, rw=0xFFFFFFFF)
        regs.set(IDXD_CMDSTS_OFFSET, 4, 0)
        regs.set(IDXD_CMDCAP_OFFSET, 4, sum(1 << c for c in SUPPORTED_COMMANDS))
        regs.set(IDXD_SWERR_OFFSET, 8, 0, w1c=IDXD_SWERR_VALID | IDXD_SWERR_OVERFLOW)
        for wq in range(self.num_wqs):
            base = WQCFG_TABLE + wq * WQCFG_BYTES
            regs.set(base, 4, 0, rw=0xFFFF)  # wq_size
            regs.set(base + 4, 4, 0, rw=0xFFFF)  # wq_thresh
            regs.set(base + 8, 4, 0, rw=0x3FFFFFFF)  # mode, bof, ats/prs, priority, pasid
            regs.set(base + 12, 4, 0, rw=0x1FFF)  # max_xfer/batch/sgl shifts
            for dw in range(8, 16):
                regs.set(base + 4 * dw, 4, 0, rw=0xFFFFFFFF)  # op_config
        for qw in range(GRPCFG_SIZE // 8):  # group 0
            regs.set(GRPCFG_TABLE + 8 * qw, 8, 0, rw=(1 << 64) - 1)
        self.regs = regs

    # -- MMIO -------------------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar != 0 or offset + size > self.regs.size:
            return 0  # portals read as zero (model); beyond the registers: reserved
        return self.regs.read(offset, size)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0 or offset + size > self.regs.size:
            return  # a plain store to a portal is no submission (model: dropped)
        if self._locked_config(offset):
            return
        self.regs.write(offset, size, value)
        if offset <= IDXD_CMD_OFFSET < offset + size:
            self._command(self.regs.peek(IDXD_CMD_OFFSET, 4))

    def _locked_config(self, offset: int) -> bool:
        """WQCFG of an enabled WQ and GRPCFG of an enabled device are read-only."""
        if WQCFG_TABLE <= offset < WQCFG_TABLE + self.num_wqs * WQCFG_BYTES:
            return self._wq_enabled((offset - WQCFG_TABLE) // WQCFG_BYTES)
        if GRPCFG_TABLE <= offset < GRPCFG_TABLE + GRPCFG_SIZE:
            return self._state() == IDXD_DEVICE_STATE_ENABLED
        return False

    def bar_write64b(self, bar: int, offset: int, data: bytes) -> None:
        if bar != 2:
            super().bar_write64b(bar, offset, data)
            return
        wq = offset // (IDXD_PORTAL_SIZE * PORTALS_PER_WQ)
        if wq >= self.num_wqs or not self._wq_enabled(wq):
            return  # dropped: no enabled WQ behind this portal (model)
        if self._state() != IDXD_DEVICE_STATE_ENABLED:
            return
        self.submissions += 1
        self._submit(wq, Descriptor.decode(data))

    # -- device state -------------------------------------------------------------------
    def _state(self) -> int:
        return self.regs.peek(IDXD_GENSTATS_OFFSET, 4) & 0x3

    def _wqcfg(self, wq: int, dword: int) -> int:
        return self.regs.peek(WQCFG_TABLE + wq * WQCFG_BYTES + 4 * dword, 4)

    def _wq_enabled(self, wq: int) -> bool:
        return bits.get(self._wqcfg(wq, 6), 31, 30) == 1

    def _set_wq_state(self, wq: int, enabled: bool) -> None:
        at = WQCFG_TABLE + wq * WQCFG_BYTES + 24
        dw6 = self.regs.peek(at, 4) & ~bits.mask(31, 30)
        self.regs.poke(at, 4, dw6 | (bits.put(1, 31, 30) if enabled else 0))

    # -- commands -----------------------------------------------------------------------
    def _command(self, reg: int) -> None:
        cmd, operand = bits.get(reg, 24, 20), bits.get(reg, 19, 0)
        self.regs.poke(IDXD_CMDSTS_OFFSET, 4, IDXD_CMDSTS_ACTIVE)
        status = self._run_command(cmd, operand)
        self.regs.poke(IDXD_CMDSTS_OFFSET, 4, status)
        if bits.get(reg, 31, 31):  # int_req: command completion interrupt on vector 0
            cause = self.regs.peek(IDXD_INTCAUSE_OFFSET, 4)
            self.regs.poke(IDXD_INTCAUSE_OFFSET, 4, cause | IDXD_INTC_CMD)
            self.signal(0)

    def _run_command(self, cmd: int, operand: int) -> int:
        if cmd == IDXD_CMD_RESET_DEVICE:
            self.reset_device()
            return 0
        if cmd == IDXD_CMD_ENABLE_DEVICE:
            return self._enable_device()
        if cmd == IDXD_CMD_DISABLE_DEVICE:
            if self._state() != IDXD_DEVICE_STATE_ENABLED:
                return IDXD_CMDSTS_ERR_DIS_DEV_EN
            for wq in range(self.num_wqs):
                self._set_wq_state(wq, False)
            self.regs.poke(IDXD_GENSTATS_OFFSET, 4, IDXD_DEVICE_STATE_DISABLED)
            return 0
        if cmd in (IDXD_CMD_DRAIN_ALL, IDXD_CMD_ABORT_ALL, IDXD_CMD_DRAIN_PASID):
            return 0  # nothing is ever in flight: submissions complete synchronously
        if cmd == IDXD_CMD_ABORT_PASID:
            return 0
        wq_cmds = (
            IDXD_CMD_ENABLE_WQ,
            IDXD_CMD_DISABLE_WQ,
            IDXD_CMD_DRAIN_WQ,
            IDXD_CMD_ABORT_WQ,
            IDXD_CMD_RESET_WQ,
        )
        if cmd in wq_cmds:
            return self._wq_command(cmd, operand)
        return IDXD_CMDSTS_INVAL_CMD

    def _enable_device(self) -> int:
        if self._state() == IDXD_DEVICE_STATE_ENABLED:
            return IDXD_CMDSTS_ERR_DEV_ENABLED
        if not self.bus_master:
            return IDXD_CMDSTS_ERR_BUSMASTER_EN
        sizes = [self._wqcfg(wq, 0) & 0xFFFF for wq in range(self.num_wqs)]
        if sum(sizes) > TOTAL_WQ_SIZE:
            return IDXD_CMDSTS_ERR_WQ_SIZE_ERANGE
        wqs = self.regs.peek(GRPCFG_TABLE, 8)
        engines = self.regs.peek(GRPCFG_TABLE + 32, 8)
        for wq, size in enumerate(sizes):
            if size and not wqs >> wq & 1:
                return IDXD_CMDSTS_ERR_GRP_CONFIG  # a WQ with entries but no group
        if wqs and not engines & 1:
            return IDXD_CMDSTS_ERR_GRP_CONFIG  # a group with WQs but no engine
        self.regs.poke(IDXD_GENSTATS_OFFSET, 4, IDXD_DEVICE_STATE_ENABLED)
        return 0

    def _wq_command(self, cmd: int, wq: int) -> int:
        if cmd == IDXD_CMD_ENABLE_WQ:
            if wq >= self.num_wqs:
                return IDXD_CMDSTS_INVAL_WQIDX
            if self._state() != IDXD_DEVICE_STATE_ENABLED:
                return IDXD_CMDSTS_ERR_DEV_NOTEN
            if self._wq_enabled(wq):
                return IDXD_CMDSTS_ERR_WQ_ENABLED
            if not self._wqcfg(wq, 0) & 0xFFFF:
                return IDXD_CMDSTS_ERR_WQ_SIZE
            if not self._wqcfg(wq, 2) & 1:
                return IDXD_CMDSTS_ERR_WQ_MODE  # shared mode is not modelled
            dw3 = self._wqcfg(wq, 3)
            gencap = self.regs.peek(IDXD_GENCAP_OFFSET, 8)
            if bits.get(dw3, 4, 0) > bits.get(gencap, 20, 16):
                return IDXD_CMDSTS_ERR_MAX_XFER_SIZE
            if bits.get(dw3, 8, 5) > bits.get(gencap, 24, 21):
                return IDXD_CMDSTS_ERR_MAX_BATCH_SIZE
            self._set_wq_state(wq, True)
            return 0
        # Disable/drain/abort/reset WQ take BIT(id % 16) | (id / 16) << 16 (idxd_wq_disable).
        if self._state() != IDXD_DEVICE_STATE_ENABLED:
            return IDXD_CMDSTS_ERR_DEV_NOT_EN
        if cmd in (IDXD_CMD_DISABLE_WQ, IDXD_CMD_RESET_WQ):
            for index in range(self.num_wqs):
                if index // 16 == wq >> 16 and wq >> (index % 16) & 1:
                    self._set_wq_state(index, False)
        return 0

    # -- descriptors --------------------------------------------------------------------
    def _wq_pasid(self, wq: int) -> int | None:
        dw2 = self._wqcfg(wq, 2)
        return bits.get(dw2, 27, 8) if dw2 >> 28 & 1 else None

    def _submit(self, wq: int, desc: Descriptor) -> None:
        self._run_one(wq, desc, self._wq_pasid(wq), in_batch=False)

    def _run_one(self, wq: int, desc: Descriptor, pasid: int | None, *, in_batch: bool) -> bool:
        """Execute ``desc`` and report it (record, interrupt or SWERR); True if it succeeded."""
        if desc.flags & IDXD_OP_FLAG_CRAV and desc.completion_addr % DSA_COMPLETION_SIZE:
            self._sw_error(wq, desc, DSA_COMP_CRA_ALIGN)
            return False
        try:
            done = self._execute(wq, desc, pasid, in_batch=in_batch)
        except DescriptorError as exc:
            self._complete(desc, pasid, exc.status, exc.done, exc.fault_addr, failed=True)
            return False
        self._complete(desc, pasid, DSA_COMP_SUCCESS, done, 0, failed=False)
        return True

    def _execute(self, wq: int, desc: Descriptor, pasid: int | None, *, in_batch: bool) -> int:
        """Run one descriptor; the value for Bytes Completed; DescriptorError on failure."""
        dw3 = self._wqcfg(wq, 3)
        op_config = self.regs.peek(WQCFG_TABLE + wq * WQCFG_BYTES + 32, 8)
        if desc.opcode >= 64 or not op_config >> desc.opcode & 1:
            raise DescriptorError(DSA_COMP_BAD_OPCODE)
        if desc.opcode in (DSA_OPCODE_NOOP, DSA_OPCODE_DRAIN):
            return 0
        if desc.opcode == DSA_OPCODE_MEMMOVE:
            if desc.size > 1 << bits.get(dw3, 4, 0):
                raise DescriptorError(DSA_COMP_XFER_ERANGE)
            data = self._read(desc.src, desc.size, pasid)
            self.posted_write(desc.dst, data, pasid)
            return 0
        if desc.opcode == DSA_OPCODE_BATCH and not in_batch:
            return self._batch(wq, desc, pasid, 1 << bits.get(dw3, 8, 5))
        raise DescriptorError(DSA_COMP_BAD_OPCODE)

    def _batch(self, wq: int, desc: Descriptor, pasid: int | None, max_count: int) -> int:
        """A batch: fetch the list, run each; Bytes Completed = descriptors that succeeded."""
        if not 2 <= desc.size <= max_count:
            raise DescriptorError(DSA_COMP_DESC_CNT_ERANGE)
        if desc.src % DSA_DESC_SIZE:
            raise DescriptorError(DSA_COMP_DESCLIST_ALIGN)
        raw = self._read(desc.src, desc.size * DSA_DESC_SIZE, pasid)
        ok = 0
        for i in range(desc.size):
            sub = Descriptor.decode(raw[i * DSA_DESC_SIZE : (i + 1) * DSA_DESC_SIZE])
            ok += self._run_one(wq, sub, pasid, in_batch=True)
        if ok != desc.size:
            raise DescriptorError(DSA_COMP_BATCH_FAIL, done=ok)
        return ok

    def _read(self, iova: int, n: int, pasid: int | None) -> bytes:
        try:
            return self.dma_read(iova, n, pasid)
        except DmaFault as exc:
            raise DescriptorError(DSA_COMP_HW_ERR1, fault_addr=exc.iova) from exc
        except DmaBlocked as exc:
            raise DescriptorError(DSA_COMP_HW_ERR1, fault_addr=iova) from exc

    def _complete(
        self,
        desc: Descriptor,
        pasid: int | None,
        status: int,
        done: int,
        fault_addr: int,
        *,
        failed: bool,
    ) -> None:
        """Write the completion record (when asked, or on error with a valid address) and
        send the completion interrupt (when asked)."""
        flags = desc.flags
        if flags & IDXD_OP_FLAG_RCI and not failed:
            msix = self.spec.msix
            if msix is None or desc.int_handle >= msix.vectors:
                status, failed = DSA_COMP_INT_HANDLE_INVAL, True
        record = flags & IDXD_OP_FLAG_RCR or (failed and flags & IDXD_OP_FLAG_CRAV)
        if record and flags & IDXD_OP_FLAG_CRAV:
            cr = struct.pack("<BBHIQ", status, 0, 0, done, fault_addr).ljust(32, b"\0")
            self.posted_write(desc.completion_addr, cr, pasid)
        if flags & IDXD_OP_FLAG_RCI and status != DSA_COMP_INT_HANDLE_INVAL:
            self.signal(desc.int_handle)

    def _sw_error(self, wq: int, desc: Descriptor, error: int) -> None:
        """Record an error no completion record can carry in SWERR (overflow if unread)."""
        regs = self.regs
        first = regs.peek(IDXD_SWERR_OFFSET, 8)
        if first & IDXD_SWERR_VALID:
            regs.poke(IDXD_SWERR_OFFSET, 8, first | IDXD_SWERR_OVERFLOW)
            return
        value = (
            IDXD_SWERR_VALID
            | bits.bit(2)  # desc_valid
            | bits.bit(3)  # wq_idx_valid
            | bits.put(error, 15, 8)
            | bits.put(wq, 23, 16)
            | bits.put(desc.opcode, 39, 32)
            | bits.put(desc.pasid, 59, 40)
        )
        regs.poke(IDXD_SWERR_OFFSET, 8, value)
        regs.poke(IDXD_SWERR_OFFSET + 16, 8, desc.completion_addr)
        regs.poke(IDXD_INTCAUSE_OFFSET, 4, regs.peek(IDXD_INTCAUSE_OFFSET, 4) | IDXD_INTC_ERR)
        if regs.peek(IDXD_GENCTRL_OFFSET, 4) & 1:  # softerr_int_en
            self.signal(0)


def dsa(
    iommu: IommuHw,
    rid: int,
    *,
    device_id: int = PCI_DEVICE_ID_INTEL_DSA_SPR0,
    num_wqs: int = 1,
    max_xfer_shift: int = 12,
    pasid_bits: int = 20,
    ats: bool = False,
) -> DsaFunction:
    """The ``dsa`` kind: a Sapphire Rapids DSA (the ID the selftest driver matches)."""
    if not 1 <= num_wqs <= 8:
        raise ValueError("1 to 8 WQs")
    if not 0 <= max_xfer_shift <= 31:
        raise ValueError("max_xfer_shift is 5 bits")
    bars = (
        Bar(0x10000, mem64=True, prefetchable=True),
        None,
        Bar(0x20000, mem64=True, prefetchable=True),  # 8 WQs x 4 portal pages
        None,
        None,
        None,
    )
    spec = FunctionSpec.intel_dma_engine(device_id, 0x01, bars, 1 + num_wqs, pasid=True)
    return DsaFunction(
        iommu,
        rid,
        spec,
        num_wqs=num_wqs,
        max_xfer_shift=max_xfer_shift,
        pasid_bits=pasid_bits,
        ats=ats,
    )
