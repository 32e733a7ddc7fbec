"""IO page faults as Linux 7.2's SMMUv3 takes them: stalled transactions (IDR0.STALL_MODEL =
FORCE, CD.S / STE.S2S) reported by the event queue thread to the FAULT queue of the attached
HWPT, answered by a page response that becomes CMD_RESUME."""

from __future__ import annotations

from typing import Any

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3.kernel import RESUME_ABORT, RESUME_RETRY

from helpers import event_file
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.scenarios.base import pattern
from iommufd_model.uapi import iommufd as U

from .conftest import RawVmm

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
    hw = r.smmu
    with pytest.raises(DmaFault, match="stalled"):
        r.dev.dma_write(iova + 0x10, b"x")
    ev = hw.events[-1]
    assert ev.stall and ev.sid == r.dev.rid
    out = event_file(r.proc, fault_fd).read(U.IommuHwptPgfault.SIZE * 4)
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
    event_file(r.proc, fault_fd).write(resp.pack())
    assert hw.executed[start:] == [C.resume(r.dev.rid, ev.stag, RESUME_RETRY)]
    assert hw.resumes[-1] == (r.dev.rid, ev.stag, RESUME_RETRY) and not hw.stalled
    r.dev.dma_write(iova + 0x10, b"x")  # the device's retry now translates
    assert r.proc.read(va + 0x10, 1) == b"x" and r.dev.dma_read(iova, 8) == pattern(4, 8)


def test_invalid_response_aborts(vmm: Any) -> None:
    r, _ioas, _hwpt, fault_fd, iova = _faulting_vmm(vmm)
    hw = r.smmu
    with pytest.raises(DmaFault, match="stalled"):
        r.dev.dma_read(iova, 4)
    f = U.IommuHwptPgfault.unpack(event_file(r.proc, fault_fd).read(U.IommuHwptPgfault.SIZE))
    assert f.perm == U.IOMMU_PGFAULT_PERM_READ
    resp = U.IommuHwptPageResponse(cookie=f.cookie, code=U.IOMMUFD_PAGE_RESP_INVALID)
    event_file(r.proc, fault_fd).write(resp.pack())
    assert hw.resumes[-1] == (r.dev.rid, f.grpid, RESUME_ABORT)


def test_no_fault_queue_is_answered_at_once(vmm: Any) -> None:
    """No fault-capable HWPT: iommu_report_device_fault() answers INVALID itself (ABORT)."""
    r, _ioas, _hwpt, _fd, iova = _faulting_vmm(vmm, with_queue=False)
    hw = r.smmu
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
    f = U.IommuHwptPgfault.unpack(event_file(r.proc, fault_fd).read(U.IommuHwptPgfault.SIZE))
    flags = U.IOMMU_PGFAULT_FLAGS_LAST_PAGE | U.IOMMU_PGFAULT_FLAGS_PASID_VALID
    assert (f.flags, f.pasid) == (flags, 3)
    from iommufd_arm_smmuv3.ste import Ste

    from iommufd_model.hw.bits import words

    smmu = r.machine.iommus[0].driver_state
    master = smmu.masters[r.dev.rid]
    ste = Ste.decode(words(r.machine.memory.read(smmu.ste_addr(r.dev.rid), 64)))
    cd0 = r.machine.memory.read_u64(smmu.cd_addr(master, 0))
    assert not ste.s1stalld and cd0 & (1 << 44)  # CD.S: the stream stalls


def _ste_and_cd0(r: RawVmm) -> tuple[Any, int]:
    from iommufd_arm_smmuv3.ste import Ste

    from iommufd_model.hw.bits import words

    smmu = r.machine.iommus[0].driver_state
    master = smmu.masters[r.dev.rid]
    ste = Ste.decode(words(r.machine.memory.read(smmu.ste_addr(r.dev.rid), 64)))
    return ste, r.machine.memory.read_u64(smmu.cd_addr(master, 0))


CD0_S = 1 << 44


