"""The command buffer: codec, COMPLETION_WAIT, illegal commands, hardware errors."""

from __future__ import annotations

import contextlib
import errno
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iommufd_amd import commands as C
from iommufd_amd import events as E
from iommufd_amd import regs as R

import iommufd_model as im
from iommufd_model import uapi as U
from iommufd_model.testing import assert_errno


def test_builders_decode_to_what_they_say() -> None:
    cw = C.decode(C.completion_wait(0x000F_FFFF_FFFF_FFF8, 0xDEAD_BEEF_0123_4567, interrupt=True))
    assert cw is not None and cw.opcode == C.COMPLETION_WAIT
    assert (cw.address, cw.data, cw.s, cw.i) == (
        0x000F_FFFF_FFFF_FFF8,
        0xDEAD_BEEF_0123_4567,
        True,
        True,
    )
    inv = C.decode(C.inv_iommu_pages(0x1234, 0x5000, 4096, pasid=0x9_8765, gn=True))
    assert inv is not None
    assert (inv.opcode, inv.domid, inv.pasid, inv.address, inv.s, inv.pde, inv.gn) == (
        C.INVALIDATE_IOMMU_PAGES,
        0x1234,
        0x9_8765,
        0x5000,
        False,
        True,
        True,
    )
    tlb = C.decode(C.inv_iotlb_pages(0x100, 0x7000, 4096, qdep=4, pasid=0xA_BCDE, gn=True))
    assert tlb is not None and (tlb.devid, tlb.pasid, tlb.count, tlb.gn) == (
        0x100,
        0xA_BCDE,
        4,
        True,
    )
    ppr = C.decode(C.complete_ppr(0x18, 0x33, 0xF, 0x1AB, gn=True))
    assert ppr is not None and (ppr.devid, ppr.pasid, ppr.status, ppr.tag) == (
        0x18,
        0x33,
        0xF,
        0x1AB,
    )
    pf = C.decode(C.prefetch_iommu_pages(0x18, 0x1234_5000, count=3, inval=True))
    assert pf is not None and (pf.address, pf.count, pf.inval) == (0x1234_5000, 3, True)
    for raw, op in (
        (C.inv_devtab_entry(7), C.INVALIDATE_DEVTAB_ENTRY),
        (C.inv_interrupt_table(7), C.INVALIDATE_INTERRUPT_TABLE),
        (C.inv_all(), C.INVALIDATE_IOMMU_ALL),
    ):
        cmd = C.decode(raw)
        assert cmd is not None and cmd.opcode == op
    # the opcode lives in word 1 [31:28]
    assert struct.unpack("<4I", C.inv_all())[1] == 0x8000_0000


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack("<4I", 0, 0xB000_0000, 0, 0),  # unknown opcode 0xB
        struct.pack("<4I", 0, 0, 0, 0),  # opcode 0
        struct.pack("<4I", 0, 0xF000_0000, 0, 0),
        struct.pack("<4I", 1 << 16, 0x2000_0000, 0, 0),  # INVALIDATE_DEVTAB_ENTRY reserved bits
        struct.pack("<4I", 0, 0x3000_0000, 1 << 5, 0),  # INVALIDATE_IOMMU_PAGES reserved bit 5
        struct.pack("<4I", 0, 0x1010_0000, 0, 0),  # COMPLETION_WAIT reserved word 1 bit 20
        struct.pack("<4I", 0, 0x8000_0000, 0, 1),  # INVALIDATE_IOMMU_ALL with data
    ],
)
def test_illegal_encodings(raw: bytes) -> None:
    assert C.decode(raw) is None


@settings(max_examples=300, deadline=None)
@given(st.integers(0, (1 << 52) - 1), st.integers(1, 1 << 45))
def test_range_encoding_covers_the_range_minimally(start: int, size: int) -> None:
    addr = C.inv_address(start, size)
    first, last = C.decode_range(addr & ~0xFFF, bool(addr & C.INV_S))
    assert first <= start and start + size - 1 <= last
    span = last - first + 1
    if span < 1 << 52:
        # the smallest naturally aligned power of two holding both ends
        assert span & (span - 1) == 0 and first % span == 0
        if span > 8192:
            half = span // 2
            assert start // half != (start + size - 1) // half


def test_range_encodings_by_hand() -> None:
    assert C.decode_range(0x5000, False) == (0x5000, 0x5FFF)
    assert C.decode_range(0x4000 | 0x1000, True) == (0x4000, 0x7FFF)  # bit 13 clear: 16 KiB
    assert C.decode_range(0x7FFF_FFFF_FFFF_F000, True) == (0, (1 << 64) - 1)
    assert C.inv_address(0, 1 << 64) == C.ALL_PAGES_ADDRESS | C.INV_S


