"""Trapped MMIO under ``iommufd-model run``: a program's BAR mapping reaches the device's
registers on every access, in program order (preload.c's fault handler, the server's OP_MMIO).

The device here is the test's own register file behind a model file with ``mmap_region``
(the VFIO device file's contract), so the trap is proven without the VFIO layer."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iommufd_model.errors import err
from iommufd_model.machine import Machine
from iommufd_model.run.launch import build_machine, run_program
from iommufd_model.run.server import Server

Build = Callable[[str, str], Path]
C = Path(__file__).parent / "c"

DOORBELL, COUNT, STATUS, PORTAL = 0x100, 0x108, 0x110, 0x200


class RegisterFile:
    """BAR 0 of a test device: bytes that read back what was written (all ones where
    nothing was), a doorbell that counts its writes and sets STATUS to value + 1, and a
    64-byte portal. Every access is logged in order."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}
        self.count = 0
        self.status = 0
        self.portal: list[bytes] = []
        self.log: list[tuple[str, int, int, int]] = []

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        assert bar == 0
        if offset == COUNT:
            value = self.count
        elif offset == STATUS:
            value = self.status
        else:
            raw = bytes(self.bytes.get(offset + i, 0xFF) for i in range(size))
            value = int.from_bytes(raw, "little")
        self.log.append(("r", offset, size, value))
        return value

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        assert bar == 0 and value < 1 << (8 * size)
        self.log.append(("w", offset, size, value))
        if offset == DOORBELL:
            self.count += 1
            self.status = value + 1
            return
        for i, byte in enumerate(value.to_bytes(size, "little")):
            self.bytes[offset + i] = byte

    def mmio_write64b(self, bar: int, offset: int, data: bytes) -> None:
        assert bar == 0 and offset == PORTAL and len(data) == 64
        self.log.append(("w64", offset, 64, int.from_bytes(data, "little")))
        self.portal.append(data)
        self.count += 1


class RegsFile:
    """A model file whose region 0 is the register file's BAR 0 (two pages)."""

    def __init__(self, device: RegisterFile) -> None:
        self.device = device
        self.released = False

    def mmap_region(self, offset: int, length: int, prot: int, flags: int) -> tuple[int, int]:
        if offset + length > 0x2000:
            raise err(errno.EINVAL, "beyond BAR 0")
        return 0, offset

    def ioctl(self, cmd: int, arg: Any, caller: Any) -> int:
        """Signal the eventfd the struct names, as VFIO_DEVICE_SET_IRQS' triggers do."""
        mine = caller.get_fd(int.from_bytes(arg[:4], "little"))
        try:
            os.write(mine, (1).to_bytes(8, "little"))
        finally:
            os.close(mine)
        return cmd & 0xFF

    def read(self, count: int, offset: int) -> bytes:
        """pread: config-space-like bytes, each its offset's low byte."""
        return bytes((offset + i) & 0xFF for i in range(count))

    def write(self, data: bytes, offset: int) -> int:
        self.device.log.append(("pwrite", offset, len(data), int.from_bytes(data, "little")))
        return len(data)

    def release(self) -> None:
        self.released = True


def run_regs(
    binary: Path, scenario: str, capfd: pytest.CaptureFixture[str] | None = None
) -> tuple[int, Server, RegisterFile, Machine]:
    regs = RegisterFile()

    def opener(machine: Machine, path: str, flags: int, proc: Any) -> Any:
        return RegsFile(regs) if path == "/dev/model-regs" else None

    machine = build_machine(["mock"], 0)
    rc, server = run_program(
        [str(binary), scenario], machine=machine, openers=[("/dev/model-regs", opener)]
    )
    return rc, server, regs, machine


@pytest.fixture(scope="module")
def mmio_prog(cc: Build) -> Path:
    return cc("mmio", (C / "mmio.c").read_text())


def test_every_instruction_form_reaches_the_registers(mmio_prog: Path) -> None:
    rc, server, regs, _ = run_regs(mmio_prog, "access")
    assert rc == 0
    assert server.internal_errors == [] and server.files == {}
    # identical back-to-back writes are two accesses, and each MOVDIR64B one submission
    doorbells = [e for e in regs.log if e[:2] == ("w", DOORBELL)]
    assert [e[3] for e in doorbells] == [41, 7, 7]
    assert regs.portal == [bytes(range(64))] * 2
    # the doorbell's status read follows it at once
    i = regs.log.index(("w", DOORBELL, 4, 41))
    assert regs.log[i + 1] == ("r", STATUS, 4, 42)
    # sizes as the instructions give them: writeq, the SIL store, the immediate stores
    assert ("w", 0, 8, 0x1122334455667788) in regs.log
    assert ("w", 17, 1, 0x34) in regs.log
    assert ("w", 16, 1, 0x77) in regs.log
    assert ("w", 32, 8, (1 << 64) - 2) in regs.log
    assert ("w", 26, 2, 0x1234) in regs.log
    # the second mapping starts at register 0x1000
    assert ("w", 0x1010, 4, 0x600D) in regs.log


def test_threads_and_forks_share_the_device(mmio_prog: Path) -> None:
    rc, _, regs, _ = run_regs(mmio_prog, "threads")
    assert rc == 0 and regs.count == 400
    rc, server, regs, _ = run_regs(mmio_prog, "fork")
    assert rc == 0 and server.internal_errors == []
    assert [e[3] for e in regs.log if e[0] == "w"] == [5, 9]


def test_trap_table_changes_while_threads_access(mmio_prog: Path) -> None:
    """The fault handler reads the trap table under its sequence count while another
    thread remaps part of the BAR: every doorbell write of the four threads is trapped."""
    rc, server, regs, _ = run_regs(mmio_prog, "remap")
    assert rc == 0 and server.internal_errors == []
    assert regs.count == 400


def test_a_write_to_a_read_only_mapping_is_sigsegv(mmio_prog: Path) -> None:
    rc, _, regs, _ = run_regs(mmio_prog, "readonly")
    assert rc == 128 + signal.SIGSEGV
    assert not [e for e in regs.log if e[0] == "w"]


def test_other_faults_keep_their_disposition(mmio_prog: Path) -> None:
    rc, _, regs, _ = run_regs(mmio_prog, "plain-segv")
    assert rc == 128 + signal.SIGSEGV and regs.count == 1
    rc, _, regs, _ = run_regs(mmio_prog, "own-handler")
    assert rc == 42 and regs.count == 1


def test_an_undecodable_access_is_reported_and_sigbus(
    mmio_prog: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    rc, _, regs, _ = run_regs(mmio_prog, "undecodable")
    assert rc == 128 + signal.SIGBUS
    assert "cannot emulate this MMIO access" in capfd.readouterr().err
    assert regs.log == []


def test_file_ops_and_eventfds_from_the_callers_fd_table(mmio_prog: Path) -> None:
    rc, server, regs, _ = run_regs(mmio_prog, "fileops")
    assert rc == 0 and server.internal_errors == []
    assert ("pwrite", 0x44, 2, 0xBEEF) in regs.log
    assert ("pwrite", 3, 1, 0x7A) in regs.log  # write() at the file position read() left
