"""Page requests fuzzed on every driver (issue 17): hypothesis drives a PRI device and the VMM's
fault fd with what a buggy device or VMM sends -- garbage PASIDs and group indexes, bursts
that overflow the IOMMU's queue while its interrupt thread is late, reads of odd sizes,
responses with stale or invented cookies and codes outside the uAPI, detaches with groups in
flight -- and checks after every step and at the end:

- nothing but OSError leaves the uAPI (a read or write of the fault fd, an attach), and a
  device's page request never raises: the IOMMU queues it or not (``PciDevice.page_request``);
- the queues stay consistent: once the interrupt thread ran, the driver consumed its queue
  (AMD PPR_HEAD = PPR_TAIL, VT-d PQH = PQT, SMMUv3 PRIQ_CONS = PRIQ_PROD); the fault object
  holds exactly the groups read and not yet answered;
- the device's PRI capability (devices/pri.py) keeps its register rules under config writes of
  any width, offset and value: Capacity and "PRG Response PASID Required" never change,
  Reset reads 0, Stopped reads the inverse of Enable;
- every request is answered once: at the end (responses, a detach's auto-responses, the fault
  queue's destruction) each group index was answered at least as often as the IOMMU queued a
  last request of it and never more often than the device sent requests with it; a stalled
  SMMUv3 transaction is resumed exactly once; a cookie answered once is refused after.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from iommufd_amd import regs as AMD
from iommufd_intel_vtd import regs as VTD

from iommufd_model.core.eventq import EventFile
from iommufd_model.devices import pci_regs as PR
from iommufd_model.devices.pri import PRI_CAPACITY
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.machine import Machine
from iommufd_model.uapi import iommufd as U

FAULT = U.IommuHwptPgfault.SIZE
RESP = U.IommuHwptPageResponse.SIZE
IOVA = 0x400_0000


class Vendor:
    """How one driver's IOMMU is probed for page requests, and what its device was answered."""

    options: dict[str, Any] = {}
    hwpt_flags = 0
    irq_attr = ""  # the IOMMU's page request interrupt handler (a callable), if it has one

    def __init__(self, hw: Any) -> None:
        self.hw = hw

    def answered(self) -> Counter[int] | None:
        """Group index -> answers the device received (None: the driver keeps no trace)."""
        return None

    def hold(self) -> Callable[[], None]:
        """Delay the page request interrupt; the function returned runs it late."""
        if not self.irq_attr:
            return lambda: None
        irq = getattr(self.hw, self.irq_attr)
        setattr(self.hw, self.irq_attr, None)

        def release() -> None:
            setattr(self.hw, self.irq_attr, irq)
            irq()

        return release

    def consumed(self) -> bool:
        return True


class Amd(Vendor):
    # A PASID-capable (v2, SVA-capable) domain: the DTE gets PPR, requests reach the PPR log.
    hwpt_flags = U.IOMMU_HWPT_ALLOC_PASID
    irq_attr = "ppr_irq"

    def answered(self) -> Counter[int]:
        return Counter(c.tag & 0x1FF for c in self.hw.ppr_responses)

    def consumed(self) -> bool:
        return bool(self.hw.mmio.read(AMD.PPR_HEAD) == self.hw.mmio.read(AMD.PPR_TAIL))


class Vtd(Vendor):
    irq_attr = "prq_irq"

    def answered(self) -> Counter[int]:
        return Counter(r.prgi for r in self.hw.prg_responses)

    def consumed(self) -> bool:
        return bool(self.hw.mmio.read(VTD.PQH) == self.hw.mmio.read(VTD.PQT))


class Smmuv3(Vendor):
    options = {"stall_force": True, "pri": True}

    def answered(self) -> Counter[int]:
        return Counter(grpid for _sid, _ssid, grpid, _resp in self.hw.pri_responses)

    def hold(self) -> Callable[[], None]:
        irqs, self.hw.priq_irq = self.hw.priq_irq, []

        def release() -> None:
            self.hw.priq_irq = irqs
            for irq in irqs:
                irq()

        return release

    def consumed(self) -> bool:
        m = self.hw.mmio
        wrap = (1 << (self.hw._priq_log2 + 1)) - 1
        return bool(m["PRIQ_PROD"] & wrap == m["PRIQ_CONS"] & wrap)


VENDORS: dict[str, type[Vendor]] = {
    "mock": Vendor,  # its page_response does nothing: only the uAPI side is checked
    "amd": Amd,
    "intel_vtd": Vtd,
    "arm_smmuv3": Smmuv3,
}


