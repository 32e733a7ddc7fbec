"""The kernel's page-request path for one VT-d unit (Linux 7.2 prq.c, io-pgfault.c, and
iommufd's fault queue as the receiver).

The page request interrupt runs :meth:`KernelPrq.event_thread` (``prq_event_thread``): clear
PRS.PPR, walk the queue from PQH to PQT, answer malformed requests with "invalid request"
(only the last of a group needs an answer), drop stop markers, hand the rest to the fault
handler of the domain attached where the request points (``find_fault_handler``: the PASID's
domain, or the RID's without a PASID), advance PQH, clear PRO once the queue is empty. Only
domains of HWPTs allocated with a fault queue have a handler; a request meeting no handler is
answered "invalid" at once (``iopf_error_response``). Requests that are not the last of their
group wait in the device's partial list until the last one comes (``report_partial_fault``);
the group then goes to the HWPT's fault queue, whose user answers it with a page group
response descriptor (``intel_iommu_page_response``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommufd_intel_vtd import prq as P
from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import regs as R
from iommufd_model.core.eventq import IopfFault, IopfPartial, deliver_iopf_group, iopf_perm
from iommufd_model.hw.memory import PAGE_SHIFT

if TYPE_CHECKING:
    from iommufd_intel_vtd.domain import VtdDomain
    from iommufd_intel_vtd.kernel import DevInfo, IommuState

PRQ_SIZE = 4096 << P.PRQ_ORDER
PRQ_RING_MASK = PRQ_SIZE - P.ENTRY_SIZE
VIRTUAL_MASK_SHIFT = 47  # __VIRTUAL_MASK_SHIFT of a 4-level x86-64 kernel
#: IOMMU_FAULT_PAGE_RESPONSE_NEEDS_PASID: 7.2 sets it for PASID requests and iommufd passes
#: prm.flags to the user unchanged (iommufd_compose_fault_message)
FAULT_NEEDS_PASID = 1 << 2
FLPT_DEFAULT_DID = 1


def _canonical(addr: int) -> bool:
    high = addr >> VIRTUAL_MASK_SHIFT
    return high == 0 or high == (1 << (64 - VIRTUAL_MASK_SHIFT)) - 1


class KernelPrq:
    """``iommu->prq`` and the per-device partial faults (``iommu_fault_param->partial``)."""

    def __init__(self, st: IommuState) -> None:
        self.st = st
        mem, mmio = st.mem, st.hw.mmio
        # intel_iommu_enable_prq(): 2^PRQ_ORDER pages, PQH = PQT = 0, PQA = base | order.
        self.base = mem.alloc_contiguous(1 << P.PRQ_ORDER) << PAGE_SHIFT
        mmio.write(R.PQH, 0)
        mmio.write(R.PQT, 0)
        mmio.write(R.PQA, self.base | P.PRQ_ORDER)
        self.partial = IopfPartial()
        st.hw.prq_irq = self.event_thread

    # -- the interrupt thread -----------------------------------------------------------------
    def event_thread(self) -> None:
        st = self.st
        mmio = st.hw.mmio
        mmio.write(R.PRS_REG, R.PRS_PPR, 4)
        tail = mmio.read(R.PQT) & PRQ_RING_MASK
        head = mmio.read(R.PQH) & PRQ_RING_MASK
        while head != tail:
            req = P.PageRequest.decode(st.mem.read(self.base + head, P.ENTRY_SIZE))
            if (
                not _canonical(req.addr)
                or (req.priv and (req.read or req.write))
                or (req.exe and req.read)
            ):
                self._bad(req)
            elif req.lpig and not req.read and not req.write:
                pass  # a stop marker needs no response
            else:
                info = st.devs.get(req.rid)
                if info is None or not info.dev.ats:  # device_rbtree_find(): ATS devices only
                    self._bad(req)
                else:
                    self._report(info, req)
            head = (head + P.ENTRY_SIZE) & PRQ_RING_MASK
        mmio.write(R.PQH, tail)
        if mmio.read(R.PRS_REG, 4) & R.PRS_PRO:
            head = mmio.read(R.PQH) & PRQ_RING_MASK
            tail = mmio.read(R.PQT) & PRQ_RING_MASK
            if head == tail:
                self.partial.discard()
                mmio.write(R.PRS_REG, R.PRS_PRO, 4)

    def _bad(self, req: P.PageRequest) -> None:
        """handle_bad_prq_event(): "invalid request" for the last request of a group."""
        if req.lpig:
            self.respond(req.rid, req.pasid, req.prgi, Q.RESP_INVALID)

    def _report(self, info: DevInfo, req: P.PageRequest) -> None:
        """intel_prq_report() + iommu_report_device_fault() + iommufd's iopf handler."""
        perm = iopf_perm(read=req.read, write=req.write, exe=req.exe, priv=req.priv)
        needs_pasid = 0 if req.pasid is None else FAULT_NEEDS_PASID
        fault = IopfFault(req.addr, perm, req.pasid, needs_pasid)
        domain = info.domains.get(0 if req.pasid is None else req.pasid)
        hwpt = None if domain is None else domain.hwpt
        if hwpt is None or hwpt.fault is None:
            # find_fault_handler() found no domain with an iopf handler: answer at once
            self.respond(req.rid, req.pasid, req.prgi, Q.RESP_INVALID)
            return
        group = self.partial.group(req.rid, req.prgi, fault, req.lpig)
        if group and not deliver_iopf_group(domain, info.dev, req.prgi, group):
            self.respond(req.rid, req.pasid, req.prgi, Q.RESP_INVALID)

    # -- responses and draining ---------------------------------------------------------------
    def respond(self, rid: int, pasid: int | None, prgi: int, code: int) -> None:
        """intel_iommu_page_response(): one page group response descriptor."""
        desc = Q.make(
            Q.PGRP_RESP,
            pasid=pasid or 0,
            rid=rid,
            pasid_p=int(pasid is not None),
            code=code,
            prgi=prgi,
        )
        self.st.submit(desc)

    def drain(self, info: DevInfo, pasid: int, rid_domain: VtdDomain | None) -> None:
        """intel_iommu_drain_pasid_prq(): nothing is pending in software (the interrupt
        thread ran when each request arrived); then a fenced wait, the IOTLB (the RID
        domain's DID, as 7.2 takes ``info->domain``) and the device TLB, with PD on the wait
        of the submission so the hardware drains page requests and responses."""
        if not info.iopf_refcount:
            return
        st = self.st
        did = FLPT_DEFAULT_DID
        if rid_domain is not None and rid_domain.did is not None:
            did = rid_domain.did
        fence = Q.make(Q.WAIT, fn=1, status_data=2)  # QI_DONE, no status write
        if pasid == 0:
            flush = st.iotlb_desc(did, 0, 0, Q.IOTLB_DOMAIN)
        else:
            flush = Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=did, pasid=pasid)
        st.submit(fence, flush, st.devtlb_desc(info, pasid, 0, Q.MAX_AGAW_PFN_WIDTH), drain=True)
        if st.hw.mmio.read(R.PRS_REG, 4) & R.PRS_PRO:
            self.event_thread()
