"""The CMDQV hardware queue: a guest-owned VCMDQ in guest RAM that the SMMU consumes directly
(no IOMMU_HWPT_INVALIDATE, no trap), with the VINTF's VMID and vSID->pSID enforced."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.cmdqv import (
    VCMDQ_CONFIG,
    VCMDQ_CONS,
    VCMDQ_EN,
    VCMDQ_GERROR,
    VCMDQ_GERRORN,
    VCMDQ_PROD,
    VCMDQ_STATUS,
    VINTF_PAGE_SIZE,
)
from iommufd_arm_smmuv3.vsmmu import VintfWindow

from iommufd_model.hw.bits import words
from iommufd_model.uapi import iommufd as U

G = 0  # as conftest.GuestVm
GVA = 0x1234_0000
GUEST_ASID = 5
VSID = 0x42
QUEUE_IPA = G + 0x30_0000  # 4 KiB of guest RAM: 256 commands
QLEN = 4096
CMDQV_DATA = bytes(16)  # struct iommu_viommu_tegra241_cmdqv, out fields only


class GuestQueue:
    """What the guest's arm-smmu-v3 driver does with a VCMDQ through the mapped VINTF page."""

    def __init__(self, vm: Any, lidx: int = 0) -> None:
        self.vm = vm
        out = U.IommuViommuTegra241Cmdqv.unpack(vm.viommu_out)
        # the VINTF page, mapped through mmap() of the iommufd at the offset the kernel gave
        self.window = VintfWindow(vm.r.fd.mmap(out.out_vintf_mmap_offset, VINTF_PAGE_SIZE))
        self.off = lidx * 0x80
        self.prod = 0

    def reg(self, reg: int) -> int:
        return int(self.window.read(self.off + reg, 4))

    def enable(self) -> None:
        self.window.write(self.off + VCMDQ_CONFIG, VCMDQ_EN, 4)

    def push(self, *cmds: tuple[int, int]) -> None:
        for cmd in cmds:
            slot = QUEUE_IPA + (self.prod & 0xFF) * 16
            self.vm.r.proc.write(self.vm.ram + slot - G, C.encode(cmd))
            self.prod = (self.prod + 1) & 0x1FF  # 256 entries: wrap bit 8
        self.window.write(self.off + VCMDQ_PROD, self.prod, 4)


def cmdqv_vm(guest_vm: Any) -> Any:
    vm = guest_vm(U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV, CMDQV_DATA)
    return vm


