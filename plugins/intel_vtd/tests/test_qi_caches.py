"""Caches stay stale until the matching queued invalidation; wait descriptors; IQE."""

from __future__ import annotations

from typing import Any

import pytest
from iommufd_intel_vtd import faults as F
from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import regs as R
from iommufd_intel_vtd.domain import VtdPaging

import iommufd_model as im
from iommufd_model import uapi as U

PAGE = 4096


def _attach(world: Any, flags: int = 0, pages: int = 16) -> tuple[Any, VtdPaging]:
    ioas = world.ioas()
    world.map(ioas, 0, pages * PAGE)
    hwpt = world.hwpt(ioas, flags) if flags else ioas
    world.fd.attach(world.dev_id, hwpt)
    domain = world.fd.device(world.dev_id).hwpt.domain
    assert isinstance(domain, VtdPaging)
    return world.hw.driver_state, domain


def _ok(world: Any, iova: int, pasid: int | None = None) -> bool:
    try:
        world.dev.dma_read(iova, 4, pasid=pasid)
    except im.DmaFault:
        return False
    return True


def test_descriptor_codec_roundtrip_and_layout() -> None:
    d = Q.make(Q.PIOTLB, g=Q.PIOTLB_PAGE, did=0x1234, pasid=0xABCDE, addr=0x7654321, am=9, ih=1)
    raw = d.encode(256)
    assert len(raw) == 32 and Q.decode(raw) == Q.decode(d.encode())
    q0, q1 = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:16], "little")
    assert q0 & 0xF == 6 and (q0 >> 4) & 3 == 3 and (q0 >> 16) & 0xFFFF == 0x1234
    assert (q0 >> 32) & 0xFFFFF == 0xABCDE
    assert q1 & 0x3F == 9 and q1 >> 6 & 1 and q1 >> 12 == 0x7654321
    w = Q.make(Q.WAIT, sw=1, iflag=1, status_data=0xDEAD, status_addr=0x1000 >> 2)
    q0 = int.from_bytes(w.encode()[:8], "little")
    assert q0 == 5 | 1 << 4 | 1 << 5 | 0xDEAD << 32
    with pytest.raises(ValueError):
        Q.make(Q.CC, addr=1)


@pytest.mark.parametrize(
    "raw",
    [
        (0xF).to_bytes(16, "little"),  # unknown type
        (Q.IOTLB | 1 << 4 | 1 << 40).to_bytes(16, "little"),  # reserved bit 40
        (Q.PIOTLB | 0 << 4).to_bytes(16, "little"),  # reserved granularity 0
        (Q.CC | 0 << 4).to_bytes(16, "little"),  # reserved granularity 0
        Q.make(Q.WAIT, sw=1).encode() + b"\x01" + bytes(15),  # upper 128 bits set
    ],
)
def test_invalid_descriptors_are_refused(raw: bytes) -> None:
    with pytest.raises(Q.InvalidDescriptor):
        Q.decode(raw.ljust(32, b"\0") if len(raw) < 32 else raw)


def test_context_cache_is_stale_until_context_invalidation(world: Any) -> None:
    st, _ = _attach(world)
    assert _ok(world, 0)
    rid = world.dev.rid
    slot = st.context_tables[(rid >> 8, 0)] + (rid & 0x7F) * 32
    q0 = world.hw.memory.read_u64(slot)
    world.hw.memory.write_u64(slot, q0 & ~1)  # context entry no longer present
    world.hw.execute(Q.make(Q.IOTLB, g=Q.IOTLB_GLOBAL))
    world.hw.execute(Q.make(Q.PC, g=Q.PC_GLOBAL))
    assert _ok(world, 0)  # the cached context entry is used
    st.submit(Q.make(Q.CC, g=Q.CC_DEVICE, sid=rid + 8))  # another device
    assert _ok(world, 0)
    st.submit(Q.make(Q.CC, g=Q.CC_DEVICE, sid=rid | 7, fm=3))  # function mask covers rid
    assert not _ok(world, 0)
    assert world.hw.pending_faults()[-1].reason == F.FR_SM_CTX_NOT_PRESENT
    world.hw.memory.write_u64(slot, q0)
    st.submit(Q.make(Q.CC, g=Q.CC_GLOBAL))
    assert _ok(world, 0)


