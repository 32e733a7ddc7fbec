"""The fault queue's file as Linux 7.2's eventq.c has it: ``iommufd_fault_fops_read`` /
``_write``, cookies from ``xa_alloc(XA_FLAGS_ALLOC1)``, and ``iommufd_auto_response_faults``
when a device leaves a fault-capable HWPT (device.c). The device's answers are read on VT-d,
whose page group responses the hardware records."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from iommufd_model.core.eventq import EventFile
from iommufd_model.machine import Machine
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import iommufd as U

FAULT = U.IommuHwptPgfault.SIZE
IOVA = 0x400_0000


class Rig:
    def __init__(self) -> None:
        m = Machine.build(iommus=["intel_vtd"])
        self.hw: Any = m.iommus[0]
        self.dev = m.add_pci_device(iommu=0, ats=True)
        self.proc = m.new_process()
        self.fd = self.proc.open_iommufd()
        self.dev_id = self.fd.bind(self.dev)
        self.ioas = self.fd.ioas_alloc()
        self.fault_id, fault_fd = self.fd.fault_queue_alloc()
        file = self.proc.file(fault_fd)
        assert isinstance(file, EventFile)
        self.file = file
        self.hwpt = self.fd.hwpt_alloc(self.dev_id, self.ioas, fault_id=self.fault_id)
        self.fd.attach(self.dev_id, self.hwpt)

    def faults(self, n: int = 8) -> list[U.IommuHwptPgfault]:
        data = self.file.read(n * FAULT)
        return [U.IommuHwptPgfault.unpack(data[i : i + FAULT]) for i in range(0, len(data), FAULT)]

    def respond(self, *answers: tuple[int, int]) -> int:
        data = b"".join(U.IommuHwptPageResponse(cookie=c, code=k).pack() for c, k in answers)
        return self.file.write(data)

    def codes(self) -> list[tuple[int, int]]:
        """(group index, code) of every page group response the device received."""
        return [(r.prgi, r.code) for r in self.hw.prg_responses]


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_cookies_start_at_1_and_the_lowest_free_is_reused(rig: Rig) -> None:
    for g in range(3):
        rig.dev.page_request(IOVA, grpid=g)
    assert [f.cookie for f in rig.faults()] == [1, 2, 3]
    assert rig.respond((2, U.IOMMUFD_PAGE_RESP_SUCCESS)) == U.IommuHwptPageResponse.SIZE
    rig.dev.page_request(IOVA, grpid=7)
    assert [f.cookie for f in rig.faults()] == [2]


def test_a_read_too_small_for_the_first_group_is_einval(rig: Rig) -> None:
    rig.dev.page_request(IOVA, grpid=1, last=False)
    rig.dev.page_request(IOVA + 0x1000, grpid=1)
    assert_errno(errno.EINVAL, lambda: rig.file.read(FAULT))  # the group has two faults
    assert_errno(errno.ESPIPE, lambda: rig.file.read(FAULT + 1))
    assert_errno(errno.EINVAL, lambda: rig.file.read(0))  # nothing fits: nothing read
    assert [f.cookie for f in rig.faults(2)] == [1, 1]


def test_responses_stop_at_the_first_bad_one(rig: Rig) -> None:
    for g in range(2):
        rig.dev.page_request(IOVA, grpid=g)
    c0, c1 = (f.cookie for f in rig.faults())
    size = U.IommuHwptPageResponse.SIZE
    assert_errno(errno.ESPIPE, lambda: rig.file.write(bytes(size + 1)))
    assert_errno(errno.EINVAL, lambda: rig.respond((c0, 2)))  # a code outside the uAPI ...
    assert_errno(errno.EINVAL, lambda: rig.respond((99, 0)))  # ... an unknown cookie
    # the good one before a bad one is taken, the bad one and what follows are not
    assert rig.respond((c0, 0), (c0, 0), (c1, 0)) == size
    assert rig.codes() == [(0, 0)]
    assert rig.respond((c1, 1)) == size
    assert rig.codes() == [(0, 0), (1, 1)]
    assert_errno(errno.EINVAL, lambda: rig.respond((c1, 0)))  # answered once only


def test_detach_and_replace_answer_the_devices_groups(rig: Rig) -> None:
    """``iommufd_auto_response_faults()``: groups read but unanswered and groups not yet
    read are answered INVALID when the device leaves the HWPT; the queue forgets them."""
    rig.dev.page_request(IOVA, grpid=4)
    (f,) = rig.faults()
    rig.dev.page_request(IOVA, grpid=5)  # delivered, not read
    rig.fd.detach(rig.dev_id)
    assert sorted(rig.codes()) == [(4, 1), (5, 1)]
    assert rig.faults() == []
    assert_errno(errno.EINVAL, lambda: rig.respond((f.cookie, 0)))
    rig.fd.attach(rig.dev_id, rig.hwpt)
    rig.dev.page_request(IOVA, grpid=6)
    other = rig.fd.hwpt_alloc(rig.dev_id, rig.ioas, fault_id=rig.fault_id)
    rig.fd.attach(rig.dev_id, other)  # replace: the old HWPT's groups are answered
    assert rig.codes()[-1] == (6, 1)
    assert rig.faults() == []


def _pasid_rig() -> tuple[Rig, int]:
    """The rig's device, its RID and PASIDs 1 and 2 all on one PASID-capable fault HWPT."""
    rig = Rig()
    hwpt = rig.fd.hwpt_alloc(
        rig.dev_id, rig.ioas, flags=U.IOMMU_HWPT_ALLOC_PASID, fault_id=rig.fault_id
    )
    rig.fd.attach(rig.dev_id, hwpt)
    for pasid in (1, 2):
        rig.fd.attach(rig.dev_id, hwpt, pasid=pasid)
    return rig, hwpt


