"""The command stream the driver issues, command by command, against the sequence Linux 7.2's
arm-smmu-v3.c issues for the same operation (worked out from its code: arm_smmu_write_entry's
steps, arm_smmu_domain_inv_range's batches, arm_smmu_attach_commit's ATC flushes).

Every CMD_SYNC is the MSI-polling kind (CS = IRQ, MSIAddr = the SYNC's own queue slot); the
streams below write it as ``SYNC`` after checking that."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.domain import SmmuDomain
from iommufd_arm_smmuv3.driver import plugin
from iommufd_arm_smmuv3.hw import Smmuv3
from iommufd_arm_smmuv3.kernel import SmmuDevice
from iommufd_arm_smmuv3.pgtable import MAIR_VALUE, PTE_AP_RDONLY, PTE_AP_UNPRIV, PTE_NG, PTE_XN
from iommufd_arm_smmuv3.ste import EATS_TRANS, Ste

from iommufd_model.driver import IOMMU_CACHE, IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.bits import get, words
from iommufd_model.hw.pci import PciDevice
from iommufd_model.machine import Machine
from iommufd_model.uapi import iommufd as U

from .conftest import GuestVm

SYNC = ("SYNC",)
PROT = IOMMU_READ | IOMMU_WRITE | IOMMU_CACHE
PA = 0x40_0000
K4, M2 = 1 << 12, 1 << 21
Cmd = tuple[int, int] | tuple[str]


class Rig:
    """One SMMU, one device, and a record of what the hardware executed from here on."""

    def __init__(self, smmu_machine: Callable[..., Any], ats: bool = False, **opts: Any) -> None:
        self.m, self.hw, self.smmu = smmu_machine(**opts)
        assert isinstance(self.hw, Smmuv3) and isinstance(self.smmu, SmmuDevice)
        self.m_dev: PciDevice = self.m.add_pci_device(iommu=0, ats=ats)
        self.sid = self.m_dev.rid
        self.mark()

    def mark(self) -> None:
        self.start = len(self.hw.executed)

    def stream(self) -> list[Cmd]:
        """What was executed since :meth:`mark`, SYNCs checked and abbreviated."""
        out: list[Cmd] = []
        base = self.smmu.cmdq.base
        for w0, w1 in self.hw.executed[self.start :]:
            if C.op(w0) == C.CMD_SYNC:
                addr = w1 & C.CMD1_SYNC_MSIADDR
                assert get(w0, 13, 12) == C.CS_IRQ and base <= addr < base + 4096
                assert get(w0, 23, 22) == 3 and get(w0, 27, 24) == 0xF and not w0 >> 32
                out.append(SYNC)
            else:
                out.append((w0, w1))
        self.mark()
        return out

    def domain(self, flags: int = 0) -> SmmuDomain:
        d = plugin.domain_alloc_user(
            iommu=self.hw, dev=self.m_dev, flags=flags, parent=None, viommu=None, user_data=None
        )
        assert isinstance(d, SmmuDomain)
        return d

    def attach(self, domain: Any) -> None:
        plugin.attach(iommu=self.hw, dev=self.m_dev, domain=domain)

    def map(self, d: SmmuDomain, iova: int, pgsize: int, count: int, prot: int = PROT) -> None:
        plugin.domain_map_pages(domain=d, iova=iova, pa=PA, pgsize=pgsize, pgcount=count, prot=prot)

    def unmap(self, d: SmmuDomain, iova: int, size: int) -> None:
        assert plugin.domain_unmap(domain=d, iova=iova, size=size) == size

    def ste(self) -> Ste:
        return Ste.decode(words(self.m.memory.read(self.smmu.ste_addr(self.sid), 64)))


@pytest.fixture
def rig(smmu_machine: Callable[..., Any]) -> Callable[..., Rig]:
    return lambda **kw: Rig(smmu_machine, **kw)


def va(asid: int, iova: int, **kw: Any) -> tuple[int, int]:
    return C.tlbi_va(C.TLBI_NH_VA, iova, asid=asid, leaf=True, **kw)


def test_first_stage1_attach(rig: Any) -> None:
    """A 20-bit PASID device gets a 2-level CD table: the leaf table of SSID 0 and its L1
    descriptor (non-leaf CFGI_CD), CD 0 from invalid (hitless: qwords 1..7, then qword 0),
    then the abort STE turned into a CD-table STE (hitless: the new pointer first, then
    Config), then PREFETCH_CFG. Without PASID the table is one linear CD: no L1 step."""
    r = rig()
    d = r.domain()
    r.attach(d)
    cd, ste = C.cfgi_cd(r.sid, 0), C.cfgi_ste(r.sid)
    l1 = C.cfgi_cd(r.sid, 0, leaf=False)
    assert r.stream() == [l1, SYNC, cd, SYNC, cd, SYNC, ste, SYNC, ste, SYNC, C.prefetch_cfg(r.sid)]
    assert (r.ste().s1fmt, r.ste().s1cdmax, r.ste().s1dss) == (2, 20, 2)  # 64K_L2, SSID0
    dev = r.m.add_pci_device(iommu=0, pasid_bits=0)
    r.mark()
    plugin.attach(iommu=r.hw, dev=dev, domain=d)
    cd, ste = C.cfgi_cd(dev.rid, 0), C.cfgi_ste(dev.rid)
    assert r.stream() == [cd, SYNC, cd, SYNC, ste, SYNC, ste, SYNC, C.prefetch_cfg(dev.rid)]


def test_map_issues_nothing_and_unmap_flushes_a_range_with_the_level_hint(rig: Any) -> None:
    r = rig()
    d = r.domain()
    r.attach(d)
    r.mark()
    r.map(d, 0x10_0000, K4, 4)
    r.map(d, 0x20_0000, M2, 1)
    r.map(d, 0x80_0000, K4, 33)
    assert r.stream() == []  # io-pgtable map never invalidates
    r.unmap(d, 0x10_0000, 4 * K4)  # 4 pages: NUM+1 = 1 unit of 2^2 pages, TTL 3 (level 3)
    assert r.stream() == [va(d.asid, 0x10_0000, num=0, scale=2, tg=1, ttl=3), SYNC]
    r.unmap(d, 0x20_0000, M2)  # one 2 MiB block: 2^9 pages, TTL 2 (level 2)
    assert r.stream() == [va(d.asid, 0x20_0000, num=0, scale=9, tg=1, ttl=2), SYNC]
    r.unmap(d, 0x80_0000, 33 * K4)  # 33 = 1 + 32: two commands
    assert r.stream() == [
        va(d.asid, 0x80_0000, num=0, scale=0, tg=1, ttl=3),
        va(d.asid, 0x80_1000, num=0, scale=5, tg=1, ttl=3),
        SYNC,
    ]


def test_without_range_invalidation_one_tlbi_per_page_up_to_the_threshold(rig: Any) -> None:
    """No IDR3.RIL: one TLBI_NH_VA per granule (no TG, no TTL); from MAX_TLBI_OPS = 512
    granules on, one TLBI_NH_ASID instead."""
    r = rig(range_invalidation=False)
    d = r.domain()
    r.attach(d)
    r.map(d, 0x10_0000, K4, 3)
    r.map(d, 0x40_0000, K4, 512)
    r.map(d, 0x80_0000, M2, 1)
    r.mark()
    r.unmap(d, 0x10_0000, 3 * K4)
    assert r.stream() == [va(d.asid, 0x10_0000 + i * K4) for i in range(3)] + [SYNC]
    r.unmap(d, 0x40_0000, M2)  # 512 pages of 4 KiB: too many, the whole ASID goes
    assert r.stream() == [C.tlbi_nh_asid(0, d.asid), SYNC]
    r.unmap(d, 0x80_0000, M2)  # one 2 MiB leaf: one command
    assert r.stream() == [va(d.asid, 0x80_0000), SYNC]


def test_leaves_of_two_sizes_are_two_gathers(rig: Any) -> None:
    r = rig()
    d = r.domain()
    r.attach(d)
    r.map(d, 0x1F_F000, K4, 1)
    r.map(d, 0x20_0000, M2, 1)
    r.mark()
    r.unmap(d, 0x1F_F000, K4 + M2)
    assert r.stream() == [
        va(d.asid, 0x1F_F000, num=0, scale=0, tg=1, ttl=3),
        SYNC,
        va(d.asid, 0x20_0000, num=0, scale=9, tg=1, ttl=2),
        SYNC,
    ]


def test_unattached_domain_unmap_issues_nothing_and_free_issues_nothing(rig: Any) -> None:
    r = rig()
    d = r.domain()
    r.map(d, 0x10_0000, K4, 4)
    r.unmap(d, 0x10_0000, 4 * K4)
    plugin.domain_free(domain=d)
    assert r.stream() == []


def test_replace_stage1_by_stage1_then_detach(rig: Any) -> None:
    """Replace: CD 0 changes ASID and TTB0 (two qwords: V=0, the rest, qword 0); the STE is
    unchanged (only PREFETCH_CFG); the old ASID lost its last user: TLBI_NH_ASID + SYNC.
    Blocking: the STE to abort (qword 0, then the now-unused qwords), PREFETCH_CFG, the ASID
    flush, then CD 0 cleared (V first, then the rest)."""
    r = rig()
    a, b = r.domain(), r.domain()
    r.attach(a)
    r.mark()
    r.attach(b)
    cd, ste = C.cfgi_cd(r.sid, 0), C.cfgi_ste(r.sid)
    assert r.stream() == [
        *(cd, SYNC) * 3,
        C.prefetch_cfg(r.sid),
        C.tlbi_nh_asid(0, a.asid),
        SYNC,
    ]
    r.attach(None)
    assert r.stream() == [
        *(ste, SYNC) * 2,
        C.prefetch_cfg(r.sid),
        C.tlbi_nh_asid(0, b.asid),
        SYNC,
        *(cd, SYNC) * 2,
    ]


def test_two_masters_share_the_asid_flush_only_at_the_last_detach(rig: Any) -> None:
    r = rig()
    d = r.domain()
    other = r.m.add_pci_device(iommu=0)
    r.attach(d)
    plugin.attach(iommu=r.hw, dev=other, domain=d)
    r.map(d, 0x10_0000, K4, 1)
    r.mark()
    r.unmap(d, 0x10_0000, K4)  # one tag entry, however many masters
    assert r.stream() == [va(d.asid, 0x10_0000, num=0, scale=0, tg=1, ttl=3), SYNC]
    plugin.attach(iommu=r.hw, dev=other, domain=None)
    assert C.tlbi_nh_asid(0, d.asid) not in r.stream()
    r.attach(None)
    assert C.tlbi_nh_asid(0, d.asid) in r.stream()


def test_nest_parent_unmap_stage2_then_nh_all_after_its_own_sync(vmm: Any) -> None:
    vm = GuestVm(vmm(), U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3)
    vm.attach_translating()
    hw = vm.hw
    vmid = vm.parent_domain.vmid
    start = len(hw.executed)
    vm.r.ioas_unmap(vm.ioas, 0, 16 << 20)  # 16 MiB of guest RAM in one area
    got = [c if C.op(c[0]) != C.CMD_SYNC else SYNC for c in hw.executed[start:]]
    parent = vm.parent_domain
    # the guest RAM is mapped in 4 KiB pages (the VMM's memory is not physically
    # contiguous): one range of 2^12 pages, TTL 3
    ranged = C.tlbi_va(C.TLBI_S2_IPA, 0, vmid=vmid, num=0, scale=12, tg=1, ttl=3, leaf=True)
    assert parent.pt.iova_to_phys(0) == -1
    assert got == [ranged, SYNC, C.tlbi_nh_all(vmid), SYNC]


def test_vsmmu_invalidation_is_converted_and_synced(guest_vm: Any) -> None:
    vm = guest_vm()
    vm.attach_translating()
    hw = vm.hw
    start = len(hw.executed)
    assert vm.invalidate([C.tlbi_nh_asid(0, 5), C.tlbi_nsnh_all()]) == (0, 2)
    vmid = vm.parent_domain.vmid
    got = [c if C.op(c[0]) != C.CMD_SYNC else SYNC for c in hw.executed[start:]]
    assert got == [C.tlbi_nh_asid(vmid, 5), C.tlbi_nh_all(vmid), SYNC]


def test_ats_device_attach_enables_ats_and_unmap_flushes_the_atc_after_a_sync(rig: Any) -> None:
    """A host stage-1 domain on an ATS-capable device: EATS = TRANS, the ATC flushed whole
    before ATS is enabled; an unmap invalidates the IOTLB, syncs, then the ATC range."""
    r = rig(ats=True)
    d = r.domain()
    r.attach(d)
    everything = C.atc_inv(r.sid, 0, C.ATC_INV_SIZE_ALL)
    assert r.stream()[-2:] == [everything, SYNC]
    assert r.ste().eats == EATS_TRANS
    r.map(d, 0x10_0000, K4, 3)
    r.mark()
    r.unmap(d, 0x10_1000, 2 * K4)  # pages 0x101, 0x102: the span 0x100..0x103
    assert r.stream() == [
        va(d.asid, 0x10_1000, num=0, scale=1, tg=1, ttl=3),
        SYNC,
        C.atc_inv(r.sid, 0x10_0000, 2),
        SYNC,
    ]
    r.attach(None)  # ATS off: the whole ATC once more
    stream = r.stream()
    assert everything in stream and r.ste().eats == 0


def test_command_fetch_abort_is_retried(rig: Any) -> None:
    r = rig()
    ring = r.hw._cmdq
    assert ring is not None
    real: Callable[[int], bytes] = ring.read
    failures = [1]

    def flaky(index: int) -> bytes:
        if failures[0]:
            failures[0] -= 1
            raise OSError(5, "fetch abort")
        return real(index)

    ring.read = flaky
    r.smmu.issue([C.tlbi_nh_asid(0, 7)])
    assert r.smmu.cmdq_errors[-1][0] == R.CERROR_ABT
    assert r.stream() == [C.tlbi_nh_asid(0, 7), SYNC]  # the same command, fetched again
    failures[0] = 100  # an abort that never clears: the SYNC times out
    with pytest.raises(OSError):
        r.smmu.issue([C.tlbi_nh_asid(0, 8)])


def test_reset_programs_cr1_cr2_and_atschk(smmu_machine: Any) -> None:
    _m, hw, _smmu = smmu_machine()
    cr1 = hw.mmio.read(R.CR1, 4)
    # tables and queues: inner shareable (3), outer and inner write-back (1)
    assert [get(cr1, hi, lo) for hi, lo in ((11, 10), (9, 8), (7, 6), (5, 4), (3, 2), (1, 0))] == [
        3,
        1,
        1,
        3,
        1,
        1,
    ]
    assert hw.mmio.read(R.CR2, 4) == R.CR2_PTM | R.CR2_RECINVSID
    assert hw.mmio.read(R.CR0, 4) & R.CR0_ATSCHK  # IDR0.ATS: ATS translations are checked
    start = [C.op(w0) for w0, _ in hw.executed[:4]]
    assert start == [C.CFGI_STE_RANGE, C.CMD_SYNC, C.TLBI_NSNH_ALL, C.CMD_SYNC]


def test_raw_bits_of_leaves_cd_and_stes(rig: Any) -> None:
    r = rig(attr_types_ovr=False)
    d = r.domain()
    fmt = d.pt.fmt
    rw = fmt.make_leaf(PA, 0, PROT)
    ro = fmt.make_leaf(PA, 0, IOMMU_READ | IOMMU_CACHE)
    assert rw & PTE_AP_UNPRIV and rw & PTE_NG and not rw & PTE_XN and not rw & PTE_AP_RDONLY
    assert ro & PTE_AP_RDONLY and get(rw, 4, 2) == 1 and get(rw, 9, 8) == 3  # AttrIndx 1, IS
    assert get(MAIR_VALUE, 31, 24) == 0xF4  # slot 3: inner non-cacheable, outer WB
    r.attach(d)
    ste = r.ste()
    assert ste.shcfg == 0  # no IDR1.ATTR_TYPES_OVR: SHCFG is left 0
    parent = r.domain(U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    r.attach(parent)
    ste = r.ste()
    assert ste.s2ptw and ste.shcfg == 0 and ste.s2r and ste.s2aa64
    r2 = Rig(lambda **kw: _machine(**kw))
    r2.attach(r2.domain(U.IOMMU_HWPT_ALLOC_NEST_PARENT))
    assert r2.ste().shcfg == 1  # with the feature: SHCFG = incoming


def _machine(**kw: Any) -> tuple[Machine, Smmuv3, SmmuDevice]:
    m = Machine.build(iommus=["arm_smmuv3"], options={"arm_smmuv3": dict(kw)})
    hw = m.iommus[0]
    assert isinstance(hw, Smmuv3)
    return m, hw, hw.driver_state
