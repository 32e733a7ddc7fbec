"""STE / CD codecs and checks, configuration caches refreshed only by CFGI, TLB only by TLBI."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import events as E
from iommufd_arm_smmuv3.cd import Cd
from iommufd_arm_smmuv3.ste import CFG_NESTED, Ste

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.bits import pack, words
from iommufd_model.hw.iommu import DmaFault

RW = IOMMU_READ | IOMMU_WRITE
u64 = st.integers(0, (1 << 64) - 1)


@given(w=st.lists(u64, min_size=8, max_size=8))
def test_ste_codec_keeps_every_modelled_field(w: list[int]) -> None:
    ste = Ste.decode(w)
    again = Ste.decode(ste.encode())
    ste.raw = again.raw = ()
    assert again == ste


@given(w=st.lists(u64, min_size=8, max_size=8))
def test_cd_codec_keeps_every_modelled_field(w: list[int]) -> None:
    cd = Cd.decode(w)
    assert Cd.decode(cd.encode()) == cd


def test_ste_and_cd_legality() -> None:
    good_s2 = Ste(v=True, config=CFG_NESTED, s2aa64=True, s2t0sz=16, s2sl0=2)
    assert good_s2.illegal(20, 48) == ""
    assert "Config" in Ste(v=True, config=0b010).illegal(20, 48)
    assert "S2AA64" in Ste(v=True, config=0b110, s2t0sz=16, s2sl0=2).illegal(20, 48)
    assert "S2T0SZ" in Ste(v=True, config=0b110, s2aa64=True, s2t0sz=16, s2sl0=1).illegal(20, 48)
    assert Ste(v=True, config=0b110, s2aa64=True, s2t0sz=24, s2sl0=1).illegal(20, 48) == ""
    assert "S1CDMax" in Ste(v=True, config=0b101, s1cdmax=21).illegal(20, 48)
    assert "S1Fmt" in Ste(v=True, config=0b101, s1fmt=1).illegal(20, 48)
    ok = Cd(v=True, aa64=True, t0sz=16)
    assert ok.illegal() == ""
    assert Cd(v=True, aa64=True, t0sz=12).illegal() and Cd(v=True, t0sz=16).illegal()
    assert Cd(v=True, aa64=True, t0sz=16, tg0=1).illegal() and Cd(aa64=True, t0sz=16).illegal()


@pytest.fixture
def rig(smmu_machine: Any, paging_domain: Any) -> tuple:  # type: ignore[type-arg]
    m, hw, smmu = smmu_machine()
    dev = m.add_pci_device(iommu=0)
    domain = paging_domain(hw, dev)
    data = m.memory.alloc_frames(16)
    for i, pfn in enumerate(data):
        domain.pt.map(0x10_0000 + i * 4096, pfn << 12, 4096, RW)
        m.memory.write(pfn << 12, bytes([i]) * 16)
    return m, hw, smmu, dev, domain


def test_illegal_ste_and_cd_raise_config_events(rig: tuple, paging_domain: Any) -> None:  # type: ignore[type-arg]
    m, hw, smmu, dev, _domain = rig
    master = smmu.masters[dev.rid]
    bad = Ste.decode(words(m.memory.read(smmu.ste_addr(dev.rid), 64)))
    bad.config = 0b011  # reserved
    smmu.write_ste(master, bad.encode())
    with pytest.raises(DmaFault, match="C_BAD_STE"):
        dev.dma_read(0x10_0000, 4)
    assert hw.events[-1].id == E.C_BAD_STE and hw.events[-1].sid == dev.rid
    assert smmu.host_events[-1].id == E.C_BAD_STE  # delivered through the EVENTQ interrupt
    smmu.write_ste(master, smmu.make_cdtable_ste(master))
    cd = Cd.decode(words(m.memory.read(smmu.cd_addr(master, 0), 64)))
    cd.aa64 = False
    smmu.write_cd(master, 0, cd.encode())
    with pytest.raises(DmaFault, match="C_BAD_CD"):
        dev.dma_read(0x10_0000, 4)
    assert hw.events[-1].id == E.C_BAD_CD
    other = m.add_pci_device(iommu=0, rid=0x4000)  # no L2 table for that bus yet? probed: abort
    with pytest.raises(DmaFault, match="abort"):
        other.dma_read(0, 4)


def test_ste_cache_stale_until_cfgi_ste(rig: tuple, paging_domain: Any) -> None:  # type: ignore[type-arg]
    m, hw, smmu, dev, _domain = rig
    assert dev.dma_read(0x10_1000, 2) == b"\x01\x01"
    m.memory.write(smmu.ste_addr(dev.rid), pack(Ste(v=True).encode()))  # abort, no CFGI
    assert dev.dma_read(0x10_1000, 2) == b"\x01\x01"
    smmu.issue([C.cfgi_ste_range(dev.rid, 0)])  # covers SIDs rid & ~1 .. | 1
    with pytest.raises(DmaFault):
        dev.dma_read(0x10_1000, 2)
    assert not hw.events  # Config = abort reports nothing


def test_cd_cache_stale_until_cfgi_cd(rig: tuple, paging_domain: Any) -> None:  # type: ignore[type-arg]
    m, hw, smmu, dev, domain = rig
    master = smmu.masters[dev.rid]
    assert dev.dma_read(0x10_2000, 1) == b"\x02"
    other = paging_domain(hw, m.add_pci_device(iommu=0))
    other.pt.map(0x10_2000, domain.pt.iova_to_phys(0x10_3000), 4096, RW)
    cd = Cd.decode(words(m.memory.read(smmu.cd_addr(master, 0), 64)))
    cd.ttb0, cd.asid = other.pt.root, other.asid
    m.memory.write(smmu.cd_addr(master, 0), pack(cd.encode()))  # no CFGI_CD
    assert dev.dma_read(0x10_2000, 1) == b"\x02"
    smmu.issue([C.cfgi_ste(dev.rid + 8)])  # another StreamID's configuration
    smmu.issue([C.cfgi_cd_all(dev.rid + 8)])
    smmu.issue([C.cfgi_cd(dev.rid, 1)])  # another substream
    assert dev.dma_read(0x10_2000, 1) == b"\x02"
    smmu.issue([C.cfgi_cd(dev.rid, 0)])
    assert dev.dma_read(0x10_2000, 1) == b"\x03"


def test_cfgi_ste_does_drop_cds_of_that_stream(rig: tuple, paging_domain: Any) -> None:  # type: ignore[type-arg]
    _m, hw, smmu, dev, _domain = rig
    dev.dma_read(0x10_0000, 1)
    assert (dev.rid, 0) in hw.cd_cache
    smmu.issue([C.cfgi_all()])
    assert not hw.cd_cache and not hw.ste_cache


def stale_leaf(domain: object, iova: int) -> None:
    """Clear a leaf PTE without any invalidation (a buggy driver)."""
    domain.pt.unmap(iova, 4096)  # type: ignore[attr-defined]


def test_tlb_stale_until_tlbi_by_va_range_asid_and_all(rig: tuple, paging_domain: Any) -> None:  # type: ignore[type-arg]
    _m, hw, smmu, dev, domain = rig
    for i in range(16):
        assert dev.dma_read(0x10_0000 + i * 4096, 1) == bytes([i])
    for i in range(16):
        stale_leaf(domain, 0x10_0000 + i * 4096)
    assert dev.dma_read(0x10_5000, 1) == b"\x05"  # TLB hit on a cleared PTE
    hits = hw.stats.iotlb_hits
    smmu.issue([C.tlbi_va(C.TLBI_NH_VA, 0x10_5000, asid=domain.asid + 1)])  # other ASID
    assert dev.dma_read(0x10_5000, 1) == b"\x05" and hw.stats.iotlb_hits == hits + 1
    smmu.issue([C.tlbi_va(C.TLBI_NH_VA, 0x10_5000, asid=domain.asid)])  # one address, no range
    with pytest.raises(DmaFault, match="F_TRANSLATION"):
        dev.dma_read(0x10_5000, 1)
    assert dev.dma_read(0x10_6000, 1) == b"\x06"
    # range: (NUM + 1) << SCALE = 4 granules from 0x10_8000 -> 0x10_8000..0x10_b000
    smmu.issue([C.tlbi_va(C.TLBI_NH_VA, 0x10_8000, asid=domain.asid, num=1, scale=1, tg=1)])
    for i in range(8, 12):
        with pytest.raises(DmaFault):
            dev.dma_read(0x10_0000 + i * 4096, 1)
    assert dev.dma_read(0x10_C000, 1) == b"\x0c" and dev.dma_read(0x10_7000, 1) == b"\x07"
    smmu.issue([C.tlbi_va(C.TLBI_NH_VAA, 0x10_7000)])  # all ASIDs of VMID 0
    with pytest.raises(DmaFault):
        dev.dma_read(0x10_7000, 1)
    smmu.issue([C.tlbi_nh_asid(0, domain.asid)])
    with pytest.raises(DmaFault):
        dev.dma_read(0x10_C000, 1)
    ev = hw.events[-1]
    assert (ev.id, ev.sid, ev.input_addr, ev.read, ev.s2) == (
        E.F_TRANSLATION,
        dev.rid,
        0x10_C000,
        True,
        False,
    )


def test_s2_tlb_stale_until_tlbi_s2_ipa_and_nsnh_all(smmu_machine: Any, paging_domain: Any) -> None:
    (
        m,
        hw,
        smmu,
    ) = smmu_machine()[0:3]
    dev = m.add_pci_device(iommu=0)
    s2 = paging_domain(hw, dev, nest_parent=True)
    frames = m.memory.alloc_frames(4)
    for i, pfn in enumerate(frames):
        s2.pt.map(0x4000_0000 + i * 4096, pfn << 12, 4096, RW)
        m.memory.write(pfn << 12, bytes([0xA0 + i]))
        assert dev.dma_read(0x4000_0000 + i * 4096, 1) == bytes([0xA0 + i])
        stale_leaf(s2, 0x4000_0000 + i * 4096)
    smmu.issue([C.tlbi_va(C.TLBI_S2_IPA, 0x4000_0000, vmid=s2.vmid)])
    with pytest.raises(DmaFault, match="stage 2"):
        dev.dma_read(0x4000_0000, 1)
    assert hw.events[-1].s2 and hw.events[-1].ipa == 0x4000_0000
    smmu.issue([C.tlbi_nh_all(s2.vmid)])  # stage-1 invalidation leaves stage-2 entries
    assert dev.dma_read(0x4000_1000, 1) == b"\xa1"
    smmu.issue([C.tlbi_nsnh_all()])
    with pytest.raises(DmaFault):
        dev.dma_read(0x4000_1000, 1)


def test_driver_unmap_invalidates_with_range_commands(
    smmu_machine: Any, paging_domain: Any
) -> None:
    m, hw, _smmu = smmu_machine()
    dev = m.add_pci_device(iommu=0)
    from iommufd_arm_smmuv3.driver import plugin

    d = paging_domain(hw, dev)
    base = m.memory.alloc_contiguous(64) << 12
    plugin.domain_map(domain=d, iova=0x20_0000, pa=base, size=64 * 4096, prot=RW)
    dev.dma_read(0x20_0000, 64 * 4096)
    hw.executed.clear()
    plugin.domain_unmap(domain=d, iova=0x20_0000, size=47 * 4096)
    ops = [C.op(w0) for w0, _ in hw.executed]
    assert ops == [C.TLBI_NH_VA, C.TLBI_NH_VA, C.CMD_SYNC]
    with pytest.raises(DmaFault):
        dev.dma_read(0x20_0000 + 46 * 4096, 1)
    dev.dma_read(0x20_0000 + 47 * 4096, 1)
    m2, hw2, _smmu2 = smmu_machine(range_invalidation=False)
    dev2 = m2.add_pci_device(iommu=0)
    d2 = paging_domain(hw2, dev2)
    plugin.domain_map(domain=d2, iova=0, pa=base, size=4 * 4096, prot=RW)
    hw2.executed.clear()
    plugin.domain_unmap(domain=d2, iova=0, size=4 * 4096)
    assert [C.op(w0) for w0, _ in hw2.executed] == [C.TLBI_NH_VA] * 4 + [C.CMD_SYNC]


def test_driver_skips_an_illegal_command(smmu_machine: Any) -> None:
    _m, hw, smmu = smmu_machine()
    smmu.issue([(0x7F, 0), C.tlbi_nsnh_all()])
    assert smmu.cmdq_errors == [(1, 0x7F, 0)]
    assert C.op(hw.executed[-2][0]) == C.TLBI_NSNH_ALL  # the queue went on after the skip
