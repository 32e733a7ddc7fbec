"""HTTU in a nested translation, end to end: the SMMU's update of a guest's stage-1 descriptor
(AF by CD.HA, AP[2] cleared by CD.HD) is a write through the VMM's stage 2 (IHI 0070, HTTU
with nesting). A guest whose stage-1 tables sit in memory its VMM mapped read-only cannot have
the SMMU write them: the DMA faults at stage 2 (CLASS TT, TT_RnW = write), the host keeps the
record, and guest memory stays as it was. Writable tables take the updates as before."""

from __future__ import annotations

from typing import Any

import pytest
from iommufd_arm_smmuv3 import events as E
from iommufd_arm_smmuv3 import walk as W
from iommufd_arm_smmuv3.cd import CD_SIZE, Cd

from helpers import event_file
from iommufd_model.hw.bits import pack, words
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.uapi import iommufd as U

from .conftest import CD_IPA, GVA, GuestVm
from .test_events_72 import decode_72


def _httu_guest(guest_vm: Any, tables_read_only: bool, hd: bool = False) -> tuple[GuestVm, int]:
    """A translating guest whose CD enables HA (and HD); returns it and the IPA of the stage-1
    leaf of GVA + 1 page, whose AF the guest clears."""
    vm: GuestVm = guest_vm(tables_read_only=tables_read_only)
    cd = Cd.decode(words(vm.guest.read(CD_IPA, CD_SIZE)))
    cd.ha, cd.hd = True, hd
    vm.guest.write(CD_IPA, pack(cd.encode()))
    vm.attach_translating()
    leaf_ipa = vm.s1._leaves(GVA + 4096, GVA + 4096)[0][0]
    vm.guest.write_u64(leaf_ipa, vm.guest.read_u64(leaf_ipa) & ~W.DESC_AF)
    return vm, leaf_ipa


def _assert_tt_write_fault(vm: GuestVm, iova: int, read: bool, leaf_ipa: int) -> None:
    raw = vm.hw.events[-1].encode()  # the record as the SMMU wrote it to the EVENTQ
    ev = decode_72(raw)
    assert (ev["id"], ev["sid"], ev["s2"], ev["read"]) == (E.F_PERMISSION, vm.r.dev.rid, 1, read)
    assert (ev["class"], ev["ttrnw"], ev["ipa"], ev["iova"]) == (
        E.CLASS_TT,
        0,  # the refused access to the table was a write
        leaf_ipa & ~0xFFF,
        iova,
    )
    assert vm.smmu.host_events[-1] == E.Event.decode(raw)  # the host driver read it


def test_access_flag_update_into_read_only_tables_faults(guest_vm: Any) -> None:
    vm, leaf_ipa = _httu_guest(guest_vm, tables_read_only=True)
    r = vm.r
    qfd = r.veventq_alloc(vm.viommu, U.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3)
    leaf = vm.guest.read_u64(leaf_ipa)
    data = vm.fill(0x1_0000, 21)
    assert r.dev.dma_read(GVA + 8, 8) == data[8:16]  # AF set: reading the tables is fine
    with pytest.raises(DmaFault, match="stage 2"):
        r.dev.dma_read(GVA + 4096 + 0x10, 4)
    _assert_tt_write_fault(vm, GVA + 4096 + 0x10, True, leaf_ipa)
    assert vm.guest.read_u64(leaf_ipa) == leaf  # no AF written
    with pytest.raises(DmaFault, match="stage 2"):
        r.dev.dma_write(GVA + 4096 + 0x10, b"abcd")
    _assert_tt_write_fault(vm, GVA + 4096 + 0x10, False, leaf_ipa)
    assert vm.guest.read_u64(leaf_ipa) == leaf
    assert vm.guest.read(0x1_1000, 4096) == data[4096:8192]  # the DMA wrote nothing
    assert event_file(r.proc, qfd).read(4096) == b""  # a stage-2 fault: the host's, not the guest's


def test_dirty_state_update_into_read_only_tables_faults(guest_vm: Any) -> None:
    vm, _leaf = _httu_guest(guest_vm, tables_read_only=True, hd=True)
    r = vm.r
    other = vm.s1._leaves(GVA + 2 * 4096, GVA + 2 * 4096)[0][0]
    clean = vm.guest.read_u64(other) | W.S1_DBM | W.S1_AP_RDONLY  # writable-clean
    vm.guest.write_u64(other, clean)
    data = vm.fill(0x1_0000, 22)
    assert r.dev.dma_read(GVA + 2 * 4096, 4) == data[8192:8196]  # a read needs no update
    with pytest.raises(DmaFault, match="stage 2"):
        r.dev.dma_write(GVA + 2 * 4096, b"abcd")
    _assert_tt_write_fault(vm, GVA + 2 * 4096, False, other)
    assert vm.guest.read_u64(other) == clean
    assert vm.guest.read(0x1_2000, 4) == data[8192:8196]


def test_writable_tables_take_the_updates(guest_vm: Any) -> None:
    vm, leaf_ipa = _httu_guest(guest_vm, tables_read_only=False, hd=True)
    r = vm.r
    events = len(vm.hw.events)
    leaf = vm.guest.read_u64(leaf_ipa)
    data = vm.fill(0x1_0000, 23)
    assert r.dev.dma_read(GVA + 4096 + 0x10, 4) == data[4096 + 0x10 : 4096 + 0x14]
    assert vm.guest.read_u64(leaf_ipa) == leaf | W.DESC_AF
    other = vm.s1._leaves(GVA + 2 * 4096, GVA + 2 * 4096)[0][0]
    clean = vm.guest.read_u64(other) | W.S1_DBM | W.S1_AP_RDONLY
    vm.guest.write_u64(other, clean)
    r.dev.dma_write(GVA + 2 * 4096, b"abcd")
    assert vm.guest.read_u64(other) == clean & ~W.S1_AP_RDONLY  # dirty
    assert vm.guest.read(0x1_2000, 4) == b"abcd"
    assert len(vm.hw.events) == events
