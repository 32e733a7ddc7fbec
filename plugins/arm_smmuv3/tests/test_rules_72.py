"""Linux 7.2's rules and errnos on the vSMMU paths: driver data of the wrong length, an empty
invalidation array, the vIOMMU's coherency gate, CMDQV's 20-bit vSIDs."""

from __future__ import annotations

import errno
from functools import partial
from typing import Any

from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3.pgtable import PTE_MEMATTR_FWB_WB, PTE_MEMATTR_OIWB
from iommufd_arm_smmuv3.ste import Ste

from iommufd_model.hw.bits import words
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import iommufd as U

from .conftest import GuestVm, RawVmm

CMDQV = U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV


def test_tegra_viommu_data_of_any_other_length_is_einval(vmm: Any) -> None:
    r = vmm()
    ioas = r.ioas_alloc()
    parent = r.hwpt_alloc(ioas, U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    for data in (b"", bytes(8), bytes(24), bytes(16) + b"\x01"):
        assert_errno(errno.EINVAL, partial(r.viommu_alloc_data, parent, CMDQV, data))
    owners = r.machine.iommus[0]
    viommu, out = r.viommu_alloc_data(parent, CMDQV, bytes(16))
    assert viommu and len(out) == 16 and owners.cmdqv is not None


def test_empty_invalidation_array_on_a_vsmmu_is_einval(guest_vm: Any) -> None:
    vm = guest_vm()
    commands = vm.hw.stats.commands
    assert vm.r.invalidate(vm.viommu, U.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, []) == (
        errno.EINVAL,
        0,
    )
    assert vm.hw.stats.commands == commands  # nothing reached the command queue


def _gate_vmm(vmm: Any, **options: Any) -> tuple[RawVmm, int]:
    r = vmm(**options)
    ioas = r.ioas_alloc()
    return r, r.hwpt_alloc(ioas, U.IOMMU_HWPT_ALLOC_NEST_PARENT)


def test_viommu_needs_canwbs_or_s2fwb(vmm: Any) -> None:
    r, parent = _gate_vmm(vmm, canwbs=False)
    for vtype in (U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3, CMDQV):
        assert_errno(errno.EOPNOTSUPP, partial(r.viommu_alloc_data, parent, vtype, bytes(16)))
    r, parent = _gate_vmm(vmm, canwbs=False, s2fwb=True)
    assert r.viommu_alloc_data(parent, U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3)[0]


def test_s2fwb_nest_parent_sets_ste_s2fwb_and_fwb_memattr(vmm: Any) -> None:
    for fwb in (False, True):
        vm = GuestVm(vmm(s2fwb=fwb), U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3)
        vm.attach_translating()
        ste = Ste.decode(words(vm.r.machine.memory.read(vm.smmu.ste_addr(vm.r.dev.rid), 64)))
        assert ste.s2fwb == fwb
        leaf = vm.parent_domain.pt.fmt.make_leaf(0, 0, 7)
        assert leaf & (0xF << 2) == (PTE_MEMATTR_FWB_WB if fwb else PTE_MEMATTR_OIWB)


def test_cmdqv_vsids_are_20_bits(guest_vm: Any) -> None:
    vm = guest_vm(CMDQV, bytes(16))
    assert_errno(errno.EINVAL, lambda: vm.r.vdevice_alloc(vm.viommu, 1 << 20))
    vdev = vm.r.vdevice_alloc(vm.viommu, (1 << 20) - 1)
    vintf = vm.viommu_drv.vintf
    assert vintf.sid_match[0] == (((1 << 20) - 1) << 1) | 1 and vdev
    assert vintf.sid_replace[0] == vm.r.dev.rid
    assert C.op(C.cfgi_cd(0, 0)[0]) == C.CFGI_CD  # encoders stay usable after the refusal
