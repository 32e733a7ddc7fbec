"""Fixtures of the AMD plugin's tests: a machine with one AMD IOMMU, reached through the uAPI.

With ``--import-mode=importlib`` test modules cannot import each other, so the helpers live
here, on the :class:`AmdWorld` object the ``world`` fixture returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from iommufd_amd.commands import Command
from iommufd_amd.events import Event
from iommufd_amd.hw import AmdIommu
from iommufd_amd.kernel import AmdKernel
from iommufd_amd.viommu import AmdViommu

import iommufd_model as im
from helpers import narrow
from iommufd_model import uapi as U
from iommufd_model.core.main import IommuFd
from iommufd_model.testing import assert_errno
from iommufd_model.uapi.codec import UStruct

PAGE = 4096


class AmdWorld:
    """One AMD IOMMU, a process with memory, an iommufd and one bound device."""

    def __init__(
        self, options: dict[str, Any] | None = None, *, ats: bool = False, **dev: Any
    ) -> None:
        self.machine = im.Machine.build(iommus=["amd"], options={"amd": options or {}})
        hw = self.machine.iommus[0]
        assert isinstance(hw, AmdIommu)
        self.hw = hw
        self.kernel: AmdKernel = hw.driver_state
        self.mem = self.machine.memory
        self.dev = self.machine.add_pci_device(iommu=0, ats=ats, **dev)
        self.proc = self.machine.new_process()
        self.fd = self.proc.open_iommufd()
        self.dev_id = self.fd.bind(self.dev)

    # -- uAPI wrappers ---------------------------------------------------------------------
    def ioctl(self, cmd: int, st: UStruct) -> Any:
        """Pack ``st`` (its size field filled in), issue ``cmd``, decode the reply."""
        if hasattr(st, "size") and not st.size:
            st.size = st.SIZE
        raw = bytearray(st.pack())
        self.fd.ioctl(cmd, raw)
        return st.unpack(raw)

    # The commands themselves go through the fd's typed layer (the same dispatcher).
    def ioas(self) -> int:
        return self.fd.ioas_alloc()

    def buffer(self, length: int, fill: int | None = None) -> int:
        va = self.proc.mmap(length)
        if fill is not None:
            self.proc.write(va, bytes([fill]) * length)
        return va

    def map(self, ioas: int, va: int, length: int, iova: int, *, write: bool = True) -> int:
        flags = U.IOMMU_IOAS_MAP_READABLE | (U.IOMMU_IOAS_MAP_WRITEABLE if write else 0)
        return self.fd.ioas_map(ioas, va, length, iova=iova, flags=flags)

    def unmap(self, ioas: int, iova: int, length: int) -> int:
        return self.fd.ioas_unmap(ioas, iova, length)

    def hwpt(
        self, pt_id: int, flags: int = 0, data_type: int = 0, data: bytes = b"", dev_id: int = 0
    ) -> int:
        return self.fd.hwpt_alloc(
            dev_id or self.dev_id, pt_id, flags=flags, data_type=data_type, data=data
        )

    def viommu(self, hwpt: int, vtype: int = U.IOMMU_VIOMMU_TYPE_AMD) -> int:
        """A vIOMMU with the mandatory ``struct iommu_viommu_amd`` (AMD's tree)."""
        return self.fd.viommu_alloc(self.dev_id, hwpt, vtype, bytes(U.IommuViommuAmd.SIZE))

    def destroy(self, obj_id: int) -> None:
        self.fd.destroy(obj_id)

    # -- hardware views ---------------------------------------------------------------------
    def record_commands(self) -> list[Command]:
        """Wrap the command processor: every command the driver sends, in order."""
        seen: list[Command] = []
        execute = self.hw.execute

        def spy(cmd: Command, addr: int) -> bool:
            seen.append(cmd)
            return bool(execute(cmd, addr))

        self.hw.execute = spy  # type: ignore[method-assign]
        return seen

    def events(self) -> list[Event]:
        return self.hw.read_events()

    def dte_words(self, devid: int | None = None) -> tuple[int, ...]:
        rid = self.dev.rid if devid is None else devid
        return self.kernel.read_dte(rid).encode()

    def state(self) -> dict[str, Any]:
        """What a refused ioctl must not change (objects, DTEs, DomainIDs, frames)."""
        return {
            "ids": self.fd.objects.ids(),
            "users": [o.users for o in self.fd.objects],
            "dte": {rid: self.dte_words(rid) for rid in self.hw.devices},
            "domids": sorted(self.kernel.domids.used),
            "frames": self.mem.frames_in_use,
            "events": self.hw.mmio["EVT_TAIL"],
        }


class GuestRam:
    """Guest RAM of a VM: a process buffer mapped at guest-physical ``base`` in an IOAS, in
    which the "guest" builds its own x86-64 (v2) page tables and GCR3 table."""

    P, RW, US, PS = 1, 2, 4, 0x80

    def __init__(self, w: AmdWorld, ioas: int, base: int, size: int) -> None:
        self.w = w
        self.base = base
        self.size = size
        self.va = w.buffer(size)
        w.map(ioas, self.va, size, base)
        self.next = base

    def alloc(self) -> int:
        gpa = self.next
        self.next += PAGE
        assert self.next <= self.base + self.size
        return gpa

    def write_u64(self, gpa: int, value: int) -> None:
        self.w.proc.write(self.va + gpa - self.base, value.to_bytes(8, "little"))

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.w.proc.read(self.va + gpa - self.base, 8), "little")

    def write(self, gpa: int, data: bytes) -> None:
        self.w.proc.write(self.va + gpa - self.base, data)

    def read(self, gpa: int, n: int) -> bytes:
        return self.w.proc.read(self.va + gpa - self.base, n)

    def map_page(self, cr3: int, gva: int, gpa: int, *, levels: int = 4, write: bool = True) -> int:
        """Map one 4 KiB guest page; returns the PTE's guest-physical slot."""
        table = cr3
        for level in range(levels - 1, 0, -1):
            slot = table + ((gva >> (12 + 9 * level)) & 0x1FF) * 8
            entry = self.read_u64(slot)
            if not entry & self.P:
                entry = self.alloc() | self.P | self.RW | self.US
                self.write_u64(slot, entry)
            table = entry & ~0xFFF & ((1 << 52) - 1)
        slot = table + ((gva >> 12) & 0x1FF) * 8
        self.write_u64(slot, gpa | self.P | self.US | (self.RW if write else 0))
        return slot


