"""FAULT and vEVENTQ objects: queues a driver fills and the user reads through a file.

The fault queue carries IO page faults (``struct iommu_hwpt_pgfault``) and takes page
responses (``struct iommu_hwpt_page_response``) written back to the same fd. The vEVENTQ
carries vendor event records behind ``struct iommufd_vevent_header``, with sequence numbers
that wrap at INT_MAX and a trailing LOST_EVENTS header when the queue overflowed.
"""

from __future__ import annotations

import collections
import errno
from typing import TYPE_CHECKING

import attrs

from iommufd_model.core.objects import IommufdObject, ObjType
from iommufd_model.core.ucmd import Ucmd, ioctl_op
from iommufd_model.errors import err
from iommufd_model.failnth import failpoint
from iommufd_model.ida import lowest_free
from iommufd_model.locking import notify_event, serialized
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_model.core.device import AttachHandle, Device
    from iommufd_model.core.main import IommuFd
    from iommufd_model.core.viommu import Viommu
    from iommufd_model.driver import Domain
    from iommufd_model.hw.pci import PciDevice

INT_MAX = (1 << 31) - 1
PGFAULT_SIZE = U.IommuHwptPgfault.SIZE
RESPONSE_SIZE = U.IommuHwptPageResponse.SIZE
HEADER_SIZE = U.IommufdVeventHeader.SIZE


@attrs.define
class FaultGroup:
    """The faults of one page request group, answered together by one response;
    ``handle`` is the attach handle whose domain's fault handler took it (``struct
    iopf_group``'s ``attach_handle``)."""

    handle: AttachHandle
    pasid: int | None
    grpid: int
    faults: list[U.IommuHwptPgfault]

    @property
    def idev(self) -> Device:
        return self.handle.idev


@attrs.frozen
class IopfFault:
    """One page request as an IOMMU driver reports it (``struct iommu_fault_page_request``
    less the group index): its page, ``IOMMU_PGFAULT_PERM_*``, its own PASID (a group is
    one group index: its requests may carry different PASIDs, each reported with its own)
    and the flags the driver sets beyond LAST_PAGE and PASID_VALID (VT-d's NEEDS_PASID)."""

    addr: int
    perm: int
    pasid: int | None = None
    flags: int = 0


class IopfPartial:
    """The requests that wait for the last of their group, per device (``struct
    iommu_fault_param``'s ``partial`` list, keyed here by the requester ID)."""

    def __init__(self) -> None:
        self.waiting: dict[int, list[tuple[int, IopfFault]]] = {}

    def group(self, rid: int, grpid: int, fault: IopfFault, last: bool) -> list[IopfFault]:
        """``report_partial_fault()`` for a request that is not its group's last (an empty
        answer: nothing to deliver yet); for the last, ``iopf_group_alloc()``: the waiting
        requests of the same group index, in order, then this one."""
        waiting = self.waiting.setdefault(rid, [])
        if not last:
            waiting.append((grpid, fault))
            return []
        group = [f for g, f in waiting if g == grpid] + [fault]
        waiting[:] = [(g, f) for g, f in waiting if g != grpid]
        return group

    def discard(self) -> None:
        """``iopf_queue_discard_partial()``: after a page request queue overflow."""
        self.waiting.clear()


def iopf_perm(*, read: bool, write: bool, exe: bool = False, priv: bool = False) -> int:
    """``IOMMU_PGFAULT_PERM_*`` of a request's access bits."""
    return (
        (U.IOMMU_PGFAULT_PERM_READ if read else 0)
        | (U.IOMMU_PGFAULT_PERM_WRITE if write else 0)
        | (U.IOMMU_PGFAULT_PERM_EXEC if exe else 0)
        | (U.IOMMU_PGFAULT_PERM_PRIV if priv else 0)
    )


