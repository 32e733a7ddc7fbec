"""The mock IOMMU as hardware: per-device (and per-PASID) context pointers, and a walk of the
mock paging domain's table (mock/iommupt.py: one entry per MOCK_IO_PAGE_SIZE of IOVA). The
domains it walks are in :mod:`iommufd_model.mock.domain`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommufd_model.core.eventq import IopfFault, IopfPartial, deliver_iopf_group, iopf_perm
from iommufd_model.driver import Domain
from iommufd_model.hw.iommu import CacheDict, IommuHw
from iommufd_model.locking import locked
from iommufd_model.mock.domain import (
    MOCK_IO_PAGE_SHIFT,
    MOCK_IO_PAGE_SIZE,
    MockDomain,
    MockNestedDomain,
)
from iommufd_model.mock.iommupt import (
    ENTRY_FLAGS,
    ENTRY_READ,
    ENTRY_WRITE,
)

if TYPE_CHECKING:
    from iommufd_model.hw.pci import PageRequest, PciDevice
    from iommufd_model.machine import Machine

MOCK_PASID_WIDTH = 20
MOCK_DEV_CACHE_NUM = 4


class MockIommu(IommuHw):
    """Context pointers per RID and per (RID, PASID); translation through MockDomain."""

    def __init__(self, machine: Machine, index: int) -> None:
        super().__init__(machine, index)
        # Context caches in the front's sense: any change forgets the streams it knows.
        self.context: dict[int, Domain | None] = CacheDict(self.front)
        self.pasid_context: dict[tuple[int, int], Domain] = CacheDict(self.front)
        self.partial = IopfPartial()

    @locked
    def page_request(self, dev: PciDevice, req: PageRequest) -> bool:
        """The mock has no page request queue (the self-test driver reports faults from
        IOMMU_TEST_OP_TRIGGER_IOPF): a request goes straight to the kernel's
        ``iommu_report_device_fault()`` path, as the test op's request does. The handler is
        the fault queue of the domain at the request's PASID (none there: the RID's nested
        domain, ``user_pasid_table``) or at the RID; earlier requests of a group wait for
        its last. Without a handler the request is answered INVALID (``iopf_error_response``;
        the mock's ``page_response`` does nothing) and False returned (model's own)."""
        domain = self.context.get(dev.rid)
        if req.pasid is not None:
            at_pasid = self.pasid_context.get((dev.rid, req.pasid))
            domain = at_pasid or (domain if isinstance(domain, MockNestedDomain) else None)
        hwpt = None if domain is None else domain.hwpt
        if hwpt is None or hwpt.fault is None:
            return False
        perm = iopf_perm(read=req.read, write=req.write, exe=req.exe, priv=req.priv)
        fault = IopfFault(req.addr, perm, req.pasid)
        group = self.partial.group(dev.rid, req.grpid, fault, req.last)
        return not group or deliver_iopf_group(domain, dev, req.grpid, group)

    def translate(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        stats = self.stats
        stats.translations += 1
        if pasid is None:
            domain = self.context.get(dev.rid)
        else:
            domain = self.pasid_context.get((dev.rid, pasid))
        if domain is None:
            raise self.fault(dev, iova, write, pasid, "blocked: no domain attached")
        if isinstance(domain, MockNestedDomain):
            domain = domain.stage2
        if not isinstance(domain, MockDomain):
            raise self.fault(dev, iova, write, pasid, "domain type cannot translate")
        index = iova >> MOCK_IO_PAGE_SHIFT
        stats.walk_mem_refs += 1
        entry = domain.entries.get(index)
        if entry is None:
            raise self.fault(dev, iova, write, pasid, "not mapped")
        need = ENTRY_WRITE if write else ENTRY_READ
        if not entry & need:
            raise self.fault(dev, iova, write, pasid, "permission")
        if write and domain.dirty_enabled:
            domain.pt.set_dirty(iova)  # the model's hardware sets D as AMDv1 hardware does
        # The next requests of this device and PASID are the compiled front's while the
        # context stays (hw/xlate.py: ``learn_table``; the entries dict is the live table).
        self.front.learn_table(
            dev.rid,
            pasid,
            domain.entries,
            MOCK_IO_PAGE_SHIFT,
            ~ENTRY_FLAGS,
            (ENTRY_READ, ENTRY_WRITE),
            domain,
        )
        offset = iova & (MOCK_IO_PAGE_SIZE - 1)
        return (entry & ~ENTRY_FLAGS) + offset, MOCK_IO_PAGE_SIZE - offset
