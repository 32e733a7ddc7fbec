"""IO page faults as Linux 7.2's SMMUv3 takes them: stalled transactions (IDR0.STALL_MODEL =
FORCE, CD.S / STE.S2S) reported by the event queue thread to the FAULT queue of the attached
HWPT, answered by a page response that becomes CMD_RESUME."""

from __future__ import annotations

from typing import Any

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3.kernel import RESUME_ABORT, RESUME_RETRY

from iommufd_model.hw.iommu import DmaFault
from iommufd_model.uapi import iommufd as U

from .conftest import RawVmm, pattern

PG = 4096


def _faulting_vmm(vmm: Any, *, with_queue: bool = True) -> tuple[RawVmm, int, int, int, int]:
    r = vmm(stall_force=True)
    ioas = r.ioas_alloc()
    fault_id, fault_fd = r.fd.fault_queue_alloc() if with_queue else (None, -1)
    hwpt = r.fd.hwpt_alloc(r.dev_id, ioas, fault_id=fault_id)
    r.fd.attach(r.dev_id, hwpt)
    return r, ioas, hwpt, fault_fd, 0x10_0000


def test_stalled_fault_reaches_the_fault_queue_and_resume_retries(vmm: Any) -> None:
    r, ioas, _hwpt, fault_fd, iova = _faulting_vmm(vmm)
    hw = r.machine.iommus[0]
    with pytest.raises(DmaFault, match="stalled"):
        r.dev.dma_write(iova + 0x10, b"x")
    ev = hw.events[-1]
    assert ev.stall and ev.sid == r.dev.rid
    out = r.proc.file(fault_fd).read(U.IommuHwptPgfault.SIZE * 4)
    assert len(out) == U.IommuHwptPgfault.SIZE
    f = U.IommuHwptPgfault.unpack(out)
    assert f.flags == U.IOMMU_PGFAULT_FLAGS_LAST_PAGE and f.dev_id == r.dev_id
    assert (f.grpid, f.perm, f.addr, f.length) == (
        ev.stag,
        U.IOMMU_PGFAULT_PERM_WRITE,
        iova + 0x10,
        0,
    )
    # the VMM makes the page present, then answers: CMD_RESUME RETRY, no CMD_SYNC
    va = r.buffer(PG, 4)
    r.ioas_map(ioas, va, PG, iova=iova)
    start = len(hw.executed)
    resp = U.IommuHwptPageResponse(cookie=f.cookie, code=U.IOMMUFD_PAGE_RESP_SUCCESS)
    r.proc.file(fault_fd).write(resp.pack())
    assert hw.executed[start:] == [C.resume(r.dev.rid, ev.stag, RESUME_RETRY)]
    assert hw.resumes[-1] == (r.dev.rid, ev.stag, RESUME_RETRY) and not hw.stalled
    r.dev.dma_write(iova + 0x10, b"x")  # the device's retry now translates
    assert r.proc.read(va + 0x10, 1) == b"x" and r.dev.dma_read(iova, 8) == pattern(4, 8)


def test_invalid_response_aborts(vmm: Any) -> None:
    r, _ioas, _hwpt, fault_fd, iova = _faulting_vmm(vmm)
    hw = r.machine.iommus[0]
    with pytest.raises(DmaFault, match="stalled"):
        r.dev.dma_read(iova, 4)
    f = U.IommuHwptPgfault.unpack(r.proc.file(fault_fd).read(U.IommuHwptPgfault.SIZE))
    assert f.perm == U.IOMMU_PGFAULT_PERM_READ
    resp = U.IommuHwptPageResponse(cookie=f.cookie, code=U.IOMMUFD_PAGE_RESP_INVALID)
    r.proc.file(fault_fd).write(resp.pack())
    assert hw.resumes[-1] == (r.dev.rid, f.grpid, RESUME_ABORT)


def test_no_fault_queue_is_answered_at_once(vmm: Any) -> None:
    """No fault-capable HWPT: iommu_report_device_fault() answers INVALID itself (ABORT)."""
    r, _ioas, _hwpt, _fd, iova = _faulting_vmm(vmm, with_queue=False)
    hw = r.machine.iommus[0]
    with pytest.raises(DmaFault, match="stalled"):
        r.dev.dma_read(iova, 4)
    ev = hw.events[-1]
    assert hw.resumes == [(r.dev.rid, ev.stag, RESUME_ABORT)] and not hw.stalled


def test_pasid_faults_carry_the_pasid_and_stall_bits_in_ste_and_cd(vmm: Any) -> None:
    r = vmm(stall_force=True)
    ioas = r.ioas_alloc()
    fault_id, fault_fd = r.fd.fault_queue_alloc()
    rid = r.fd.hwpt_alloc(r.dev_id, ioas, flags=U.IOMMU_HWPT_ALLOC_PASID)
    pas = r.fd.hwpt_alloc(r.dev_id, ioas, flags=U.IOMMU_HWPT_ALLOC_PASID, fault_id=fault_id)
    r.fd.attach(r.dev_id, rid)
    r.fd.attach(r.dev_id, pas, pasid=3)
    with pytest.raises(DmaFault, match="stalled"):
        r.dev.dma_read(0x20_0000, 4, pasid=3)
    f = U.IommuHwptPgfault.unpack(r.proc.file(fault_fd).read(U.IommuHwptPgfault.SIZE))
    flags = U.IOMMU_PGFAULT_FLAGS_LAST_PAGE | U.IOMMU_PGFAULT_FLAGS_PASID_VALID
    assert (f.flags, f.pasid) == (flags, 3)
    from iommufd_arm_smmuv3.ste import Ste

    from iommufd_model.hw.bits import words

    smmu = r.machine.iommus[0].driver_state
    master = smmu.masters[r.dev.rid]
    ste = Ste.decode(words(r.machine.memory.read(smmu.ste_addr(r.dev.rid), 64)))
    cd0 = r.machine.memory.read_u64(smmu.cd_addr(master, 0))
    assert not ste.s1stalld and cd0 & (1 << 44)  # CD.S: the stream stalls