def amd_iommu(machine: im.Machine, index: int = 0) -> AmdIommu:
    """IOMMU instance ``index`` of an AMD machine, as the AMD model it is."""
    return narrow(machine.iommus[index], AmdIommu)


def amd_viommu(fd: IommuFd, viommu_id: int) -> AmdViommu:
    """The AMD driver's half of vIOMMU ``viommu_id`` (its GID, its gDomID map...)."""
    return narrow(fd.objects.get_viommu(viommu_id).drv, AmdViommu)


@pytest.fixture
def world() -> AmdWorld:
    return AmdWorld()


@pytest.fixture
def make_world() -> Callable[..., AmdWorld]:
    return AmdWorld


class NestParent:
    """Where every vIOMMU test starts: an IOAS holding 256 KiB of guest RAM at guest-physical
    1 MiB (:class:`GuestRam`) and a nest-parent HWPT over it."""

    GPA = 1 << 20

    def __init__(self, w: AmdWorld) -> None:
        self.w = w
        self.ioas = w.ioas()
        self.ram = GuestRam(w, self.ioas, self.GPA, 64 * 4096)
        self.parent = w.hwpt(self.ioas, U.IOMMU_HWPT_ALLOC_NEST_PARENT)


@pytest.fixture
def expect() -> Callable[..., int]:
    return assert_errno
