"""Dirty tracking as Linux 7.2's SMMUv3 does it: HTTU (CD.HA/HD) only in dirty-tracking
domains, DBM in their writable leaves, the SMMU clearing AP[2] on a write, and
arm_smmu_dirty_ops reading (and setting AP[2] again) without any TLBI."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from iommufd_arm_smmuv3.cd import Cd
from iommufd_arm_smmuv3.driver import plugin
from iommufd_arm_smmuv3.pgtable import PTE_AP_RDONLY, PTE_DBM

from iommufd_model.hw.bits import words
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
