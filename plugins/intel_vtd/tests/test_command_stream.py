"""The invalidation-queue stream the driver issues, descriptor by descriptor, against what the
Linux 7.2 code issues for the same call (iommu.c, pasid.c, cache.c, nested.c, dmar.c).

Every qi_submit_sync() ends in its own wait descriptor (SW = 1, status data QI_DONE, no
fence), so the wait descriptors show where 7.2 submits: one per flush in
intel_pasid_tear_down_entry(), one per batch in cache_tag_flush_range().
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import tables as T
from iommufd_intel_vtd.domain import VtdNested, VtdPaging
from iommufd_intel_vtd.guest import GuestRam, guest_first_stage

from iommufd_model import uapi as U
from iommufd_model.testing import assert_errno

PAGE = 4096
IOVA = 0x40_0000
M2 = 1 << 21
FULL = 0x7_FFFF_FFFF_FFFF  # device-TLB ADDR[63:12] with S = 1: the whole address space


@pytest.fixture
def ats_world(make_world: Any) -> Any:
    w = make_world()
    # A second device with ATS (qdep 8, the model's own knob on the device info).
    dev = w.machine.add_pci_device(iommu=0, ats=True)
    w.st = w.hw.driver_state
    w.st.devs[dev.rid].qdep = 8
    w.adev, w.adev_id = dev, w.fd.bind(dev)
    return w


def _dom(world: Any, dev_id: int) -> Any:
    return world.fd.device(dev_id).hwpt.domain


def _teardown(qi: Any, rid: int, did: int, pasid: int, first_stage: bool) -> list[Any]:
    """intel_pasid_tear_down_entry()'s three flushes, each its own submission: the PASID
    cache, the IOTLB (PASID-based for a first-stage entry, domain-selective for a second-stage
    one), the whole device TLB (the PASID-based form for a PASID other than 0)."""
    if first_stage:
        iotlb = qi.d(Q.PIOTLB, g=Q.PIOTLB_PASID, did=did, pasid=pasid)
    else:
        iotlb = qi.iotlb(did, Q.IOTLB_DOMAIN)
    if pasid:
        devtlb = qi.d(Q.PDEV_TLB, sid=rid, pasid=pasid, qdep=8, addr=FULL, size=1)
    else:
        devtlb = qi.d(Q.DEV_TLB, sid=rid, qdep=8, addr=FULL, size=1)
    pc = qi.d(Q.PC, g=Q.PC_PASID, did=did, pasid=pasid)
    return [pc, qi.WAIT, iotlb, qi.WAIT, devtlb, qi.WAIT]


def test_boot_issues_the_global_flushes_each_with_its_wait(qi: Any, world: Any) -> None:
    got = [qi.fmt(x) for x in world.hw.driver_state.issued]
    assert got == [
        qi.d(Q.CC, g=Q.CC_GLOBAL),
        qi.WAIT,
        qi.d(Q.PC, g=Q.PC_GLOBAL),
        qi.WAIT,
        qi.iotlb(0, Q.IOTLB_GLOBAL),
        qi.WAIT,
    ]


def test_attach_and_map_issue_nothing_unmap_flushes_per_cache_tag(qi: Any, ats_world: Any) -> None:
    w = ats_world
    s = qi.Stream(w)
    ioas = w.ioas()
    w.map(ioas, IOVA + PAGE, PAGE)
    w.fd.attach(w.adev_id, ioas)
    w.map(ioas, IOVA + 2 * PAGE, 3 * PAGE, va=w.va + PAGE)
    # Non-present to present with CM = 0 and no RWBF: pasid_flush_caches() issues nothing.
    assert s.take() == []
    dom = _dom(w, w.adev_id)
    assert isinstance(dom, VtdPaging) and dom.first_stage and dom.did == 2
    rid = w.adev.rid
    # One page of a 2 MiB run: no table is freed, IH = 1; PASID-based IOTLB (first stage),
    # then the RID's device TLB (DEVTLB tag, PASID 0: the no-PASID form), one batch.
    w.unmap(ioas, IOVA + PAGE, PAGE)
    assert s.take() == [
        qi.d(Q.PIOTLB, g=Q.PIOTLB_PAGE, did=2, pasid=0, addr=(IOVA + PAGE) >> 12, am=0, ih=1),
        qi.d(Q.DEV_TLB, sid=rid, qdep=8, addr=(IOVA + PAGE) >> 12),
        qi.WAIT,
    ]
    # Three pages from IOVA+2P: fls(start ^ last) = 15 gives an 8-page block at IOVA; the
    # device-TLB form sets ADDR bits 12-13 (the lowest 0 bit, 14, says 8 pages).
    w.unmap(ioas, IOVA + 2 * PAGE, 3 * PAGE)
    assert s.take() == [
        qi.d(Q.PIOTLB, g=Q.PIOTLB_PAGE, did=2, pasid=0, addr=IOVA >> 12, am=3, ih=1),
        qi.d(Q.DEV_TLB, sid=rid, qdep=8, addr=(IOVA >> 12) | 0b11, size=1),
        qi.WAIT,
    ]


@pytest.mark.parametrize("huge", [True, False])
def test_unmap_that_frees_a_table_clears_ih(qi: Any, ats_world: Any, huge: bool) -> None:
    w = ats_world
    ioas = w.ioas()
    opt = U.IommuOption(
        option_id=U.IOMMU_OPTION_HUGE_PAGES, op=U.IOMMU_OPTION_OP_SET, object_id=ioas, val64=huge
    )
    w.ioctl(U.IOMMU_OPTION, opt)
    hwpt = w.hwpt(ioas, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING, dev_id=w.adev_id)  # second stage
    w.fd.attach(w.adev_id, hwpt)
    w.map(ioas, IOVA, M2)
    dom = _dom(w, w.adev_id)
    mem = w.hw.memory
    shift = w.hw.walker.walk_ss(mem._pages, mem.size, dom.pt.root, IOVA, 4, False, 6, False)[2]
    assert shift == 12 or huge  # a 2 MiB leaf only when the user pages are contiguous
    s = qi.Stream(w)
    w.unmap(ioas, IOVA, M2)
    # One 2 MiB leaf: no table freed, IH = 1. 512 small leaves: generic_pt frees their
    # level-0 table, intel_iommu_tlb_sync() passes IH = 0. 512 pages: AM = 9.
    assert s.take() == [
        qi.iotlb(dom.did, Q.IOTLB_PAGE, IOVA, 9, int(shift == 21)),
        qi.d(Q.DEV_TLB, sid=w.adev.rid, qdep=8, addr=(IOVA >> 12) | 0xFF, size=1),
        qi.WAIT,
    ]


def test_replace_tears_down_before_it_sets_up(qi: Any, ats_world: Any) -> None:
    w = ats_world
    rid = w.adev.rid
    ioas = w.ioas()
    w.map(ioas, IOVA, M2)
    w.fd.attach(w.adev_id, ioas)  # first-stage domain, DID 2
    ss = w.hwpt(ioas, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING, dev_id=w.adev_id)
    s = qi.Stream(w)
    w.fd.attach(w.adev_id, ss)
    # intel_iommu_attach_device -> device_block_translation -> intel_pasid_tear_down_entry:
    # PASID cache, PASID-based IOTLB (the old entry was first stage), device TLB: three
    # submissions; then the new entry with no flush. The DID of the old domain is freed
    # before the new one is allocated: the second-stage domain gets DID 2 again.
    assert s.take() == _teardown(qi, rid, 2, 0, first_stage=True)
    st = w.st
    pe = st.read_pasid_entry(st.devs[rid], 0)
    assert pe.pgtt == T.PGTT_SECOND and pe.did == 2 == _dom(w, w.adev_id).did
    # Detach: the same teardown with a domain-selective IOTLB flush (second stage).
    w.fd.detach(w.adev_id)
    assert s.take() == _teardown(qi, rid, 2, 0, first_stage=False)
    assert 2 not in st.dids


def test_pasid_attach_replace_and_remove(qi: Any, ats_world: Any) -> None:
    w = ats_world
    rid = w.adev.rid
    ioas = w.ioas()
    w.map(ioas, IOVA, PAGE)
    a = w.hwpt(ioas, U.IOMMU_HWPT_ALLOC_PASID, dev_id=w.adev_id)
    b = w.hwpt(ioas, U.IOMMU_HWPT_ALLOC_PASID, dev_id=w.adev_id)
    s = qi.Stream(w)
    w.fd.attach(w.adev_id, a, pasid=5)
    assert s.take() == []
    w.fd.attach(w.adev_id, b, pasid=5)
    # The new domain takes DID 3 before the old entry (DID 2) is torn down; PASID 5 uses
    # the PASID-based device-TLB form.
    assert s.take() == _teardown(qi, rid, 2, 5, first_stage=True)
    dom_b = w.fd.objects.get(b).domain
    assert dom_b.did == 3 and w.fd.objects.get(a).domain.did is None
    w.unmap(ioas, IOVA, PAGE)
    assert s.take() == [
        qi.d(Q.PIOTLB, g=Q.PIOTLB_PAGE, did=3, pasid=5, addr=IOVA >> 12, am=0, ih=1),
        qi.d(Q.PDEV_TLB, sid=rid, pasid=5, qdep=8, addr=IOVA >> 12),
        qi.WAIT,
    ]
    w.fd.detach(w.adev_id, pasid=5)
    assert s.take() == _teardown(qi, rid, 3, 5, first_stage=True)
    assert dom_b.did is None and not w.st.dids


def test_second_stage_domain_on_rid_and_pasid_flushes_once_per_tag(qi: Any, ats_world: Any) -> None:
    w = ats_world
    rid = w.adev.rid
    ioas = w.ioas()
    w.map(ioas, IOVA + PAGE, PAGE)
    flags = U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING | U.IOMMU_HWPT_ALLOC_PASID
    ss = w.hwpt(ioas, flags, dev_id=w.adev_id)
    w.fd.attach(w.adev_id, ss)
    w.fd.attach(w.adev_id, ss, pasid=7)
    s = qi.Stream(w)
    w.unmap(ioas, IOVA + PAGE, PAGE)
    # Tags in assignment order: IOTLB(2, 0), DEVTLB(2, 0), IOTLB(2, 7), DEVTLB(2, 7). A
    # second-stage IOTLB tag ignores its PASID: the same DID is flushed twice, as 7.2 does.
    page = (IOVA + PAGE) >> 12
    assert s.take() == [
        qi.iotlb(2, Q.IOTLB_PAGE, IOVA + PAGE, 0, 1),
        qi.d(Q.DEV_TLB, sid=rid, qdep=8, addr=page),
        qi.iotlb(2, Q.IOTLB_PAGE, IOVA + PAGE, 0, 1),
        qi.d(Q.PDEV_TLB, sid=rid, pasid=7, qdep=8, addr=page),
        qi.WAIT,
    ]


def _nest(w: Any, dev_id: int) -> tuple[int, int, Any]:
    ioas = w.ioas()
    gpa, ram_len = 1 << 30, 1 << 22
    w.map(ioas, gpa, ram_len)
    w.map(ioas, gpa + ram_len, PAGE, va=w.va)  # a page to unmap on its own
    parent = w.hwpt(ioas, U.IOMMU_HWPT_ALLOC_NEST_PARENT, dev_id=dev_id)
    ram = GuestRam(w.proc, w.va, gpa, ram_len)
    s1 = guest_first_stage(ram, 4)
    data = U.IommuHwptVtdS1(pgtbl_addr=s1.root, addr_width=48).pack()
    child = w.hwpt(parent, data_type=U.IOMMU_HWPT_DATA_VTD_S1, data=data, dev_id=dev_id)
    return ioas, child, s1


def test_nested_invalidate_and_parent_unmap(qi: Any, ats_world: Any) -> None:
    w = ats_world
    rid = w.adev.rid
    ioas, child, _ = _nest(w, w.adev_id)
    w.fd.attach(w.adev_id, child)
    nested = _dom(w, w.adev_id)
    assert isinstance(nested, VtdNested) and nested.did == 2
    s = qi.Stream(w)
    entry = U.IommuHwptVtdS1Invalidate(addr=IOVA, npages=2, flags=U.IOMMU_VTD_INV_FLAGS_LEAF)
    assert w.invalidate(child, [entry.pack()], U.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1) == (0, 1)
    assert s.take() == [
        qi.d(Q.PIOTLB, g=Q.PIOTLB_PAGE, did=2, pasid=0, addr=IOVA >> 12, am=1, ih=1),
        qi.d(Q.DEV_TLB, sid=rid, qdep=8, addr=IOVA >> 12, size=1),
        qi.WAIT,
    ]
    # npages = U64_MAX (address 0): the whole space, PASID-selective.
    everything = U.IommuHwptVtdS1Invalidate(addr=0, npages=(1 << 64) - 1)
    w.invalidate(child, [everything.pack()], U.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1)
    assert s.take() == [
        qi.d(Q.PIOTLB, g=Q.PIOTLB_PASID, did=2, pasid=0),
        qi.d(Q.DEV_TLB, sid=rid, qdep=8, addr=FULL, size=1),
        qi.WAIT,
    ]
    # A stage-2 unmap: the parent holds NESTING_IOTLB(2) and NESTING_DEVTLB(2) tags: an
    # IOTLB flush of the child's DID, and the whole device TLB.
    w.unmap(ioas, (1 << 30) + (1 << 22), PAGE)
    assert s.take() == [
        qi.iotlb(2, Q.IOTLB_PAGE, (1 << 30) + (1 << 22), 0, 1),
        qi.d(Q.DEV_TLB, sid=rid, qdep=8, addr=FULL, size=1),
        qi.WAIT,
    ]


def test_dids_are_allocated_at_attach_and_freed_at_the_last_detach(qi: Any, world: Any) -> None:
    st = world.hw.driver_state
    ioas = world.ioas()
    h1 = world.hwpt(ioas)
    h2 = world.hwpt(ioas)
    d1, d2 = world.fd.objects.get(h1).domain, world.fd.objects.get(h2).domain
    assert d1.did is None and d2.did is None and not st.dids
    world.fd.attach(world.dev_id, h2)
    assert d2.did == 2 and d1.did is None
    world.fd.attach(world.dev_id, h1)
    assert d1.did == 2 and d2.did is None


def test_set_dirty_tracking_unwinds_with_eopnotsupp(qi: Any, ats_world: Any) -> None:
    w = ats_world
    ioas = w.ioas()
    w.map(ioas, IOVA, M2)
    flags = U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING | U.IOMMU_HWPT_ALLOC_PASID
    ss = w.hwpt(ioas, flags, dev_id=w.adev_id)
    w.fd.attach(w.adev_id, ss)
    w.fd.attach(w.adev_id, ss, pasid=7)
    st = w.st
    info = st.devs[w.adev.rid]
    # Make the PASID 7 entry first-stage behind the driver's back: the second
    # intel_pasid_setup_dirty_tracking() call fails, and the first is undone.
    pe7 = st.read_pasid_entry(info, 7)
    st.write_pasid_entry(info, 7, T.PasidEntry(**{**_fields(pe7), "pgtt": T.PGTT_FIRST}))
    s = qi.Stream(w)
    on = U.IommuHwptSetDirtyTracking(flags=U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE, hwpt_id=ss)
    assert_errno(errno.EOPNOTSUPP, lambda: w.ioctl(U.IOMMU_HWPT_SET_DIRTY_TRACKING, on))
    assert not st.read_pasid_entry(info, 0).ssade
    flush = _teardown(qi, w.adev.rid, 2, 0, first_stage=False)
    assert s.take() == flush + flush  # SSADE on for the RID, then off again


def _fields(pe: T.PasidEntry) -> dict[str, Any]:
    import attrs

    return attrs.asdict(pe)
