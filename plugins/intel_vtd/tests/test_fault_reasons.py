"""Fault reasons as the VT-d spec numbers them (Linux 7.2's dma_remap_sm_fault_reasons), the
first-stage rules behind them (canonical upper half, U/S, FL1GP), and the RW1C status bits."""

from __future__ import annotations

from typing import Any

import pytest
from iommufd_intel_vtd import faults as F
from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import regs as R
from iommufd_intel_vtd.domain import VtdPaging

import iommufd_model as im
from iommufd_model import uapi as U
from iommufd_model.hw.x86_64 import X86_PS, X86_US

PAGE = 4096
IOVA = 0x40_0000
RO = U.IOMMU_IOAS_MAP_READABLE
WO = U.IOMMU_IOAS_MAP_WRITEABLE


def _reason(world: Any, fn: Any) -> int:
    with pytest.raises(im.DmaFault):
        fn()
    return int(world.hw.records[-1].reason)


def _flush(world: Any) -> None:
    for d in (
        Q.make(Q.CC, g=Q.CC_GLOBAL),
        Q.make(Q.PC, g=Q.PC_GLOBAL),
        Q.make(Q.IOTLB, g=Q.IOTLB_GLOBAL),
    ):
        world.hw.execute(d)


def _attach(world: Any, flags: int = 0, map_flags: int = RO | WO, length: int = PAGE) -> Any:
    ioas = world.ioas()
    world.map(ioas, IOVA, length, flags=map_flags)
    if flags:
        hwpt = world.hwpt(ioas, flags)
        world.fd.attach(world.dev_id, hwpt)
    else:
        world.fd.attach(world.dev_id, ioas)
    dom = world.fd.device(world.dev_id).hwpt.domain
    assert isinstance(dom, VtdPaging)
    return dom


def test_permission_reasons_are_0x85_and_0x86_on_both_stages(world: Any) -> None:
    assert (F.FR_WRITE, F.FR_READ) == (0x85, 0x86)
    fs = _attach(world, map_flags=RO)
    assert fs.first_stage
    assert _reason(world, lambda: world.dev.dma_write(IOVA, b"x")) == 0x85
    world.fd.detach(world.dev_id)
    # A dirty-tracking domain is second stage; write-only leaves have R = 0.
    ss = _attach(world, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING, map_flags=WO)
    assert not ss.first_stage
    assert _reason(world, lambda: world.dev.dma_read(IOVA, 4)) == 0x86
    world.dev.dma_write(IOVA, b"ok")


