"""The SMMUv3 as hardware: register side effects, CMDQ (CMD_SYNC, errors), EVENTQ."""

from __future__ import annotations

from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import events as E
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.hw import Smmuv3

from iommufd_model.hw.ring import MemRing
from iommufd_model.machine import Machine


def bare() -> tuple[Smmuv3, MemRing]:
    """An SMMU straight out of reset with a 16-entry CMDQ, no driver."""
    m = Machine(1 << 32)
    hw = Smmuv3(m, 0)
    q = m.memory.alloc_frame() << 12
    hw.mmio.write(R.CMDQ_BASE, q | 4)
    hw.mmio.write(R.CR0, R.CR0_CMDQEN, 4)
    return hw, MemRing(m.memory, q, 16, 16)


def push(hw: Smmuv3, ring: MemRing, *cmds: tuple[int, int]) -> None:
    prod = hw.mmio.read(R.CMDQ_PROD, 4)
    for cmd in cmds:
        ring.write(prod & 15, C.encode(cmd))
        prod = (prod + 1) & 31  # index plus the wrap bit (bit 4)
    hw.mmio.write(R.CMDQ_PROD, prod, 4)


def test_id_registers_are_read_only_and_describe_the_model() -> None:
    hw, _ = bare()
    idr0 = hw.mmio.read(R.IDR0, 4)
    assert idr0 & R.IDR0_S1P and idr0 & R.IDR0_S2P and idr0 & R.IDR0_ST_LVL_2LVL
    hw.mmio.write(R.IDR0, 0, 4)
    assert hw.mmio.read(R.IDR0, 4) == idr0
    assert hw.mmio.read(R.IDR1, 4) & 0x3F == 16  # SIDSIZE
    assert hw.mmio.read(R.IDR5, 4) & 7 == R.IDR5_OAS_48
    assert hw.mmio.read(R.IDR3, 4) & R.IDR3_RIL


def test_cr0_is_acknowledged_and_enables_the_smmu() -> None:
    hw, _ = bare()
    assert hw.mmio.read(R.CR0ACK, 4) == R.CR0_CMDQEN
    hw.mmio.write(R.CR0, R.CR0_CMDQEN | R.CR0_EVTQEN | R.CR0_SMMUEN | (1 << 9), 4)
    assert hw.mmio.read(R.CR0ACK, 4) == R.CR0_CMDQEN | R.CR0_EVTQEN | R.CR0_SMMUEN
    assert hw.enabled and hw.evtq_on
    hw.mmio.write(R.GBPA, R.GBPA_UPDATE | R.GBPA_ABORT, 4)
    assert hw.mmio.read(R.GBPA, 4) == R.GBPA_ABORT  # UPDATE completes at once
    hw.mmio.write(R.IRQ_CTRL, 5, 4)
    assert hw.mmio.read(R.IRQ_CTRLACK, 4) == 5


def test_cmdq_prod_write_runs_commands_and_cmd_sync_signals() -> None:
    hw, ring = bare()
    mem = hw.memory
    word = mem.alloc_frame() << 12
    push(hw, ring, C.cmd_sync(C.CS_SEV), C.cmd_sync(C.CS_IRQ), C.cmd_sync(C.CS_IRQ, word, 0xC0DE))
    assert hw.mmio.read(R.CMDQ_CONS, 4) == 3
    assert hw.sev_count == 1 and hw.sync_irq_count == 1
    assert int.from_bytes(mem.read(word, 4), "little") == 0xC0DE  # MSIData at MSIAddress
    # 16 more wrap the queue: CONS carries the wrap bit
    for _ in range(16):
        push(hw, ring, C.cmd_sync())
    assert hw.mmio.read(R.CMDQ_CONS, 4) == 16 + 3


def test_illegal_command_sets_cmdq_err_and_stops_the_queue() -> None:
    hw, ring = bare()
    push(hw, ring, C.cmd_sync(C.CS_SEV), (0x7F, 0), C.cmd_sync(C.CS_SEV))
    cons = hw.mmio.read(R.CMDQ_CONS, 4)
    assert cons & 0x1F == 1 and (cons >> 24) & 0x7F == R.CERROR_ILL
    gerror = hw.mmio.read(R.GERROR, 4)
    assert (gerror ^ hw.mmio.read(R.GERRORN, 4)) & R.GERROR_CMDQ_ERR
    assert hw.sev_count == 1  # the SYNC after the bad command did not run
    push(hw, ring, C.cmd_sync(C.CS_SEV))  # more commands: still stopped
    assert hw.sev_count == 1
    ring.write(1, C.encode(C.cmd_sync()))  # software fixes the entry, acknowledges the error
    hw.mmio.write(R.GERRORN, gerror, 4)
    assert hw.sev_count == 3 and hw.mmio.read(R.CMDQ_CONS, 4) & 0x1F == 4
    push(hw, ring, C.cmd_sync(3))  # CS = 0b11 is reserved
    assert (hw.mmio.read(R.CMDQ_CONS, 4) >> 24) & 0x7F == R.CERROR_ILL


def test_eventq_records_and_overflow() -> None:
    hw, _ = bare()
    m = hw.mmio
    q = hw.memory.alloc_frame() << 12
    m.write(R.EVENTQ_BASE, q | 2)  # 4 records
    m.write(R.CR0, R.CR0_CMDQEN | R.CR0_EVTQEN, 4)
    for i in range(5):
        hw.record_event(E.Event(E.F_TRANSLATION, 0x100 + i, None, 0x1000 * i, True))
    prod = m.read(R.EVENTQ_PROD, 4)
    assert prod & 7 == 4 and prod & R.Q_OVERFLOW  # full (wrap bit set), overflow flagged
    assert hw.events_lost == 1
    ev = E.Event.decode(hw.memory.read(q + 32, 32))
    assert (ev.id, ev.sid, ev.input_addr, ev.read) == (E.F_TRANSLATION, 0x101, 0x1000, True)


def test_event_codec_round_trip() -> None:
    ev = E.Event(E.F_PERMISSION, 0x1234, 7, 0xDEAD_B000, False, True, E.CLASS_TT, 0x8000_3000)
    back = E.Event.decode(ev.encode())
    assert back == ev
    assert E.Event.decode(E.replace_sid(ev.encode(), 0x42)).sid == 0x42


def test_command_codec_and_range_plan() -> None:
    w0, w1 = C.tlbi_va(C.TLBI_NH_VA, 0x1234_5000, vmid=3, asid=9, num=3, scale=1, tg=1, ttl=3)
    assert C.op(w0) == C.TLBI_NH_VA
    assert (w0 >> 32) & 0xFFFF == 3 and w0 >> 48 == 9
    assert C.tlbi_range(w0, w1, C.CMD1_TLBI_VA) == (0x1234_5000, 0x1234_5000 + 8 * 4096 - 1)
    assert C.decode(C.encode((w0, w1))) == (w0, w1)
    plan = C.plan_range(0x10_0000, 0x2F * 4096)
    covered = sum((num + 1) << scale for _a, num, scale in plan)
    assert covered == 0x2F and plan[0] == (0x10_0000, 14, 0)
    assert C.plan_range(0, 512 * 4096) == [(0, 0, 9)]
