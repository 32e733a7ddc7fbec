"""Registers: capability fields and the side effects of GCMD (SRTP, TE, QIE), CCMD, FSTS, FRCD."""

from __future__ import annotations

from typing import Any

import pytest
from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import regs as R
from iommufd_intel_vtd.faults import FR_PASID_DIR_NOT_PRESENT, FR_SM_CTX_NOT_PRESENT

import iommufd_model as im


def test_capabilities_describe_the_modelled_features(world: Any) -> None:
    mmio = world.hw.mmio
    cap, ecap = mmio.read(R.CAP), mmio.read(R.ECAP)
    assert mmio.read(R.VER, 4) == R.VERSION
    assert R.field(cap, R.CAP_SAGAW_SHIFT, 5) == 0b0100  # 4-level second stage
    assert R.field(cap, R.CAP_MGAW_SHIFT, 6) + 1 == 48
    assert R.field(cap, R.CAP_FRO_SHIFT, 10) * 16 == R.FRCD_OFFSET
    assert R.field(cap, R.CAP_NFR_SHIFT, 8) + 1 == 8
    assert R.field(cap, R.CAP_SLLPS_SHIFT, 4) == 0b11
    assert cap & R.CAP_FL1GP and cap & R.CAP_FL5LP and cap & R.CAP_PSI
    for bit in (
        R.ECAP_SMTS,
        R.ECAP_PASID,
        R.ECAP_NEST,
        R.ECAP_FLTS,
        R.ECAP_SLTS,
        R.ECAP_SLADS,
        R.ECAP_QI,
        R.ECAP_DT,
    ):
        assert ecap & bit
    assert R.field(ecap, R.ECAP_PSS_SHIFT, 5) == 19
    mmio.write(R.CAP, 0)
    assert mmio.read(R.CAP) == cap  # read-only


def test_options_shape_cap_and_ecap(make_world: Any) -> None:
    w = make_world(levels=5, nest=False, dirty=False, pasid_bits=0, fl1gp=False, sllps=1)
    cap, ecap = w.hw.cap, w.hw.ecap
    assert R.field(cap, R.CAP_SAGAW_SHIFT, 5) == 0b1100
    assert R.field(cap, R.CAP_MGAW_SHIFT, 6) + 1 == 57
    assert not cap & R.CAP_FL1GP and R.field(cap, R.CAP_SLLPS_SHIFT, 4) == 1
    assert not ecap & (R.ECAP_NEST | R.ECAP_SLADS | R.ECAP_PASID)
    with pytest.raises(OSError):
        make_world(bogus=1)


def test_driver_leaves_translation_qi_and_root_pointer_enabled(world: Any) -> None:
    gsts = world.hw.mmio.read(R.GSTS, 4)
    assert gsts & R.GSTS_TES and gsts & R.GSTS_QIES and gsts & R.GSTS_RTPS
    assert world.hw.ttm == R.TTM_SCALABLE


def test_srtp_latches_rtaddr_only_when_commanded(world: Any) -> None:
    hw, mmio = world.hw, world.hw.mmio
    old_root = hw.root_table
    new = hw.memory.alloc_frame() << 12
    mmio.write(R.RTADDR, new | R.TTM_SCALABLE << R.RTADDR_TTM_SHIFT)
    assert hw.root_table == old_root  # RTADDR alone changes nothing
    gcmd = R.GCMD_TE | R.GCMD_QIE
    mmio.write(R.GCMD, gcmd | R.GCMD_SRTP, 4)
    assert hw.root_table == new and mmio.read(R.GSTS, 4) & R.GSTS_RTPS
    assert mmio.read(R.GCMD, 4) & R.GCMD_SRTP == 0  # one-shot
    # The context cache is not flushed by SRTP: a cached device keeps translating ...
    va, iova = world.va, 0x40_0000
    ioas = world.ioas()
    world.map(ioas, iova, 4096, va)
    mmio.write(R.RTADDR, old_root | R.TTM_SCALABLE << R.RTADDR_TTM_SHIFT)
    mmio.write(R.GCMD, gcmd | R.GCMD_SRTP, 4)
    world.fd.attach(world.dev_id, ioas)
    world.dev.dma_read(iova, 4)
    mmio.write(R.RTADDR, new | R.TTM_SCALABLE << R.RTADDR_TTM_SHIFT)
    mmio.write(R.GCMD, gcmd | R.GCMD_SRTP, 4)
    world.dev.dma_read(iova, 4)  # cached context and PASID entries
    # ... until the global context-cache invalidation the spec requires after SRTP.
    hw.execute(Q.make(Q.CC, g=Q.CC_GLOBAL))
    with pytest.raises(im.DmaFault):
        world.dev.dma_read(iova, 4)
    assert hw.pending_faults()[-1].reason == 0x39  # the empty root table: root not present