class World:
    """A PRI (ATS) device attached to a HWPT on a fault queue, and the VMM's fault fd."""

    def __init__(self, driver: str) -> None:
        kind = VENDORS[driver]
        m = Machine.build(iommus=[driver], options={driver: dict(kind.options)})
        self.v = kind(m.iommus[0])
        self.dev = m.add_pci_device(iommu=0, ats=True)
        self.proc = m.new_process()
        self.fd = self.proc.open_iommufd()
        self.dev_id = self.fd.bind(self.dev)
        self.ioas = self.fd.ioas_alloc()
        self.fault_id, self.fault_fd = self.fd.fault_queue_alloc()
        self.hwpt = self.fd.hwpt_alloc(
            self.dev_id, self.ioas, flags=kind.hwpt_flags, fault_id=self.fault_id
        )
        self.fd.attach(self.dev_id, self.hwpt)
        self.attached = True
        self.release: Callable[[], None] | None = None
        self.sent: Counter[int] = Counter()  # group index -> requests the device sent
        self.queued_last: Counter[int] = Counter()  # ... last requests the IOMMU queued
        self.stalls = 0
        self.cookies: set[int] = set()  # read and not answered
        self.answered_cookies: set[int] = set()

    @property
    def file(self) -> EventFile:
        f = self.proc.file(self.fault_fd)
        assert isinstance(f, EventFile)
        return f

    def fault(self) -> Any:
        return self.fd.objects.get(self.fault_id, held=True)

    # -- steps --------------------------------------------------------------------------------
    def request(self, addr: int, pasid: int | None, bits: int, grpid: int, last: bool) -> None:
        read, write, exe, priv = (bool(bits >> i & 1) for i in range(4))
        queued = self.dev.page_request(
            addr, pasid=pasid, read=read, write=write, exe=exe, priv=priv, grpid=grpid, last=last
        )
        assert isinstance(queued, bool)
        self.sent[grpid & 0x1FF] += 1
        if queued and last and (read or write):  # a stop marker (R = W = 0) wants no answer
            self.queued_last[grpid & 0x1FF] += 1

    def dma(self, addr: int) -> None:
        try:
            self.dev.dma_write(addr, b"x")
        except DmaFault as exc:
            self.stalls += "stalled" in exc.reason

    def read(self, nfaults: int, odd: int) -> None:
        try:
            data = self.file.read(nfaults * FAULT + odd)
        except OSError as exc:
            assert exc.errno in (errno.ESPIPE, errno.EINVAL), exc
            assert odd or nfaults * FAULT < FAULT * max(len(g.faults) for g in self.fault().deliver)
            return
        assert not odd and len(data) % FAULT == 0 and len(data) <= nfaults * FAULT
        for off in range(0, len(data), FAULT):
            cookie = U.IommuHwptPgfault.unpack(data[off : off + FAULT]).cookie
            assert cookie != 0
            self.cookies.add(cookie)
            self.answered_cookies.discard(cookie)  # a cookie is reused once answered

    def respond(self, picks: list[tuple[int, int]]) -> None:
        known = sorted(self.cookies | self.answered_cookies)
        resps = []
        for pick, code in picks:
            cookie = known[pick % len(known)] if known and pick < 1 << 16 else pick
            resps.append((cookie, code))
        data = b"".join(U.IommuHwptPageResponse(cookie=c, code=k).pack() for c, k in resps)
        try:
            done = self.file.write(data)
        except OSError as exc:
            assert exc.errno == errno.EINVAL, exc
            done = 0
        assert done % RESP == 0 and done <= len(data)
        for cookie, code in resps[: done // RESP]:
            assert cookie in self.cookies and code in (0, 1), (cookie, code)
            self.cookies.discard(cookie)
            self.answered_cookies.add(cookie)
        if done < len(data):  # the first refused response is a bad one
            cookie, code = resps[done // RESP]
            assert cookie not in self.cookies or code not in (0, 1), (cookie, code)

    def reattach(self) -> None:
        """Detach (the device's groups are auto-answered) and attach again."""
        if self.attached:
            self.fd.detach(self.dev_id)
            self.cookies.clear()
        else:
            self.fd.attach(self.dev_id, self.hwpt)
        self.attached = not self.attached

    def hold(self) -> None:
        if self.release is None:
            self.release = self.v.hold()

    def run_irq(self) -> None:
        if self.release is not None:
            self.release()
            self.release = None

    # -- checks -------------------------------------------------------------------------------
    def config(self, offset: int, size: int, value: int) -> None:
        """A config write into the PRI capability (a VMM or guest poking it through VFIO)."""
        pos = self.dev.config.find_ext_cap(PR.PCI_EXT_CAP_ID_PRI)
        assert pos is not None
        offset = min(offset, PR.PCI_EXT_CAP_PRI_SIZEOF - size)
        if offset % size:
            offset -= offset % size
        self.dev.config_write(pos + offset, size, value)

    def check(self) -> None:
        pos = self.dev.config.find_ext_cap(PR.PCI_EXT_CAP_ID_PRI)
        assert pos is not None, "the PRI capability left the chain"
        ctrl = self.dev.config_read(pos + PR.PCI_PRI_CTRL, 2)
        status = self.dev.config_read(pos + PR.PCI_PRI_STATUS, 2)
        assert not ctrl & ~PR.PCI_PRI_CTRL_ENABLE, f"PRI control {ctrl:#x}"
        assert bool(status & PR.PCI_PRI_STATUS_STOPPED) != bool(ctrl & PR.PCI_PRI_CTRL_ENABLE)
        assert status & PR.PCI_PRI_STATUS_PASID, "PRG Response PASID Required changed"
        assert self.dev.config_read(pos + PR.PCI_PRI_MAX_REQ, 4) == PRI_CAPACITY
        if self.release is None:
            assert self.v.consumed(), "the driver left page requests in its queue"
        fault = self.fault()
        assert set(fault.response) == self.cookies, "outstanding cookies differ"
        answered = self.v.answered() or Counter()
        for grpid, n in answered.items():
            assert n <= self.sent[grpid], f"group {grpid} answered {n}x, {self.sent[grpid]} sent"

    def finish(self) -> None:
        self.run_irq()
        self.check()
        while self.file.read(64 * FAULT):
            pass
        self.fd.detach(self.dev_id) if self.attached else None
        self.fd.destroy(self.hwpt)
        self.proc.close(self.fault_fd)
        self.fd.destroy(self.fault_id)
        assert self.v.consumed()
        answered = self.v.answered()
        if answered is None:
            return
        for grpid, n in self.queued_last.items():
            assert answered[grpid] >= n, f"group {grpid}: {n} queued, {answered[grpid]} answered"
        hw = self.v.hw
        if isinstance(self.v, Smmuv3):
            assert not hw.stalled, "a stalled transaction was never resumed"
            assert len(hw.resumes) == self.stalls, "a stall resumed other than once"


GRPID = st.one_of(st.integers(0, 3), st.integers(0, 0x3FF))
PASID = st.one_of(st.none(), st.integers(0, 8), st.integers(0, (1 << 32) - 1))
ADDR = st.one_of(st.just(IOVA), st.integers(0, (1 << 64) - 1))
STEP = st.one_of(
    st.tuples(st.just("request"), ADDR, PASID, st.integers(0, 15), GRPID, st.booleans()),
    st.tuples(st.just("burst"), st.integers(1, 600), GRPID),
    st.tuples(st.just("dma"), st.integers(0, 15)),
    st.tuples(st.just("read"), st.integers(0, 20), st.sampled_from([0, 0, 0, 1, 31])),
    st.tuples(
        st.just("respond"),
        st.lists(
            st.tuples(
                st.one_of(st.integers(0, 64), st.integers(0, (1 << 32) - 1)),
                st.sampled_from([0, 0, 1, 2, 0xFFFF_FFFF]),
            ),
            min_size=1,
            max_size=4,
        ),
    ),
    st.tuples(st.just("reattach")),
    st.tuples(
        st.just("config"),
        st.integers(0, 15),
        st.sampled_from([1, 2, 4]),
        st.integers(0, (1 << 32) - 1),
    ),
    st.tuples(st.just("hold")),
    st.tuples(st.just("irq")),
)


@pytest.mark.parametrize("driver", sorted(VENDORS))
@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps=st.lists(STEP, max_size=25))
# A group read and outstanding when the device detaches; one answered twice; a queue that
# overflows while the interrupt thread is late; a stalled write on SMMUv3, never read.
@example(steps=[("request", IOVA, None, 3, 1, True), ("read", 4, 0), ("reattach",)])
@example(steps=[("dma", 0), ("read", 2, 0), ("respond", [(0, 0), (0, 0)])])
@example(steps=[("hold",), ("burst", 600, 7), ("irq",), ("read", 20, 0)])
@example(steps=[("dma", 1), ("dma", 2), ("reattach",), ("reattach",), ("dma", 3)])
@example(steps=[("config", 4, 4, 0xFFFF_FFFF), ("config", 6, 2, 0), ("reattach",), ("dma", 0)])
def test_page_requests_and_fault_fd(driver: str, steps: list[tuple[Any, ...]]) -> None:
    w = World(driver)
    for step in steps:
        kind = step[0]
        if kind == "request":
            w.request(*step[1:])
        elif kind == "burst":
            for i in range(step[1]):
                w.request(IOVA + (i << 12), None, 1, step[2], True)
        elif kind == "dma":
            w.dma(IOVA + (step[1] << 12))
        elif kind == "read":
            w.read(step[1], step[2])
        elif kind == "respond":
            w.respond(step[1])
        elif kind == "reattach":
            w.reattach()
        elif kind == "config":
            w.config(*step[1:])
        elif kind == "hold":
            w.hold()
        else:
            w.run_irq()
        w.check()
    w.finish()
