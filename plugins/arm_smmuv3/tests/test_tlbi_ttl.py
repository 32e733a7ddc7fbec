"""Range TLBIs with a TTL level hint (IHI 0070 TLBI_NH_VA / TLBI_S2_IPA: TG, TTL). A non-zero
TTL names the level of the leaves the command invalidates, and the architecture lets the SMMU
skip entries of other levels. The model's reading (``Smmuv3._tlbi_range``): it keeps every
entry larger than a leaf of the named level and drops the rest. So a driver whose TTL names a
smaller level than the leaf leaves it cached, while Linux 7.2's own unmap streams
(``arm_smmu_cmdq_batch_add_range``: TTL = 4 - (log2(granule) - 3) / (tg - 3) for leaves)
still invalidate everything they unmap: 4 KiB, 2 MiB and 1 GiB leaves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3.driver import plugin

from iommufd_model.hw.iommu import DmaFault

from .test_cmd_stream import K4, M2, PROT, SYNC, Rig, va

G1 = 1 << 30
IOVA = 1 << 32


def _cached_shifts(r: Any) -> list[int]:
    return sorted(key[0] for key, _entry in r.hw.tlb.entries())


@pytest.mark.parametrize(("pgsize", "ttl"), [(K4, 3), (M2, 2), (G1, 1)])
def test_the_72_unmap_stream_invalidates_its_leaves(
    smmu_machine: Callable[..., Any], pgsize: int, ttl: int
) -> None:
    r = Rig(smmu_machine)
    d = r.domain()
    r.attach(d)
    plugin.domain_map_pages(domain=d, iova=IOVA, pa=0, pgsize=pgsize, pgcount=1, prot=PROT)
    assert r.m_dev.dma_read(IOVA + 8, 8) is not None
    assert _cached_shifts(r) == [pgsize.bit_length() - 1]
    r.mark()
    r.unmap(d, IOVA, pgsize)
    scale = pgsize.bit_length() - 1 - 12
    assert r.stream() == [va(d.asid, IOVA, num=0, scale=scale, tg=1, ttl=ttl), SYNC]
    assert _cached_shifts(r) == []
    with pytest.raises(DmaFault):
        r.m_dev.dma_read(IOVA + 8, 8)


@pytest.mark.parametrize(
    ("ttl", "dropped"),
    [(3, False), (2, True), (1, True), (0, True)],
)
def test_a_ttl_naming_a_smaller_level_leaves_the_leaf_cached(
    smmu_machine: Callable[..., Any], ttl: int, dropped: bool
) -> None:
    """A 2 MiB leaf cached, then a range TLBI over it whose TTL names level 3 (4 KiB leaves):
    the entry stays, as the architecture allows (the model's reading keeps it, so a wrong
    hint shows); TTL 2 names its level, TTL 1 a larger one (the entry cannot be larger than
    such a leaf: dropped), TTL 0 gives no hint."""
    r = Rig(smmu_machine)
    d = r.domain()
    r.attach(d)
    plugin.domain_map_pages(domain=d, iova=IOVA, pa=0, pgsize=M2, pgcount=1, prot=PROT)
    r.m_dev.dma_read(IOVA + K4, 8)
    assert _cached_shifts(r) == [21]
    r.smmu.issue([va(d.asid, IOVA, num=0, scale=9, tg=1, ttl=ttl)])
    assert _cached_shifts(r) == ([] if dropped else [21])
    r.smmu.issue([C.tlbi_va(C.TLBI_NH_VA, IOVA, asid=d.asid, leaf=True)])  # TG 0: no hint
    assert _cached_shifts(r) == []