def deliver_iopf_group(
    domain: Domain | None,
    dev: PciDevice,
    grpid: int,
    faults: list[IopfFault],
) -> bool:
    """A complete page request group to the fault queue of the HWPT behind ``domain`` (the
    domain the driver found attached where the requests point, as io-pgfault.c's
    ``find_fault_handler()`` does): Linux 7.2's ``iommufd_fault_iopf_handler()``, each
    request as ``iommufd_compose_fault_message()`` gives it (``length`` 0, LAST_PAGE on the
    last, PASID_VALID with a PASID). False when that domain has no fault queue (no handler):
    the driver answers the group itself (``iopf_error_response()``). The group goes with the
    attach handle ``find_fault_handler()`` finds for the last request's PASID."""
    hwpt = None if domain is None else domain.hwpt
    queue: Fault | None = None if hwpt is None else hwpt.fault
    if hwpt is None or queue is None:
        return False
    idev = next((d for d in hwpt.devices if d.dev is dev), None)
    handle = None if idev is None else idev.fault_handle(hwpt, faults[-1].pasid)
    if handle is None:
        return False
    last = len(faults) - 1
    group = [
        U.IommuHwptPgfault(
            flags=f.flags
            | (0 if f.pasid is None else U.IOMMU_PGFAULT_FLAGS_PASID_VALID)
            | (U.IOMMU_PGFAULT_FLAGS_LAST_PAGE if i == last else 0),
            dev_id=handle.idev.id,
            pasid=f.pasid or 0,
            grpid=grpid,
            perm=f.perm,
            addr=f.addr,
            length=0,
        )
        for i, f in enumerate(faults)
    ]
    queue.report(handle, faults[-1].pasid, grpid, group)
    return True


@serialized()
class EventFile:
    """The anonymous file behind a FAULT or vEVENTQ object (``common.filep``)."""

    def __init__(self, owner: _EventObject) -> None:
        self.owner = owner

    def read(self, count: int) -> bytes:
        return self.owner.fops_read(count)

    def write(self, data: bytes) -> int:
        return self.owner.fops_write(data)

    def release(self) -> None:
        self.owner.file_closed()


class _EventObject(IommufdObject):
    def __init__(self, ictx: IommuFd) -> None:
        super().__init__(ictx)
        self.file = EventFile(self)
        self.fd = -1

    def open_file(self, caller_files: dict[int, object]) -> int:
        failpoint("eventq.open_file")  # anon_inode_getfile() / get_unused_fd_flags()
        proc = self.ictx.proc
        self.fd = proc.install_file(self.file)
        self.users += 1  # the open file keeps the object alive
        self.ictx.file_refs += 1  # ... and the iommufd file too (iommufd_ctx_get)
        return self.fd

    def file_closed(self) -> None:
        self.users -= 1
        self.ictx.put_file_ref()

    def fops_read(self, count: int) -> bytes:
        raise NotImplementedError

    def fops_write(self, data: bytes) -> int:
        raise err(errno.EINVAL, "this queue is read-only")


