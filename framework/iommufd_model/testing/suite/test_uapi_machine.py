"""A hypothesis state machine over the iommufd uAPI, run against each selected driver.

Random interleavings of IOAS alloc/map/copy/unmap, device attach/replace/detach and
unbind/rebind, HWPT alloc (paging, nest parent, nested where the driver declares it),
HWPT invalidate, fault queues (HWPTs on them, page request groups delivered through an
attachment, reads, responses, and the answers detach and replace give), vEVENTQs (events
reported by the driver's side, overflow, reads of every size) and destroy of any object. A
plain shadow of what a VMM was told predicts every outcome; after every step the machine
checks that ids, areas and pins match the shadow and that device DMA reads exactly the user
page each mapped IOVA names (and faults elsewhere). A refused call must raise ``OSError``
with an errno and change nothing.

Hypothesis is a test extra: without it this module is skipped. The example database is
chosen with the ``iommu_example_db`` ini option or ``IOMMUFD_MODEL_EXAMPLE_DB`` (one
sub-directory per driver); with ``CI`` set it is read-only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest

from iommufd_model.core.device import Device
from iommufd_model.core.eventq import (
    INT_MAX,
    EventFile,
    Fault,
    IopfFault,
    Veventq,
    deliver_iopf_group,
)
from iommufd_model.core.hw_pagetable import Hwpt, HwptPaging
from iommufd_model.core.ioas import Ioas
from iommufd_model.core.main import IommuFd
from iommufd_model.core.objects import ObjType
from iommufd_model.driver import DEFAULT_OPTION_SET, DriverInfo, Feature, OptionSet
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE
from iommufd_model.locking import MODEL_LOCK
from iommufd_model.machine import Machine
from iommufd_model.plugins import DriverRegistry
from iommufd_model.scenarios.catalog import vendor_data
from iommufd_model.uapi import iommufd as U

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.database import (  # noqa: E402
    DirectoryBasedExampleDatabase,
    ExampleDatabase,
    ReadOnlyDatabase,
)
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

NPAGES = 32  # user buffer pages, each tagged with its index
FIXED = 64  # pages of the fixed-IOVA window at the start of the allowed span
SPAN = 192  # pages of the IOAS allowed range (automatic IOVAs land here)
MAX_IOAS = 4
PICK = st.integers(0, 1 << 16)
RW = U.IOMMU_IOAS_MAP_READABLE | U.IOMMU_IOAS_MAP_WRITEABLE
EXAMPLES = int(os.environ.get("IOMMUFD_MODEL_MACHINE_EXAMPLES", "100"))
STEPS = int(os.environ.get("IOMMUFD_MODEL_MACHINE_STEPS", "60"))
GARBAGE = 0xBAD0_DA7A
PASID = 5  # the one PASID the machine attaches (Feature pasid)
PGFAULT = U.IommuHwptPgfault.SIZE
RESPONSE = U.IommuHwptPageResponse.SIZE
VHDR = U.IommufdVeventHeader.SIZE
LOST = U.IOMMU_VEVENTQ_FLAG_LOST_EVENTS

# Valid nested vendor data and a "flush everything" invalidation entry per HWPT data type
# the framework knows; a driver with another type gets nested alloc but no invalidate rule.
_VTD_FLUSH_ALL = U.IommuHwptVtdS1Invalidate(addr=0, npages=U.U64_MAX, flags=0).pack()
_SELFTEST_DATA, _SELFTEST_INV, _SELFTEST_FLAG_ALL = 0xDEAD, 0xDEADBEEF, 1
INVALIDATE: dict[int, tuple[int, bytes]] = {
    U.IOMMU_HWPT_DATA_VTD_S1: (U.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, _VTD_FLUSH_ALL),
    _SELFTEST_DATA: (_SELFTEST_INV, _SELFTEST_FLAG_ALL.to_bytes(4, "little") + bytes(4)),
}


def tag(page: int) -> bytes:
    """The 8 bytes at the start of user page ``page``: DMA from any other page differs."""
    return b"UPG" + bytes([0xA5]) + page.to_bytes(4, "little")


# -- state the machine checks, read from the model on purpose -----------------------------
def user_frames(fd: IommuFd, va: int) -> list[int]:
    return [fd.proc.translate(va + i * PAGE_SIZE) for i in range(NPAGES)]


def snapshot(fd: IommuFd, va: int) -> dict[str, Any]:
    """Everything a refused call must leave untouched, as comparable data."""
    objs: dict[int, Any] = {}
    for obj in fd.objects:
        e: dict[str, Any] = {
            "type": obj.TYPE.value,
            "users": obj.users,
            "holds": [h.id for h in obj.holds],
        }
        if isinstance(obj, Ioas):
            e["areas"] = [
                (iova, last, prot, sb, id(pages), pages.npinned)
                for iova, last, prot, pages, sb in obj.iopt.areas()
            ]
            e["reserved"] = [(s, last) for s, last, _ in obj.iopt.reserved()]
            e["allowed"] = obj.iopt.allowed()
            e["hwpts"] = sorted(h.id for h in obj.hwpt_list)
            e["ndomains"] = len(obj.iopt.domains)
        elif isinstance(obj, Hwpt):
            e["devices"] = sorted(d.id for d in obj.devices)
        elif isinstance(obj, Device):
            e["hwpt"] = obj.hwpt.id if obj.hwpt is not None else None
        objs[obj.id] = e
    mem = fd.machine.memory
    return {
        "ids": fd.objects.ids(),
        "objects": objs,
        "refs": [mem.frame_refs(p) for p in user_frames(fd, va)],
        "locked": fd.proc.locked_pages,
    }


def check_users(fd: IommuFd) -> None:
    """Every ``users`` count is the table's reference plus what holds and attachments explain."""
    live = {o.id: o for o in fd.objects}
    users: Counter[int] = Counter()
    for obj in live.values():
        for held in obj.holds:
            assert live.get(held.id) is held, f"{obj} holds a dead {held}"
            users[held.id] += 1
        if isinstance(obj, Device):
            users[obj.id] += 1  # the VFIO device file
            for h in [obj.hwpt, *obj.pasid_hwpts.values()]:
                if h is not None:
                    assert live.get(h.id) is h, f"{obj} attached to a dead {h}"
                    users[h.id] += 1
        if isinstance(obj, (Fault, Veventq)) and fd.proc.files.get(obj.fd) is obj.file:
            users[obj.id] += 1  # the open fault / vEVENTQ file
        if isinstance(obj, HwptPaging):
            assert obj in obj.ioas.hwpt_list and obj.adapter in obj.ioas.iopt.domains
        if isinstance(obj, Ioas):
            assert len(obj.iopt.domains) == len(obj.hwpt_list)
    for obj in live.values():
        assert obj.users == 1 + users[obj.id], f"{obj}: expected {1 + users[obj.id]} users"


# -- the shadow ---------------------------------------------------------------------------
@attrs.define
class Area:
    first: int  # IOVA page number
    n: int
    upage: int  # user page of the first IOVA page
    pages_id: int  # which IOAS_MAP's pages it shares (copies share their source's)


@attrs.define
class HwptShadow:
    kind: str  # auto | paging | parent | nested
    ioas: int
    parent: int = 0  # nested: the nest parent HWPT or vIOMMU it was allocated on
    pasid: bool = False  # allocated with IOMMU_HWPT_ALLOC_PASID
    fault: int = 0  # the fault queue it was allocated on (IOMMU_HWPT_FAULT_ID_VALID)


