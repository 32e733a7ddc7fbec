"""Substreams as Linux 7.2 gives them: IOMMU_HWPT_ALLOC_PASID stage-1 domains on PASIDs,
linear and 2-level CD tables, S1DSS, the SSID in events and commands."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import events as E
from iommufd_arm_smmuv3.driver import plugin
from iommufd_arm_smmuv3.ste import S1DSS_SSID0, S1DSS_TERMINATE, Ste

from iommufd_model.hw.bits import words
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.scenarios.base import pattern
from iommufd_model.uapi import iommufd as U

from .conftest import RawVmm
from .test_cmd_stream import SYNC, Rig

BUF = 4 * 4096


def _ste(r: RawVmm) -> Ste:
    smmu = r.machine.iommus[0]
    return Ste.decode(words(r.machine.memory.read(smmu.driver_state.ste_addr(r.dev.rid), 64)))


def _two_ioas(r: RawVmm) -> tuple[int, int, int, int, int]:
    """RID HWPT over IOAS A and a PASID HWPT over IOAS B, both with the same IOVA mapped."""
    a, b = r.ioas_alloc(), r.ioas_alloc()
    rid = r.hwpt_alloc(a, U.IOMMU_HWPT_ALLOC_PASID)
    pas = r.hwpt_alloc(b, U.IOMMU_HWPT_ALLOC_PASID)
    iova = r.ioas_map(a, r.buffer(BUF, 1), BUF)
    r.ioas_map(b, r.buffer(BUF, 2), BUF, iova)
    return a, b, rid, pas, iova


def test_pasid_domain_beside_the_rid_domain(vmm: Any) -> None:
    r = vmm()
    _a, _b, rid, pas, iova = _two_ioas(r)
    r.fd.attach(r.dev_id, rid)
    r.fd.attach(r.dev_id, pas, pasid=5)
    assert r.dev.dma_read(iova, 16) == pattern(1, 16)
    assert r.dev.dma_read(iova, 16, pasid=5) == pattern(2, 16)
    ste = _ste(r)
    assert (ste.s1fmt, ste.s1cdmax, ste.s1dss) == (2, 20, S1DSS_SSID0)
    hw = r.machine.iommus[0]
    with pytest.raises(DmaFault, match="C_BAD_CD"):  # CD 6 was never written
        r.dev.dma_read(iova, 8, pasid=6)
    ev = hw.events[-1]
    assert (ev.id, ev.sid, ev.ssid) == (E.C_BAD_CD, r.dev.rid, 6)  # SSV and SSID recorded
    with pytest.raises(DmaFault, match="L1 CD descriptor not valid"):  # no leaf for 5000
        r.dev.dma_read(iova, 8, pasid=5000)
    assert (hw.events[-1].id, hw.events[-1].ssid) == (E.C_BAD_SUBSTREAMID, 5000)
    r.fd.detach(r.dev_id, pasid=5)
    with pytest.raises(DmaFault, match="C_BAD_CD"):
        r.dev.dma_read(iova, 8, pasid=5)
    assert r.dev.dma_read(iova, 16) == pattern(1, 16)  # the RID is untouched


def test_pasid_on_a_blocked_rid_uses_s1dss_terminate(vmm: Any) -> None:
    r = vmm()
    _a, _b, _rid, pas, iova = _two_ioas(r)
    r.fd.attach(r.dev_id, pas, pasid=1)
    ste = _ste(r)
    assert ste.config == 0b101 and ste.s1dss == S1DSS_TERMINATE
    assert r.dev.dma_read(iova, 8, pasid=1) == pattern(2, 8)
    with pytest.raises(DmaFault):  # traffic without a PASID is terminated
        r.dev.dma_read(iova, 8)
    assert r.machine.iommus[0].events[-1].id == E.F_STREAM_DISABLED
    r.fd.detach(r.dev_id, pasid=1)
    assert _ste(r).config == 0  # the last substream gone: a plain abort STE again


def test_set_dev_pasid_command_streams(smmu_machine: Callable[..., Any]) -> None:
    """CD 1 shares the leaf table of CD 0: only its two write steps. CD 1024 needs a new
    leaf table: the L1 descriptor's non-leaf CFGI_CD first. The STE already points at the
    CD table with the right EATS: untouched. Removing: CD cleared in two steps, and the
    domain's ASID flushed once its last user left."""
    r = Rig(smmu_machine)
    rid, p1 = r.domain(U.IOMMU_HWPT_ALLOC_PASID), r.domain(U.IOMMU_HWPT_ALLOC_PASID)
    r.attach(rid)
    r.mark()
    plugin.set_dev_pasid(iommu=r.hw, dev=r.m_dev, pasid=1, domain=p1)
    cd1 = C.cfgi_cd(r.sid, 1)
    assert r.stream() == [cd1, SYNC, cd1, SYNC]
    plugin.set_dev_pasid(iommu=r.hw, dev=r.m_dev, pasid=1024, domain=p1)
    cd2 = C.cfgi_cd(r.sid, 1024)
    assert r.stream() == [C.cfgi_cd(r.sid, 1024, leaf=False), SYNC, cd2, SYNC, cd2, SYNC]
    plugin.remove_dev_pasid(iommu=r.hw, dev=r.m_dev, pasid=1)
    assert r.stream() == [cd1, SYNC, cd1, SYNC]  # p1 still used by PASID 1024
    plugin.remove_dev_pasid(iommu=r.hw, dev=r.m_dev, pasid=1024)
    assert r.stream() == [cd2, SYNC, cd2, SYNC, C.tlbi_nh_asid(0, p1.asid), SYNC]