def test_te_off_passes_dma_untranslated_and_on_translates(world: Any) -> None:
    hw, mmio = world.hw, world.hw.mmio
    pa = hw.memory.alloc_frame() << 12
    hw.memory.write(pa, b"phys")
    with pytest.raises(im.DmaFault):
        world.dev.dma_read(pa, 4)  # TE on, nothing attached: blocked
    # Linux allocates PASID tables on first use: the directory entry is still empty.
    assert hw.pending_faults()[-1].reason == FR_PASID_DIR_NOT_PRESENT
    mmio.write(R.GCMD, R.GCMD_QIE, 4)
    assert not mmio.read(R.GSTS, 4) & R.GSTS_TES
    assert world.dev.dma_read(pa, 4) == b"phys"
    mmio.write(R.GCMD, R.GCMD_QIE | R.GCMD_TE, 4)
    with pytest.raises(im.DmaFault):
        world.dev.dma_read(pa, 4)


def test_qie_gates_the_queue_and_resets_the_head(world: Any) -> None:
    hw, mmio = world.hw, world.hw.mmio
    mmio.write(R.GCMD, R.GCMD_TE, 4)
    assert not mmio.read(R.GSTS, 4) & R.GSTS_QIES
    status = hw.memory.alloc_frame() << 12
    q = hw.memory.alloc_frame() << 12
    mmio.write(R.IQA, q)  # 128-bit descriptors
    hw.memory.write(q, Q.make(Q.WAIT, sw=1, status_data=7, status_addr=status >> 2).encode())
    mmio.write(R.IQT, 16)
    assert hw.memory.read(status, 4) == bytes(4)  # queue disabled: nothing fetched
    mmio.write(R.GCMD, R.GCMD_TE | R.GCMD_QIE, 4)
    assert mmio.read(R.GSTS, 4) & R.GSTS_QIES and mmio.read(R.IQH) == 0
    mmio.write(R.IQT, 16)
    assert int.from_bytes(hw.memory.read(status, 4), "little") == 7
    assert mmio.read(R.IQH) == 16


def test_ccmd_register_invalidation_drops_the_context_cache(world: Any) -> None:
    hw, mmio = world.hw, world.hw.mmio
    ioas = world.ioas()
    world.map(ioas, 0, 4096)
    world.fd.attach(world.dev_id, ioas)
    world.dev.dma_read(0, 4)
    assert world.dev.rid in hw.context_cache
    mmio.write(R.CCMD, R.CCMD_ICC | Q.CC_DEVICE << R.CCMD_CIRG_SHIFT | world.dev.rid << 16)
    assert world.dev.rid not in hw.context_cache
    value = mmio.read(R.CCMD)
    assert not value & R.CCMD_ICC and R.field(value, R.CCMD_CAIG_SHIFT, 2) == Q.CC_DEVICE


def test_fault_records_rw1c_and_overflow(make_world: Any) -> None:
    w = make_world(nfr=2)
    hw, mmio = w.hw, w.hw.mmio
    for _ in range(3):
        with pytest.raises(im.DmaFault):
            w.dev.dma_write(0x1000, b"x")
    fsts = mmio.read(R.FSTS, 4)
    assert fsts & R.FSTS_PFO and fsts & R.FSTS_PPF  # third fault found no free record
    assert len(hw.pending_faults()) == 2 and len(hw.records) == 3
    rec = hw.pending_faults()[0]
    assert (rec.sid, rec.addr, rec.write, rec.pasid) == (w.dev.rid, 0x1000, True, None)
    base = R.FRCD_OFFSET
    mmio.write(base + 8, R.FRCD_HI_F)  # software clears record 0 (RW1C)
    mmio.write(base + 24, R.FRCD_HI_F)
    mmio.write(R.FSTS, R.FSTS_PFO, 4)
    assert not mmio.read(R.FSTS, 4) & (R.FSTS_PFO | R.FSTS_PPF)
    # Context not present for a RID the driver never set up.
    other = w.machine.add_pci_device(iommu=0, rid=0x300)
    w.hw.driver_state.devs.pop(0x300)
    slot = w.hw.driver_state.context_tables[(3, 0)]
    w.hw.memory.write_u64(slot, 0)
    with pytest.raises(im.DmaFault):
        other.dma_read(0, 4, pasid=5)
    rec = hw.pending_faults()[-1]
    assert rec.reason == FR_SM_CTX_NOT_PRESENT and rec.pasid == 5 and not rec.write
