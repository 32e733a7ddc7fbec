"""The vEVENTQ as Linux 7.2 keeps it (``driver.c`` ``iommufd_viommu_report_event``,
``iommufd_private.h`` ``iommufd_vevent_handler``, ``eventq.c`` ``iommufd_veventq_fops_read``):
at most ``veventq_depth`` events queued; an event reported into a full queue consumes a
sequence number and leaves one LOST_EVENTS header at the tail (moved forward by the next
loss, dropped when a real event follows: the sequence gap tells the reader); sequence
numbers wrap from INT_MAX to 0; a read takes whole events while they fit, a LOST_EVENTS
header needing only its 8 bytes, and is EINVAL only when the first event does not fit."""

from __future__ import annotations

import errno
import struct
from typing import Any

from helpers import World, event_file
from iommufd_model.core.eventq import INT_MAX, Veventq
from iommufd_model.failnth import fail_nth, sweep
from iommufd_model.mock import selftest as T
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import iommufd as U

HDR = U.IommufdVeventHeader.SIZE
LOST = U.IOMMU_VEVENTQ_FLAG_LOST_EVENTS
SELFTEST_Q = T.IOMMU_VEVENTQ_TYPE_SELFTEST


class Rig:
    def __init__(self, depth: int) -> None:
        w = World()
        ioas = w.fd.ioas_alloc()
        parent = w.fd.hwpt_alloc(w.dev_id, ioas, flags=U.IOMMU_HWPT_ALLOC_NEST_PARENT)
        viommu = w.fd.viommu_alloc(w.dev_id, parent, T.IOMMU_VIOMMU_TYPE_SELFTEST)
        qid, qfd = w.fd.veventq_alloc(viommu, T.IOMMU_VEVENTQ_TYPE_SELFTEST, depth)
        q = w.fd.objects.get(qid)
        assert isinstance(q, Veventq)
        self.q = q
        self.file = w.proc.files[qfd]

    def report(self, *events: bytes) -> None:
        for data in events:
            self.q.report(data)

    def read(self, count: int = 4096) -> list[tuple[int, int, bytes]]:
        """(flags, sequence, data) of each record read; a record's data is 4 bytes here."""
        out = self.file.read(count)  # type: ignore[attr-defined]
        recs = []
        while out:
            hdr = U.IommufdVeventHeader.unpack(out[:HDR])
            size = 0 if hdr.flags & LOST else 4
            recs.append((hdr.flags, hdr.sequence, bytes(out[HDR : HDR + size])))
            out = out[HDR + size :]
        return recs


def ev(n: int) -> bytes:
    return n.to_bytes(4, "little")


def test_overflow_leaves_one_lost_header_with_the_last_sequence() -> None:
    r = Rig(depth=2)
    r.report(ev(0), ev(1), ev(2), ev(3))  # 2 and 3 lost: sequences 2 and 3 consumed
    assert r.read() == [(0, 0, ev(0)), (0, 1, ev(1)), (LOST, 3, b"")]
    assert r.read() == []


def test_a_real_event_after_a_loss_replaces_the_lost_header() -> None:
    """After a read made room, the next event drops the tail LOST_EVENTS header: the
    sequence gap (1 -> 3) is what says an event was lost."""
    r = Rig(depth=2)
    r.report(ev(0), ev(1), ev(2))
    assert r.read(HDR + 4) == [(0, 0, ev(0))]  # room for one event: the rest waits
    r.report(ev(3))
    assert r.read() == [(0, 1, ev(1)), (0, 3, ev(3))]


def test_a_lost_header_needs_only_its_header_room() -> None:
    r = Rig(depth=1)
    r.report(ev(0), ev(1))
    # one event and 8 more bytes: the LOST_EVENTS header fits, no data follows it
    assert r.read(2 * HDR + 4) == [(0, 0, ev(0)), (LOST, 1, b"")]
    r.report(ev(2), ev(3))
    assert_errno(errno.EINVAL, lambda: r.file.read(HDR))  # type: ignore[attr-defined]
    assert r.read(HDR + 4) == [(0, 2, ev(2))]  # the lost header stays queued
    assert r.read(HDR) == [(LOST, 3, b"")]  # alone it fits a header-sized read