def test_substreams_in_use_refuse_stage2_and_stage2_refuses_substreams(
    smmu_machine: Callable[..., Any],
) -> None:
    r = Rig(smmu_machine)
    s1 = r.domain(U.IOMMU_HWPT_ALLOC_PASID)
    s2 = r.domain(U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    r.attach(s2)
    with pytest.raises(OSError) as exc:  # the RID's STE is a stage-2 STE, no CD table
        plugin.set_dev_pasid(iommu=r.hw, dev=r.m_dev, pasid=1, domain=s1)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:  # a stage-2 domain cannot go on a PASID
        plugin.set_dev_pasid(iommu=r.hw, dev=r.m_dev, pasid=1, domain=s2)
    assert exc.value.errno == errno.EINVAL
    r.attach(None)
    plugin.set_dev_pasid(iommu=r.hw, dev=r.m_dev, pasid=1, domain=s1)
    before = r.m.memory.read(r.smmu.ste_addr(r.sid), 64)
    with pytest.raises(OSError) as exc:
        r.attach(s2)
    assert exc.value.errno == errno.EBUSY
    assert r.m.memory.read(r.smmu.ste_addr(r.sid), 64) == before


def test_nest_parent_with_pasid_flag_is_eopnotsupp(vmm: Any) -> None:
    r = vmm()
    ioas = r.ioas_alloc()
    with pytest.raises(OSError) as exc:
        r.hwpt_alloc(ioas, U.IOMMU_HWPT_ALLOC_NEST_PARENT | U.IOMMU_HWPT_ALLOC_PASID)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_linear_cd_table_without_cd2l_and_hw_info(vmm: Any) -> None:
    r = vmm(cd2l=False)
    reply, _ = r.hw_info()
    assert reply.max_pasid_log2 == 20
    _a, _b, rid, pas, iova = _two_ioas(r)
    r.fd.attach(r.dev_id, rid)
    r.fd.attach(r.dev_id, pas, pasid=1023)
    ste = _ste(r)
    assert (ste.s1fmt, ste.s1cdmax) == (0, 10)  # 1024 linear CDs: 64 KiB
    assert r.dev.dma_read(iova, 8, pasid=1023) == pattern(2, 8)
    with pytest.raises(DmaFault, match="SubstreamID out of range"):
        r.dev.dma_read(iova, 8, pasid=1024)