def test_pasid_cache_is_stale_until_pasid_cache_invalidation(world: Any) -> None:
    st, domain = _attach(world)
    assert domain.did is not None  # attached: it has its DomainID
    assert _ok(world, 0)
    info = st.devs[world.dev.rid]
    slot = st.pasid_slot(info, 0)
    q0 = world.hw.memory.read_u64(slot)
    world.hw.memory.write_u64(slot, q0 & ~1)
    st.submit(Q.make(Q.IOTLB, g=Q.IOTLB_GLOBAL))
    assert _ok(world, 0)
    st.submit(Q.make(Q.PC, g=Q.PC_PASID, did=domain.did + 1, pasid=0))  # wrong DID
    assert _ok(world, 0)
    st.submit(Q.make(Q.PC, g=Q.PC_PASID, did=domain.did, pasid=3))  # wrong PASID
    assert _ok(world, 0)
    st.submit(Q.make(Q.PC, g=Q.PC_DOMAIN, did=domain.did))
    assert not _ok(world, 0)
    assert world.hw.pending_faults()[-1].reason == F.FR_PASID_NOT_PRESENT


def test_second_stage_iotlb_is_stale_until_iotlb_invalidation(world: Any) -> None:
    st, d = _attach(world, U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    assert d.did is not None
    assert not d.first_stage
    for page in range(8):
        assert _ok(world, page * PAGE)
    d.pt.unmap(0, 8 * PAGE)  # a driver "forgetting" to flush
    assert all(_ok(world, p * PAGE) for p in range(8))  # stale, as on silicon
    # Page-selective with AM=1 at page 2: pages 2 and 3 only.
    st.submit(Q.make(Q.IOTLB, g=Q.IOTLB_PAGE, did=d.did, addr=2, am=1))
    assert [_ok(world, p * PAGE) for p in range(5)] == [True, True, False, False, True]
    st.submit(Q.make(Q.IOTLB, g=Q.IOTLB_PAGE, did=d.did + 1, addr=0, am=4))  # other DID
    assert _ok(world, 0)
    # P_IOTLB does not touch second-stage-only entries.
    st.submit(Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=d.did, pasid=0))
    assert _ok(world, 0)
    st.submit(Q.make(Q.IOTLB, g=Q.IOTLB_DOMAIN, did=d.did))
    assert not _ok(world, 0) and not _ok(world, 5 * PAGE)
    assert world.hw.pending_faults()[-1].reason == F.FR_SS_NOT_PRESENT


def test_global_iotlb_invalidation(world: Any) -> None:
    st, d = _attach(world)
    assert _ok(world, PAGE)
    d.pt.unmap(0, 16 * PAGE)
    assert _ok(world, PAGE)
    st.submit(Q.make(Q.IOTLB, g=Q.IOTLB_GLOBAL))
    assert not _ok(world, PAGE)


def test_first_stage_iotlb_is_stale_until_pasid_based_invalidation(world: Any) -> None:
    st, d = _attach(world, U.IOMMU_HWPT_ALLOC_PASID)
    assert d.did is not None
    assert d.first_stage
    world.fd.attach(world.dev_id, world.fd.device(world.dev_id).hwpt.id, pasid=9)
    for p in range(4):
        assert _ok(world, p * PAGE) and _ok(world, p * PAGE, pasid=9)
    d.pt.unmap(0, 16 * PAGE)
    st.submit(Q.make(Q.IOTLB, g=Q.IOTLB_PAGE, did=d.did, addr=0, am=3))  # SS-only: no effect
    assert _ok(world, 0) and _ok(world, 0, pasid=9)
    st.submit(Q.make(Q.PIOTLB, g=Q.PIOTLB_PAGE, did=d.did, pasid=9, addr=0, am=1))
    assert [_ok(world, p * PAGE, pasid=9) for p in range(3)] == [False, False, True]
    assert _ok(world, 0)  # PASID 0's entries are tagged separately
    st.submit(Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=d.did, pasid=0))
    assert not _ok(world, 3 * PAGE) and _ok(world, 2 * PAGE, pasid=9)
    st.submit(Q.make(Q.IOTLB, g=Q.IOTLB_DOMAIN, did=d.did))  # DSI covers every PASID
    assert not _ok(world, 2 * PAGE, pasid=9)