@attrs.define
class GroupShadow:
    """A delivered one-request page group: the attachment it came through (device index,
    PASID or None, and which attachment: a new token per attach), its group index."""

    dev: int
    pasid: int | None
    token: int
    grpid: int


@attrs.define
class FaultShadow:
    fd: int | None  # its file, None once closed
    deliver: list[GroupShadow] = attrs.Factory(list)  # not read yet, oldest first
    response: dict[int, GroupShadow] = attrs.Factory(dict)  # cookie -> read, unanswered


@attrs.define
class VeventqShadow:
    """What eventq.c / driver.c say a vEVENTQ holds: records (flags, sequence, data), the
    real events counted against the depth, the next sequence number."""

    viommu: int
    fd: int | None
    depth: int
    records: list[tuple[int, int, bytes]] = attrs.Factory(list)
    num: int = 0
    seq: int = 0

    def report(self, data: bytes) -> None:
        if self.records and self.records[-1][0] & LOST:
            self.records.pop()  # a new record replaces the tail LOST_EVENTS header
        if self.num == self.depth:
            self.records.append((LOST, self.seq, b""))
        else:
            self.records.append((0, self.seq, data))
            self.num += 1
        self.seq = (self.seq + 1) & INT_MAX

    def read(self, count: int) -> bytes | None:
        """The bytes a read of ``count`` returns (taken off the queue); None for EINVAL."""
        if count < VHDR:
            return None
        out = b""
        while self.records:
            flags, seq, data = self.records[0]
            if len(out) + VHDR + len(data) > count:
                if not out:
                    return None
                break
            self.records.pop(0)
            self.num -= 0 if flags & LOST else 1
            out += U.IommufdVeventHeader(flags, seq).pack() + data
        return out


