"""NVIDIA Tegra241 CMDQV as hardware: virtual command queues (VCMDQs) a guest fills and the
SMMU consumes directly, without a trap into the VMM.

The CMDQV has virtual interfaces (VINTFs); each owns logical VCMDQs, a VMID and a table of
SID_MATCH / SID_REPLACE pairs. A guest-owned (not HYP_OWN) VINTF only executes invalidation
commands: the hardware stamps the VINTF's VMID into TLBIs and replaces a matching virtual
StreamID by the physical one; anything else stops the queue with CERROR_ILL, toggles the queue's
GERROR and sets the VINTF's LVCMDQ_ERR_MAP bit. Each VINTF's page 0 (the 64 KiB window a VMM
maps for its guest) holds the per-queue CONS / PROD / CONFIG / STATUS / GERROR / GERRORN
registers at 0x80 per queue; the queue base (page 1) is programmed by the host only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import regs as R
from iommufd_model.hw.bits import bit, get, mask, put
from iommufd_model.hw.regs import Mmio
from iommufd_model.hw.ring import MemRing

if TYPE_CHECKING:
    from iommufd_arm_smmuv3.hw import Smmuv3

NUM_VINTF_LOG2 = 2  # CMDQV_PARAM.NUM_VINTF_LOG2: 4 VINTFs (VINTF0 is the host's)
NUM_VCMDQ_LOG2 = 3  # CMDQV_PARAM.NUM_VCMDQ_LOG2: 8 VCMDQs, 2 logical queues per VINTF
NUM_SID_PER_VM_LOG2 = 4  # CMDQV_PARAM.NUM_SID_PER_VM_LOG2: 16 SID_MATCH/REPLACE pairs
CMDQV_VERSION = 1  # CMDQV_PARAM.CMDQV_VER
VINTF_PAGE_SIZE = 0x10000  # the mmap window of one VINTF (its page 0)

# VINTF configuration (host side)
VINTF_EN = bit(0)
VINTF_VMID = mask(16, 1)
VINTF_HYP_OWN = bit(17)
SID_MATCH_VALID = bit(0)  # SID_MATCH = vSID << 1 | valid

# Logical VCMDQ page-0 registers, at 0x80 * lidx in the VINTF window
VCMDQ_STRIDE = 0x80
VCMDQ_CONS = 0x00
VCMDQ_PROD = 0x04
VCMDQ_CONFIG = 0x08
VCMDQ_STATUS = 0x0C
VCMDQ_GERROR = 0x10
VCMDQ_GERRORN = 0x14
VCMDQ_EN = bit(0)
# Page 1: VCMDQ_BASE
VCMDQ_ADDR = mask(47, 5)
VCMDQ_LOG2SIZE = mask(4, 0)
VCMDQ_LOG2SIZE_MAX = 19

# What a guest-owned queue may carry (the rest is CERROR_ILL).
GUEST_OPCODES = frozenset({C.TLBI_NH_ASID, C.TLBI_NH_VA, C.ATC_INV, C.CMD_SYNC})


class Vcmdq:
    """One logical VCMDQ of a VINTF."""

    def __init__(self, vintf: Vintf, lidx: int) -> None:
        self.vintf = vintf
        self.lidx = lidx
        self.base = 0  # VCMDQ_BASE (page 1): queue address | LOG2SIZE
        self.allocated = False
        self.sev_count = 0
        off = lidx * VCMDQ_STRIDE
        w = vintf.window
        self.regs = {
            "CONS": w.define(f"VCMDQ{lidx}_CONS", off + VCMDQ_CONS, width=4, writable=mask(19, 0)),
            "PROD": w.define(
                f"VCMDQ{lidx}_PROD",
                off + VCMDQ_PROD,
                width=4,
                writable=mask(19, 0),
                on_write=lambda _o, _n: self.run(),
            ),
            "CONFIG": w.define(
                f"VCMDQ{lidx}_CONFIG",
                off + VCMDQ_CONFIG,
                width=4,
                writable=VCMDQ_EN,
                on_write=self._config_written,
            ),
            "STATUS": w.define(f"VCMDQ{lidx}_STATUS", off + VCMDQ_STATUS, width=4, writable=0),
            "GERROR": w.define(f"VCMDQ{lidx}_GERROR", off + VCMDQ_GERROR, width=4, writable=0),
            "GERRORN": w.define(
                f"VCMDQ{lidx}_GERRORN",
                off + VCMDQ_GERRORN,
                width=4,
                writable=R.GERROR_ERR_MASK,
                on_write=self._gerrorn_written,
            ),
        }

    def reg(self, name: str) -> int:
        return self.regs[name].value

    def _config_written(self, old: int, new: int) -> None:
        # Enabling needs a queue the host has allocated and based.
        enabled = bool(new & VCMDQ_EN) and self.allocated and self.base != 0
        self.regs["STATUS"].value = int(enabled)
        if enabled:
            self.run()

    def _gerrorn_written(self, old: int, new: int) -> None:
        if not self.error_active():
            self.vintf.err_map &= ~(1 << self.lidx)
            self.run()

    def error_active(self) -> bool:
        return bool((self.reg("GERROR") ^ self.reg("GERRORN")) & R.GERROR_CMDQ_ERR)

    def reset(self) -> None:
        for name in ("CONS", "PROD", "CONFIG", "STATUS"):
            self.regs[name].value = 0
        self.regs["GERRORN"].value = self.reg("GERROR")
        self.base = 0
        self.vintf.err_map &= ~(1 << self.lidx)

    def run(self) -> None:
        """Consume commands from CONS to PROD, as the SMMU does for a guest-owned queue."""
        vintf = self.vintf
        if not vintf.config & VINTF_EN or not self.reg("STATUS") or self.error_active():
            return
        log2 = min(self.base & VCMDQ_LOG2SIZE, VCMDQ_LOG2SIZE_MAX)
        ring = MemRing(vintf.cmdqv.hw.memory, self.base & VCMDQ_ADDR, C.CMD_SIZE, 1 << log2)
        wrap_mask = (1 << (log2 + 1)) - 1
        cons = self.reg("CONS") & wrap_mask
        while cons != self.reg("PROD") & wrap_mask:
            try:
                cmd: tuple[int, int] | None = vintf.sanitize(*C.decode(ring.read(cons)))
            except OSError:
                cmd = None
            if cmd is None or not self._execute(cmd):
                self.regs["CONS"].value = cons | (R.CERROR_ILL << R.CMDQ_CONS_ERR_SHIFT)
                self.regs["GERROR"].value ^= R.GERROR_CMDQ_ERR
                vintf.err_map |= 1 << self.lidx
                vintf.raise_error()
                return
            cons = (cons + 1) & wrap_mask
            self.regs["CONS"].value = cons

    def _execute(self, cmd: tuple[int, int]) -> bool:
        w0, w1 = cmd
        if C.op(w0) == C.CMD_SYNC:
            # Completion is seen by polling CONS; the sync is not turned into an MSI write.
            if get(w0, 13, 12) == 3:
                return False
            self.sev_count += 1
            return True
        return self.vintf.cmdqv.hw.execute(w0, w1)


class Vintf:
    """A virtual interface: its VMID, SID translation pairs, logical queues and window."""

    def __init__(self, cmdqv: Cmdqv, idx: int) -> None:
        self.cmdqv = cmdqv
        self.idx = idx
        self.config = 0  # VINTF_CONFIG: EN, VMID, HYP_OWN
        self.sid_match = [0] * (1 << NUM_SID_PER_VM_LOG2)
        self.sid_replace = [0] * (1 << NUM_SID_PER_VM_LOG2)
        self.err_map = 0  # LVCMDQ_ERR_MAP: queues of this VINTF in error
        self.window = Mmio(f"cmdqv.vintf{idx}.page0")
        self.lvcmdqs = [Vcmdq(self, i) for i in range(cmdqv.lvcmdqs_per_vintf)]
        self.error_irq: list[Callable[[Vintf], None]] = []

    @property
    def vmid(self) -> int:
        return get(self.config, 16, 1)

    def configure(self, vmid: int, enable: bool, hyp_own: bool = False) -> None:
        self.config = put(vmid, 16, 1) | (VINTF_EN if enable else 0)
        if hyp_own:
            self.config |= VINTF_HYP_OWN

    def sanitize(self, w0: int, w1: int) -> tuple[int, int] | None:
        """The command as the SMMU will execute it, or None for an illegal one."""
        opcode = C.op(w0)
        if not self.config & VINTF_HYP_OWN and opcode not in GUEST_OPCODES:
            return None
        if opcode in (C.TLBI_NH_ASID, C.TLBI_NH_VA):
            return (w0 & ~C.CMD0_TLBI_VMID) | put(self.vmid, 47, 32), w1
        if opcode == C.ATC_INV:
            vsid = get(w0, 63, 32)
            for match, replace in zip(self.sid_match, self.sid_replace, strict=True):
                if match == (vsid << 1) | SID_MATCH_VALID:
                    return (w0 & ~C.CMD0_SID) | put(replace, 63, 32), w1
            return None
        return w0, w1

    def raise_error(self) -> None:
        for handler in list(self.error_irq):
            handler(self)

    def reset(self) -> None:
        for q in self.lvcmdqs:
            q.reset()
            q.allocated = False
        self.config = 0
        self.sid_match = [0] * len(self.sid_match)
        self.sid_replace = [0] * len(self.sid_replace)


class Cmdqv:
    """The CMDQV block next to one SMMU."""

    def __init__(self, hw: Smmuv3) -> None:
        self.hw = hw
        self.num_vintfs = 1 << NUM_VINTF_LOG2
        self.num_vcmdqs = 1 << NUM_VCMDQ_LOG2
        self.lvcmdqs_per_vintf = self.num_vcmdqs // self.num_vintfs
        self.num_sids_per_vintf = 1 << NUM_SID_PER_VM_LOG2
        self.vintfs = [Vintf(self, i) for i in range(self.num_vintfs)]

    @property
    def param(self) -> int:
        """CMDQV_PARAM."""
        return (
            put(NUM_SID_PER_VM_LOG2, 15, 12)
            | put(NUM_VINTF_LOG2, 11, 8)
            | put(NUM_VCMDQ_LOG2, 7, 4)
            | put(CMDQV_VERSION, 3, 0)
        )
