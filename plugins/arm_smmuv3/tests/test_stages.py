"""SMMUs with one translation stage (IDR0.S1P or S2P clear): which paging domains Linux 7.2's
arm_smmu_domain_alloc_paging_flags() gives, the vSMMU gate (arm_smmu_get_viommu_size needs
ARM_SMMU_FEAT_NESTING, both stages), the hardware refusing an STE whose Config enables a
missing stage, and probe failing without either stage (arm_smmu_device_hw_probe: ENXIO)."""

from __future__ import annotations

import errno
from functools import partial
from typing import Any

import pytest
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3 import ste as S
from iommufd_arm_smmuv3.domain import SmmuDomain
from iommufd_arm_smmuv3.driver import plugin

from iommufd_model.core.mmap import MmapOwner
from iommufd_model.hw.bits import words
from iommufd_model.machine import Machine
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import iommufd as U

PAGE = 4096
IOVA = 1 << 20
NEST = U.IOMMU_HWPT_ALLOC_NEST_PARENT
DIRTY = U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
PASID = U.IOMMU_HWPT_ALLOC_PASID


def _domain(r: Any, hwpt: int) -> SmmuDomain:
    dom = r.fd.objects.get(hwpt).domain
    assert isinstance(dom, SmmuDomain)
    return dom


def _vmm_with_buffer(vmm: Any, **options: Any) -> tuple[Any, int]:
    r = vmm(**options)
    ioas = r.ioas_alloc()
    va = r.proc.mmap(PAGE)
    r.proc.write(va, b"\xa5" * PAGE)
    r.ioas_map(ioas, va, PAGE, IOVA)
    return r, ioas


def test_stage_2_only_smmu_gives_stage_2_domains(vmm: Any) -> None:
    """flags 0 is stage 2 (VMID, an S2 STE) when IDR0.S1P is clear; DIRTY_TRACKING and PASID
    need stage 1, a nest parent both stages: EOPNOTSUPP, no object left behind."""
    r, ioas = _vmm_with_buffer(vmm, s1p=False)
    idr0 = r.machine.iommus[0].mmio.read(R.IDR0, 4)
    assert idr0 & R.IDR0_S2P and not idr0 & R.IDR0_S1P
    assert not r.machine.iommus[0].mmio.read(R.IDR1, 4) >> 6 & 0x1F  # SSIDSIZE 0
    objects = len(r.fd.objects)
    for flags in (DIRTY, PASID, DIRTY | PASID, NEST):
        assert_errno(errno.EOPNOTSUPP, partial(r.hwpt_alloc, ioas, flags))
    assert len(r.fd.objects) == objects
    h = r.hwpt_alloc(ioas)
    dom = _domain(r, h)
    assert (dom.stage, dom.asid, dom.nest_parent) == (2, 0, False) and dom.vmid
    r.fd.attach(r.dev_id, h)
    smmu = r.machine.iommus[0].driver_state
    ste = S.Ste.decode(words(r.machine.memory.read(smmu.ste_addr(r.dev.rid), 64)))
    assert ste.config == S.CFG_S2_TRANS and ste.s2vmid == dom.vmid
    assert r.dev.dma_read(IOVA, 4) == b"\xa5" * 4


def test_stage_1_only_smmu_has_no_nest_parent_and_no_vsmmu(vmm: Any) -> None:
    r, ioas = _vmm_with_buffer(vmm, s2p=False)
    assert_errno(errno.EOPNOTSUPP, lambda: r.hwpt_alloc(ioas, NEST))
    h = r.hwpt_alloc(ioas)
    assert _domain(r, h).stage == 1
    # arm_smmu_get_viommu_size() offers no vIOMMU type without NESTING, whatever the parent
    # (the driver's hook; 7.2's core asks it before looking at the parent).
    for vtype in (U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3, U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV):
        assert_errno(
            errno.EOPNOTSUPP,
            partial(
                plugin.viommu_alloc,
                iommu=r.machine.iommus[0],
                dev=r.dev,
                parent=_domain(r, h),
                viommu_type=vtype,
                data=bytes(16),
                mmap=MmapOwner(r.fd),
            ),
        )
    # Through the uAPI: EOPNOTSUPP before the HWPT is looked up (a stage-1 HWPT, which is no
    # nest parent, or no HWPT at all), where a parent check first would give EINVAL / ENOENT.
    for hwpt_id in (h, 999):
        assert_errno(
            errno.EOPNOTSUPP,
            partial(r.fd.viommu_alloc, r.dev_id, hwpt_id, U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3),
        )
    r.fd.attach(r.dev_id, h)
    assert r.dev.dma_read(IOVA, 4) == b"\xa5" * 4
    assert _domain(r, r.hwpt_alloc(ioas, PASID | DIRTY)).stage == 1


@pytest.mark.parametrize(
    ("options", "config"),
    [({"s1p": False}, S.CFG_S1_TRANS), ({"s2p": False}, S.CFG_S2_TRANS)],
)
def test_an_ste_enabling_a_missing_stage_is_c_bad_ste(
    options: dict[str, bool], config: int
) -> None:
    ste = S.Ste(v=True, config=config, s2aa64=True, s2t0sz=16, s2sl0=2)
    s1p, s2p = options.get("s1p", True), options.get("s2p", True)
    assert "IDR0 does not implement" in ste.illegal(16, 48, True, s1p=s1p, s2p=s2p)
    assert ste.illegal(16, 48, True) == ""


def test_no_stage_at_all_fails_the_probe() -> None:
    assert_errno(
        errno.ENXIO,
        lambda: Machine.build(
            iommus=["arm_smmuv3"], options={"arm_smmuv3": {"s1p": False, "s2p": False}}
        ),
    )
