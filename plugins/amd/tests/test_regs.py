"""MMIO registers and their side effects, on raw hardware (no driver)."""

from __future__ import annotations

from typing import Any

from iommufd_amd import commands as C
from iommufd_amd import events as E
from iommufd_amd import regs as R
from iommufd_amd.hw import AmdIommu

import iommufd_model as im
from iommufd_model.hw.memory import PAGE_SHIFT


def raw_iommu() -> AmdIommu:
    machine = im.Machine.build(iommus=())
    return AmdIommu(machine, 0)


def test_offsets_follow_the_spec() -> None:
    assert (R.DEV_TABLE_BASE, R.CMD_BUF_BASE, R.EVT_LOG_BASE, R.CONTROL) == (0, 8, 0x10, 0x18)
    assert (R.EFR, R.PPR_LOG_BASE, R.EFR2) == (0x30, 0x38, 0x1A0)
    assert (R.CMD_HEAD, R.CMD_TAIL, R.EVT_HEAD, R.EVT_TAIL, R.STATUS) == (
        0x2000,
        0x2008,
        0x2010,
        0x2018,
        0x2020,
    )
    assert (R.PPR_HEAD, R.PPR_TAIL) == (0x2030, 0x2038)


def test_feature_registers_are_read_only() -> None:
    hw = raw_iommu()
    efr = hw.mmio.read(R.EFR)
    assert efr & R.EFR_GT_SUP and efr & R.EFR_HD_SUP and efr & R.EFR_IA_SUP
    hw.mmio.write(R.EFR, 0)
    hw.mmio.write(R.EFR2, 0)
    assert hw.mmio.read(R.EFR) == efr
    assert hw.mmio.read(R.EFR2) & R.EFR2_GCR3TRPMODE
    # 32-bit halves of a 64-bit register
    assert hw.mmio.read(R.EFR + 4, 4) == efr >> 32


def _cmd_buffer(hw: AmdIommu) -> int:
    base = hw.memory.alloc_contiguous(2) << PAGE_SHIFT
    hw.mmio.write(R.CMD_BUF_BASE, R.base_value(base, 9))
    return base


def test_base_write_resets_head_and_tail_and_enable_starts_fetching() -> None:
    hw = raw_iommu()
    base = _cmd_buffer(hw)
    assert hw.cmd_ring is not None and hw.cmd_ring.nentries == 512
    sem = hw.memory.alloc_frame() << PAGE_SHIFT
    # Queue two commands while the buffer is disabled: nothing runs yet.
    hw.memory.write(base, C.completion_wait(sem, 7))
    hw.memory.write(base + 16, C.completion_wait(sem + 8, 8))
    hw.mmio.write(R.CMD_TAIL, 32)
    assert hw.memory.read_u64(sem) == 0 and hw.mmio.read(R.CMD_HEAD) == 0
    assert not hw.mmio.read(R.STATUS) & R.ST_CMDBUF_RUN
    # Enabling CmdBufEn starts fetching at the head: both run, the head catches up.
    hw.mmio.write(R.CONTROL, R.CTRL_CMDBUF_EN)
    assert hw.mmio.read(R.STATUS) & R.ST_CMDBUF_RUN
    assert (hw.memory.read_u64(sem), hw.memory.read_u64(sem + 8)) == (7, 8)
    assert hw.mmio.read(R.CMD_HEAD) == 32
    # The base register is ignored while the buffer runs; rewriting it when stopped resets.
    hw.mmio.write(R.CMD_BUF_BASE, R.base_value(0x1000_0000, 9))
    assert hw.mmio.read(R.CMD_BUF_BASE) & R.BASE_ADDR_MASK == base
    hw.mmio.write(R.CONTROL, 0)
    assert not hw.mmio.read(R.STATUS) & R.ST_CMDBUF_RUN
    hw.mmio.write(R.CMD_BUF_BASE, R.base_value(base, 9))
    assert (hw.mmio.read(R.CMD_HEAD), hw.mmio.read(R.CMD_TAIL)) == (0, 0)