class UapiMachine(RuleBasedStateMachine):
    """Subclassed per driver by :func:`machine_for` (class attributes below)."""

    driver: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}  # the driver's probe options (an OptionSet's)
    registry: ClassVar[DriverRegistry]
    info: ClassVar[DriverInfo]
    base: ClassVar[int] = 1 << 24  # first page of the allowed span, as an IOVA
    stats: ClassVar[Counter[str]]

    def __init__(self) -> None:
        super().__init__()
        type(self).stats["examples"] += 1
        self.machine = Machine.build(
            iommus=[self.driver], registry=self.registry, options={self.driver: self.options}
        )
        self.pdevs = [self.machine.add_pci_device(iommu=0) for _ in range(2)]
        self.proc = self.machine.new_process()
        self.va = self.proc.mmap(NPAGES * PAGE_SIZE)
        for i in range(NPAGES):
            self.proc.write(self.va + i * PAGE_SIZE, tag(i))
        self.fd = self.proc.open_iommufd()
        self.dev_ids: list[int | None] = [self.fd.bind(d) for d in self.pdevs]
        self.attached: list[int | None] = [None, None]
        self.pasid_att: list[int | None] = [None, None]  # HWPT at PASID per device
        self.areas: dict[int, list[Area]] = {}  # live IOAS id -> areas
        self.ever: dict[int, set[int]] = {}  # IOAS id -> every IOVA page it ever mapped
        self.hwpts: dict[int, HwptShadow] = {}
        self.viommus: dict[int, int] = {}  # vIOMMU id -> nest parent HWPT id
        self.faults: dict[int, FaultShadow] = {}
        self.veventqs: dict[int, VeventqShadow] = {}
        # the attach token of each (device, PASID or None): a new one per attachment
        self.tokens: dict[tuple[int, int | None], int] = {}
        self.next_token = 0
        self.next_event = 0
        # attachments a refused replace left to the driver: 7.2's core does not re-attach the
        # old domain to the device that failed (__iommu_group_set_domain_internal), and
        # VT-d blocks before it checks (intel_iommu_attach_device): its DMA may fault now
        self.torn: set[tuple[int, int | None]] = set()
        self.dead: set[int] = set()
        self.small: set[int] = set()  # IOASes with IOMMU_OPTION_HUGE_PAGES off
        self.next_pages = 0
        self.frames = user_frames(self.fd, self.va)

    # -- helpers ------------------------------------------------------------------------
    def _step(self, name: str) -> None:
        type(self).stats[name] += 1
        type(self).stats["steps"] += 1

    def _live(self) -> set[int]:
        ids = set(self.areas) | set(self.hwpts) | set(self.viommus)
        ids |= set(self.faults) | set(self.veventqs)
        return ids | {d for d in self.dev_ids if d is not None}

    def _new_id(self, obj_id: int) -> int:
        assert obj_id not in self._live(), f"id {obj_id} handed out twice"
        self.dead.discard(obj_id)
        return obj_id

    def _kill(self, obj_id: int) -> None:
        self.dead.add(obj_id)

    def _refused(self, fn: Callable[[], object], allowed: Sequence[int], what: str) -> int:
        """``fn`` must raise OSError with an errno in ``allowed`` and change nothing."""
        before = snapshot(self.fd, self.va)
        try:
            fn()
        except OSError as exc:
            assert exc.errno in allowed, f"{what}: errno {exc.errno} not in {allowed}: {exc}"
            assert snapshot(self.fd, self.va) == before, f"{what}: refused call changed state"
            return exc.errno or 0
        raise AssertionError(f"{what}: succeeded, expected errno in {allowed}")

    def _maybe(self, fn: Callable[[], int], what: str) -> int | None:
        """A call whose outcome is the driver's choice: success, or a clean refusal."""
        before = snapshot(self.fd, self.va)
        try:
            return fn()
        except OSError as exc:
            assert exc.errno, f"{what}: OSError without errno: {exc}"
            assert snapshot(self.fd, self.va) == before, f"{what}: refused call changed state"
            return None

    def _pages(self, ioas: int) -> dict[int, tuple[int, int]]:
        """IOVA page -> (user page, pages id)."""
        out: dict[int, tuple[int, int]] = {}
        for a in self.areas[ioas]:
            for k in range(a.n):
                out[a.first + k] = (a.upage + k, a.pages_id)
        return out

    def _overlapping(self, ioas: int, first: int, n: int) -> list[Area]:
        return [a for a in self.areas[ioas] if a.first < first + n and first < a.first + a.n]

    def _has_domain(self, ioas: int) -> bool:
        return any(h.ioas == ioas and h.kind != "nested" for h in self.hwpts.values())

    def _add_area(self, ioas: int, area: Area) -> None:
        self.areas[ioas].append(area)
        self.ever[ioas].update(range(area.first, area.first + area.n))

    def _new_pages(self) -> int:
        self.next_pages += 1
        return self.next_pages

    def _users_of(self, obj_id: int) -> int:
        """Shadow count of what keeps ``obj_id`` alive besides the table (EBUSY if > 0)."""
        if obj_id in self.areas:
            return sum(1 for h in self.hwpts.values() if h.ioas == obj_id and h.kind != "nested")
        if obj_id in self.dev_ids:
            return 1
        if obj_id in self.faults:
            n = int(self.faults[obj_id].fd is not None)
            return n + sum(1 for h in self.hwpts.values() if h.fault == obj_id)
        if obj_id in self.veventqs:
            return int(self.veventqs[obj_id].fd is not None)
        n = sum(1 for a in [*self.attached, *self.pasid_att] if a == obj_id)
        n += sum(1 for h in self.hwpts.values() if h.kind == "nested" and h.parent == obj_id)
        n += sum(1 for q in self.veventqs.values() if q.viommu == obj_id)
        return n + sum(1 for p in self.viommus.values() if p == obj_id)

    @staticmethod
    def _choose(seq: Sequence[int], pick: int) -> int:
        return sorted(seq)[pick % len(seq)]

    def _bound(self) -> list[int]:
        return [i for i, d in enumerate(self.dev_ids) if d is not None]

    def _any_dev_id(self) -> int:
        return next(d for d in self.dev_ids if d is not None)

    def _moved(self, dev: int, pasid: int | None, old: int | None, new: int | None) -> None:
        """Shadow of an attachment changing (attach, replace, detach): the groups its old
        attach handle took are answered (iommufd_auto_response_faults) and leave the fault
        queue; a new attachment gets a new handle."""
        if old == new:
            return
        self.torn.discard((dev, pasid))
        token = self.tokens.pop((dev, pasid), None)
        fault = self.faults.get(self.hwpts[old].fault) if old is not None else None
        if fault is not None:
            fault.deliver = [g for g in fault.deliver if g.token != token]
            fault.response = {c: g for c, g in fault.response.items() if g.token != token}
        if new is not None:
            self.next_token += 1
            self.tokens[(dev, pasid)] = self.next_token

    def _release(self, idx: int) -> None:
        """Shadow of a device leaving its HWPT: an unused automatic domain dies with it."""
        old = self.attached[idx]
        self._moved(idx, None, old, None)
        self.attached[idx] = None
        if old is not None and self.hwpts[old].kind == "auto" and old not in self.attached:
            del self.hwpts[old]
            self._kill(old)

    def _parents(self) -> list[int]:
        return [i for i, h in self.hwpts.items() if h.kind == "parent"]

    def _nested_on_viommu(self) -> bool:
        return Feature.VIOMMU in self.info.features and bool(self.info.viommu_types)

    # -- IOAS -----------------------------------------------------------------------------
    @precondition(lambda self: len(self.areas) < MAX_IOAS)
    @rule()
    def ioas_alloc(self) -> None:
        self._step("ioas_alloc")
        ioas = self._new_id(self.fd.ioas_alloc())
        self.fd.ioas_allow_iovas(ioas, [(self.base, self.base + SPAN * PAGE_SIZE - 1)])
        self.areas[ioas] = []
        self.ever[ioas] = set()
        self.small.discard(ioas)  # ids are reused: a new IOAS allows large pages

    @precondition(lambda self: self.areas)
    @rule(pick=PICK, at=st.integers(0, FIXED - 1), n=st.integers(1, 8),
          src=st.integers(0, NPAGES - 8))  # fmt: skip
    def map_fixed(self, pick: int, at: int, n: int, src: int) -> None:
        self._step("map_fixed")
        ioas = self._choose(list(self.areas), pick)
        first = (self.base >> PAGE_SHIFT) + at

        def call() -> int:
            va = self.va + src * PAGE_SIZE
            return self.fd.ioas_map(ioas, va, n * PAGE_SIZE, iova=first << PAGE_SHIFT)

        if self._overlapping(ioas, first, n):
            self._refused(call, [errno.EEXIST], "map over a mapped range")
            return
        assert call() == first << PAGE_SHIFT
        self._add_area(ioas, Area(first, n, src, self._new_pages()))

    @precondition(lambda self: self.areas)
    @rule(pick=PICK, n=st.integers(1, 8), src=st.integers(0, NPAGES - 8))
    def map_auto(self, pick: int, n: int, src: int) -> None:
        self._step("map_auto")
        ioas = self._choose(list(self.areas), pick)
        try:
            iova = self.fd.ioas_map(ioas, self.va + src * PAGE_SIZE, n * PAGE_SIZE)
        except OSError as exc:  # the allowed span is full: a clean refusal
            assert exc.errno == errno.ENOSPC, exc
            return
        first = iova >> PAGE_SHIFT
        assert iova % PAGE_SIZE == 0 and self.base <= iova
        assert iova + n * PAGE_SIZE <= self.base + SPAN * PAGE_SIZE
        assert not self._overlapping(ioas, first, n), f"auto IOVA {iova:#x} overlaps an area"
        self._add_area(ioas, Area(first, n, src, self._new_pages()))

    @precondition(lambda self: any(self.areas.values()))
    @rule(src_pick=PICK, dst_pick=PICK, page_pick=PICK, n=st.integers(1, 8),
          dst_at=st.none() | st.integers(0, FIXED - 1))  # fmt: skip
    def copy(self, src_pick: int, dst_pick: int, page_pick: int, n: int,
             dst_at: int | None) -> None:  # fmt: skip
        self._step("copy")
        src = self._choose([i for i, a in self.areas.items() if a], src_pick)
        dst = self._choose(list(self.areas), dst_pick)
        pages = self._pages(src)
        start = self._choose(list(pages), page_pick)
        dst_first = None if dst_at is None else (self.base >> PAGE_SHIFT) + dst_at

        def call() -> int:
            dst_iova = None if dst_first is None else dst_first << PAGE_SHIFT
            return self.fd.ioas_copy(dst, src, start << PAGE_SHIFT, n * PAGE_SIZE,
                                     dst_iova=dst_iova)  # fmt: skip

        if not all(start + k in pages for k in range(n)):
            self._refused(call, [errno.ENOENT], "copy of a range with holes")
            return
        if dst_first is not None and self._overlapping(dst, dst_first, n):
            self._refused(call, [errno.EEXIST], "copy over a mapped range")
            return
        try:
            got = call() >> PAGE_SHIFT
        except OSError as exc:
            assert dst_first is None and exc.errno == errno.ENOSPC, exc
            return
        assert dst_first is None or got == dst_first
        assert not self._overlapping(dst, got, n), "copy landed over an area"
        k = 0
        while k < n:  # one new area per source area crossed
            area = next(a for a in self.areas[src] if a.first <= start + k < a.first + a.n)
            take = min(n - k, area.first + area.n - (start + k))
            upage, pid = pages[start + k]
            self._add_area(dst, Area(got + k, take, upage, pid))
            k += take

    @precondition(lambda self: self.areas)
    @rule(pick=PICK, at=st.integers(0, SPAN - 1), n=st.integers(1, 24))
    def unmap(self, pick: int, at: int, n: int) -> None:
        self._step("unmap")
        ioas = self._choose(list(self.areas), pick)
        first = (self.base >> PAGE_SHIFT) + at
        hit = self._overlapping(ioas, first, n)

        def call() -> int:
            return self.fd.ioas_unmap(ioas, first << PAGE_SHIFT, n * PAGE_SIZE)

        if not hit or any(a.first < first or a.first + a.n > first + n for a in hit):
            # Linux 7.2 unmaps the covered areas it meets before the one sticking out.
            lead = []
            for a in sorted(hit, key=lambda a: a.first):
                if a.first < first or a.first + a.n > first + n:
                    break
                lead.append(a)
            if not lead:
                self._refused(call, [errno.ENOENT], "unmap splitting an area or of nothing")
                return
            try:
                call()
            except OSError as exc:
                assert exc.errno == errno.ENOENT, f"unmap splitting an area: {exc}"
            else:
                raise AssertionError("unmap splitting an area succeeded")
            for a in lead:
                self.areas[ioas].remove(a)
            return
        assert call() == sum(a.n for a in hit) * PAGE_SIZE
        for a in hit:
            self.areas[ioas].remove(a)

    @precondition(lambda self: any(self.areas.values()))
    @rule(pick=PICK, area_pick=PICK)
    def unmap_area(self, pick: int, area_pick: int) -> None:
        self._step("unmap_area")
        ioas = self._choose([i for i, a in self.areas.items() if a], pick)
        area = self.areas[ioas][area_pick % len(self.areas[ioas])]
        got = self.fd.ioas_unmap(ioas, area.first << PAGE_SHIFT, area.n * PAGE_SIZE)
        assert got == area.n * PAGE_SIZE
        self.areas[ioas].remove(area)

    @precondition(lambda self: self.areas)
    @rule(pick=PICK)
    def unmap_all(self, pick: int) -> None:
        self._step("unmap_all")
        ioas = self._choose(list(self.areas), pick)
        assert self.fd.ioas_unmap_all(ioas) == sum(a.n for a in self.areas[ioas]) * PAGE_SIZE
        self.areas[ioas] = []

    @precondition(lambda self: self.areas)
    @rule(pick=PICK, allow=st.booleans())
    def huge_pages(self, pick: int, allow: bool) -> None:
        """IOMMU_OPTION_HUGE_PAGES: turning it off is refused once domains hold mappings
        (new maps then go to the domains one 4 KiB page size at a time)."""
        self._step("huge_pages")
        ioas = self._choose(list(self.areas), pick)

        def call() -> int:
            return self.fd.option(U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_SET,
                                  object_id=ioas, val64=int(allow))  # fmt: skip

        if not allow and ioas not in self.small and self._has_domain(ioas) and self.areas[ioas]:
            self._refused(call, [errno.EINVAL], "huge pages off under mapped domains")
            return
        call()
        get = self.fd.option(U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_GET, object_id=ioas)
        assert get == int(allow)
        (self.small.discard if allow else self.small.add)(ioas)

    @precondition(lambda self: self.areas)
    @rule(pick=PICK, kind=st.sampled_from(["noperm", "flags", "wraps", "noioas"]))
    def map_refused(self, pick: int, kind: str) -> None:
        self._step("map_refused")
        ioas = self._choose(list(self.areas), pick)
        iova = self.base + (FIXED - 1) * PAGE_SIZE
        flags, want = {
            "noperm": (0, errno.EINVAL),
            "flags": (RW | 1 << 20, errno.EOPNOTSUPP),
            "wraps": (RW, errno.EOVERFLOW),
            "noioas": (RW, errno.ENOENT),
        }[kind]
        if kind == "wraps":
            iova = (1 << 64) - PAGE_SIZE  # iova + length - 1 wraps past U64_MAX
        if kind == "noioas":
            ioas = max(self._live() | self.dead) + 1

        def call() -> int:
            return self.fd.ioas_map(ioas, self.va, 2 * PAGE_SIZE, iova=iova, flags=flags)

        self._refused(call, [want], f"map refused ({kind})")

    # -- devices and HWPTs -----------------------------------------------------------------
    @precondition(lambda self: self.areas and any(d is not None for d in self.dev_ids))
    @rule(dev=st.integers(0, 1), pick=PICK)
    def attach_ioas(self, dev: int, pick: int) -> None:
        self._step("attach_ioas")
        dev_id = self.dev_ids[dev]
        if dev_id is None:
            return
        ioas = self._choose(list(self.areas), pick)
        if self.pasid_att[dev] is not None:  # auto domains are not PASID-compatible
            self._refused(lambda: self.fd.attach(dev_id, ioas), [errno.EINVAL],
                          "RID to an IOAS while a PASID is attached")  # fmt: skip
            return
        autos = [i for i, h in self.hwpts.items() if h.kind == "auto" and h.ioas == ioas]
        got = self.fd.attach(dev_id, ioas)
        if autos:
            assert got == autos[0], f"attach made auto domain {got}, expected reuse of {autos}"
        elif got not in self.hwpts:
            self.hwpts[self._new_id(got)] = HwptShadow("auto", ioas)
        if self.attached[dev] != got:
            self._release(dev)
            self._moved(dev, None, None, got)
        self.attached[dev] = got

    @precondition(lambda self: self.hwpts and any(d is not None for d in self.dev_ids))
    @rule(dev=st.integers(0, 1), pick=PICK)
    def attach_hwpt(self, dev: int, pick: int) -> None:
        """Attach or replace to any HWPT: paging ones must take the device; whether a
        nested one does (zeroed vendor data) is the driver's call, but all-or-nothing."""
        self._step("attach_hwpt")
        dev_id = self.dev_ids[dev]
        if dev_id is None:
            return
        hwpt = self._choose(list(self.hwpts), pick)
        if self.pasid_att[dev] is not None and not self.hwpts[hwpt].pasid:
            self._refused(lambda: self.fd.attach(dev_id, hwpt), [errno.EINVAL],
                          "RID to a non-PASID HWPT while a PASID is attached")  # fmt: skip
            return
        if self.hwpts[hwpt].kind == "nested":
            if self._maybe(lambda: self.fd.attach(dev_id, hwpt), "attach nested") is None:
                return
            type(self).stats["nested_attached"] += 1
        elif self.hwpts[hwpt].fault:
            # whether the device can take IO page faults is the driver's (VT-d: PRI)
            if self._maybe(lambda: self.fd.attach(dev_id, hwpt), "attach fault") is None:
                if self.attached[dev] is not None:
                    self.torn.add((dev, None))
                return
            type(self).stats["fault_attached"] += 1
        else:
            assert self.fd.attach(dev_id, hwpt) == hwpt
        if self.attached[dev] != hwpt:
            self._release(dev)
            self._moved(dev, None, None, hwpt)
        self.attached[dev] = hwpt

    @precondition(
        lambda self: Feature.PASID in self.info.features and self.hwpts
        and any(d is not None for d in self.dev_ids)
    )  # fmt: skip
    @rule(dev=st.integers(0, 1), pick=PICK)
    def attach_pasid(self, dev: int, pick: int) -> None:
        """Attach or replace PASID 5: only PASID-compatible HWPTs, and only while the RID
        uses one too (or none)."""
        self._step("attach_pasid")
        dev_id = self.dev_ids[dev]
        if dev_id is None:
            return
        compat = [i for i, h in self.hwpts.items() if h.pasid]
        hwpt = self._choose(compat if compat and pick % 4 else list(self.hwpts), pick >> 2)
        rid = self.attached[dev]
        if not self.hwpts[hwpt].pasid or (rid is not None and not self.hwpts[rid].pasid):
            self._refused(lambda: self.fd.attach(dev_id, hwpt, pasid=PASID), [errno.EINVAL],
                          "PASID attach without PASID-compatible HWPTs")  # fmt: skip
            return
        if self.hwpts[hwpt].fault:
            attach = lambda: self.fd.attach(dev_id, hwpt, pasid=PASID)  # noqa: E731
            if self._maybe(attach, "attach fault at PASID") is None:
                if self.pasid_att[dev] is not None:
                    self.torn.add((dev, PASID))
                return
        else:
            assert self.fd.attach(dev_id, hwpt, pasid=PASID) == hwpt
        self._moved(dev, PASID, self.pasid_att[dev], hwpt)
        self.pasid_att[dev] = hwpt
        type(self).stats["pasid_attached"] += 1

    @precondition(lambda self: any(a is not None for a in self.pasid_att))
    @rule(dev=st.integers(0, 1))
    def detach_pasid(self, dev: int) -> None:
        self._step("detach_pasid")
        dev_id = self.dev_ids[dev]
        if dev_id is None or self.pasid_att[dev] is None:
            return
        self.fd.detach(dev_id, pasid=PASID)
        self._moved(dev, PASID, self.pasid_att[dev], None)
        self.pasid_att[dev] = None

    @precondition(lambda self: any(a is not None for a in self.attached))
    @rule(dev=st.integers(0, 1))
    def detach(self, dev: int) -> None:
        self._step("detach")
        dev_id = self.dev_ids[dev]
        if dev_id is None or self.attached[dev] is None:
            return
        self.fd.detach(dev_id)
        self._release(dev)

    @precondition(lambda self: any(d is not None for d in self.dev_ids))
    @rule(dev=st.integers(0, 1), rebind=st.booleans())
    def unbind(self, dev: int, rebind: bool) -> None:
        """Close of the VFIO device: its attachment goes and its id dies (then, usually,
        the device is bound again and may get the same id back)."""
        self._step("unbind")
        dev_id = self.dev_ids[dev]
        if dev_id is None:
            return
        self.fd.unbind(dev_id)
        self._moved(dev, PASID, self.pasid_att[dev], None)
        self._release(dev)
        self.pasid_att[dev] = None
        self.dev_ids[dev] = None
        self._kill(dev_id)
        if rebind:
            self.bind(dev)

    @precondition(lambda self: any(d is None for d in self.dev_ids))
    @rule(dev=st.integers(0, 1))
    def bind(self, dev: int) -> None:
        self._step("bind")
        if self.dev_ids[dev] is not None:
            return
        self.dev_ids[dev] = self._new_id(self.fd.bind(self.pdevs[dev]))

    @precondition(lambda self: self.areas and any(d is not None for d in self.dev_ids))
    @rule(pick=PICK, kind=st.sampled_from(["paging", "parent", "dirty", "pasid"]))
    def hwpt_alloc(self, pick: int, kind: str) -> None:
        """A paging HWPT: plain, nest parent, dirty tracking or PASID-compatible (each
        only when the driver declares it)."""
        ioas = self._choose(list(self.areas), pick)
        need, flags = {
            "paging": (Feature.PAGING, 0),
            "parent": (Feature.NEST_PARENT, U.IOMMU_HWPT_ALLOC_NEST_PARENT),
            "dirty": (Feature.DIRTY_TRACKING, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING),
            "pasid": (Feature.PASID, U.IOMMU_HWPT_ALLOC_PASID),
        }[kind]
        if need not in self.info.features:
            return  # not this driver's feature
        self._step(f"hwpt_alloc_{kind}")
        hwpt = self._new_id(self.fd.hwpt_alloc(self._any_dev_id(), ioas, flags=flags))
        self.hwpts[hwpt] = HwptShadow("parent" if kind == "parent" else "paging", ioas,
                                      pasid=kind == "pasid")  # fmt: skip

    @precondition(lambda self: self.areas and any(d is not None for d in self.dev_ids))
    @rule(pick=PICK, kind=st.sampled_from(["flags", "nopt", "data"]))
    def hwpt_alloc_refused(self, pick: int, kind: str) -> None:
        self._step("hwpt_alloc_refused")
        ioas = self._choose(list(self.areas), pick)
        dev_id = self._any_dev_id()
        if kind == "flags":
            self._refused(lambda: self.fd.hwpt_alloc(dev_id, ioas, flags=1 << 30),
                          [errno.EOPNOTSUPP], "hwpt_alloc unknown flags")  # fmt: skip
        elif kind == "nopt":
            gone = max(self._live() | self.dead) + 1
            self._refused(lambda: self.fd.hwpt_alloc(dev_id, gone), [errno.EINVAL],
                          "hwpt_alloc on a missing pt_id")  # fmt: skip
        else:
            self._refused(
                lambda: self.fd.hwpt_alloc(dev_id, ioas, data_type=GARBAGE, data=bytes(32)),
                [errno.EOPNOTSUPP, errno.EINVAL], "paging hwpt_alloc with vendor data",
            )  # fmt: skip

    @precondition(
        lambda self: Feature.VIOMMU in self.info.features and self.info.viommu_types
        and self._parents() and any(d is not None for d in self.dev_ids)
    )  # fmt: skip
    @rule(pick=PICK)
    def viommu_alloc(self, pick: int) -> None:
        self._step("viommu_alloc")
        parent = self._choose(self._parents(), pick)
        vtype = min(self.info.viommu_types)
        sizes = {U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV: U.IommuViommuTegra241Cmdqv.SIZE,
                 U.IOMMU_VIOMMU_TYPE_AMD: U.IommuViommuAmd.SIZE}  # fmt: skip
        data = bytes(sizes.get(vtype, 0))
        viommu = self.fd.viommu_alloc(self._any_dev_id(), parent, vtype, data)
        self.viommus[self._new_id(viommu)] = parent

    @precondition(
        lambda self: Feature.NESTED in self.info.features and self.info.hwpt_data_types
        and (self.viommus if self._nested_on_viommu() else self._parents())
        and any(d is not None for d in self.dev_ids)
    )  # fmt: skip
    @rule(pick=PICK)
    def nested_alloc(self, pick: int) -> None:
        self._step("nested_alloc")
        pts = list(self.viommus) if self._nested_on_viommu() else self._parents()
        pt = self._choose(pts, pick)
        dtype = min(self.info.hwpt_data_types)
        hwpt = self.fd.hwpt_alloc(self._any_dev_id(), pt, data_type=dtype,
                                  data=vendor_data(dtype))  # fmt: skip
        parent = self.viommus.get(pt, pt)
        self.hwpts[self._new_id(hwpt)] = HwptShadow("nested", self.hwpts[parent].ioas, pt)

    def _nested_ids(self) -> list[int]:
        return [i for i, h in self.hwpts.items() if h.kind == "nested"]

    @precondition(
        lambda self: Feature.HWPT_INVALIDATE in self.info.features and self._nested_ids()
        and min(self.info.hwpt_data_types) in INVALIDATE
    )  # fmt: skip
    @rule(pick=PICK, garbage=st.booleans())
    def hwpt_invalidate(self, pick: int, garbage: bool) -> None:
        self._step("hwpt_invalidate")
        hwpt = self._choose(self._nested_ids(), pick)
        itype, entry = INVALIDATE[min(self.info.hwpt_data_types)]
        if garbage:
            self._refused(lambda: self.fd.hwpt_invalidate(hwpt, GARBAGE, [entry]),
                          [errno.EINVAL, errno.EOPNOTSUPP], "invalidate garbage type")  # fmt: skip
            return
        assert self.fd.hwpt_invalidate(hwpt, itype, [entry]) == 1

    @precondition(lambda self: any(h.kind != "nested" for h in self.hwpts.values()))
    @rule(pick=PICK)
    def invalidate_paging(self, pick: int) -> None:
        """A paging HWPT takes no user invalidation (the kernel: EINVAL, any driver)."""
        self._step("invalidate_paging")
        hwpt = self._choose([i for i, h in self.hwpts.items() if h.kind != "nested"], pick)
        self._refused(lambda: self.fd.hwpt_invalidate(hwpt, 0, []), [errno.EINVAL],
                      "invalidate a paging HWPT")  # fmt: skip

    def _dma_targets(self) -> list[tuple[int, int, int]]:
        """(device index, IOVA page, user page) a paging attachment maps."""
        out = []
        for i, hwpt in enumerate(self.attached):
            if (
                hwpt is not None
                and self.hwpts[hwpt].kind != "nested"
                and (i, None) not in self.torn
            ):
                for page, (upage, _) in self._pages(self.hwpts[hwpt].ioas).items():
                    out.append((i, page, upage))
        return out

    @precondition(lambda self: self._dma_targets())
    @rule(pick=PICK, value=st.integers(0, (1 << 64) - 1))
    def dma_write(self, pick: int, value: int) -> None:
        """A device write lands in the user page the IOVA names (bytes 8..15 of it)."""
        self._step("dma_write")
        targets = self._dma_targets()
        dev, page, upage = targets[pick % len(targets)]
        data = value.to_bytes(8, "little")
        self.pdevs[dev].dma_write((page << PAGE_SHIFT) + 8, data)
        assert self.proc.read(self.va + upage * PAGE_SIZE + 8, 8) == data

    # -- fault queues (eventq.c) ----------------------------------------------------------------
    def _event_file(self, fd: int | None) -> EventFile:
        assert fd is not None
        file = self.proc.file(fd)
        assert isinstance(file, EventFile), f"fd {fd} is not an event file"
        return file

    def _open_faults(self) -> list[int]:
        return [i for i, f in self.faults.items() if f.fd is not None]

    @precondition(lambda self: len(self.faults) < 2)
    @rule()
    def fault_alloc(self) -> None:
        self._step("fault_alloc")
        fault_id, fault_fd = self.fd.fault_queue_alloc()
        self.faults[self._new_id(fault_id)] = FaultShadow(fault_fd)

    @precondition(
        lambda self: Feature.IOPF in self.info.features and self.faults and self.areas
        and any(d is not None for d in self.dev_ids)
    )  # fmt: skip
    @rule(pick=PICK, fault_pick=PICK, pasid=st.booleans())
    def fault_hwpt_alloc(self, pick: int, fault_pick: int, pasid: bool) -> None:
        """A paging HWPT on a fault queue (PASID-compatible too when the driver can)."""
        self._step("fault_hwpt_alloc")
        ioas = self._choose(list(self.areas), pick)
        fault = self._choose(list(self.faults), fault_pick)
        pasid = pasid and Feature.PASID in self.info.features
        flags = U.IOMMU_HWPT_ALLOC_PASID if pasid else 0
        hwpt = self.fd.hwpt_alloc(self._any_dev_id(), ioas, flags=flags, fault_id=fault)
        self.hwpts[self._new_id(hwpt)] = HwptShadow("paging", ioas, pasid=pasid, fault=fault)

    @precondition(
        lambda self: Feature.IOPF in self.info.features and self.areas
        and len(self.faults) < 2 and any(d is not None for d in self.dev_ids)
    )  # fmt: skip
    @rule(pick=PICK, dev=st.integers(0, 1))
    def fault_rig(self, pick: int, dev: int) -> None:
        """In one step what a VMM does to take IO page faults: a fault queue, a HWPT on it
        (PASID-compatible when the driver can), the device attached or replaced to it."""
        self._step("fault_rig")
        before = set(self.faults)
        self.fault_alloc()
        (fault,) = set(self.faults) - before
        before = set(self.hwpts)
        self.fault_hwpt_alloc(pick, sorted(self.faults).index(fault), True)
        (hwpt,) = set(self.hwpts) - before
        self.attach_hwpt(dev, sorted(self.hwpts).index(hwpt))

    def _fault_attachments(self) -> list[tuple[int, int | None, int]]:
        """(device index, PASID or None, HWPT) of each attachment to a HWPT on a queue."""
        out = []
        for dev in range(2):
            for pasid, hwpt in ((None, self.attached[dev]), (PASID, self.pasid_att[dev])):
                if hwpt is not None and self.hwpts[hwpt].fault:
                    out.append((dev, pasid, hwpt))
        return out

    @precondition(lambda self: self._fault_attachments())
    @rule(pick=PICK, grpid=st.integers(0, 0x1FF), then=st.sampled_from([None, 0, 1, 3]))
    def iopf_deliver(self, pick: int, grpid: int, then: int | None) -> None:
        """The driver's side: a one-request page group at a faulting attachment (what
        iommu_report_device_fault() hands iommufd_fault_iopf_handler()); ``then`` a read of
        that many records from its queue, if its file is open."""
        self._step("iopf_deliver")
        atts = self._fault_attachments()
        dev, pasid, hwpt = atts[pick % len(atts)]
        domain = self.fd.objects.get_hwpt_paging(hwpt).domain
        fault = IopfFault(self.base + grpid * PAGE_SIZE, U.IOMMU_PGFAULT_PERM_READ, pasid)
        with MODEL_LOCK:
            assert deliver_iopf_group(domain, self.pdevs[dev], grpid, [fault])
        token = self.tokens[(dev, pasid)]
        fault_id = self.hwpts[hwpt].fault
        self.faults[fault_id].deliver.append(GroupShadow(dev, pasid, token, grpid))
        if then is not None and self.faults[fault_id].fd is not None:
            self.fault_read(sorted(self._open_faults()).index(fault_id), then, False)

    @precondition(lambda self: self._open_faults())
    @rule(pick=PICK, n=st.integers(0, 3), odd=st.booleans())
    def fault_read(self, pick: int, n: int, odd: bool) -> None:
        """A read of ``n`` records: whole groups while they fit, each with the lowest free
        cookie from 1; EINVAL when the first does not fit, ESPIPE for part of a record."""
        self._step("fault_read")
        fault_id = self._choose(self._open_faults(), pick)
        shadow = self.faults[fault_id]
        file = self._event_file(shadow.fd)
        count = n * PGFAULT + int(odd)
        if odd:
            self._refused(lambda: file.read(count), [errno.ESPIPE], "fault read, odd size")
            return
        if n == 0 and shadow.deliver:
            self._refused(lambda: file.read(count), [errno.EINVAL], "fault read, no room")
            return
        got = file.read(count)
        want = b""
        for g in shadow.deliver[:n]:
            cookie = next(c for c in range(1, len(shadow.response) + 2) if c not in shadow.response)
            shadow.response[cookie] = g
            want += U.IommuHwptPgfault(
                flags=U.IOMMU_PGFAULT_FLAGS_LAST_PAGE
                | (0 if g.pasid is None else U.IOMMU_PGFAULT_FLAGS_PASID_VALID),
                dev_id=self.dev_ids[g.dev] or 0, pasid=g.pasid or 0, grpid=g.grpid,
                perm=U.IOMMU_PGFAULT_PERM_READ, addr=self.base + g.grpid * PAGE_SIZE,
                cookie=cookie,
            ).pack()  # fmt: skip
        shadow.deliver = shadow.deliver[n:]
        assert got == want, f"fault read {got.hex()} != {want.hex()}"
        type(self).stats["faults_read"] += len(got) // PGFAULT

    @precondition(lambda self: self._open_faults())
    @rule(pick=PICK, which=PICK, code=st.sampled_from([0, 1, 2]), odd=st.booleans())
    def fault_respond(self, pick: int, which: int, code: int, odd: bool) -> None:
        """A response for a read group is taken once (SUCCESS or INVALID); an unknown cookie
        or another code is EINVAL, part of a response ESPIPE."""
        self._step("fault_respond")
        fault_id = self._choose(self._open_faults(), pick)
        shadow = self.faults[fault_id]
        file = self._event_file(shadow.fd)
        known = sorted(shadow.response)
        cookie = known[which % len(known)] if known and which % 4 else 1 + len(known) + which
        data = U.IommuHwptPageResponse(cookie=cookie, code=code).pack()
        if odd:
            self._refused(lambda: file.write(data[:-1]), [errno.ESPIPE], "half a response")
        elif code > 1 or cookie not in shadow.response:
            self._refused(lambda: file.write(data), [errno.EINVAL], "a bad response")
        else:
            assert file.write(data) == RESPONSE
            del shadow.response[cookie]
            type(self).stats["faults_answered"] += 1

    @precondition(lambda self: self._open_faults() or self._open_veventqs())
    @rule(pick=PICK)
    def event_fd_close(self, pick: int) -> None:
        """Close a fault queue's or vEVENTQ's file: the object may be destroyed then."""
        self._step("event_fd_close")
        obj = self._choose(self._open_faults() + self._open_veventqs(), pick)
        if obj in self.faults:
            fault = self.faults[obj]
            self._event_file(fault.fd)
            self.proc.close(fault.fd or 0)
            fault.fd = None
        else:
            q = self.veventqs[obj]
            self._event_file(q.fd)
            self.proc.close(q.fd or 0)
            q.fd = None

    # -- vEVENTQs (eventq.c, driver.c) --------------------------------------------------------
    def _open_veventqs(self) -> list[int]:
        return [i for i, q in self.veventqs.items() if q.fd is not None]

    @precondition(
        lambda self: Feature.VEVENTQ in self.info.features and self.info.veventq_types
        and self.viommus
    )  # fmt: skip
    @rule(pick=PICK, depth=st.integers(1, 3))
    def veventq_alloc(self, pick: int, depth: int) -> None:
        """One vEVENTQ per vIOMMU and type (EEXIST for a second)."""
        self._step("veventq_alloc")
        viommu = self._choose(list(self.viommus), pick)
        qtype = min(self.info.veventq_types)
        if any(q.viommu == viommu for q in self.veventqs.values()):
            self._refused(lambda: self.fd.veventq_alloc(viommu, qtype, depth), [errno.EEXIST],
                          "a second vEVENTQ of a type")  # fmt: skip
            return
        qid, qfd = self.fd.veventq_alloc(viommu, qtype, depth)
        self.veventqs[self._new_id(qid)] = VeventqShadow(viommu, qfd, depth)

    @precondition(
        lambda self: Feature.VEVENTQ in self.info.features and self.info.veventq_types
        and Feature.NEST_PARENT in self.info.features and self.info.viommu_types
        and self.areas and any(d is not None for d in self.dev_ids)
    )  # fmt: skip
    @rule(pick=PICK, depth=st.integers(1, 3))
    def veventq_rig(self, pick: int, depth: int) -> None:
        """In one step a nest parent, a vIOMMU on it and a vEVENTQ on that."""
        self._step("veventq_rig")
        before = set(self.hwpts)
        self.hwpt_alloc(pick, "parent")
        (parent,) = set(self.hwpts) - before
        before = set(self.viommus)
        self.viommu_alloc(sorted(self._parents()).index(parent))
        (viommu,) = set(self.viommus) - before
        self.veventq_alloc(sorted(self.viommus).index(viommu), depth)

    @precondition(lambda self: self.veventqs)
    @rule(pick=PICK, n=st.integers(1, 3), then=st.sampled_from([None, 8, 16, 40, 4096]))
    def vevent_report(self, pick: int, n: int, then: int | None) -> None:
        """The driver's side: ``n`` events for the vEVENTQ's type (iommufd_viommu_report_event),
        some of them into a full queue; ``then`` a read of that many bytes, if its file is
        open."""
        self._step("vevent_report")
        qid = self._choose(list(self.veventqs), pick)
        shadow = self.veventqs[qid]
        viommu = self.fd.objects.get_viommu(shadow.viommu)
        qtype = min(self.info.veventq_types)
        for _ in range(n):
            self.next_event += 1
            data = self.next_event.to_bytes(8, "little")
            with MODEL_LOCK:
                assert viommu.report_event(qtype, data)
            shadow.report(data)
        if then is not None and shadow.fd is not None:
            self.veventq_read(sorted(self._open_veventqs()).index(qid), then)

    @precondition(lambda self: self._open_veventqs())
    @rule(pick=PICK, count=st.sampled_from([0, 7, 8, 15, 16, 24, 40, 4096]))
    def veventq_read(self, pick: int, count: int) -> None:
        """Whole records while they fit (a LOST_EVENTS header needs only its 8 bytes); EINVAL
        below one header, or when the first event does not fit."""
        self._step("veventq_read")
        qid = self._choose(self._open_veventqs(), pick)
        shadow = self.veventqs[qid]
        file = self._event_file(shadow.fd)
        before = (list(shadow.records), shadow.num)
        want = shadow.read(count)
        if want is None:
            shadow.records, shadow.num = before
            self._refused(lambda: file.read(count), [errno.EINVAL], f"vEVENTQ read {count}")
            return
        got = file.read(count)
        assert got == want, f"vEVENTQ read {count}: {got.hex()} != {want.hex()}"
        type(self).stats["vevents_read"] += len(got) // VHDR

    # -- destroy ----------------------------------------------------------------------------
    def _destroyable(self) -> list[int]:
        ids = set(self.areas) | set(self.hwpts) | set(self.viommus)
        return sorted(ids | set(self.faults) | set(self.veventqs))

    @precondition(lambda self: self._destroyable() or any(self.dev_ids))
    @rule(pick=PICK)
    def destroy(self, pick: int) -> None:
        self._step("destroy")
        devs = [d for d in self.dev_ids if d is not None]
        if devs and pick % 8 == 0:  # the VFIO device file holds a device object
            dev_id = self._choose(devs, pick >> 3)
            self._refused(lambda: self.fd.destroy(dev_id), [errno.EBUSY], "destroy a device")
            type(self).stats["destroy_device_ebusy"] += 1
            return
        if not self._destroyable():
            return
        obj = self._choose(self._destroyable(), pick)
        if self._users_of(obj):
            self._refused(lambda: self.fd.destroy(obj), [errno.EBUSY], f"destroy busy {obj}")
            type(self).stats["destroy_ebusy"] += 1
            return
        self.fd.destroy(obj)
        self._kill(obj)
        if obj in self.areas:
            del self.areas[obj]
        elif obj in self.viommus:
            del self.viommus[obj]
        elif obj in self.faults:
            del self.faults[obj]  # iommufd_fault_destroy(): its groups were answered
        elif obj in self.veventqs:
            del self.veventqs[obj]
        else:
            assert self.hwpts[obj].kind != "auto"  # an auto domain always has a device
            del self.hwpts[obj]

    @precondition(lambda self: self.dead)
    @rule(pick=PICK)
    def destroy_dead(self, pick: int) -> None:
        self._step("destroy_dead")
        obj = self._choose(list(self.dead), pick)
        self._refused(lambda: self.fd.destroy(obj), [errno.ENOENT], f"destroy dead {obj}")

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def ids_match(self) -> None:
        """No dangling or leaked ids; each live id has the type the shadow says."""
        fd = self.fd
        assert fd.objects.ids() == sorted(self._live()), (fd.objects.ids(), self._live())
        kinds = {"auto": ObjType.HWPT_PAGING, "paging": ObjType.HWPT_PAGING,
                 "parent": ObjType.HWPT_PAGING, "nested": ObjType.HWPT_NESTED}  # fmt: skip
        for obj in fd.objects:
            if obj.id in self.areas:
                assert obj.TYPE is ObjType.IOAS
            elif obj.id in self.hwpts:
                assert obj.TYPE is kinds[self.hwpts[obj.id].kind]
            elif obj.id in self.viommus:
                assert obj.TYPE is ObjType.VIOMMU
            elif obj.id in self.faults:
                assert obj.TYPE is ObjType.FAULT
            elif obj.id in self.veventqs:
                assert obj.TYPE is ObjType.VEVENTQ
            else:
                assert obj.TYPE is ObjType.DEVICE
        for d in self.dead:
            assert d not in fd.objects.ids()
        for i, dev_id in enumerate(self.dev_ids):
            if dev_id is not None:
                h = fd.device(dev_id).hwpt
                assert (h.id if h is not None else None) == self.attached[i]
                at = self.pasid_att[i]
                pasids = {p: x.id for p, x in fd.device(dev_id).pasid_hwpts.items()}
                assert pasids == ({PASID: at} if at is not None else {})
        check_users(fd)

    @invariant()
    def areas_and_pins(self) -> None:
        """Areas match the shadow; each user frame holds its PTE reference plus one pin per
        IOAS_MAP whose pages a domain uses (copies share pins); locked_pages agrees."""
        want: dict[int, set[int]] = {}  # user page -> pages ids that must pin it
        for ioas, areas in self.areas.items():
            obj = self.fd.objects.get_ioas(ioas)
            got = sorted((iova, last) for iova, last, *_ in obj.iopt.areas())
            shadow = sorted(
                (a.first << PAGE_SHIFT, ((a.first + a.n) << PAGE_SHIFT) - 1) for a in areas
            )
            assert got == shadow, f"IOAS {ioas}: areas {got} != shadow {shadow}"
            if self._has_domain(ioas):
                for upage, pid in self._pages(ioas).values():
                    want.setdefault(upage, set()).add(pid)
        mem = self.machine.memory
        refs = [mem.frame_refs(p) for p in self.frames]
        expect = [1 + len(want.get(i, ())) for i in range(NPAGES)]
        assert refs == expect, f"pin leak or loss: refs {refs} != {expect}"
        assert self.proc.locked_pages == sum(len(v) for v in want.values())

    @invariant()
    def dma_matches(self) -> None:
        """Every IOVA an attached paging domain maps reads its user page; every IOVA its
        IOAS ever mapped and no longer does faults (the unmap flushed the IOTLB)."""
        for i, hwpt in enumerate(self.attached):
            dev = self.pdevs[i]
            if hwpt is None:
                if self.dev_ids[i] is not None:
                    self._expect_fault(dev, self.base)
                continue
            shadow = self.hwpts[hwpt]
            if shadow.kind == "nested":
                # the zeroed stage 1 decides; only a clean fault or data may come back
                with contextlib.suppress(DmaFault):
                    dev.dma_read(self.base, 8)
                continue
            self._check_dma(dev, shadow.ioas, None, (i, None) in self.torn)
        for i, hwpt in enumerate(self.pasid_att):
            if hwpt is not None:
                self._check_dma(
                    self.pdevs[i], self.hwpts[hwpt].ioas, PASID, (i, PASID) in self.torn
                )
            elif self.dev_ids[i] is not None and Feature.PASID in self.info.features:
                self._expect_fault(self.pdevs[i], self.base, PASID)

    def _check_dma(self, dev: Any, ioas: int, pasid: int | None, torn: bool = False) -> None:
        """``torn``: a refused replace may have left the device blocked (a fault is fine)."""
        pages = self._pages(ioas)
        for page in sorted(self.ever[ioas]):
            if page in pages:
                try:
                    got = dev.dma_read(page << PAGE_SHIFT, 8, pasid=pasid)
                except DmaFault:
                    if torn:
                        continue
                    raise
                assert got == tag(pages[page][0]), f"IOVA page {page:#x} reads {got!r}"
            else:
                self._expect_fault(dev, page << PAGE_SHIFT, pasid)

    @staticmethod
    def _expect_fault(dev: Any, iova: int, pasid: int | None = None) -> None:
        try:
            got = dev.dma_read(iova, 8, pasid=pasid)
        except DmaFault:
            return
        raise AssertionError(f"DMA at {iova:#x} read {got!r}, expected an IOMMU fault")

    def teardown(self) -> None:
        """Closing the fd (after the fault and vEVENTQ files, which hold it) releases every
        pin."""
        fds = [f.fd for f in self.faults.values()] + [q.fd for q in self.veventqs.values()]
        for fd in fds:
            if fd is not None:
                self.proc.close(fd)
        self.fd.close()
        assert self.fd.closed and self.proc.locked_pages == 0
        refs = [self.machine.memory.frame_refs(p) for p in self.frames]
        assert refs == [1] * NPAGES, f"pins left after close: {refs}"