class Fault(_EventObject):
    """IOMMU_FAULT_QUEUE_ALLOC: IO page faults for HWPTs allocated with its fault_id."""

    TYPE = ObjType.FAULT

    def __init__(self, ictx: IommuFd) -> None:
        super().__init__(ictx)
        self.deliver: collections.deque[FaultGroup] = collections.deque()
        self.response: dict[int, FaultGroup] = {}  # cookie -> group awaiting an answer

    def report(
        self,
        handle: AttachHandle,
        pasid: int | None,
        grpid: int,
        faults: list[U.IommuHwptPgfault],
    ) -> None:
        """``iommufd_fault_iopf_handler()``: queue a group (LAST_PAGE on its last fault)."""
        self.deliver.append(FaultGroup(handle, pasid, grpid, faults))
        notify_event()

    def _alloc_cookie(self, group: FaultGroup) -> int:
        """``xa_alloc(XA_FLAGS_ALLOC1, xa_limit_32b)``: the lowest free cookie from 1."""
        cookie = lowest_free(self.response, 1)
        self.response[cookie] = group
        return cookie

    def fops_read(self, count: int) -> bytes:
        """``iommufd_fault_fops_read()``: whole groups while they fit; EINVAL when not even
        the first group does; each group read gets a cookie and waits for its response."""
        if count % PGFAULT_SIZE:
            # iommufd_fault_fops_read() (Linux 7.2): ESPIPE, not EINVAL
            raise err(errno.ESPIPE, "read size must be whole faults")
        out = bytearray()
        while self.deliver:
            group = self.deliver[0]
            if len(out) + len(group.faults) * PGFAULT_SIZE > count:
                if not out:
                    raise err(errno.EINVAL, "the read does not fit the first fault group")
                break
            self.deliver.popleft()
            cookie = self._alloc_cookie(group)
            for f in group.faults:
                f.cookie = cookie
                out += f.pack()
        return bytes(out)

    def fops_write(self, data: bytes) -> int:
        """``iommufd_fault_fops_write()``: responses in order until a bad one (a code other
        than SUCCESS / INVALID, or a cookie no group waits on): EINVAL if it is the first,
        else the bytes of the responses before it."""
        if len(data) % RESPONSE_SIZE:
            raise err(errno.ESPIPE, "write size must be whole responses")
        done = 0
        for off in range(0, len(data), RESPONSE_SIZE):
            resp = U.IommuHwptPageResponse.unpack(data[off : off + RESPONSE_SIZE])
            ok = resp.code in (U.IOMMUFD_PAGE_RESP_SUCCESS, U.IOMMUFD_PAGE_RESP_INVALID)
            group = self.response.pop(resp.cookie, None) if ok else None
            if group is None:
                if done:
                    break
                raise err(errno.EINVAL, f"bad page response (cookie {resp.cookie})")
            _respond(group, resp.code)
            done += RESPONSE_SIZE
        return done

    def auto_respond(self, handle: AttachHandle) -> None:
        """``iommufd_auto_response_faults()``: when an attachment goes (detach, or replace
        once the new one is in), the groups delivered through its very handle --
        undelivered first, then those awaiting a response, in cookie order -- are answered
        INVALID. Groups of the same device and HWPT at another PASID, or of another
        attachment of that HWPT, stay."""
        mine = [g for g in self.deliver if g.handle is handle]
        for g in mine:
            self.deliver.remove(g)
            _respond(g, U.IOMMUFD_PAGE_RESP_INVALID)
        for cookie, g in sorted(self.response.items()):
            if g.handle is handle:
                del self.response[cookie]
                _respond(g, U.IOMMUFD_PAGE_RESP_INVALID)

    def destroy(self) -> None:
        # iommufd_fault_destroy(): pending groups are answered INVALID, the undelivered
        # first, then those awaiting a response in cookie order.
        for group in [*self.deliver, *(g for _, g in sorted(self.response.items()))]:
            _respond(group, U.IOMMUFD_PAGE_RESP_INVALID)
        self.deliver.clear()
        self.response.clear()


def _respond(group: FaultGroup, code: int) -> None:
    """``iopf_group_response()``: the driver's ``page_response`` for the group."""
    idev = group.idev
    idev.hooks.page_response(
        iommu=idev.hw, dev=idev.dev, pasid=group.pasid, grpid=group.grpid, code=code
    )


@attrs.define
class _Vevent:
    flags: int
    sequence: int
    data: bytes