def test_completion_wait_stores_and_interrupts(world: Any) -> None:
    w = world
    sem = w.mem.alloc_frame() << 12
    w.hw.mmio.write(R.STATUS, R.ST_COMWAIT_INT)
    w.kernel.queue(C.completion_wait(sem + 8, 0x1122_3344_5566_7788, interrupt=True))
    assert w.mem.read_u64(sem + 8) == 0x1122_3344_5566_7788
    assert w.hw.mmio.read(R.STATUS) & R.ST_COMWAIT_INT
    w.kernel.queue(C.completion_wait(sem, 5, store=False))
    assert w.mem.read_u64(sem) == 0
    # The driver's own wait: a fresh value each time.
    before = w.kernel.cmd_sem_val
    w.kernel.completion_wait()
    assert w.mem.read_u64(w.kernel.cmd_sem) == before + 1


def test_illegal_command_stops_the_processor_until_the_driver_resets_it(world: Any) -> None:
    w = world
    hw, k = w.hw, w.kernel
    head_before = hw.mmio.read(R.CMD_HEAD)
    w.events()
    k.queue(struct.pack("<4I", 0, 0xB000_0000, 0, 0))  # opcode 0xB
    bad_addr = k.cmd_buf + head_before
    assert not hw.cmd_running
    assert hw.mmio.read(R.CMD_HEAD) == head_before  # the head stays on the bad command
    (ev,) = w.events()
    assert ev.code == E.ILLEGAL_COMMAND_ERROR and ev.address == bad_addr
    # Nothing after it runs: the completion wait times out like the kernel's loop.
    with pytest.raises(OSError) as exc:
        k.completion_wait()
    assert "timed out" in str(exc.value)
    # amd_iommu_reset_cmd_buffer(): disable, zero the pointers, enable.
    k.reset_cmd_buffer()
    assert hw.cmd_running
    k.completion_wait()


def test_completion_store_outside_memory_is_a_command_hardware_error(world: Any) -> None:
    w = world
    w.events()
    w.kernel.queue(C.completion_wait(w.mem.size + 0x1000, 1))
    assert not w.hw.cmd_running
    (ev,) = w.events()
    assert ev.code == E.COMMAND_HARDWARE_ERROR


def test_device_iotlb_invalidation_needs_an_ats_device(make_world: Any) -> None:
    w = make_world(ats=True)
    w.events()
    w.kernel.queue(C.inv_iotlb_pages(w.dev.rid, 0, 4096))
    assert w.hw.device_iotlb_invalidations == 1 and w.events() == []
    w.kernel.queue(C.inv_iotlb_pages(0x7777, 0, 4096))  # nobody answers
    (ev,) = w.events()
    assert ev.code == E.IOTLB_INV_TIMEOUT and ev.devid == 0x7777


def test_irt_ppr_and_invalidate_all(world: Any) -> None:
    w = world
    w.kernel.queue(C.inv_interrupt_table(w.dev.rid))
    assert w.hw.irt_invalidations == 1
    w.kernel.queue(C.complete_ppr(w.dev.rid, 3, 0, 0x42, gn=True))
    assert w.hw.ppr_responses[-1].tag == 0x42
    with contextlib.suppress(im.DmaFault):
        w.dev.dma_read(0, 4)  # blocked, but the DTE is now cached
    assert w.dev.rid in w.hw.dte_cache
    w.kernel.queue(C.inv_all())
    assert w.hw.dte_cache == {} and len(w.hw.iotlb) == 0
    assert w.hw.cmd_running


def test_prefetch_fills_the_iotlb_and_never_faults(world: Any) -> None:
    from iommufd_model import uapi as U

    w = world
    ioas = w.ioas()
    w.map(ioas, w.buffer(4096, fill=0x3C), 4096, 1 << 30)
    w.fd.attach(w.dev_id, ioas)
    w.events()
    w.kernel.queue(C.prefetch_iommu_pages(w.dev.rid, 1 << 30))
    w.kernel.queue(C.prefetch_iommu_pages(w.dev.rid, 1 << 31))  # unmapped: no event
    assert w.events() == [] and len(w.hw.iotlb) == 1
    misses = w.hw.stats.iotlb_misses
    assert w.dev.dma_read(1 << 30, 1) == b"\x3c"
    assert w.hw.stats.iotlb_misses == misses  # served by the prefetched entry
    # IOMMU_HW_INFO for a foreign type is refused
    foreign = U.IOMMU_HW_INFO_TYPE_INTEL_VTD
    assert_errno(errno.EOPNOTSUPP, lambda: w.fd.hw_info(w.dev_id, data_type=foreign))


def test_page_response_sends_complete_ppr_request(make_world: Any) -> None:
    """The hardware takes COMPLETE_PPR_REQUEST: GN and the PASID as the device's PRI (enabled
    by the v2 attach; "PRG Response PASID Required" set) asks."""
    from iommufd_amd.driver import plugin

    w = make_world(ats=True)
    w.fd.attach(w.dev_id, w.hwpt(w.ioas(), U.IOMMU_HWPT_ALLOC_PASID))
    plugin.page_response(iommu=w.hw, dev=w.dev, pasid=9, grpid=0x11, code=1)
    cmd = w.hw.ppr_responses[-1]
    assert (cmd.devid, cmd.pasid, cmd.gn, cmd.tag, cmd.status) == (w.dev.rid, 9, True, 0x11, 1)
