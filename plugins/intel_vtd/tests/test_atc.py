"""The device TLB (PCIe ATC) of an ATS device: it keeps what it translated until a device-TLB
invalidation in 7.2's format reaches it; a missing one shows up as a stale translation."""

from __future__ import annotations

from typing import Any

import pytest
from iommufd_intel_vtd import qi as Q

import iommufd_model as im
from iommufd_model import uapi as U

PAGE = 4096
IOVA = 0x40_0000


@pytest.fixture
def ats(world: Any) -> Any:
    w = world
    w.adev = w.machine.add_pci_device(iommu=0, ats=True)
    w.adev_id = w.fd.bind(w.adev)
    w.ioas_id = w.ioas()
    w.map(w.ioas_id, IOVA, 4 * PAGE)
    w.fd.attach(w.adev_id, w.ioas_id)
    w.proc.write(w.va, b"page0")
    w.proc.write(w.va + PAGE, b"page1")
    return w


def _leaf_slot(w: Any, iova: int) -> int:
    dom = w.fd.device(w.adev_id).hwpt.domain
    mem = w.hw.memory
    table: int = dom.pt.root
    for level in range(dom.pt.fmt.levels - 1, 0, -1):
        table = mem.read_u64(table + 8 * ((iova >> (12 + 9 * level)) & 0x1FF)) & ~0xFFF
        table &= (1 << 52) - 1
    return table + 8 * ((iova >> 12) & 0x1FF)


def test_the_atc_serves_until_the_device_tlb_is_invalidated(ats: Any) -> None:
    w, hw = ats, ats.hw
    rid = w.adev.rid
    assert w.adev.dma_read(IOVA, 5) == b"page0"
    hits = hw.atc_hits
    assert w.adev.dma_read(IOVA, 5) == b"page0" and hw.atc_hits == hits + 1
    # Point the leaf at page 1 behind the driver's back and flush only the IOTLB.
    slot = _leaf_slot(w, IOVA)
    mem = hw.memory
    mem.write_u64(slot, mem.read_u64(_leaf_slot(w, IOVA + PAGE)))
    did = w.fd.device(w.adev_id).hwpt.domain.did
    hw.execute(Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=did, pasid=0))
    assert w.adev.dma_read(IOVA, 5) == b"page0"  # stale: the device's own ATC
    # A page-selective device-TLB invalidation of another page leaves it ...
    hw.execute(Q.make(Q.DEV_TLB, sid=rid, addr=(IOVA + 2 * PAGE) >> 12))
    assert w.adev.dma_read(IOVA, 5) == b"page0"
    # ... a 2-page range (S = 1, ADDR bit 12 = 0) covering it drops it.
    hw.execute(Q.make(Q.DEV_TLB, sid=rid, addr=IOVA >> 12, size=1))
    assert w.adev.dma_read(IOVA, 5) == b"page1"


def test_unmap_reaches_the_atc(ats: Any) -> None:
    w = ats
    assert w.adev.dma_read(IOVA + PAGE, 5) == b"page1"
    w.unmap(w.ioas_id, IOVA, 4 * PAGE)
    with pytest.raises(im.DmaFault):
        w.adev.dma_read(IOVA + PAGE, 5)


def test_pasid_device_tlb_flush_is_per_pasid(ats: Any) -> None:
    w, hw = ats, ats.hw
    rid = w.adev.rid
    hwpt = w.hwpt(w.ioas_id, U.IOMMU_HWPT_ALLOC_PASID, dev_id=w.adev_id)
    w.fd.attach(w.adev_id, hwpt)  # the RID's HWPT must be PASID-compatible too
    w.fd.attach(w.adev_id, hwpt, pasid=3)
    assert w.adev.dma_read(IOVA, 5, pasid=3) == b"page0"
    atc = hw.atc[rid]
    assert atc.lookup(3, IOVA) is not None
    hw.execute(Q.make(Q.PDEV_TLB, sid=rid, pasid=4, addr=Q.devtlb_range(0, 52)[0], size=1))
    assert atc.lookup(3, IOVA) is not None  # another PASID
    hw.execute(Q.make(Q.PDEV_TLB, sid=rid, pasid=3, addr=Q.devtlb_range(0, 52)[0], size=1))
    assert atc.lookup(3, IOVA) is None


@pytest.mark.parametrize("dt", [True, False])
def test_hw_info_ats_capability_follows_ecap_dt(make_world: Any, dt: bool) -> None:
    from iommufd_intel_vtd import regs as R

    w = make_world()
    if not dt:
        w.hw.ecap &= ~R.ECAP_DT  # before the device is probed: the unit lacks device TLBs
    dev = w.machine.add_pci_device(iommu=0, ats=True)
    dev_id = w.fd.bind(dev)
    out = w.proc.mmap(PAGE)
    info = U.IommuHwInfo(size=U.IommuHwInfo.SIZE, dev_id=dev_id, data_len=64, data_uptr=out)
    caps = w.ioctl(U.IOMMU_GET_HW_INFO, info).out_capabilities
    assert bool(caps & U.IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED) == (not dt)
    plain = w.ioctl(
        U.IOMMU_GET_HW_INFO,
        U.IommuHwInfo(size=U.IommuHwInfo.SIZE, dev_id=w.dev_id, data_len=64, data_uptr=out),
    )
    assert plain.out_capabilities & U.IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED
