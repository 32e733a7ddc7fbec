"""The page-request path: a PRI device's page requests through the page request queue into an
IOMMU_FAULT_QUEUE, answered by the user with page group responses (descriptor type 0x9), as
Linux 7.2's prq.c, io-pgfault.c and iommufd's fault queue do."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from iommufd_intel_vtd import faults as F
from iommufd_intel_vtd import prq as P
from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import regs as R

from iommufd_model import uapi as U
from iommufd_model.testing import assert_errno

PAGE = 4096
IOVA = 0x40_0000
PGFAULT = U.IommuHwptPgfault.SIZE


class Rig:
    """An ATS/PRI device bound to an iommufd, a fault queue and a fault-capable HWPT."""

    def __init__(self, world: Any, **hwpt: Any) -> None:
        self.w = world
        self.dev = world.machine.add_pci_device(iommu=0, ats=True)
        self.dev_id = world.fd.bind(self.dev)
        self.ioas = world.ioas()
        world.map(self.ioas, IOVA, PAGE)
        alloc = U.IommuFaultAlloc(size=U.IommuFaultAlloc.SIZE)
        out = world.ioctl(U.IOMMU_FAULT_QUEUE_ALLOC, alloc)
        self.fault_id, self.fault_fd = out.out_fault_id, out.out_fault_fd
        self.hwpt = self.alloc_hwpt(**hwpt)

    def alloc_hwpt(self, flags: int = 0) -> int:
        cmd = U.IommuHwptAlloc(
            size=U.IommuHwptAlloc.SIZE,
            flags=flags | U.IOMMU_HWPT_FAULT_ID_VALID,
            dev_id=self.dev_id,
            pt_id=self.ioas,
            fault_id=self.fault_id,
        )
        return int(self.w.ioctl(U.IOMMU_HWPT_ALLOC, cmd).out_hwpt_id)

    def read(self) -> list[U.IommuHwptPgfault]:
        data = self.w.proc.files[self.fault_fd].read(16 * PGFAULT)
        return [
            U.IommuHwptPgfault.unpack(data[i : i + PGFAULT]) for i in range(0, len(data), PGFAULT)
        ]

    def respond(self, cookie: int, code: int = U.IOMMUFD_PAGE_RESP_SUCCESS) -> None:
        resp = U.IommuHwptPageResponse(cookie=cookie, code=code)
        assert self.w.proc.files[self.fault_fd].write(resp.pack()) == U.IommuHwptPageResponse.SIZE


@pytest.fixture
def rig(world: Any) -> Rig:
    return Rig(world)


def test_unit_and_context_entry_advertise_page_requests(qi: Any, rig: Rig) -> None:
    hw, st = rig.w.hw, rig.w.hw.driver_state
    assert hw.ecap & R.ECAP_PRS and hw.ecap & R.ECAP_PDS
    pqa = hw.mmio["PQA"]
    assert pqa & P.PQS_MASK == P.PRQ_ORDER and pqa & ~0xFFF == st.prq.base
    info = st.devs[rig.dev.rid]
    assert info.pri_supported and info.pri_enabled
    plain = st.devs[rig.w.dev.rid]  # the fixture's device has no ATS: no PRI, PRE = 0
    assert not plain.pri_supported
    assert_errno(errno.ENODEV, lambda: rig.w.fd.attach(rig.w.dev_id, rig.hwpt))


def test_page_request_to_fault_queue_and_response_to_device(qi: Any, rig: Rig) -> None:
    w = rig.w
    w.fd.attach(rig.dev_id, rig.hwpt)
    st = w.hw.driver_state
    assert st.devs[rig.dev.rid].iopf_refcount == 1
    assert rig.dev.page_request(0x1234_5000, write=True, grpid=0x1AB)
    # The interrupt thread consumed the queue: PQH caught up with PQT, PPR was cleared.
    assert w.hw.mmio["PQH"] == w.hw.mmio["PQT"] == P.ENTRY_SIZE
    assert not w.hw.mmio.read(R.PRS_REG, 4) & R.PRS_PPR
    (f,) = rig.read()
    assert (f.flags, f.dev_id, f.pasid, f.grpid, f.addr, f.length) == (
        U.IOMMU_PGFAULT_FLAGS_LAST_PAGE,
        rig.dev_id,
        0,
        0x1AB,
        0x1234_5000,
        0,
    )
    assert f.perm == U.IOMMU_PGFAULT_PERM_READ | U.IOMMU_PGFAULT_PERM_WRITE
    s = qi.Stream(w)
    rig.respond(f.cookie)
    assert s.take() == [qi.d(Q.PGRP_RESP, rid=rig.dev.rid, code=0, prgi=0x1AB), qi.WAIT]
    assert w.hw.prg_responses[-1] == P.PageGroupResponse(rig.dev.rid, None, 0x1AB, 0)


def test_a_group_is_delivered_at_its_last_request_with_pasid(qi: Any, rig: Rig) -> None:
    w = rig.w
    hwpt = rig.alloc_hwpt(U.IOMMU_HWPT_ALLOC_PASID)
    w.fd.attach(rig.dev_id, hwpt, pasid=9)
    rig.dev.page_request(0x1000, pasid=9, last=False, grpid=3)
    rig.dev.page_request(0x2000, pasid=9, last=False, grpid=4)  # another group
    assert rig.read() == []  # nothing until the last request of a group
    rig.dev.page_request(0x3000, pasid=9, write=True, grpid=3)
    got = rig.read()
    flags = U.IOMMU_PGFAULT_FLAGS_PASID_VALID | 1 << 2  # + IOMMU_FAULT_PAGE_RESPONSE_NEEDS_PASID
    assert [(f.addr, f.flags, f.pasid, f.grpid) for f in got] == [
        (0x1000, flags, 9, 3),
        (0x3000, flags | U.IOMMU_PGFAULT_FLAGS_LAST_PAGE, 9, 3),
    ]
    assert got[0].cookie == got[1].cookie
    s = qi.Stream(w)
    rig.respond(got[0].cookie, U.IOMMUFD_PAGE_RESP_INVALID)
    assert s.take() == [
        qi.d(Q.PGRP_RESP, rid=rig.dev.rid, pasid=9, pasid_p=1, code=1, prgi=3),
        qi.WAIT,
    ]


def test_requests_without_a_handler_or_malformed_are_answered_invalid(qi: Any, rig: Rig) -> None:
    w = rig.w
    hw = w.hw
    # No domain with a fault queue where the request points: invalid at once.
    rig.dev.page_request(0x1000, grpid=1)
    assert hw.prg_responses[-1] == P.PageGroupResponse(rig.dev.rid, None, 1, Q.RESP_INVALID)
    w.fd.attach(rig.dev_id, rig.hwpt)
    n = len(hw.prg_responses)
    rig.dev.page_request(1 << 50, grpid=2)  # not canonical
    rig.dev.page_request(0x1000, priv=True, grpid=3)  # privileged read
    rig.dev.page_request(0x1000, exe=True, grpid=4)  # execute with read
    rig.dev.page_request(0x1000, exe=True, grpid=5, last=False)  # bad, but not the last
    rig.dev.page_request(0x1000, read=False, grpid=6)  # a stop marker: dropped
    assert [(r.prgi, r.code, r.by_hardware) for r in hw.prg_responses[n:]] == [
        (2, Q.RESP_INVALID, False),
        (3, Q.RESP_INVALID, False),
        (4, Q.RESP_INVALID, False),
    ]
    assert rig.read() == []


def test_pre_clear_is_fault_0x47_answered_by_hardware(qi: Any, rig: Rig) -> None:
    w = rig.w
    plain = w.dev  # no ATS, so no PRI: its context entry has PRE = 0
    assert not plain.page_request(0x1000, grpid=7)
    assert w.hw.records[-1].reason == F.FR_SM_CTX_PRE == 0x47
    assert w.hw.prg_responses[-1] == P.PageGroupResponse(plain.rid, None, 7, 1, True)


def test_queue_overflow_sets_pro_and_the_thread_clears_it(qi: Any, rig: Rig) -> None:
    w = rig.w
    hw = w.hw
    w.fd.attach(rig.dev_id, rig.hwpt)
    hw.prq_irq = None  # the interrupt masked: requests pile up
    size = 4096 << P.PRQ_ORDER
    queued = sum(rig.dev.page_request(0x1000, grpid=i & 0x1FF) for i in range(size // 32))
    assert queued == size // 32 - 1  # one slot stays free
    assert hw.mmio.read(R.PRS_REG, 4) & R.PRS_PRO and hw.mmio.read(R.FSTS, 4) & R.FSTS_PRO
    assert hw.prg_responses[-1].by_hardware and hw.prg_responses[-1].code == Q.RESP_SUCCESS
    st = hw.driver_state
    st.prq.event_thread()
    assert not hw.mmio.read(R.PRS_REG, 4) & (R.PRS_PRO | R.PRS_PPR)
    assert len(rig.read()) == 16  # the read buffer holds 16; the rest stay queued
    hw.mmio.write(R.FSTS, R.FSTS_PRO, 4)  # dmar_fault() clears FSTS.PRO
    assert not hw.mmio.read(R.FSTS, 4) & R.FSTS_PRO


def test_teardown_with_iopf_drains_page_requests(qi: Any, rig: Rig) -> None:
    w = rig.w
    rid = rig.dev.rid
    full = 0x7_FFFF_FFFF_FFFF
    w.fd.attach(rig.dev_id, rig.hwpt)
    s = qi.Stream(w)
    # The blocking domain drops the IOPF reference before the teardown
    # (blocking_domain_attach_dev): no drain, the plain three submissions.
    w.fd.detach(rig.dev_id)
    assert s.take() == [
        qi.d(Q.PC, g=Q.PC_PASID, did=2, pasid=0),
        qi.WAIT,
        qi.d(Q.PIOTLB, g=Q.PIOTLB_PASID, did=2, pasid=0),
        qi.WAIT,
        qi.d(Q.DEV_TLB, sid=rid, addr=full, size=1),
        qi.WAIT,
    ]
    assert w.hw.driver_state.devs[rid].iopf_refcount == 0
    # A PASID is torn down before its reference goes (blocking_domain_set_dev_pasid): then
    # intel_iommu_drain_pasid_prq() follows: a fenced wait without status write, the
    # PASID-based IOTLB under the RID domain's DID (none: FLPT_DEFAULT_DID 1, as 7.2 takes
    # info->domain), the device TLB, and PD on the submission's wait.
    hwpt = rig.alloc_hwpt(U.IOMMU_HWPT_ALLOC_PASID)
    w.fd.attach(rig.dev_id, hwpt, pasid=4)
    did = w.fd.device(rig.dev_id).pasid_hwpts[4].domain.did
    s.take()
    w.fd.detach(rig.dev_id, pasid=4)
    assert s.take() == [
        qi.d(Q.PC, g=Q.PC_PASID, did=did, pasid=4),
        qi.WAIT,
        qi.d(Q.PIOTLB, g=Q.PIOTLB_PASID, did=did, pasid=4),
        qi.WAIT,
        qi.d(Q.PDEV_TLB, sid=rid, pasid=4, addr=full, size=1),
        qi.WAIT,
        qi.d(Q.WAIT, fn=1, status_data=2),
        qi.d(Q.PIOTLB, g=Q.PIOTLB_PASID, did=1, pasid=4),
        qi.d(Q.PDEV_TLB, sid=rid, pasid=4, addr=full, size=1),
        ("WAIT+PD",),
    ]
    assert w.hw.driver_state.devs[rid].iopf_refcount == 0


def test_fault_queue_close_answers_pending_groups_invalid(qi: Any, rig: Rig) -> None:
    w = rig.w
    w.fd.attach(rig.dev_id, rig.hwpt)
    rig.dev.page_request(0x1000, grpid=11)
    w.fd.detach(rig.dev_id)
    w.fd.destroy(rig.hwpt)
    w.proc.close(rig.fault_fd)
    w.fd.destroy(rig.fault_id)
    assert w.hw.prg_responses[-1] == P.PageGroupResponse(rig.dev.rid, None, 11, 1)


@pytest.mark.parametrize(("pasid_bits", "required"), [(20, True), (20, False), (0, False)])
def test_pri_enable_follows_the_prg_response_pasid_required_bit(
    world: Any, pasid_bits: int, required: bool
) -> None:
    """intel_iommu_probe_device(): PRI supported (context entry PRE) with ATS, PRS/PDS and the
    device's PRI capability; iommu_enable_pci_pri() enables it (pci_reset_pri,
    pci_enable_pri(PRQ_DEPTH): Allocation = min(Capacity, 2048), Enable) unless the device's
    PASID is enabled and its PRI does not want the PASID in PRG responses; without PRI
    enabled, a fault-capable attach is ENODEV (intel_iommu_enable_iopf)."""
    from iommufd_intel_vtd import tables as T

    from iommufd_model.devices import pci_regs as PR

    dev = world.machine.add_pci_device(
        iommu=0, ats=True, pasid_bits=pasid_bits, prg_resp_pasid_required=required
    )
    st = world.hw.driver_state
    info = st.devs[dev.rid]
    enabled = required or pasid_bits == 0
    assert info.pri_supported and info.pri_enabled == enabled
    pos = dev.config.find_ext_cap(PR.PCI_EXT_CAP_ID_PRI)
    assert dev.config_read(pos + PR.PCI_PRI_CTRL, 2) == (PR.PCI_PRI_CTRL_ENABLE if enabled else 0)
    assert dev.config_read(pos + PR.PCI_PRI_ALLOC_REQ, 4) == (
        min(dev.pri_capacity, 2048) if enabled else 0
    )
    bus, devfn = dev.rid >> 8, dev.rid & 0xFF
    table = st.context_tables[(bus, int(devfn >= 128))]
    slot = table + (devfn & 0x7F) * T.SM_CONTEXT_ENTRY_SIZE
    ce = T.ContextEntry.decode(*(st.mem.read_u64(slot + 8 * i) for i in range(4)))
    assert ce.pre
    dev_id = world.fd.bind(dev)
    ioas = world.ioas()
    alloc = U.IommuFaultAlloc(size=U.IommuFaultAlloc.SIZE)
    fault_id = world.ioctl(U.IOMMU_FAULT_QUEUE_ALLOC, alloc).out_fault_id
    cmd = U.IommuHwptAlloc(
        size=U.IommuHwptAlloc.SIZE,
        flags=U.IOMMU_HWPT_FAULT_ID_VALID,
        dev_id=dev_id,
        pt_id=ioas,
        fault_id=fault_id,
    )
    hwpt = int(world.ioctl(U.IOMMU_HWPT_ALLOC, cmd).out_hwpt_id)
    if enabled:
        world.fd.attach(dev_id, hwpt)
    else:
        assert_errno(errno.ENODEV, lambda: world.fd.attach(dev_id, hwpt))
