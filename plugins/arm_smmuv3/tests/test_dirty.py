"""Dirty tracking as Linux 7.2's SMMUv3 does it: HTTU (CD.HA/HD) only in dirty-tracking
domains, DBM in their writable leaves, the SMMU clearing AP[2] on a write, and
arm_smmu_dirty_ops reading (and setting AP[2] again) without any TLBI."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.cd import Cd
from iommufd_arm_smmuv3.driver import FEATURES, plugin
from iommufd_arm_smmuv3.hw import Smmuv3
from iommufd_arm_smmuv3.option_sets import OPTION_SETS
from iommufd_arm_smmuv3.pgtable import PTE_AF, PTE_AP_RDONLY, PTE_DBM

import iommufd_model as im
from iommufd_model.hw.bits import words
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.uapi import iommufd as U

from .test_cmd_stream import K4, PROT, Rig

DIRTY = U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING


def _leaf(r: Rig, d: Any, iova: int) -> int:
    pt = d.pt
    ((slot, _iova, _level),) = pt._leaves(iova, iova)
    return int(r.m.memory.read_u64(slot))


def _cd0(r: Rig) -> Cd:
    return Cd.decode(words(r.m.memory.read(r.smmu.cd_addr(r.smmu.masters[r.sid], 0), 64)))


def test_httu_only_in_dirty_tracking_domains(smmu_machine: Callable[..., Any]) -> None:
    r = Rig(smmu_machine)
    plain = r.domain()
    r.attach(plain)
    assert not _cd0(r).ha and not _cd0(r).hd
    d = r.domain(DIRTY)
    r.attach(d)
    assert _cd0(r).ha and _cd0(r).hd
    r.map(d, 0x10_0000, K4, 2)
    r.map(d, 0x20_0000, K4, 1, prot=PROT & ~2)  # read-only: AP[2], no DBM
    assert _leaf(r, d, 0x10_0000) & (PTE_DBM | PTE_AP_RDONLY) == PTE_DBM  # born dirty
    assert _leaf(r, d, 0x20_0000) & (PTE_DBM | PTE_AP_RDONLY) == PTE_AP_RDONLY
    with pytest.raises(OSError) as exc:  # stage 2 cannot track (nest parent + dirty)
        r.domain(DIRTY | U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_dirty_bits_follow_dma_writes_without_tlbi(smmu_machine: Callable[..., Any]) -> None:
    r = Rig(smmu_machine)
    d = r.domain(DIRTY)
    r.attach(d)
    r.map(d, 0x10_0000, K4, 4)
    base = 0x10_0000
    # what the core does when tracking is enabled: wipe, then set_dirty_tracking (a no-op)
    assert (
        plugin.read_and_clear_dirty(domain=d, iova=base, length=4 * K4, clear=True, report=False)
        == []
    )
    plugin.set_dirty_tracking(domain=d, enable=True)
    r.mark()
    r.m_dev.dma_read(base + 2 * K4, 8)  # a read leaves the page clean
    r.m_dev.dma_write(base + K4 + 8, b"a")
    r.m_dev.dma_write(base + 3 * K4, b"b")
    assert _leaf(r, d, base + K4) & PTE_AP_RDONLY == 0  # the SMMU cleared AP[2]
    runs = plugin.read_and_clear_dirty(domain=d, iova=base, length=4 * K4, clear=False, report=True)
    assert runs == [(base + K4, K4), (base + 3 * K4, K4)]
    runs = plugin.read_and_clear_dirty(domain=d, iova=base, length=4 * K4, clear=True, report=True)
    assert runs == [(base + K4, K4), (base + 3 * K4, K4)]
    assert (
        plugin.read_and_clear_dirty(domain=d, iova=base, length=4 * K4, clear=True, report=True)
        == []
    )
    assert r.stream() == []  # no command at all: 7.2 issues no TLBI for dirty clearing
    r.m_dev.dma_write(base + 2 * K4, b"c")  # the read had cached it read-only: walks again
    assert plugin.read_and_clear_dirty(
        domain=d, iova=base, length=4 * K4, clear=False, report=True
    ) == [(base + 2 * K4, K4)]
    # reading while "off" is not refused by this driver (tracking is always on in HW)
    plugin.set_dirty_tracking(domain=d, enable=False)
    assert plugin.read_and_clear_dirty(
        domain=d, iova=base, length=4 * K4, clear=True, report=True
    ) == [(base + 2 * K4, K4)]


@pytest.mark.parametrize("httu", [True, False])
def test_cd_ha_acts_only_where_idr0_httu_implements_it(
    smmu_machine: Callable[..., Any], httu: bool
) -> None:
    """A CD with HA (as a guest may write one) on an SMMU without HTTU walks as if HA were
    clear: a leaf with AF = 0 is an access flag fault, and the leaf stays as it was."""
    r = Rig(smmu_machine, hw_access_flag=httu, hw_dirty=httu)
    d = r.domain()
    r.attach(d)
    r.map(d, 0x10_0000, K4, 1)
    cd_addr = r.smmu.cd_addr(r.smmu.masters[r.sid], 0)
    cd = _cd0(r)
    cd.ha = True
    for i, word in enumerate(cd.encode()):
        r.m.memory.write_u64(cd_addr + 8 * i, word)
    ((slot, _iova, _level),) = d.pt._leaves(0x10_0000, 0x10_0000)
    r.m.memory.write_u64(slot, _leaf(r, d, 0x10_0000) & ~PTE_AF)
    r.hw.cd_cache.clear()
    r.hw.tlb.flush_all()
    if httu:
        r.m_dev.dma_read(0x10_0000, 8)
        assert _leaf(r, d, 0x10_0000) & PTE_AF  # the SMMU set the access flag
    else:
        with pytest.raises(DmaFault):
            r.m_dev.dma_read(0x10_0000, 8)
        assert not _leaf(r, d, 0x10_0000) & PTE_AF


def test_dirty_tracking_declared_only_with_httu_dirty(vmm: Any) -> None:
    r = vmm()
    reply, _ = r.hw_info()
    assert reply.capabilities & U.IOMMU_HW_CAP_DIRTY_TRACKING
    r = vmm(hw_dirty=False)
    reply, _ = r.hw_info()
    assert not reply.capabilities & U.IOMMU_HW_CAP_DIRTY_TRACKING
    with pytest.raises(OSError) as exc:
        r.hwpt_alloc(r.ioas_alloc(), DIRTY)
    assert exc.value.errno == errno.EOPNOTSUPP


@pytest.mark.parametrize("opts", [o.name for o in OPTION_SETS if o.name != "s2-only"])
def test_every_option_set_declares_dirty_tracking_as_idr0_httu_says(opts: str) -> None:
    """Every SMMUv3 configuration the matrix sweeps takes DIRTY_TRACKING from IDR0.HTTU and
    COHACC (arm_smmu_dbm_capable), as hw_info's IOMMU_HW_CAP_DIRTY_TRACKING and the core's
    DIRTY_TRACKING allocation check do on the SMMU those options build; where it lacks it,
    the dirty_tracking cell is "unsupported" with the SMMU's refusal as the reason. (s2-only
    lacks it for want of stage 1; test_stages.py shows that one.)"""
    from iommufd_model.api import Feature
    from iommufd_model.scenarios import SCENARIOS
    from iommufd_model.scenarios.base import PASS, UNSUPPORTED, run_scenario

    option_set = next(o for o in OPTION_SETS if o.name == opts)
    m = im.Machine.build(iommus=["arm_smmuv3"], options={"arm_smmuv3": option_set.options})
    hw = m.iommus[0]
    assert isinstance(hw, Smmuv3)
    smmu = hw.driver_state
    idr0 = hw.mmio.read(R.IDR0, 4)
    declared = Feature.DIRTY_TRACKING in option_set.features(FEATURES)
    assert smmu.dbm_capable == declared == ((idr0 >> 6) & 3 >= 2)
    proc = m.new_process()
    fd = proc.open_iommufd()
    dev_id = fd.bind(m.add_pci_device(iommu=0))
    assert bool(fd.hw_info(dev_id).capabilities & U.IOMMU_HW_CAP_DIRTY_TRACKING) == declared
    ioas = fd.ioas_alloc()
    if declared:
        fd.hwpt_alloc(dev_id, ioas, flags=DIRTY)
    else:
        with pytest.raises(OSError) as exc:
            fd.hwpt_alloc(dev_id, ioas, flags=DIRTY)
        assert exc.value.errno == errno.EOPNOTSUPP
    result = run_scenario(SCENARIOS["dirty_tracking"], "arm_smmuv3", option_set=option_set)
    assert result.status == (PASS if declared else UNSUPPORTED), result.detail
    if not declared:
        assert "IDR0.HTTU is" in result.detail and "EOPNOTSUPP" in result.detail