def test_driver_unmap_flushes(world: Any) -> None:
    _attach(world)
    ioas = world.fd.device(world.dev_id).hwpt.ioas.id
    assert _ok(world, 0) and _ok(world, 5 * PAGE)
    commands = world.hw.stats.commands
    world.unmap(ioas, 0, 16 * PAGE)
    assert world.hw.stats.commands > commands
    assert not _ok(world, 0) and not _ok(world, 5 * PAGE)


def test_wait_descriptor_status_write_and_interrupt_flag(world: Any) -> None:
    hw = world.hw
    st = hw.driver_state
    status = hw.memory.alloc_frame() << 12
    entry = st.width // 8
    hw.memory.write(
        st.iq + st.tail * entry,
        Q.make(Q.WAIT, sw=1, iflag=1, status_data=0xC0FFEE, status_addr=(status + 4) >> 2).encode(
            st.width
        ),
    )
    st.tail += 1
    hw.mmio.write(R.IQT, st.tail * entry)
    assert int.from_bytes(hw.memory.read(status + 4, 4), "little") == 0xC0FFEE
    assert hw.mmio.read(R.ICS, 4) & R.ICS_IWC
    hw.mmio.write(R.ICS, R.ICS_IWC, 4)  # RW1C
    assert not hw.mmio.read(R.ICS, 4) & R.ICS_IWC
    assert hw.mmio.read(R.IQH) == hw.mmio.read(R.IQT)


def test_invalid_descriptor_sets_iqe_and_the_head_stops_there(world: Any) -> None:
    hw = world.hw
    st = hw.driver_state
    entry = st.width // 8
    status = hw.memory.alloc_frame() << 12
    start = st.tail
    good = Q.make(Q.WAIT, sw=1, status_data=1, status_addr=status >> 2).encode(256)
    bad = (0xE).to_bytes(32, "little")
    later = Q.make(Q.WAIT, sw=1, status_data=2, status_addr=status >> 2).encode(256)
    for i, raw in enumerate((good, bad, later)):
        hw.memory.write(st.iq + (start + i) * entry, raw)
    hw.mmio.write(R.IQT, (start + 3) * entry)
    assert hw.mmio.read(R.FSTS, 4) & R.FSTS_IQE
    assert hw.mmio.read(R.IQH) == (start + 1) * entry  # pointing at the bad descriptor
    assert int.from_bytes(hw.memory.read(status, 4), "little") == 1  # `later` not run
    hw.mmio.write(R.IQT, (start + 3) * entry)  # nothing is fetched while IQE is set
    assert hw.mmio.read(R.IQH) == (start + 1) * entry
    # Software fixes the descriptor (as qi_check_fault does) and clears IQE: the queue resumes.
    hw.memory.write(st.iq + (start + 1) * entry, good)
    hw.mmio.write(R.FSTS, R.FSTS_IQE, 4)
    assert not hw.mmio.read(R.FSTS, 4) & R.FSTS_IQE
    assert hw.mmio.read(R.IQH) == (start + 3) * entry
    assert int.from_bytes(hw.memory.read(status, 4), "little") == 2
    st.tail = start + 3
    st.submit(Q.make(Q.IOTLB, g=Q.IOTLB_GLOBAL))  # the driver's own queue still works