def test_second_stage_input_beyond_the_address_width_is_0x83(world: Any) -> None:
    _attach(world, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    assert F.FR_ADDR_BEYOND_AW == 0x83
    assert _reason(world, lambda: world.dev.dma_read(1 << 48, 4)) == 0x83


def test_request_with_pasid_while_paside_is_clear_is_0x45(world: Any) -> None:
    _attach(world)
    st = world.hw.driver_state
    rid = world.dev.rid
    slot = st.context_tables[(rid >> 8, 0)] + (rid & 0x7F) * 32
    q0 = world.hw.memory.read_u64(slot)
    world.hw.memory.write_u64(slot, q0 & ~(1 << 3))
    _flush(world)
    assert _reason(world, lambda: world.dev.dma_read(IOVA, 4, pasid=3)) == 0x45
    world.dev.dma_read(IOVA, 4)  # requests without PASID use RID_PASID: unaffected


def test_first_stage_canonical_upper_half_translates(world: Any) -> None:
    dom = _attach(world)
    world.proc.write(world.va, b"upper")
    mem = world.hw.memory
    root = dom.pt.root
    mem.write_u64(root + 8 * 511, mem.read_u64(root))  # PML4[511] = PML4[0]
    upper = 0xFFFF_FF80_0000_0000 | IOVA
    assert world.dev.dma_read(upper, 5) == b"upper"
    # Bits 63:48 not a copy of bit 47: not canonical (SGN.1, 0x80).
    assert _reason(world, lambda: world.dev.dma_read(1 << 50 | IOVA, 4)) == 0x80
    assert _reason(world, lambda: world.dev.dma_read(0x7FFF_FF80_0000_0000, 4)) == 0x80


def test_first_stage_user_request_needs_us_at_every_level(world: Any) -> None:
    dom = _attach(world)
    world.dev.dma_read(IOVA, 4)
    mem = world.hw.memory
    root = dom.pt.root
    pml4e = mem.read_u64(root)
    mem.write_u64(root, pml4e & ~X86_US)  # a table entry, not the leaf
    _flush(world)
    assert _reason(world, lambda: world.dev.dma_read(IOVA, 4)) == F.FR_FS_USER == 0x81
    mem.write_u64(root, pml4e)
    _flush(world)
    world.dev.dma_read(IOVA, 4)


@pytest.mark.parametrize("fl1gp", [True, False])
def test_first_stage_1g_leaf_only_with_fl1gp(make_world: Any, fl1gp: bool) -> None:
    world = make_world(fl1gp=fl1gp)
    dom = _attach(world)
    assert bool(dom.pgsize_bitmap & 1 << 30) == fl1gp
    mem = world.hw.memory
    pdpt = mem.read_u64(dom.pt.root) & ~0xFFF & ((1 << 52) - 1)
    target = 1 << 30
    mem.write_u64(pdpt + 8 * 3, target | 0x7 | X86_PS | 0x20)  # P RW US PS A: a 1 GiB leaf
    _flush(world)
    got = 3 << 30 | 0x1234
    if fl1gp:
        mem.write(target + 0x1234, b"1g")
        assert world.dev.dma_read(got, 2) == b"1g"
    else:
        assert _reason(world, lambda: world.dev.dma_read(got, 2)) == F.FR_FS_RSVD == 0x72


def test_fsts_pro_and_prs_bits_are_rw1c(world: Any) -> None:
    hw, mmio = world.hw, world.hw.mmio
    hw.fsts |= R.FSTS_PRO | R.FSTS_PFO
    mmio.write(R.FSTS, R.FSTS_PRO, 4)
    assert not mmio.read(R.FSTS, 4) & R.FSTS_PRO and mmio.read(R.FSTS, 4) & R.FSTS_PFO
    mmio.write(R.FSTS, R.FSTS_PFO, 4)
    assert not mmio.read(R.FSTS, 4) & (R.FSTS_PFO | R.FSTS_PRO)
    mmio.set("PRS", R.PRS_PPR | R.PRS_PRO)
    mmio.write(R.PRS_REG, 0, 4)  # writing 0 changes nothing
    assert mmio.read(R.PRS_REG, 4) == R.PRS_PPR | R.PRS_PRO
    mmio.write(R.PRS_REG, R.PRS_PPR, 4)
    assert mmio.read(R.PRS_REG, 4) == R.PRS_PRO
    mmio.write(R.PRS_REG, R.PRS_PRO | 0xFC, 4)  # reserved bits stay 0
    assert mmio.read(R.PRS_REG, 4) == 0


def test_first_stage_walker_compiled_equals_pure_on_random_tables() -> None:
    import random

    from iommufd_model.hw.compiled import load_pure, load_walker
    from iommufd_model.hw.memory import PhysicalMemory

    builds = [load_walker("iommufd_intel_vtd.walk"), load_pure("iommufd_intel_vtd.walk")]
    rng = random.Random(7)
    mem = PhysicalMemory(1 << 24)
    frames = [mem.alloc_frame() << 12 for _ in range(6)]
    for f in frames:
        for i in range(512):
            if rng.random() < 0.3:
                bits = rng.getrandbits(12) & ~0x7E | rng.choice([0, 1, 7])
                mem.write_u64(f + 8 * i, rng.choice(frames) | bits)
    for _ in range(2000):
        iova = rng.choice([rng.getrandbits(48), rng.getrandbits(64), 0xFFFF_8000_0000_0000])
        args = (mem._pages, mem.size, rng.choice(frames), iova, rng.choice([4, 5]))
        flags = (rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.5)
        got = {w.walk_fs(*args, *flags) for w in builds}
        assert len(got) == 1, (hex(iova), got)
