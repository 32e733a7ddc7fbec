"""E2H (Linux 7.2 arm-smmu-v3.c): with IDR0.HYP the driver has ARM_SMMU_FEAT_HYP and, on a host
whose kernel runs at EL2 with VHE, ARM_SMMU_FEAT_E2H: CR2.E2H at reset, TLBI_EL2_ALL (+ SYNC)
before TLBI_NSNH_ALL (HYP alone gives that too), CD-table STEs of StreamWorld EL2
(``arm_smmu_make_cdtable_ste``) and TLBI_EL2_VA / TLBI_EL2_ASID for stage-1 ASIDs
(``arm_smmu_master_build_inv``). The hardware keeps EL2 StreamWorld translations apart:
NH TLBIs and TLBI_NSNH_ALL leave them, the EL2 TLBIs remove them."""

from __future__ import annotations

from typing import Any

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.domain import SmmuDomain
from iommufd_arm_smmuv3.driver import plugin
from iommufd_arm_smmuv3.ste import STRW_EL2, STRW_NSEL1, Ste

from iommufd_model.driver import IOMMU_CACHE, IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.bits import get, words

PROT = IOMMU_READ | IOMMU_WRITE | IOMMU_CACHE
IOVA = 0x10_0000
K4 = 1 << 12


def _ops(hw: Any, start: int = 0) -> list[int]:
    return [C.op(w0) for w0, _ in hw.executed[start:]]


@pytest.mark.parametrize(("vhe", "e2h"), [(True, True), (False, False)])
def test_reset_with_idr0_hyp(smmu_machine: Any, vhe: bool, e2h: bool) -> None:
    """arm_smmu_device_reset(): CR2.E2H only with E2H; TLBI_EL2_ALL with its own SYNC
    whenever IDR0.HYP is there (ARM_SMMU_FEAT_HYP), between CFGI_ALL and TLBI_NSNH_ALL."""
    _m, hw, smmu = smmu_machine(hyp=True, vhe=vhe)
    assert hw.mmio.read(R.IDR0, 4) & R.IDR0_HYP and smmu.feat_e2h == e2h
    cr2 = R.CR2_PTM | R.CR2_RECINVSID | (R.CR2_E2H if e2h else 0)
    assert hw.mmio.read(R.CR2, 4) == cr2
    assert _ops(hw)[:6] == [
        C.CFGI_STE_RANGE,
        C.CMD_SYNC,
        C.TLBI_EL2_ALL,
        C.CMD_SYNC,
        C.TLBI_NSNH_ALL,
        C.CMD_SYNC,
    ]


def _attached(smmu_machine: Any, **opts: Any) -> tuple[Any, Any, Any, SmmuDomain]:
    m, hw, smmu = smmu_machine(**opts)
    dev = m.add_pci_device(iommu=0)
    d = plugin.domain_alloc_user(
        iommu=hw, dev=dev, flags=0, parent=None, viommu=None, user_data=None
    )
    assert isinstance(d, SmmuDomain)
    plugin.attach(iommu=hw, dev=dev, domain=d)
    frame = m.memory.alloc_frame() << 12
    m.memory.write(frame, b"el2 data")
    plugin.domain_map_pages(domain=d, iova=IOVA, pa=frame, pgsize=K4, pgcount=1, prot=PROT)
    return hw, smmu, dev, d


def _ste(hw: Any, smmu: Any, dev: Any) -> Ste:
    return Ste.decode(words(hw.memory.read(smmu.ste_addr(dev.rid), 64)))


def test_e2h_stage_1_streams_are_el2_and_flushed_with_el2_tlbis(smmu_machine: Any) -> None:
    hw, smmu, dev, d = _attached(smmu_machine, hyp=True)
    assert _ste(hw, smmu, dev).strw == STRW_EL2
    assert dev.dma_read(IOVA, 8) == b"el2 data"
    entries = len(hw.tlb)
    # NH TLBIs of the ASID and TLBI_NSNH_ALL do not reach the EL2 StreamWorld entry.
    smmu.issue([C.tlbi_nh_asid(0, d.asid), C.tlbi_nsnh_all()])
    assert len(hw.tlb) == entries
    start = len(hw.executed)
    assert plugin.domain_unmap(domain=d, iova=IOVA, size=K4) == K4
    cmds = [(w0, w1) for w0, w1 in hw.executed[start:] if C.op(w0) != C.CMD_SYNC]
    assert [C.op(w0) for w0, _ in cmds] == [C.TLBI_EL2_VA]
    w0, w1 = cmds[0]
    assert get(w0, 63, 48) == d.asid and get(w0, 47, 32) == 0
    assert C.tlbi_range(w0, w1, C.CMD1_TLBI_VA)[0] == IOVA
    assert len(hw.tlb) == entries - 1
    # The last detach flushes the ASID with TLBI_EL2_ASID.
    start = len(hw.executed)
    plugin.attach(iommu=hw, dev=dev, domain=None)
    assert C.TLBI_EL2_ASID in _ops(hw, start) and C.TLBI_NH_ASID not in _ops(hw, start)


def test_hyp_without_vhe_keeps_nsel1_and_nh_tlbis(smmu_machine: Any) -> None:
    hw, smmu, dev, d = _attached(smmu_machine, hyp=True, vhe=False)
    assert _ste(hw, smmu, dev).strw == STRW_NSEL1
    assert dev.dma_read(IOVA, 8) == b"el2 data"
    start = len(hw.executed)
    plugin.domain_unmap(domain=d, iova=IOVA, size=K4)
    assert C.TLBI_NH_VA in _ops(hw, start) and C.TLBI_EL2_VA not in _ops(hw, start)


def test_el2_tlbis_remove_only_el2_entries(smmu_machine: Any) -> None:
    hw, smmu, dev, d = _attached(smmu_machine, hyp=True)
    assert dev.dma_read(IOVA, 8) == b"el2 data"
    entries = len(hw.tlb)
    smmu.issue([C.tlbi_va(C.TLBI_EL2_VA, IOVA, asid=d.asid + 1)])  # another ASID
    assert len(hw.tlb) == entries
    smmu.issue([C.tlbi_el2_all()])
    assert len(hw.tlb) == entries - 1


def test_el2_tlbis_are_illegal_without_idr0_hyp(smmu_machine: Any) -> None:
    _m, hw, _smmu = smmu_machine()
    assert not hw.execute(*C.tlbi_el2_all())
