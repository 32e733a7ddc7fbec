"""Fixtures: machines with an SMMUv3 and paging domains attached through the driver hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3.domain import SmmuDomain
from iommufd_arm_smmuv3.driver import plugin
from iommufd_arm_smmuv3.guest import stage1_tables, vste, write_cd
from iommufd_arm_smmuv3.hw import Smmuv3
from iommufd_arm_smmuv3.kernel import SmmuDevice

from helpers import narrow
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.bits import pack
from iommufd_model.hw.pci import PciDevice
from iommufd_model.machine import Machine
from iommufd_model.scenarios.base import Rig, pattern
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm.memory import GuestMemory

RW = IOMMU_READ | IOMMU_WRITE


def _smmu_machine(**options: Any) -> tuple[Machine, Smmuv3, SmmuDevice]:
    m = Machine.build(iommus=["arm_smmuv3"], options={"arm_smmuv3": dict(options)})
    hw = m.iommus[0]
    assert isinstance(hw, Smmuv3)
    return m, hw, hw.driver_state


def _paging_domain(hw: Smmuv3, dev: PciDevice, nest_parent: bool = False) -> SmmuDomain:
    flags = U.IOMMU_HWPT_ALLOC_NEST_PARENT if nest_parent else 0
    domain = plugin.domain_alloc_user(
        iommu=hw, dev=dev, flags=flags, parent=None, viommu=None, user_data=None
    )
    plugin.attach(iommu=hw, dev=dev, domain=domain)
    assert isinstance(domain, SmmuDomain)
    return domain


@pytest.fixture
def smmu_machine() -> Callable[..., tuple[Machine, Smmuv3, SmmuDevice]]:
    """Factory: ``(machine, hw, kernel driver state)`` with probe options as keywords."""
    return _smmu_machine


@pytest.fixture
def paging_domain() -> Callable[..., SmmuDomain]:
    """Factory: a stage-1 (or nest-parent stage-2) domain attached to a device, no iommufd."""
    return _paging_domain


class RawVmm(Rig):
    """A VMM with one device bound to its iommufd (the scenarios' :class:`Rig`), plus the
    calls the SMMUv3 tests compare shapes with."""

    @property
    def smmu(self) -> Smmuv3:
        """The machine's SMMUv3, as the SMMUv3 model it is."""
        return narrow(self.machine.iommus[0], Smmuv3)

    def viommu_alloc_data(
        self, hwpt: int, viommu_type: int, data: bytes = b""
    ) -> tuple[int, bytes]:
        """``(viommu id, the driver data written back)``."""
        return self.fd.viommu_alloc_data(self.dev_id, hwpt, viommu_type, data)

    def veventq_alloc(self, viommu: int, qtype: int, depth: int = 8) -> int:
        """The vEVENTQ's file descriptor."""
        return self.fd.veventq_alloc(viommu, qtype, depth)[1]

    def hw_queue_alloc(self, viommu: int, qtype: int, index: int, iova: int, length: int) -> int:
        return self.fd.hw_queue_alloc(viommu, qtype, index, iova, length)

    def hw_info(self, data_type: int | None = None, length: int = 64) -> tuple[Any, bytes]:
        reply = self.fd.hw_info(self.dev_id, data_type=data_type, data_len=length)
        return reply, reply.data

    def invalidate(self, target: int, data_type: int, entries: list[bytes]) -> tuple[int, int]:
        """IOMMU_HWPT_INVALIDATE: ``(errno or 0, entry_num written back)``."""
        try:
            return 0, self.fd.hwpt_invalidate(
                target, data_type, entries, entry_len=len(entries[0]) if entries else 16
            )
        except OSError as exc:
            return exc.errno or -1, int(exc.handled)  # type: ignore[attr-defined]


@pytest.fixture
def vmm() -> Callable[..., RawVmm]:
    """Factory: a VMM on a fresh machine with one SMMUv3 (probe options as keywords)."""

    def make(**options: Any) -> RawVmm:
        return RawVmm(_smmu_machine(**options)[0])

    return make


# The guest of the nesting tests: RAM at IPA G behind a nest parent, its SMMU tables in it.
G = 0  # guest RAM at IPA 0 (IOVA = GPA), as the framework's Vm
GUEST_RAM = 16 << 20
TABLE_POOL = 8 << 20  # the guest's own IOMMU tables come from the top of its RAM
CD_IPA = G + 0x20_0000
GVA = 0x1234_0000
GUEST_ASID = 5
VSID = 0x42


class GuestVm:
    """A VMM with guest RAM behind a nest parent, a vIOMMU, and the guest's own SMMU tables."""

    def __init__(
        self, r: RawVmm, viommu_type: int, data: bytes = b"", tables_read_only: bool = False
    ) -> None:
        self.r = r
        self.hw = r.smmu
        self.smmu = self.hw.driver_state
        self.ioas = r.ioas_alloc()
        self.parent = r.hwpt_alloc(self.ioas, U.IOMMU_HWPT_ALLOC_NEST_PARENT)
        self.ram = r.proc.mmap(GUEST_RAM)
        if tables_read_only:  # the table pool (the top TABLE_POOL bytes) readable only
            low = GUEST_RAM - TABLE_POOL
            r.ioas_map(self.ioas, self.ram, low, iova=G)
            r.fd.ioas_map(
                self.ioas, self.ram + low, TABLE_POOL, iova=G + low, flags=U.IOMMU_IOAS_MAP_READABLE
            )
        else:
            r.ioas_map(self.ioas, self.ram, GUEST_RAM, iova=G)
        self.guest = GuestMemory(r.proc, self.ram, GUEST_RAM, table_pool=TABLE_POOL)
        self.s1 = stage1_tables(self.guest)
        write_cd(self.guest, CD_IPA, GUEST_ASID, self.s1.root)
        self.viommu, self.viommu_out = r.viommu_alloc_data(self.parent, viommu_type, data)

    @property
    def parent_domain(self) -> Any:
        return self.r.fd.objects.get(self.parent).domain  # type: ignore[attr-defined]

    @property
    def viommu_drv(self) -> Any:
        return self.r.fd.objects.get(self.viommu).drv  # type: ignore[attr-defined]

    def ipa_to_pa(self, ipa: int) -> int:
        va = self.ram + ipa - G
        return (self.r.proc.translate(va & ~0xFFF) << 12) | (va & 0xFFF)

    def fill(self, ipa: int, seed: int, n: int = 4 * 4096) -> bytes:
        data = pattern(seed, n)
        self.r.proc.write(self.ram + ipa - G, data)
        return data

    def nested_hwpt(self, ste0: int, ste1: int = 0) -> int:
        return self.r.hwpt_alloc(self.viommu, 0, U.IOMMU_HWPT_DATA_ARM_SMMUV3, pack([ste0, ste1]))

    def attach_translating(self) -> bytes:
        """vDEVICE, guest mapping GVA -> IPA G + 64 KiB, nested HWPT from a vSTE, attach."""
        self.r.vdevice_alloc(self.viommu, VSID)
        data = self.fill(G + 0x1_0000, 11)
        self.s1.map(GVA, G + 0x1_0000, 4 * 4096, RW)
        hwpt = self.r.hwpt_alloc(self.viommu, 0, U.IOMMU_HWPT_DATA_ARM_SMMUV3, vste(CD_IPA))
        self.r.fd.attach(self.r.dev_id, hwpt)
        return data

    def remap(self, seed: int) -> bytes:
        """The guest points GVA at other pages (no invalidation yet)."""
        fresh = self.fill(G + 0x5_0000, seed)
        self.s1.unmap(GVA, 4 * 4096)
        self.s1.map(GVA, G + 0x5_0000, 4 * 4096, RW)
        return fresh

    def invalidate(self, cmds: list[tuple[int, int]], data_type: int = 0) -> tuple[int, int]:
        dtype = data_type or U.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3
        return self.r.invalidate(self.viommu, dtype, [C.encode(c) for c in cmds])

    def snapshot(self) -> tuple[object, ...]:
        objs = tuple((o.id, o.TYPE.value, o.users) for o in self.r.fd.objects)
        ste = self.r.machine.memory.read(self.smmu.ste_addr(self.r.dev.rid), 64)
        return objs, ste, self.hw.stats.commands, sorted(self.smmu.vmids.used)


@pytest.fixture
def guest_vm(vmm: Callable[..., RawVmm]) -> Callable[..., GuestVm]:
    """Factory: a :class:`GuestVm` with a vIOMMU of the given type (default: SMMUv3), its
    table pool mapped read-only at stage 2 when ``tables_read_only``."""

    def make(
        viommu_type: int = U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
        data: bytes = b"",
        tables_read_only: bool = False,
    ) -> GuestVm:
        return GuestVm(vmm(), viommu_type, data, tables_read_only)

    return make