class Veventq(_EventObject):
    """IOMMU_VEVENTQ_ALLOC: one event queue per (vIOMMU, type)."""

    TYPE = ObjType.VEVENTQ

    def __init__(self, ictx: IommuFd, viommu: Viommu, type_: int, depth: int) -> None:
        super().__init__(ictx)
        self.viommu = viommu
        self.type = type_
        self.depth = depth
        self.events: collections.deque[_Vevent] = collections.deque()
        self.sequence = 0
        self.num_events = 0
        self.lost = False

    def _next_seq(self) -> int:
        seq = self.sequence
        self.sequence = 0 if seq == INT_MAX else seq + 1
        return seq

    def report(self, data: bytes) -> None:
        """``iommufd_viommu_report_event`` with the queue found: queue one record, or account
        it as lost when the queue holds ``depth`` records (7.2 returns 0 then) or the record
        cannot be allocated (``kzalloc_flex(GFP_NOWAIT)``, the failpoint): the LOST_EVENTS
        header is queued either way, and the allocation failure raises ENOMEM after it."""
        try:
            failpoint("veventq.report_event")
        except OSError:
            self._lost()
            raise
        if self.num_events >= self.depth:
            self._lost()
            return
        if self.lost:
            # A real event after a loss: the gap in sequence numbers tells the reader.
            self.events.pop()
            self.lost = False
        self.events.append(_Vevent(0, self._next_seq(), bytes(data)))
        self.num_events += 1
        notify_event()

    def _lost(self) -> None:
        """``iommufd_vevent_handler()`` with the lost_events_header: queued at the tail (or
        kept there) with the next sequence number; readers wake for it too."""
        seq = self._next_seq()
        if self.lost:
            self.events[-1].sequence = seq
        else:
            self.events.append(_Vevent(U.IOMMU_VEVENTQ_FLAG_LOST_EVENTS, seq, b""))
            self.lost = True
        notify_event()

    def fops_read(self, count: int) -> bytes:
        if count < HEADER_SIZE:
            # iommufd_veventq_fops_read(): the minimum read is one vEVENT header
            raise err(errno.EINVAL, "read shorter than a vEVENT header")
        out = bytearray()
        while self.events:
            ev = self.events[0]
            need = HEADER_SIZE + len(ev.data)
            if len(out) + need > count:
                if not out:
                    raise err(errno.EINVAL, "buffer too small for the next event")
                break
            if ev.flags & U.IOMMU_VEVENTQ_FLAG_LOST_EVENTS:
                # iommufd_veventq_deliver_fetch(): the header is copied (GFP_ATOMIC) before
                # it leaves the list; a failed copy ends the read, ENOMEM if nothing was read
                try:
                    failpoint("veventq.read_lost_header")
                except OSError:
                    if not out:
                        raise
                    break
                self.lost = False
            else:
                self.num_events -= 1
            self.events.popleft()
            out += U.IommufdVeventHeader(ev.flags, ev.sequence).pack() + ev.data
        return bytes(out)

    def destroy(self) -> None:
        self.viommu.veventqs.pop(self.type, None)
        self.events.clear()


@ioctl_op(U.IOMMU_FAULT_QUEUE_ALLOC, U.IommuFaultAlloc, "out_fault_fd")
def _fault_alloc(ucmd: Ucmd) -> None:
    cmd = ucmd.zeroed("flags")
    fault = Fault(ucmd.ictx)
    cmd.out_fault_id = ucmd.ictx.objects.alloc_id(fault)
    cmd.out_fault_fd = _open_or_remove(ucmd, fault)
    ucmd.respond()


def _open_or_remove(ucmd: Ucmd, obj: _EventObject) -> int:
    """The new object's fd; when it cannot be opened the object leaves the table again."""
    try:
        return obj.open_file(ucmd.caller.files)  # type: ignore[arg-type]
    except OSError:
        ucmd.ictx.objects.remove(obj)
        raise


VEVENTQ_MAX_DEPTH = 1 << 19  # eventq.c: "an arbitrary upper bound ... all existing HWs"


@ioctl_op(U.IOMMU_VEVENTQ_ALLOC, U.IommuVeventqAlloc, "out_veventq_fd")
def _veventq_alloc(ucmd: Ucmd) -> None:

    cmd = ucmd.cmd
    if cmd.flags or cmd.reserved or cmd.type == U.IOMMU_VEVENTQ_TYPE_DEFAULT:
        raise err(errno.EOPNOTSUPP, "bad veventq flags, reserved or type")
    if not cmd.veventq_depth or cmd.veventq_depth > VEVENTQ_MAX_DEPTH:
        raise err(errno.EINVAL, "veventq_depth must be 1 .. 1 << 19")
    viommu = ucmd.ictx.objects.get_viommu(cmd.viommu_id)
    if cmd.type in viommu.veventqs:
        raise err(errno.EEXIST, "the vIOMMU already has a vEVENTQ of that type")
    q = Veventq(ucmd.ictx, viommu, cmd.type, cmd.veventq_depth)
    cmd.out_veventq_id = ucmd.ictx.objects.alloc_id(q)
    q.hold(viommu)
    viommu.veventqs[cmd.type] = q
    cmd.out_veventq_fd = _open_or_remove(ucmd, q)
    ucmd.respond()
