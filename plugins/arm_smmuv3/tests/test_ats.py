"""ATS: a device with ATS enabled caches translations in its own ATC. Only ATC_INV (never a
TLBI) cleans it, so the driver's ATC_INV on unmap is what stops stale translations; the
SMMU lets translated transactions through only for streams whose STE says EATS = TRANS
(CR0.ATSCHK)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3.driver import plugin
from iommufd_arm_smmuv3.ste import Ste

from iommufd_model.hw.bits import words
from iommufd_model.hw.iommu import DmaFault

from .test_cmd_stream import K4, Rig


def _attached(smmu_machine: Callable[..., Any]) -> tuple[Rig, Any]:
    r = Rig(smmu_machine, ats=True)
    d = r.domain()
    r.attach(d)
    r.map(d, 0x10_0000, K4, 4)
    return r, d


def test_the_atc_answers_until_atc_inv(smmu_machine: Callable[..., Any]) -> None:
    r, d = _attached(smmu_machine)
    assert r.sid in r.hw.atcs  # pci_enable_ats() after the STE got EATS = TRANS
    r.m_dev.dma_read(0x10_0000, 8)  # a translation request: cached by the device
    walks = r.hw.stats.walk_mem_refs
    r.m_dev.dma_read(0x10_0000, 8)
    assert r.hw.atc_hits == 1 and r.hw.stats.walk_mem_refs == walks  # translated, no walk
    d.pt.unmap(0x10_0000, K4)  # the table changes behind the ATC's back
    r.smmu.issue([C.tlbi_nh_asid(0, d.asid)])  # a TLBI does not reach the device
    r.m_dev.dma_read(0x10_0000, 8)  # stale, as on real hardware
    assert r.hw.atc_hits == 2
    r.smmu.atc_inv_master(r.smmu.masters[r.sid], 0)
    with pytest.raises(DmaFault, match="F_TRANSLATION"):
        r.m_dev.dma_read(0x10_0000, 8)


def test_unmap_sends_atc_inv_and_the_device_misses(smmu_machine: Callable[..., Any]) -> None:
    r, d = _attached(smmu_machine)
    r.m_dev.dma_read(0x10_1000, 8)
    assert plugin.domain_unmap(domain=d, iova=0x10_1000, size=K4) == K4
    with pytest.raises(DmaFault, match="F_TRANSLATION"):
        r.m_dev.dma_read(0x10_1000, 8)
    r.m_dev.dma_read(0x10_0000, 8)  # the neighbour page is still mapped


def test_atschk_refuses_translated_transactions_without_eats(
    smmu_machine: Callable[..., Any],
) -> None:
    r, _d = _attached(smmu_machine)
    r.m_dev.dma_read(0x10_2000, 8)
    master = r.smmu.masters[r.sid]
    ste = Ste.decode(words(r.m.memory.read(r.smmu.ste_addr(r.sid), 64)))
    ste.eats = 0  # EATS off while the device still holds translations (a broken driver)
    r.smmu.write_ste(master, ste.encode())
    with pytest.raises(DmaFault, match="EATS off"):
        r.m_dev.dma_read(0x10_2000, 8)


def test_blocking_disables_ats_and_empties_the_atc(smmu_machine: Callable[..., Any]) -> None:
    r, _d = _attached(smmu_machine)
    r.m_dev.dma_read(0x10_0000, 8)
    r.attach(None)
    assert r.sid not in r.hw.atcs
    with pytest.raises(DmaFault):
        r.m_dev.dma_read(0x10_0000, 8)