def test_tail_write_runs_commands_and_head_is_hardware_owned() -> None:
    hw = raw_iommu()
    base = _cmd_buffer(hw)
    hw.mmio.write(R.CONTROL, R.CTRL_CMDBUF_EN)
    sem = hw.memory.alloc_frame() << PAGE_SHIFT
    hw.memory.write(base, C.completion_wait(sem, 0x1234_5678_9ABC_DEF0))
    hw.mmio.write(R.CMD_TAIL, 16)
    assert hw.memory.read_u64(sem) == 0x1234_5678_9ABC_DEF0
    assert hw.mmio.read(R.CMD_HEAD) == 16
    hw.mmio.write(R.CMD_HEAD, 0x100)  # ignored while running
    assert hw.mmio.read(R.CMD_HEAD) == 16
    # Pointer registers keep only bits [18:4].
    hw.mmio.write(R.CMD_TAIL, 0x7_FFFF)
    assert hw.mmio.read(R.CMD_TAIL) == 0x7_FFF0


def test_event_log_run_head_advance_status_rw1c_and_overflow() -> None:
    hw = raw_iommu()
    base = hw.memory.alloc_contiguous(1) << PAGE_SHIFT
    hw.mmio.write(R.EVT_LOG_BASE, R.base_value(base, R.LEN_MIN))  # 256 entries
    assert not hw.log_event(E.Event(E.IO_PAGE_FAULT))  # EventLogEn off: lost
    hw.mmio.write(R.CONTROL, R.CTRL_EVT_LOG_EN)
    assert hw.mmio.read(R.STATUS) & R.ST_EVT_RUN
    assert hw.log_event(E.Event(E.IO_PAGE_FAULT, devid=5, address=0x1000))
    assert hw.mmio.read(R.EVT_TAIL) == 16
    assert hw.mmio.read(R.STATUS) & R.ST_EVT_INT
    # Software reads the entry and advances the head.
    assert E.Event.from_bytes(hw.memory.read(base, 16)).devid == 5
    hw.mmio.write(R.EVT_HEAD, 16)
    assert hw.read_events() == []
    # RW1C: writing one clears EventLogInt, run bits are read-only.
    hw.mmio.write(R.STATUS, R.ST_EVT_INT | R.ST_EVT_RUN)
    st = hw.mmio.read(R.STATUS)
    assert not st & R.ST_EVT_INT and st & R.ST_EVT_RUN
    # The tail belongs to the hardware while logging.
    hw.mmio.write(R.EVT_TAIL, 0)
    assert hw.mmio.read(R.EVT_TAIL) == 16
    # 255 usable slots (one stays empty): the next one overflows.
    for i in range(255):
        assert hw.log_event(E.Event(E.IO_PAGE_FAULT, devid=i))
    assert not hw.log_event(E.Event(E.IO_PAGE_FAULT))
    assert hw.mmio.read(R.STATUS) & R.ST_EVT_OVERFLOW
    assert len(hw.read_events()) == 255


def test_driver_init_programs_the_registers(world: Any) -> None:
    hw = world.hw
    ctrl = hw.mmio.read(R.CONTROL)
    for bit in (R.CTRL_IOMMU_EN, R.CTRL_CMDBUF_EN, R.CTRL_EVT_LOG_EN, R.CTRL_GT_EN):
        assert ctrl & bit
    st = hw.mmio.read(R.STATUS)
    assert st & R.ST_CMDBUF_RUN and st & R.ST_EVT_RUN
    assert hw.devtab_entries == 65536
    # the driver's INVALIDATE_IOMMU_ALL and COMPLETION_WAITs went through the buffer
    assert hw.stats.commands >= 2 and hw.mmio.read(R.CMD_HEAD) == hw.mmio.read(R.CMD_TAIL)
