"""The IO page fault scenario: a device's page request served by the VMM through a fault queue.

The flow is the one Linux 7.2's iommufd offers (Documentation/userspace-api/iommufd.rst,
IOMMUFD_OBJ_FAULT; tools/testing/selftests/iommu's ``iopf`` tests): a fault queue
(IOMMU_FAULT_QUEUE_ALLOC), a HWPT allocated with IOMMU_HWPT_FAULT_ID_VALID on it, the device
attached. The device's DMA to a page nobody mapped faults; a device that does not stall sends
a PCIe page request for the page (:meth:`PciDevice.page_request`), a stalling master's fault is
the request itself (SMMUv3). The VMM reads the ``struct iommu_hwpt_pgfault`` from the fault
fd, maps the page at that IOVA, writes a ``struct iommu_hwpt_page_response`` with the fault's
cookie, and the device retries its DMA, which now succeeds.

A driver that does not declare IOPF must not deliver anything: the request stays out of the
fault queue (the driver answers it itself) and the cell is "unsupported". Linux 7.2 has no
errno for that -- no call is refused, the request just never reaches iommufd -- so the cell
says what happened instead of an errno.
"""

from __future__ import annotations

import errno

from iommufd_model.core.eventq import EventFile
from iommufd_model.driver import Feature
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.scenarios.base import (
    Divergence,
    Rig,
    ScenarioContext,
    Unsupported,
    check,
    expect_errno,
    pattern,
)
from iommufd_model.scenarios.catalog import scenario
from iommufd_model.uapi import iommufd as U

FAULT_SIZE = U.IommuHwptPgfault.SIZE
# The page the device wants (above the mock's aperture start, below SMMUv3's MSI window):
# nothing is mapped there until the VMM serves it.
IOVA = 0x400_0000
GRPID = 0x2A  # the page request group index the device uses


class FaultQueue:
    """The VMM's side of one fault queue: its fd, read and written as iommufd.rst says."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.id, self.fd = rig.fd.fault_queue_alloc()

    def file(self) -> EventFile:
        file = self.rig.proc.file(self.fd)
        if not isinstance(file, EventFile):
            raise Divergence(f"fault fd {self.fd} is not an event file in the VMM")
        return file

    def read(self, max_faults: int = 8) -> list[U.IommuHwptPgfault]:
        data = self.file().read(max_faults * FAULT_SIZE)
        return [
            U.IommuHwptPgfault.unpack(data[i : i + FAULT_SIZE])
            for i in range(0, len(data), FAULT_SIZE)
        ]

    def respond(self, cookie: int, code: int = U.IOMMUFD_PAGE_RESP_SUCCESS) -> int:
        resp = U.IommuHwptPageResponse(cookie=cookie, code=code)
        return self.file().write(resp.pack())


def _request(rig: Rig, queue: FaultQueue) -> list[U.IommuHwptPgfault]:
    """The device writes to the unmapped page: the faults that reach the queue. A stalling
    master's fault is its request; otherwise the device sends a page request for the page."""
    try:
        rig.dev.dma_write(IOVA + 0x10, b"!")
        raise Divergence("DMA to an unmapped page went through")
    except DmaFault:
        pass
    faults = queue.read()
    if not faults:
        rig.dev.page_request(IOVA, read=False, write=True, grpid=GRPID)
        faults = queue.read()
    return faults


@scenario(Feature.PAGING, Feature.IOPF)
def iopf_fault_queue(ctx: ScenarioContext) -> None:
    """A HWPT on a fault queue: the device's page request reaches the VMM, which maps the page
    and answers; the device retries and its DMA succeeds; every request answered once.

    The VMM reads one ``iommu_hwpt_pgfault`` (the device's ID, the page, write permission,
    LAST_PAGE), maps the page at that IOVA, writes the page response with the fault's cookie
    (a second response with that cookie is EINVAL), and the retried DMA lands in its memory.
    """
    machine = ctx.machine()
    rig = Rig(machine, machine.add_pci_device(iommu=0, ats=True))  # PRI follows ATS
    queue = FaultQueue(rig)
    ioas = rig.ioas_alloc()
    hwpt = rig.fd.hwpt_alloc(rig.dev_id, ioas, fault_id=queue.id)
    rig.fd.attach(rig.dev_id, hwpt)
    faults = _request(rig, queue)
    if not ctx.has(Feature.IOPF):
        check(not faults, "a driver that does not declare iopf delivered a page request")
        detail = "the page request reached no fault queue"
        upstream = ctx.info.unsupported_upstream.get(Feature.IOPF, "")
        raise Unsupported(Feature.IOPF, None, detail, upstream)
    check(len(faults) == 1, f"{len(faults)} faults for one page request, expected 1")
    (f,) = faults
    check(f.dev_id == rig.dev_id, f"fault names dev_id {f.dev_id}, not {rig.dev_id}")
    # A page request names the page; a stalled transaction its own address (SMMUv3).
    check(f.addr & -PAGE_SIZE == IOVA, f"fault at {f.addr:#x}, the device wants {IOVA:#x}")
    check(f.flags & U.IOMMU_PGFAULT_FLAGS_LAST_PAGE, "a one-request group without LAST_PAGE")
    check(not f.flags & U.IOMMU_PGFAULT_FLAGS_PASID_VALID, "PASID_VALID on a RID request")
    check(f.perm & U.IOMMU_PGFAULT_PERM_WRITE, f"the write request has perm {f.perm:#x}")
    check(queue.read() == [], "the fault was delivered twice")
    va = rig.buffer(PAGE_SIZE, 11)
    rig.ioas_map(ioas, va, PAGE_SIZE, IOVA)
    check(queue.respond(f.cookie) == U.IommuHwptPageResponse.SIZE, "short response write")
    expect_errno(errno.EINVAL, lambda: queue.respond(f.cookie), "second response, same cookie")
    rig.dev.dma_write(IOVA + 0x10, b"served")  # the retry
    check(rig.proc.read(va + 0x10, 6) == b"served", "the retried DMA missed the mapped page")
    check(rig.proc.read(va, 16) == pattern(11, 16), "the retried DMA clobbered the page")
    rig.fd.detach(rig.dev_id)
    rig.destroy(hwpt)
    expect_errno(errno.EBUSY, lambda: rig.destroy(queue.id), "fault queue with its fd open")
    rig.proc.close(queue.fd)
    rig.destroy(queue.id)
