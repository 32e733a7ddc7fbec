"""The model's event records read field by field as Linux 7.2's ``arm_smmu_decode_event()``
reads them (``EVTQ_0_*`` / ``EVTQ_1_*`` / ``EVTQ_2_ADDR`` / ``EVTQ_3_*`` of arm-smmu-v3.h,
restated here from the header, not from the model's codec), and the IO page fault that
``arm_smmu_handle_event()`` makes of a stall record's RnW, InD and PnU."""

from __future__ import annotations

from typing import Any

import pytest
from iommufd_arm_smmuv3 import events as E

from helpers import event_file
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.uapi import iommufd as U

from .conftest import GUEST_RAM, RW, G
from .test_iopf import _faulting_vmm
from .test_uapi import GVA, VSID, guest_write_fault

PERM_RW = U.IOMMU_PGFAULT_PERM_READ | U.IOMMU_PGFAULT_PERM_WRITE


def _field(value: int, hi: int, lo: int) -> int:
    return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


def decode_72(raw: bytes) -> dict[str, int]:
    """``struct arm_smmu_event`` as ``arm_smmu_decode_event()`` fills it."""
    w = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, 32, 8)]
    ssv = _field(w[0], 11, 11)
    return {
        "id": _field(w[0], 7, 0),
        "sid": _field(w[0], 63, 32),
        "ssv": ssv,
        "ssid": _field(w[0], 31, 12) if ssv else 0,
        "privileged": _field(w[1], 33, 33),
        "instruction": _field(w[1], 34, 34),
        "s2": _field(w[1], 39, 39),
        "read": _field(w[1], 35, 35),
        "stag": _field(w[1], 15, 0),
        "stall": _field(w[1], 31, 31),
        "class": _field(w[1], 41, 40),
        "iova": w[2],
        "ipa": w[3] & (((1 << 52) - 1) & ~0xFFF),
        "fetch_addr": w[3] & (((1 << 52) - 1) & ~0x7),
        "ttrnw": _field(w[1], 44, 44),
    }


def test_guest_stage1_and_host_stage2_records(guest_vm: Any) -> None:
    """A guest stage-1 write fault forwarded to the vEVENTQ (vSID) and a stage-2 read fault
    kept by the host: RnW from the transaction, S2, CLASS IN, the IPA, no PnU / InD (the
    model's PCIe DMA carries no PASID-prefix Privileged / Execute bits, and 7.2 leaves
    STE.PRIVCFG / INSTCFG at "use incoming"), no stall."""
    vm = guest_vm()
    r = vm.r
    _qfd, out = guest_write_fault(vm, 0x10)
    ev = decode_72(out[8:])
    assert ev["id"] == E.F_TRANSLATION and ev["sid"] == VSID and ev["iova"] == GVA + 3 * 4096 + 0x10
    assert (ev["ssv"], ev["privileged"], ev["instruction"], ev["s2"], ev["read"]) == (0, 0, 0, 0, 0)
    assert (ev["stall"], ev["stag"]) == (0, 0)
    bad = G + GUEST_RAM + 0x1000  # beyond the guest RAM stage 2 maps
    vm.s1.map(0x9000_0000, bad, 4096, RW)
    with pytest.raises(DmaFault, match="stage 2"):
        r.dev.dma_read(0x9000_0000 + 8, 4)
    raw = vm.hw.events[-1].encode()  # the record as the SMMU wrote it to the EVENTQ
    host = decode_72(raw)
    assert (host["id"], host["sid"], host["s2"], host["read"]) == (
        E.F_TRANSLATION,
        r.dev.rid,
        1,
        1,
    )
    assert (host["class"], host["ipa"], host["iova"], host["ttrnw"]) == (
        E.CLASS_IN,
        bad,
        0x9000_0000 + 8,
        0,
    )
    assert E.Event.decode(raw) == vm.smmu.host_events[-1]


@pytest.mark.parametrize(("instr", "priv"), [(False, False), (True, False), (False, True)])
def test_stall_record_attributes_become_the_iopf_perm(vmm: Any, instr: bool, priv: bool) -> None:
    """arm_smmu_handle_event() of a stall record: READ or WRITE from RnW, EXEC from InD,
    PRIV from PnU, grpid = STAG, LAST_PAGE. The record is the hardware's own for a stalled
    write, with InD / PnU set as a transaction carrying them would have them."""
    r, _ioas, _hwpt, fault_fd, iova = _faulting_vmm(vmm)
    hw = r.smmu
    with pytest.raises(DmaFault, match="stalled"):
        r.dev.dma_write(iova + 0x10, b"x")
    raw = bytearray(hw.events[-1].encode())
    event_file(r.proc, fault_fd).read(U.IommuHwptPgfault.SIZE * 4)  # the write's own fault
    w1 = int.from_bytes(raw[8:16], "little") | (instr << 34) | (priv << 33)
    raw[8:16] = w1.to_bytes(8, "little")
    hw.driver_state.handle_event(bytes(raw))
    f = U.IommuHwptPgfault.unpack(event_file(r.proc, fault_fd).read(U.IommuHwptPgfault.SIZE * 4))
    want = U.IOMMU_PGFAULT_PERM_WRITE
    want |= U.IOMMU_PGFAULT_PERM_EXEC if instr else 0
    want |= U.IOMMU_PGFAULT_PERM_PRIV if priv else 0
    assert (f.perm, f.grpid, f.addr) == (want, decode_72(bytes(raw))["stag"], iova + 0x10)
    assert not f.perm & U.IOMMU_PGFAULT_PERM_READ and PERM_RW & f.perm


def test_every_field_7_2_reads_round_trips_through_the_record() -> None:
    ev = E.Event(
        E.F_WALK_EABT,
        0x1234,
        7,
        0xDEAD_B000,
        False,
        True,
        E.CLASS_TT,
        fetch_addr=0x8_0000_1238,
        stall=True,
        stag=0x55,
        priv=True,
        instr=True,
        tt_read=True,
    )
    raw = ev.encode()
    got = decode_72(raw)
    assert got == {
        "id": E.F_WALK_EABT,
        "sid": 0x1234,
        "ssv": 1,
        "ssid": 7,
        "privileged": 1,
        "instruction": 1,
        "s2": 1,
        "read": 0,
        "stag": 0x55,
        "stall": 1,
        "class": E.CLASS_TT,
        "iova": 0xDEAD_B000,
        "ipa": 0x8_0000_1000,
        "fetch_addr": 0x8_0000_1238,
        "ttrnw": 1,
    }
    assert E.Event.decode(raw) == ev