def test_sequence_wraps_from_int_max_to_0_and_the_depth_counts_real_events() -> None:
    r = Rig(depth=3)
    r.q.sequence = INT_MAX - 1
    r.report(ev(0), ev(1), ev(2))
    assert [s for _, s, _ in r.read()] == [INT_MAX - 1, INT_MAX, 0]
    r.report(ev(3), ev(4), ev(5), ev(6))  # a read emptied the queue: 3 fit again
    assert r.read() == [(0, 1, ev(3)), (0, 2, ev(4)), (0, 3, ev(5)), (LOST, 4, b"")]


def test_a_failed_record_allocation_is_enomem_and_leaves_the_lost_header() -> None:
    """iommufd_viommu_report_event(): when kzalloc_flex(GFP_NOWAIT) of the record fails the
    lost_events_header is queued (a sequence consumed) and the call returns -ENOMEM; a later
    real event drops the header again, so only the sequence gap tells the reader."""
    r = Rig(depth=4)
    r.report(ev(0))
    with fail_nth(1) as fp:
        assert_errno(errno.ENOMEM, lambda: r.q.viommu.report_event(SELFTEST_Q, ev(1)))
    assert fp.fired_site == "veventq.report_event"
    r.report(ev(2))
    assert r.read() == [(0, 0, ev(0)), (0, 2, ev(2))]
    with fail_nth(1):
        assert_errno(errno.ENOMEM, lambda: r.q.viommu.report_event(SELFTEST_Q, ev(3)))
    assert r.read() == [(LOST, 3, b"")]
    assert r.q.num_events == 0


def test_a_failed_copy_of_the_lost_header_ends_the_read() -> None:
    """iommufd_veventq_deliver_fetch() copies the lost_events_header (GFP_ATOMIC) before it
    leaves the list: a failed copy ends the read with what was read, or ENOMEM when nothing
    was; the header stays queued for the next read."""
    r = Rig(depth=1)
    r.report(ev(0), ev(1))
    with fail_nth(1) as fp:
        assert r.read() == [(0, 0, ev(0))]
    assert fp.fired_site == "veventq.read_lost_header"
    with fail_nth(1):
        assert_errno(errno.ENOMEM, lambda: r.file.read(4096))  # type: ignore[attr-defined]
    assert r.read() == [(LOST, 1, b"")]


def test_trigger_vevent_under_fail_nth_returns_the_report_errno() -> None:
    """The selftest's IOMMU_TEST_OP_TRIGGER_VEVENT returns iommufd_viommu_report_event()'s
    rc: swept with fail-nth, the object lookup fails ENOENT and the record allocation ENOMEM,
    each allocation failure leaving the LOST_EVENTS header; the final call queues the event,
    which replaces the header (the sequence gap counts the lost ones)."""
    w = World()
    ioas = w.fd.ioas_alloc()
    parent = w.fd.hwpt_alloc(w.dev_id, ioas, flags=U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    viommu = w.fd.viommu_alloc(w.dev_id, parent, T.IOMMU_VIOMMU_TYPE_SELFTEST)
    _, qfd = w.fd.veventq_alloc(viommu, SELFTEST_Q, 4)
    w.fd.vdevice_alloc(viommu, w.dev_id, 0x99)
    data = struct.pack("<II", T.IOMMU_TEST_IOTLB_DEFAULT, 0)
    nested = w.fd.hwpt_alloc(w.dev_id, viommu, data_type=T.IOMMU_HWPT_DATA_SELFTEST, data=data)
    w.fd.attach(w.dev_id, nested)
    cmd = struct.pack("<IIII", 72, T.IOMMU_TEST_OP_TRIGGER_VEVENT, 0, 0)
    cmd += struct.pack("<I", w.dev_id).ljust(48, b"\0") + bytes(8)
    lost: list[int] = []

    def check(fp: Any, exc: OSError | None) -> None:
        assert exc is not None and fp.fired_errno == exc.errno
        if fp.fired_site == "veventq.report_event":
            assert exc.errno == errno.ENOMEM
            lost.append(fp.n)
        else:
            assert exc.errno in (errno.ENOENT, errno.ENOMEM)

    res = sweep(lambda: w.fd.ioctl(T.IOMMU_TEST_CMD, bytearray(cmd)), check)
    assert lost and res.reached >= 1
    out = event_file(w.proc, qfd).read(4096)
    hdr = U.IommufdVeventHeader.unpack(out[:HDR])
    assert (hdr.flags, hdr.sequence, out[HDR:]) == (0, len(lost), struct.pack("<I", 0x99))