@pytest.mark.parametrize("can_stall", [True, False])
def test_stall_model_0_stalls_only_dma_can_stall_masters(vmm: Any, can_stall: bool) -> None:
    """IDR0.STALL_MODEL = 0b00 (``stalls``): arm_smmu_probe_device() sets stall_enabled only
    for a master whose firmware node says "dma-can-stall". That master's stage-1 STE clears
    S1STALLD and its CD sets S, its fault stalls and goes to the fault queue, CMD_RESUME
    retries it; the other master gets S1STALLD and CD.S = 0, its fault terminates (an event
    without Stall, nothing for the fault queue), and its fault-capable attach still succeeds
    (arm_smmu_enable_iopf() is a no-op for a master that cannot stall)."""
    rid = 0x100  # the fixture's device
    r = vmm(stalls=True, dma_can_stall=frozenset({rid} if can_stall else {0x900}))
    hw = r.smmu
    assert (hw.mmio.read(0x0, 4) >> 24) & 3 == 0  # IDR0.STALL_MODEL
    assert r.dev.rid == rid and hw.driver_state.masters[rid].stall_enabled == can_stall
    ioas = r.ioas_alloc()
    fault_id, fault_fd = r.fd.fault_queue_alloc()
    hwpt = r.fd.hwpt_alloc(r.dev_id, ioas, fault_id=fault_id)
    r.fd.attach(r.dev_id, hwpt)
    ste, cd0 = _ste_and_cd0(r)
    assert ste.s1stalld != can_stall and bool(cd0 & CD0_S) == can_stall
    iova = 0x10_0000
    with pytest.raises(DmaFault, match="stalled" if can_stall else "F_TRANSLATION"):
        r.dev.dma_write(iova, b"x")
    ev = hw.events[-1]
    assert ev.stall == can_stall
    out = event_file(r.proc, fault_fd).read(U.IommuHwptPgfault.SIZE * 2)
    if not can_stall:
        assert out == b"" and not hw.stalled and hw.resumes == []
        return
    f = U.IommuHwptPgfault.unpack(out)
    assert (f.grpid, f.addr, f.dev_id) == (ev.stag, iova, r.dev_id)
    va = r.buffer(PG, 2)
    r.ioas_map(ioas, va, PG, iova=iova)
    resp = U.IommuHwptPageResponse(cookie=f.cookie, code=U.IOMMUFD_PAGE_RESP_SUCCESS)
    event_file(r.proc, fault_fd).write(resp.pack())
    assert hw.resumes == [(rid, ev.stag, RESUME_RETRY)] and not hw.stalled
    r.dev.dma_write(iova, b"x")
    assert r.proc.read(va, 1) == b"x"


@pytest.mark.parametrize(
    ("options", "s1stalld", "stalls"),
    [
        ({}, False, False),  # STALL_MODEL NONE: no S1STALLD (ILLEGAL there), nothing stalls
        ({"dma_can_stall": True}, False, False),  # the property alone does nothing
        ({"stalls": True}, True, False),  # stalls supported, no dma-can-stall master
        ({"stalls": True, "dma_can_stall": True}, False, True),
        ({"stall_force": True}, False, True),  # FORCE: every master, whatever the firmware
    ],
)
def test_stall_bits_per_stall_model_and_firmware(
    vmm: Any, options: dict[str, Any], s1stalld: bool, stalls: bool
) -> None:
    """The STE / CD stall bits arm_smmu_make_cdtable_ste(), arm_smmu_make_s1_cd() and
    arm_smmu_make_s2_domain_ste() write: S1STALLD when STALLS is a feature and the master
    does not stall, CD.S and STE.S2S exactly for a stalling master."""
    r = vmm(**options)
    ioas = r.ioas_alloc()
    r.fd.attach(r.dev_id, r.fd.hwpt_alloc(r.dev_id, ioas))
    ste, cd0 = _ste_and_cd0(r)
    assert (ste.s1stalld, bool(cd0 & CD0_S)) == (s1stalld, stalls)
    r.fd.attach(r.dev_id, r.fd.hwpt_alloc(r.dev_id, ioas, flags=U.IOMMU_HWPT_ALLOC_NEST_PARENT))
    ste, _ = _ste_and_cd0(r)
    assert ste.s2s == stalls


def test_resume_is_illegal_without_a_stall_model(vmm: Any) -> None:
    """CMD_RESUME on an SMMU whose IDR0.STALL_MODEL is NONE is refused (CERROR_ILL); under
    0b00 it is a command the SMMU takes (an unknown STAG: no effect)."""
    hw_none = vmm().machine.iommus[0]
    assert not hw_none.execute(*C.resume(0x100, 1, RESUME_RETRY))
    hw_stall = vmm(stalls=True).machine.iommus[0]
    assert hw_stall.execute(*C.resume(0x100, 1, RESUME_RETRY)) and hw_stall.resumes == []
