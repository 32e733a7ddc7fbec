"""End to end through the raw uAPI: paging DMA, hw_info, and the vSMMU (nest parent, vIOMMU,
vDEVICE, vSTE nested HWPT, guest stage-1 tables in guest RAM, invalidation, vEVENTQ)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import events as E
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.ste import CFG_BYPASS, CFG_NESTED, CFG_S1_TRANS, STE0_V, Ste

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.bits import pack, words
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.uapi import iommufd as U

RW = IOMMU_READ | IOMMU_WRITE
G = 0  # as conftest.GuestVm
GUEST_RAM = 16 << 20
CD_IPA = G + 0x20_0000
GVA = 0x1234_0000
GUEST_ASID = 5
VSID = 0x42


def test_paging_dma_then_unmap_faults_with_f_translation(vmm: Any) -> None:
    r = vmm()
    hw = r.machine.iommus[0]
    ioas = r.ioas_alloc()
    va = r.buffer(1 << 21, 3)
    iova = r.ioas_map(ioas, va, 1 << 21)
    r.fd.attach(r.dev_id, ioas)
    assert r.dev.dma_read(iova, 1 << 21) == r.proc.read(va, 1 << 21)
    r.dev.dma_write(iova + 0x1000, b"hello")
    assert r.proc.read(va + 0x1000, 5) == b"hello"
    assert hw.stats.walk_mem_refs > 0 and hw.stats.iotlb_hits > 0
    r.ioas_unmap(ioas, iova, 1 << 21)
    with pytest.raises(DmaFault, match="F_TRANSLATION"):
        r.dev.dma_read(iova + 0x1000, 4)
    ev = hw.driver_state.host_events[-1]  # read back from the EVENTQ by the driver's IRQ thread
    assert (ev.id, ev.sid, ev.input_addr) == (E.F_TRANSLATION, r.dev.rid, iova + 0x1000)


def test_msi_window_is_reserved(vmm: Any) -> None:
    r = vmm()
    ioas = r.ioas_alloc()
    r.fd.attach(r.dev_id, ioas)
    with pytest.raises(OSError) as exc:
        r.ioas_map(ioas, r.buffer(4096, 1), 4096, iova=0x800_0000)
    assert exc.value.errno == errno.EINVAL  # the software MSI window (0x800_0000, 1 MiB)


def test_hw_info_reports_the_id_registers(vmm: Any) -> None:
    r = vmm()
    hw = r.machine.iommus[0]
    reply, data = r.hw_info()
    assert reply.data_type == U.IOMMU_HW_INFO_TYPE_ARM_SMMUV3
    assert len(data) == U.IommuHwInfoArmSmmuv3.SIZE
    info = U.IommuHwInfoArmSmmuv3.unpack(data)
    assert info.idr0 == hw.mmio.read(R.IDR0, 4) and info.idr5 == hw.mmio.read(R.IDR5, 4)
    assert info.aidr == hw.mmio.read(R.AIDR, 4) and info.iidr == hw.mmio.read(R.IIDR, 4)
    with pytest.raises(OSError) as exc:
        r.hw_info(U.IOMMU_HW_INFO_TYPE_INTEL_VTD)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_nested_dma_walks_guest_tables_through_stage_2(guest_vm: Any) -> None:
    vm = guest_vm()
    data = vm.attach_translating()
    r, hw = vm.r, vm.hw
    assert r.dev.dma_read(GVA, len(data)) == data
    ste = Ste.decode(words(r.machine.memory.read(vm.smmu.ste_addr(r.dev.rid), 64)))
    parent = vm.parent_domain
    assert ste.config == CFG_NESTED and ste.s2vmid == parent.vmid and ste.mev
    assert ste.s1ctxptr == CD_IPA and ste.s2ttb == parent.pt.root
    before = hw.stats.walk_mem_refs
    hw.tlb.flush_all()
    r.dev.dma_read(GVA, 1)
    # four guest descriptors, each behind a stage-2 walk, plus the output's stage-2 walk
    s2_refs = 4 - parent.pt._leaves(G, G)[0][2]  # radix level of the S2 leaf
    assert hw.stats.walk_mem_refs - before == 4 + 4 * s2_refs + s2_refs
    r.dev.dma_write(GVA + 4096, b"guest")
    assert r.proc.read(vm.ram + 0x1_1000, 5) == b"guest"


def test_viommu_invalidation_rewrites_vmid_and_vsid(guest_vm: Any) -> None:
    vm = guest_vm()
    data = vm.attach_translating()
    r, hw = vm.r, vm.hw
    assert r.dev.dma_read(GVA, 8) == data[:8]
    fresh = vm.remap(12)
    assert r.dev.dma_read(GVA, 8) == data[:8]  # stale until the guest invalidates
    hw.executed.clear()
    tlbi = C.tlbi_va(C.TLBI_NH_VA, GVA, vmid=0x777, asid=GUEST_ASID, num=3, tg=1)
    assert vm.invalidate([tlbi, C.cfgi_cd(VSID, 0)]) == (0, 2)
    assert r.dev.dma_read(GVA, 4 * 4096) == fresh
    vmid = vm.parent_domain.vmid
    (w0, _), (c0, _), _sync = hw.executed
    assert (w0 >> 32) & 0xFFFF == vmid and c0 >> 32 == r.dev.rid
    hw.executed.clear()
    assert vm.invalidate([C.tlbi_nsnh_all()]) == (0, 1)
    assert C.op(hw.executed[0][0]) == C.TLBI_NH_ALL and (hw.executed[0][0] >> 32) == vmid


def test_viommu_invalidation_entry_num_is_the_first_rejected_entry(guest_vm: Any) -> None:
    vm = guest_vm()
    data = vm.attach_translating()
    r, hw = vm.r, vm.hw
    r.dev.dma_read(GVA, 8)
    fresh = vm.remap(13)
    good = C.tlbi_nh_asid(0, GUEST_ASID)
    assert vm.invalidate([good, C.cfgi_ste(VSID)]) == (errno.EIO, 1)  # CFGI_STE: not allowed
    # As the kernel: the accepted entry was converted but its batch was never issued.
    assert r.dev.dma_read(GVA, 8) == data[:8]
    assert vm.invalidate([C.cfgi_cd(0x99, 0)]) == (errno.EIO, 0)  # unknown vSID
    assert vm.invalidate([C.cmd_sync()]) == (errno.EIO, 0)
    assert vm.invalidate([good], data_type=99) == (errno.EINVAL, 0)
    assert vm.invalidate([good]) == (0, 1)
    assert r.dev.dma_read(GVA, 8) == fresh[:8]
    assert hw.mmio.read(R.GERROR, 4) == hw.mmio.read(R.GERRORN, 4)
    long_entry = [C.encode(good) + bytes(8), C.encode(good) + b"\x01" + bytes(7)]
    assert vm.r.invalidate(vm.viommu, U.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, long_entry) == (
        errno.E2BIG,
        0,
    )


def guest_write_fault(vm: Any, offset: int = 0) -> tuple[int, bytes]:
    """A translating guest whose stage 1 lost the page at GVA + 3 pages (unmapped and
    invalidated), a DMA write ``offset`` into it: (the vEVENTQ fd, what a read of it gives)."""
    vm.attach_translating()
    r = vm.r
    qfd = r.veventq_alloc(vm.viommu, U.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3)
    vm.s1.unmap(GVA + 3 * 4096, 4096)
    assert vm.invalidate([C.tlbi_va(C.TLBI_NH_VA, GVA + 3 * 4096, asid=GUEST_ASID)]) == (0, 1)
    with pytest.raises(DmaFault):
        r.dev.dma_write(GVA + 3 * 4096 + offset, b"x")
    return qfd, r.proc.file(qfd).read(4096)


def test_guest_faults_reach_the_veventq_with_the_vsid(guest_vm: Any) -> None:
    vm = guest_vm()
    r = vm.r
    qfd, out = guest_write_fault(vm)
    header = U.IommufdVeventHeader.unpack(out[:8])
    assert header.flags == 0 and len(out) == 8 + E.EVENT_SIZE
    ev = E.Event.decode(out[8:])
    assert (ev.id, ev.sid, ev.input_addr, ev.read, ev.s2) == (
        E.F_TRANSLATION,
        VSID,
        GVA + 3 * 4096,
        False,
        False,
    )
    assert vm.hw.events[-1].sid == r.dev.rid  # the hardware record has the physical SID
    # A stage-2 fault is the host's business: not forwarded.
    vm.s1.map(0x9000_0000, G + GUEST_RAM + 0x1000, 4096, RW)
    with pytest.raises(DmaFault, match="stage 2"):
        r.dev.dma_read(0x9000_0000, 4)
    assert r.proc.file(qfd).read(4096) == b""
    assert vm.smmu.host_events[-1].s2


def test_bad_vstes_are_eio_and_change_nothing(guest_vm: Any) -> None:
    vm = guest_vm()
    vm.r.vdevice_alloc(vm.viommu, VSID)
    before = vm.snapshot()
    for ste0, ste1 in (
        (STE0_V | (CFG_NESTED << 1), 0),  # Config not allowed
        (STE0_V | (0b110 << 1), 0),  # S2 only
        (STE0_V | (CFG_S1_TRANS << 1) | (1 << 52), 0),  # bit outside NESTING_ALLOWED_0
        (STE0_V | (CFG_S1_TRANS << 1), 1 << 44),  # SHCFG: not the guest's
        (STE0_V | (CFG_S1_TRANS << 1), 2 << 28),  # EATS S1CHK
    ):
        with pytest.raises(OSError) as exc:
            vm.nested_hwpt(ste0, ste1)
        assert exc.value.errno == errno.EIO
        assert vm.snapshot() == before
    st = pack([STE0_V | (CFG_BYPASS << 1), 0])
    for data, code in (
        (st[:8], errno.EINVAL),  # a short struct
        # Longer than the struct is EINVAL in 7.2 (iommu_copy_struct_from_user checks the
        # length before copy_struct_from_user could say E2BIG), even with a zero tail.
        (st + b"\x01" + bytes(7), errno.EINVAL),
        (st + bytes(8), errno.EINVAL),
    ):
        with pytest.raises(OSError) as exc:
            vm.r.hwpt_alloc(vm.viommu, 0, U.IOMMU_HWPT_DATA_ARM_SMMUV3, data)
        assert exc.value.errno == code
    with pytest.raises(OSError) as exc:  # nested on the parent HWPT, not on the vIOMMU
        vm.r.hwpt_alloc(vm.parent, 0, U.IOMMU_HWPT_DATA_ARM_SMMUV3, st)
    assert exc.value.errno == errno.EOPNOTSUPP
    assert vm.snapshot() == before


def test_bypass_and_invalid_vstes(guest_vm: Any) -> None:
    vm = guest_vm()
    r = vm.r
    data = vm.fill(G + 0x1_0000, 21)
    bypass = vm.nested_hwpt(STE0_V | (CFG_BYPASS << 1))  # no vDEVICE needed
    r.fd.attach(r.dev_id, bypass)
    assert r.dev.dma_read(G + 0x1_0000, 16) == data[:16]  # the IPA space, through stage 2
    invalid = vm.nested_hwpt(0x1234_5678_0000_0000)  # V = 0: everything else ignored
    r.fd.attach(r.dev_id, invalid)
    with pytest.raises(DmaFault, match="abort"):
        r.dev.dma_read(G + 0x1_0000, 16)
    translate = vm.nested_hwpt(STE0_V | (CFG_S1_TRANS << 1) | CD_IPA)
    with pytest.raises(OSError) as exc:  # translating nested domains need a vDEVICE
        r.fd.attach(r.dev_id, translate)
    assert exc.value.errno == errno.ENOENT


def test_nest_parent_unmap_flushes_nested_translations(guest_vm: Any) -> None:
    vm = guest_vm()
    data = vm.attach_translating()
    r = vm.r
    assert r.dev.dma_read(GVA, 8) == data[:8]
    r.ioas_unmap(vm.ioas, G, GUEST_RAM)
    with pytest.raises(DmaFault):
        r.dev.dma_read(GVA, 8)
