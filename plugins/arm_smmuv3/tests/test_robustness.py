"""Bad input never escapes as a Python exception: malformed vSTEs and guest commands get the
kernel's errno, garbage STEs / CDs / tables / commands get the architected event or error."""

from __future__ import annotations

import contextlib
import errno
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import regs as R

from iommufd_model.hw.bits import pack
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.uapi import iommufd as U

u64 = st.integers(0, (1 << 64) - 1)
GVA = 0x1234_0000
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
opcodes = st.sampled_from([*sorted(C.NAMES), 0, 127, 255])


def command(draw_op: int, w0: int, w1: int) -> tuple[int, int]:
    return (w0 & ~0xFF) | draw_op, w1


def dma(dev: Any, iova: int) -> None:
    with contextlib.suppress(DmaFault):
        dev.dma_read(iova, 8)


@SETTINGS
@given(ste0=u64, ste1=u64, cfg=st.sampled_from([0, 4, 5, 6, 7]))
def test_random_vstes(guest_vm: Any, ste0: int, ste1: int, cfg: int) -> None:
    vm = guest_vm()
    vm.r.vdevice_alloc(vm.viommu, 0x42)
    ste0 = (ste0 & ~0xE) | (cfg << 1)
    try:
        hwpt = vm.nested_hwpt(ste0, ste1)
    except OSError as exc:
        assert exc.errno == errno.EIO
        return
    try:
        vm.r.fd.attach(vm.r.dev_id, hwpt)
    except OSError as exc:
        assert exc.errno in (errno.ENOENT, errno.EINVAL)
        return
    dma(vm.r.dev, GVA)
    dma(vm.r.dev, 0x4000_0000)


@SETTINGS
@given(cmds=st.lists(st.tuples(opcodes, u64, u64), min_size=1, max_size=6))
def test_random_guest_invalidations(guest_vm: Any, cmds: list[tuple[int, int, int]]) -> None:
    vm = guest_vm()
    vm.attach_translating()
    code, handled = vm.invalidate([command(*c) for c in cmds])
    assert code in (0, errno.EIO) and handled <= len(cmds)
    assert (code == 0) == (handled == len(cmds))
    hw = vm.hw
    assert hw.mmio.read(R.GERROR, 4) == hw.mmio.read(R.GERRORN, 4)  # the host queue recovered
    dma(vm.r.dev, GVA)


@SETTINGS
@given(ste=st.lists(u64, min_size=4, max_size=4), cd=st.lists(u64, min_size=4, max_size=4))
def test_garbage_ste_and_cd(
    smmu_machine: Any, paging_domain: Any, ste: list[int], cd: list[int]
) -> None:
    m, hw, smmu = smmu_machine()
    dev = m.add_pci_device(iommu=0)
    paging_domain(hw, dev)
    master = smmu.masters[dev.rid]
    m.memory.write(smmu.cd_addr(master, 0), pack(cd + [0] * 4))
    smmu.issue([C.cfgi_cd_all(dev.rid)])
    dma(dev, 0x1000)
    m.memory.write(smmu.ste_addr(dev.rid), pack(ste + [0] * 4))
    smmu.issue([C.cfgi_ste(dev.rid)])
    dma(dev, 0x1000)
    dma(dev, (1 << 47) + 0x1000)


@SETTINGS
@given(cmds=st.lists(st.tuples(opcodes, u64, u64), min_size=1, max_size=8))
def test_garbage_host_commands_are_skipped(
    smmu_machine: Any, cmds: list[tuple[int, int, int]]
) -> None:
    _m, hw, smmu = smmu_machine()
    smmu.issue([command(*c) for c in cmds])  # the CMD_SYNC after them completes
    assert hw.mmio.read(R.GERROR, 4) == hw.mmio.read(R.GERRORN, 4)
    assert len(smmu.cmdq_errors) <= len(cmds)


@SETTINGS
@given(descs=st.lists(st.tuples(st.integers(0, 511), u64), min_size=1, max_size=8))
def test_garbage_descriptors(
    smmu_machine: Any, paging_domain: Any, descs: list[tuple[int, int]]
) -> None:
    m, hw, _smmu = smmu_machine()
    dev = m.add_pci_device(iommu=0)
    domain = paging_domain(hw, dev)
    domain.pt.map(0x1000, m.memory.alloc_frame() << 12, 4096, 3)
    tables = sorted(domain.pt.tables)
    for i, (index, value) in enumerate(descs):
        m.memory.write_u64(tables[i % len(tables)] + index * 8, value)
    for iova in (0x1000, 0x20_0000, 0x4000_0000, (1 << 47) - 4096):
        dma(dev, iova)


def test_cmdqv_rejects_unknown_queue_owner(guest_vm: Any) -> None:
    vm = guest_vm(U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV, bytes(16))
    with pytest.raises(OSError) as exc:  # struct too short
        vm.r.viommu_alloc_data(vm.parent, U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV, bytes(8))
    assert exc.value.errno == errno.EINVAL
