"""Root / context / PASID entry codecs, and bad entries giving the spec's fault reasons."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from iommufd_intel_vtd import faults as F
from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import tables as T

import iommufd_model as im

addr = st.integers(0, (1 << 52) - 1).map(lambda a: a << 12 & ((1 << 64) - 1))


@given(lp=st.booleans(), up=st.booleans(), lo=addr, hi=addr)
def test_root_entry_roundtrip(lp: bool, up: bool, lo: int, hi: int) -> None:
    re = T.RootEntry(lp, lo, up, hi)
    assert T.RootEntry.decode(*re.encode()) == re
    assert re.half(5) == (lp, lo) and re.half(200) == (up, hi)


@given(
    p=st.booleans(),
    fpd=st.booleans(),
    dte=st.booleans(),
    pre=st.booleans(),
    pdts=st.integers(0, 7),
    d=addr,
    rp=st.integers(0, (1 << 20) - 1),
)
def test_context_entry_roundtrip(
    p: bool, fpd: bool, dte: bool, pre: bool, pdts: int, d: int, rp: int
) -> None:
    ce = T.ContextEntry(p=p, fpd=fpd, dte=dte, pre=pre, pdts=pdts, pasid_dir=d, rid_pasid=rp)
    assert T.ContextEntry.decode(*ce.encode()) == ce
    assert ce.dir_entries == 1 << (pdts + 7)


@given(
    pe=st.builds(
        T.PasidEntry,
        p=st.just(True),
        aw=st.integers(1, 3),
        pgtt=st.integers(1, 4),
        ssade=st.booleans(),
        slptptr=addr,
        did=st.integers(0, 0xFFFF),
        sre=st.booleans(),
        wpe=st.booleans(),
        eafe=st.booleans(),
        fspm=st.integers(0, 1),
        fsptptr=addr,
    )
)
def test_pasid_entry_roundtrip(pe: T.PasidEntry) -> None:
    pgtt, did, sre, fspm, fs = pe.pgtt, pe.did, pe.sre, pe.fspm, pe.fsptptr
    qs = pe.encode()
    assert len(qs) == 8 and T.PasidEntry.decode(qs) == pe
    # Field placement per the spec: PGTT 8:6, DID 79:64, SRE 128, FSPM 131:130, FSPTPTR 191:140.
    assert (qs[0] >> 6) & 7 == pgtt and qs[1] & 0xFFFF == did and qs[2] & 1 == sre
    assert (qs[2] >> 2) & 3 == fspm and qs[2] & ~0xFFF == fs


def test_pasid_entry_checks() -> None:
    ok = T.PasidEntry(p=True, pgtt=T.PGTT_SECOND, aw=T.AW_48)
    assert ok.check(sagaw=0b0100, fl5lp=False) == 0
    bad = [
        attrs.evolve(ok, pgtt=0),
        attrs.evolve(ok, pgtt=5),
        attrs.evolve(ok, aw=T.AW_57),  # SAGAW lacks 5-level
        attrs.evolve(ok, pgtt=T.PGTT_FIRST, fspm=1),  # no FL5LP
    ]
    for pe in bad:
        assert pe.check(sagaw=0b0100, fl5lp=False) == F.FR_PASID_ENTRY_INVALID == 0x5B
    # A reserved bit is SPT.3 (0x5A), and it wins over an invalid PGTT.
    assert attrs.evolve(ok, rsvd=1).check(sagaw=0b0100, fl5lp=False) == F.FR_PASID_ENTRY_RSVD
    assert attrs.evolve(ok, rsvd=1, pgtt=5).check(sagaw=0b0100, fl5lp=False) == 0x5A


def _attached(world: Any) -> tuple[Any, Any, int]:
    ioas = world.ioas()
    world.map(ioas, 0, 1 << 16)
    world.fd.attach(world.dev_id, ioas)
    world.dev.dma_read(0, 8)
    st_ = world.hw.driver_state
    return st_, st_.devs[world.dev.rid], ioas


def _fault_reason(world: Any, pasid: int | None = None) -> int:
    with pytest.raises(im.DmaFault):
        world.dev.dma_read(0, 8, pasid=pasid)
    return int(world.hw.records[-1].reason)  # the FRCD ring may be full: every record


def _flush_all(world: Any) -> None:
    world.hw.execute(Q.make(Q.CC, g=Q.CC_GLOBAL))
    world.hw.execute(Q.make(Q.PC, g=Q.PC_GLOBAL))
    world.hw.execute(Q.make(Q.IOTLB, g=Q.IOTLB_GLOBAL))


def test_bad_pasid_entries_fault_with_the_spec_reason(world: Any) -> None:
    st_, info, _ = _attached(world)
    slot = st_.pasid_slot(info, 0)
    mem = world.hw.memory
    good = mem.read(slot, 64)
    q0 = int.from_bytes(good[:8], "little")
    for q0_bad, reason in (
        (q0 & ~1, F.FR_PASID_NOT_PRESENT),  # P = 0
        (q0 & ~(7 << 6) | 6 << 6, F.FR_PASID_ENTRY_INVALID),  # PGTT 6 reserved
        (q0 & ~(7 << 6) | T.PGTT_SECOND << 6 | 3 << 2, F.FR_PASID_ENTRY_INVALID),  # AW 57
        (q0 | 1 << 10, F.FR_PASID_ENTRY_RSVD),  # bits 11:10 are reserved
    ):
        mem.write_u64(slot, q0_bad)
        _flush_all(world)
        assert _fault_reason(world) == reason
    mem.write(slot, good)
    mem.write_u64(slot + 24, 1)  # reserved qword 3
    _flush_all(world)
    assert _fault_reason(world) == F.FR_PASID_ENTRY_RSVD == 0x5A
    mem.write(slot, good)
    _flush_all(world)
    world.dev.dma_read(0, 8)
    # FPD in the PASID entry: the DMA still faults but nothing is recorded.
    mem.write_u64(slot, q0 & ~1 | 2)
    _flush_all(world)
    before = len(world.hw.records)
    with pytest.raises(im.DmaFault):
        world.dev.dma_read(0, 8)
    assert len(world.hw.records) == before


def test_bad_root_context_and_directory_entries(world: Any) -> None:
    st_, info, _ = _attached(world)
    mem = world.hw.memory
    rid = world.dev.rid
    root_slot = st_.root + (rid >> 8) * 16
    ctx_slot = st_.context_tables[(rid >> 8, 0)] + (rid & 0x7F) * 32
    root_lo, ctx_q0 = mem.read_u64(root_slot), mem.read_u64(ctx_slot)
    cases = [
        (root_slot, root_lo & ~1, F.FR_SM_ROOT_NOT_PRESENT),
        (root_slot, root_lo | 0x10, F.FR_SM_ROOT_RSVD),
        (ctx_slot, ctx_q0 & ~1, F.FR_SM_CTX_NOT_PRESENT),
        (ctx_slot, ctx_q0 | 0x20, F.FR_SM_CTX_RSVD),
        (info.pasid_dir, 0, F.FR_PASID_DIR_NOT_PRESENT),
        (info.pasid_dir, mem.read_u64(info.pasid_dir) | 1 << 5, F.FR_PASID_DIR_RSVD),
    ]
    for slot, value, reason in cases:
        good = mem.read_u64(slot)
        mem.write_u64(slot, value)
        _flush_all(world)
        assert _fault_reason(world) == reason
        mem.write_u64(slot, good)
    _flush_all(world)
    world.dev.dma_read(0, 8)
    # A PASID beyond the directory's PDTS size (SCT.7), one whose table was never allocated.
    assert _fault_reason(world, pasid=(info.dir_entries << 6) + 1) == 0x46
    assert F.FR_SM_CTX_PASID_TOO_LARGE == 0x46 and F.FR_PASID_DIR_RSVD == 0x52
    assert _fault_reason(world, pasid=5000) == F.FR_PASID_DIR_NOT_PRESENT
    assert _fault_reason(world, pasid=7) == F.FR_PASID_NOT_PRESENT
    rec = world.hw.records[-1]
    assert rec.pasid == 7 and rec.sid == rid


def test_root_table_outside_memory_and_legacy_mode(world: Any) -> None:
    from iommufd_intel_vtd import regs as R

    mmio = world.hw.mmio
    gcmd = R.GCMD_TE | R.GCMD_QIE
    mmio.write(R.RTADDR, world.hw.memory.size | R.TTM_SCALABLE << R.RTADDR_TTM_SHIFT)
    mmio.write(R.GCMD, gcmd | R.GCMD_SRTP, 4)
    _flush_all(world)
    assert _fault_reason(world) == F.FR_SM_ROOT_ACCESS
    mmio.write(R.RTADDR, world.hw.driver_state.root)  # TTM = legacy: not modelled
    mmio.write(R.GCMD, gcmd | R.GCMD_SRTP, 4)
    assert _fault_reason(world) == F.FR_SM_RTADDR_TTM
