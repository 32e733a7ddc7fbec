"""INVALID_PPR_REQUEST (event 0x9): a page request the IOMMU refuses because the device's DTE
does not enable PPR is logged once in the event log, in the layout Linux 7.2's
``iommu_print_event`` decodes (drivers/iommu/amd/iommu.c: PPR_PASID of the first quadword, the
tag in word 1 [9:0]), and never reaches the PPR log."""

from __future__ import annotations

import struct
from typing import Any

from iommufd_amd import events as E
from iommufd_amd import ppr as P
from iommufd_amd import regs as R

from iommufd_model import uapi as U

IOVA = 1 << 30


def _raw_events(w: Any) -> list[bytes]:
    mmio = w.hw.mmio
    head = mmio.read(R.EVT_HEAD) // R.ENTRY_SIZE
    tail = mmio.read(R.EVT_TAIL) // R.ENTRY_SIZE
    ring = w.hw.evt_ring
    return [ring.read(head + i) for i in range(ring.count(head, tail))]


def test_ppr_request_without_dte_ppr_logs_one_invalid_ppr_request(make_world: Any) -> None:
    w = make_world(ats=True)
    rid = w.dev.rid
    w.fd.attach(w.dev_id, w.hwpt(w.ioas()))  # a paging domain without ALLOC_PASID: PPR=0
    dte = w.kernel.read_dte(rid)
    assert dte.v and not dte.ppr
    before = _raw_events(w)
    ppr_tail = w.hw.mmio.read(R.PPR_TAIL)

    assert not w.dev.page_request(IOVA + 0x456, pasid=0xA_BCDE, write=True, grpid=0x12)

    raw = _raw_events(w)[len(before) :]
    assert len(raw) == 1  # exactly once
    w0, w1, lo, hi = struct.unpack("<4I", raw[0])
    q0 = w0 | w1 << 32
    # Decoded as iommu_print_event() does for EVENT_TYPE_INV_PPR_REQ.
    assert w1 >> 28 == 0x9
    assert w0 & 0xFFFF == rid
    assert ((q0 >> 42) & 0xF) << 16 | (q0 >> 16) & 0xFFFF == 0xA_BCDE
    assert w1 & 0x3FF == 0x12 | P.TAG_LAST
    flags = P.PPR_FLAG_GN | P.PPR_FLAG_READ | P.PPR_FLAG_WRITE | P.PPR_FLAG_US
    assert (w1 >> 16) & 0xFFF == flags
    assert hi << 32 | lo == IOVA
    ev = E.Event.from_bytes(raw[0])
    assert (ev.name, ev.tag, ev.ppr_tag) == ("INVALID_PPR_REQUEST", 0xA_BCDE, 0x212)
    assert ev.to_bytes() == raw[0]
    assert w.hw.mmio.read(R.STATUS) & R.ST_EVT_INT
    assert w.hw.mmio.read(R.PPR_TAIL) == ppr_tail  # the PPR log never saw it


def test_ppr_enabled_dte_logs_no_event(make_world: Any) -> None:
    """With the DTE's PPR bit set the request goes to the PPR log, and no event is logged."""
    w = make_world(ats=True)
    w.fd.attach(w.dev_id, w.hwpt(w.ioas(), U.IOMMU_HWPT_ALLOC_PASID))
    assert w.kernel.read_dte(w.dev.rid).ppr
    before = _raw_events(w)
    assert w.dev.page_request(IOVA, pasid=5, grpid=3)
    assert _raw_events(w) == before