def test_a_pasid_detach_answers_only_that_pasids_groups() -> None:
    """7.2 matches the attach handle, which is per device and PASID: leaving PASID 1 answers
    the groups delivered through PASID 1's handle, not those of PASID 2 or of the RID on the
    same HWPT (matching by device and HWPT answered all three)."""
    rig, _ = _pasid_rig()
    rig.dev.page_request(IOVA, pasid=1, grpid=1)
    rig.dev.page_request(IOVA, pasid=2, grpid=2)
    rig.dev.page_request(IOVA, grpid=3)
    read = {f.grpid: f for f in rig.faults(1)}  # PASID 1's group waits for a response
    rig.fd.detach(rig.dev_id, pasid=1)
    assert rig.codes() == [(1, U.IOMMUFD_PAGE_RESP_INVALID)]
    assert_errno(errno.EINVAL, lambda: rig.respond((read[1].cookie, 0)))
    left = rig.faults()
    assert [(f.grpid, f.pasid) for f in left] == [(2, 2), (3, 0)]
    rig.fd.detach(rig.dev_id)  # the RID's handle: group 3 (read, unanswered) only
    assert rig.codes()[1:] == [(3, U.IOMMUFD_PAGE_RESP_INVALID)]
    assert rig.respond((left[0].cookie, U.IOMMUFD_PAGE_RESP_SUCCESS)) == len(
        U.IommuHwptPageResponse().pack()
    )
    assert rig.codes()[2:] == [(2, U.IOMMUFD_PAGE_RESP_SUCCESS)]


def test_a_replace_at_one_pasid_keeps_the_other_attachments_groups() -> None:
    """Replacing PASID 2's HWPT answers PASID 2's groups once the new HWPT is in; a group
    of the RID's attachment to the old HWPT is not touched."""
    rig, _ = _pasid_rig()
    rig.dev.page_request(IOVA, grpid=5)
    rig.dev.page_request(IOVA, pasid=2, grpid=6)
    other = rig.fd.hwpt_alloc(
        rig.dev_id, rig.ioas, flags=U.IOMMU_HWPT_ALLOC_PASID, fault_id=rig.fault_id
    )
    rig.fd.attach(rig.dev_id, other, pasid=2)
    assert rig.codes() == [(6, U.IOMMUFD_PAGE_RESP_INVALID)]
    assert [f.grpid for f in rig.faults()] == [5]