# -- the test -------------------------------------------------------------------------------
def _base_for(driver: str, registry: DriverRegistry, options: dict[str, Any]) -> int:
    """An IOVA span every attach of this driver accepts: 16 MiB if the domain's usable ranges
    cover it, else the first usable 2 MiB-aligned span (asked through IOAS_IOVA_RANGES)."""
    m = Machine.build(iommus=[driver], registry=registry, options={driver: options})
    fd = m.new_process().open_iommufd()
    dev_id = fd.bind(m.add_pci_device(iommu=0))
    ioas = fd.ioas_alloc()
    fd.attach(dev_id, ioas)
    ranges, _ = fd.ioas_iova_ranges(ioas)
    fd.close()
    size = SPAN * PAGE_SIZE
    want = UapiMachine.base
    for start, last in ranges:
        if start <= want and want + size - 1 <= last:
            return want
    for start, last in ranges:
        first = -(-max(start, 1) // (1 << 21)) * (1 << 21)
        if first + size - 1 <= last:
            return first
    raise AssertionError(f"{driver}: no {size:#x}-byte IOVA span in {ranges}")


def _database(root: Path | None, driver: str) -> ExampleDatabase | None:
    if root is None:
        return None
    db: ExampleDatabase = DirectoryBasedExampleDatabase(str(root / driver))
    return ReadOnlyDatabase(db) if os.environ.get("CI") else db


def machine_for(
    driver: str, registry: DriverRegistry, option_set: OptionSet = DEFAULT_OPTION_SET
) -> type[UapiMachine]:
    """The machine bound to ``driver`` probed with ``option_set``'s options and without the
    features it lacks (a named subclass: one example-database key each)."""
    info = registry.drivers[driver].info
    options = dict(option_set.options)
    attrs_: dict[str, Any] = {
        "driver": driver,
        "options": options,
        "registry": registry,
        "info": attrs.evolve(info, features=option_set.features(info.features)),
        "base": _base_for(driver, registry, options),
        "stats": Counter(),
    }
    name = f"UapiMachine_{driver}"
    if option_set != DEFAULT_OPTION_SET:
        name += "_" + "".join(c if c.isalnum() else "_" for c in option_set.name)
    return type(name, (UapiMachine,), attrs_)


def test_uapi_machine(
    iommu_driver: str, iommu_registry: DriverRegistry, iommu_example_db_dir: Path | None
) -> None:
    cls = machine_for(iommu_driver, iommu_registry)
    db = _database(iommu_example_db_dir, iommu_driver)
    cfg = settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    if iommu_example_db_dir is not None:
        cfg = settings(cfg, database=db)
    start = time.perf_counter()
    # Through a typed name: older hypothesis releases leave this function unannotated.
    run_machine: Callable[..., None] = run_state_machine_as_test
    run_machine(cls, settings=cfg)
    took = time.perf_counter() - start
    rules = ", ".join(f"{k}={v}" for k, v in sorted(cls.stats.items())
                      if k not in ("examples", "steps"))  # fmt: skip
    print(
        f"uapi-machine {iommu_driver}: examples={cls.stats['examples']} "
        f"steps={cls.stats['steps']} seconds={took:.1f} rules: {rules}"
    )