def test_hw_info_and_vintf_allocation(guest_vm: Any, vmm: Any) -> None:
    vm = cmdqv_vm(guest_vm)
    reply, data = vm.r.hw_info(U.IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV)
    assert reply.data_type == U.IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV
    info = U.IommuHwInfoTegra241Cmdqv.unpack(data)
    assert (info.version, info.log2vcmdqs, info.log2vsids) == (1, 1, 4)
    out = U.IommuViommuTegra241Cmdqv.unpack(vm.viommu_out)
    assert out.out_vintf_mmap_length == VINTF_PAGE_SIZE and out.out_vintf_mmap_offset
    vintf = vm.viommu_drv.vintf
    assert vintf.idx != 0 and vintf.vmid == vm.parent_domain.vmid
    # the driver data is mandatory for this type
    with pytest.raises(OSError) as exc:
        vm.r.viommu_alloc_data(vm.parent, U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV)
    assert exc.value.errno == errno.EINVAL
    # VINTF 0 is the host's: three guest VINTFs, then ENOSPC
    vm.r.viommu_alloc_data(vm.parent, U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV, CMDQV_DATA)
    vm.r.viommu_alloc_data(vm.parent, U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV, CMDQV_DATA)
    with pytest.raises(OSError) as exc:
        vm.r.viommu_alloc_data(vm.parent, U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV, CMDQV_DATA)
    assert exc.value.errno == errno.ENOSPC
    plain = vmm(cmdqv=False)
    ioas = plain.ioas_alloc()
    parent = plain.hwpt_alloc(ioas, U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    with pytest.raises(OSError) as exc:
        plain.viommu_alloc_data(parent, U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV, CMDQV_DATA)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_hw_queue_alloc_rules(guest_vm: Any) -> None:
    vm = cmdqv_vm(guest_vm)
    r, t = vm.r, U.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV
    for qtype, index, iova, length, code in (
        (7, 0, QUEUE_IPA, QLEN, errno.EOPNOTSUPP),  # unknown type
        (t, 2, QUEUE_IPA, QLEN, errno.EINVAL),  # two LVCMDQs per VINTF
        (t, 1, QUEUE_IPA, QLEN, errno.EIO),  # ascending order: 0 first
        (t, 0, QUEUE_IPA, 48, errno.EINVAL),  # not a power of two
        (t, 0, QUEUE_IPA, 16, errno.EINVAL),  # below 32 bytes
        (t, 0, QUEUE_IPA + 0x800, QLEN, errno.EINVAL),  # not aligned to its length
    ):
        with pytest.raises(OSError) as exc:
            r.hw_queue_alloc(vm.viommu, qtype, index, iova, length)
        assert exc.value.errno == code, (qtype, index, iova, length)
    q0 = r.hw_queue_alloc(vm.viommu, t, 0, QUEUE_IPA, QLEN)
    q1 = r.hw_queue_alloc(vm.viommu, t, 1, QUEUE_IPA + QLEN, 256)
    vintf = vm.viommu_drv.vintf
    assert vintf.lvcmdqs[1].base == vm.ipa_to_pa(QUEUE_IPA + QLEN) | 4  # LOG2SIZE 16 entries
    with pytest.raises(OSError) as exc:  # LVCMDQ 1 depends on 0: destroy is descending
        r.destroy(q0)
    assert exc.value.errno == errno.EBUSY and vintf.lvcmdqs[0].allocated
    r.destroy(q1)
    assert not vintf.lvcmdqs[1].allocated and vintf.lvcmdqs[1].base == 0
    r.destroy(q0)
    assert not vintf.lvcmdqs[0].allocated
    plain = guest_vm()  # a plain SMMUv3 vIOMMU has no HW queues
    with pytest.raises(OSError) as exc:
        plain.r.hw_queue_alloc(plain.viommu, t, 0, QUEUE_IPA, QLEN)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_guest_invalidates_through_its_vcmdq_without_a_trap(guest_vm: Any) -> None:
    vm = cmdqv_vm(guest_vm)
    data = vm.attach_translating()
    r, hw = vm.r, vm.hw
    r.hw_queue_alloc(vm.viommu, U.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV, 0, QUEUE_IPA, QLEN)
    q = GuestQueue(vm)
    q.enable()
    assert q.reg(VCMDQ_STATUS) == 1
    assert r.dev.dma_read(GVA, 8) == data[:8]
    fresh = vm.remap(31)
    assert r.dev.dma_read(GVA, 8) == data[:8]  # stale TLB
    hw.executed.clear()
    host_prod = hw.mmio.read(R.CMDQ_PROD, 4)  # the host's own command queue
    q.push(C.tlbi_va(C.TLBI_NH_VA, GVA, vmid=0x3FF, asid=GUEST_ASID, num=3, tg=1), C.cmd_sync())
    assert q.reg(VCMDQ_CONS) == 2  # consumed at once: the guest polls CONS for the SYNC
    assert r.dev.dma_read(GVA, 4 * 4096) == fresh
    ((w0, _w1),) = hw.executed  # the SYNC completes in the VCMDQ itself
    assert hw.mmio.read(R.CMDQ_PROD, 4) == host_prod  # no host command: nothing trapped
    assert (w0 >> 32) & 0xFFFF == vm.parent_domain.vmid  # the VINTF's VMID, not the guest's
    hw.executed.clear()
    q.push(C.atc_inv(VSID, 0, 52), C.tlbi_nh_asid(0, GUEST_ASID))
    assert hw.atc_invalidations[-1][0] == r.dev.rid  # vSID replaced by SID_REPLACE
    assert [C.op(w0) for w0, _ in hw.executed] == [C.ATC_INV, C.TLBI_NH_ASID]


def test_illegal_guest_command_stops_the_vcmdq_and_reports_a_vevent(guest_vm: Any) -> None:
    vm = cmdqv_vm(guest_vm)
    vm.attach_translating()
    r, hw = vm.r, vm.hw
    qfd = r.veventq_alloc(vm.viommu, U.IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV)
    r.hw_queue_alloc(vm.viommu, U.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV, 0, QUEUE_IPA, QLEN)
    q = GuestQueue(vm)
    q.enable()
    # CFGI_STE is the host's business; an unknown vSID cannot be replaced
    q.push(C.cfgi_ste(VSID), C.tlbi_nh_asid(0, GUEST_ASID))
    cons = q.reg(VCMDQ_CONS)
    assert cons & 0x1FF == 0 and (cons >> 24) & 0x7F == R.CERROR_ILL
    gerror = q.reg(VCMDQ_GERROR)
    assert gerror ^ q.reg(VCMDQ_GERRORN) == R.GERROR_CMDQ_ERR
    out = r.proc.file(qfd).read(4096)
    assert len(out) == 8 + 16 and words(out[8:]) == [1, 0]  # LVCMDQ_ERR_MAP bit 0
    assert hw.mmio.read(R.GERROR, 4) == hw.mmio.read(R.GERRORN, 4)  # the SMMU's own queue is fine
    # the guest replaces the bad entry with a CMD_SYNC and acknowledges: the queue resumes
    r.proc.write(vm.ram + QUEUE_IPA - G, C.encode(C.cmd_sync()))
    hw.executed.clear()
    q.window.write(VCMDQ_GERRORN, gerror, 4)
    assert q.reg(VCMDQ_CONS) == 2 and [C.op(w0) for w0, _ in hw.executed] == [C.TLBI_NH_ASID]
    q.push(C.atc_inv(0x99, 0, 52))
    assert (q.reg(VCMDQ_CONS) >> 24) & 0x7F == R.CERROR_ILL


def test_vintf_mmap_offsets_are_allocated_by_the_iommufd(vmm: Any) -> None:
    """Each VINTF page is registered with the iommufd's mmap table: the lowest free 64 KiB
    range from PAGE_SIZE on, per iommufd; destroying the vIOMMU frees its offset (EBUSY while
    mapped), and the same offset is handed out again."""
    r = vmm()
    parent = r.hwpt_alloc(r.ioas_alloc(), U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    offsets = []
    ids = []
    for _ in range(2):
        viommu, out = r.viommu_alloc_data(parent, U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV, CMDQV_DATA)
        info = U.IommuViommuTegra241Cmdqv.unpack(out)
        assert info.out_vintf_mmap_length == VINTF_PAGE_SIZE
        offsets.append(info.out_vintf_mmap_offset)
        ids.append(viommu)
    assert offsets == [4096, 4096 + VINTF_PAGE_SIZE]
    vma = r.fd.mmap(offsets[0], VINTF_PAGE_SIZE)
    with pytest.raises(OSError) as exc:
        r.destroy(ids[0])
    assert exc.value.errno == errno.EBUSY
    vma.close()
    r.destroy(ids[0])
    with pytest.raises(OSError) as exc:
        r.fd.mmap(offsets[0], VINTF_PAGE_SIZE)
    assert exc.value.errno == errno.ENXIO
    _viommu, out = r.viommu_alloc_data(parent, U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV, CMDQV_DATA)
    assert U.IommuViommuTegra241Cmdqv.unpack(out).out_vintf_mmap_offset == offsets[0]
