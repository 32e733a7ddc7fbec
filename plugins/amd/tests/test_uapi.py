"""End to end through the raw uAPI: paging DMA, attach's command sequence, PASID, dirty."""

from __future__ import annotations

import errno
from functools import partial
from typing import Any

import pytest
from iommufd_amd import events as E
from iommufd_amd import regs as R
from iommufd_amd.domain import AmdDomain

import iommufd_model as im
from iommufd_model import uapi as U
from iommufd_model.testing import assert_errno

from .conftest import amd_iommu

PAGE = 4096
IOVA = 1 << 30


def test_dma_read_write_unmap_fault_through_raw_ioctls() -> None:
    machine = im.Machine.build(iommus=["amd"])
    dev = machine.add_pci_device(iommu=0)
    proc = machine.new_process()
    fd = proc.open_iommufd()
    dev_id = fd.bind(dev)
    buf = bytearray(U.IommuIoasAlloc(size=U.IommuIoasAlloc.SIZE).pack())
    fd.ioctl(U.IOMMU_IOAS_ALLOC, buf)
    ioas = U.IommuIoasAlloc.unpack(buf).out_ioas_id
    va = proc.mmap(1 << 16)
    proc.write(va, b"x" * (1 << 16))
    flags = U.IOMMU_IOAS_MAP_FIXED_IOVA | U.IOMMU_IOAS_MAP_READABLE | U.IOMMU_IOAS_MAP_WRITEABLE
    buf = bytearray(
        U.IommuIoasMap(
            size=U.IommuIoasMap.SIZE,
            flags=flags,
            ioas_id=ioas,
            user_va=va,
            length=1 << 16,
            iova=IOVA,
        ).pack()
    )
    fd.ioctl(U.IOMMU_IOAS_MAP, buf)
    fd.attach(dev_id, ioas)
    hw = amd_iommu(machine)
    # the DTE the driver wrote: V, TV, Mode 3 (generic_pt's starting level 2: the IOVA is
    # within 39 bits), the domain's root, IR/IW, its DomainID
    hwpt = fd.device(dev_id).hwpt
    assert hwpt is not None and isinstance(hwpt.domain, AmdDomain)
    dom = hwpt.domain
    dte = hw.driver_state.read_dte(dev.rid)
    assert (dte.v, dte.tv, dte.mode, dte.host_root, dte.ir, dte.iw, dte.domain_id) == (
        True,
        True,
        3,
        dom.pt.root,
        True,
        True,
        dom.id,
    )
    dev.dma_write(IOVA + 0x1FF0, b"hello, amd iommu")  # crosses a page boundary
    assert proc.read(va + 0x1FF0, 16) == b"hello, amd iommu"
    assert dev.dma_read(IOVA + 0x1FF0, 16) == b"hello, amd iommu"
    buf = bytearray(
        U.IommuIoasUnmap(size=U.IommuIoasUnmap.SIZE, ioas_id=ioas, iova=IOVA, length=1 << 16).pack()
    )
    fd.ioctl(U.IOMMU_IOAS_UNMAP, buf)
    hw.read_events()
    with pytest.raises(im.DmaFault):
        dev.dma_write(IOVA, b"late")
    (ev,) = hw.read_events()
    assert (ev.code, ev.devid, ev.address, ev.write, ev.tag) == (
        E.IO_PAGE_FAULT,
        dev.rid,
        IOVA,
        True,
        dom.id,
    )
    assert hw.stats.iotlb_hits and hw.stats.walk_mem_refs


def test_hw_info_reports_efr_and_efr2(world: Any) -> None:
    w = world
    out = w.proc.mmap(PAGE)
    st = U.IommuHwInfo(dev_id=w.dev_id, data_len=16, data_uptr=out)
    res = w.ioctl(U.IOMMU_GET_HW_INFO, st)
    assert res.data_type == U.IOMMU_HW_INFO_TYPE_AMD == 4 and res.data_len == 16
    info = U.IommuHwInfoAmd.unpack(w.proc.read(out, 16))
    assert info.efr == w.hw.mmio.read(R.EFR) and info.efr2 == w.hw.mmio.read(R.EFR2)
    assert res.out_capabilities & U.IOMMU_HW_CAP_DIRTY_TRACKING
    assert res.out_max_pasid_log2 == 16


def test_paging_flag_combinations(make_world: Any) -> None:
    w = make_world()
    ioas = w.ioas()
    for flags in (
        U.IOMMU_HWPT_ALLOC_PASID | U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
        U.IOMMU_HWPT_ALLOC_PASID | U.IOMMU_HWPT_ALLOC_NEST_PARENT,
    ):
        assert_errno(errno.EOPNOTSUPP, partial(w.hwpt, ioas, flags))
    w2 = make_world({"hd": False})
    ioas2 = w2.ioas()
    assert_errno(errno.EOPNOTSUPP, lambda: w2.hwpt(ioas2, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING))
    assert w2.hwpt(ioas2, U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    with pytest.raises(OSError) as exc:
        im.Machine.build(iommus=["amd"], options={"amd": {"bogus": 1}})
    assert exc.value.errno == errno.EINVAL


def test_dirty_tracking_through_the_host_dirty_bit(world: Any) -> None:
    w = world
    ioas = w.ioas()
    for i in range(4):
        w.map(ioas, w.buffer(PAGE, fill=i), PAGE, IOVA + i * PAGE)
    hwpt = w.hwpt(ioas, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    w.fd.attach(w.dev_id, hwpt)
    w.dev.dma_write(IOVA, b"before tracking")
    w.ioctl(
        U.IOMMU_HWPT_SET_DIRTY_TRACKING,
        U.IommuHwptSetDirtyTracking(hwpt_id=hwpt, flags=U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE),
    )
    assert w.kernel.read_dte(w.dev.rid).had == 3  # DTE HAD: update A and D

    def bitmap(clear: bool = True) -> int:
        out = w.proc.mmap(PAGE)
        st = U.IommuHwptGetDirtyBitmap(
            hwpt_id=hwpt,
            iova=IOVA,
            length=4 * PAGE,
            page_size=PAGE,
            data=out,
            flags=0 if clear else U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
        )
        w.ioctl(U.IOMMU_HWPT_GET_DIRTY_BITMAP, st)
        return int.from_bytes(w.proc.read(out, 8), "little")

    assert bitmap() == 0  # the write before tracking was not recorded
    w.dev.dma_write(IOVA + PAGE, b"x")  # IOTLB hit from before: must still set D
    w.dev.dma_write(IOVA + 3 * PAGE + 7, b"y")
    w.dev.dma_read(IOVA + 2 * PAGE, 4)  # reads do not dirty
    assert bitmap(clear=False) == 0b1010
    assert bitmap() == 0b1010
    assert bitmap() == 0
    w.dev.dma_write(IOVA + PAGE, b"again")  # cleared: the next write dirties again
    assert bitmap() == 0b0010
    w.dev.dma_write(IOVA, b"z")
    w.ioctl(U.IOMMU_HWPT_SET_DIRTY_TRACKING, U.IommuHwptSetDirtyTracking(hwpt_id=hwpt))
    assert w.kernel.read_dte(w.dev.rid).had == 0
    # Linux 7.2's generic_pt reads with tracking off too: the bit set before it stopped
    assert bitmap() == 0b0001
    w.ioctl(
        U.IOMMU_HWPT_SET_DIRTY_TRACKING,
        U.IommuHwptSetDirtyTracking(hwpt_id=hwpt, flags=U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE),
    )
    assert bitmap() == 0  # re-enabling starts from a clean snapshot


def test_v2_domain_on_the_rid_through_gcr3_0(world: Any) -> None:
    """A PASID-compatible (v2) domain on the RID: GIoV, requests without a PASID use GCR3[0];
    a request with a PASID before any GCR3 table is an INVALID_DEVICE_REQUEST."""
    w = world
    ioas = w.ioas()
    w.map(ioas, w.buffer(PAGE, fill=0xB5), PAGE, IOVA)
    b = w.hwpt(ioas, U.IOMMU_HWPT_ALLOC_PASID)
    w.events()
    with pytest.raises(im.DmaFault):
        w.dev.dma_read(IOVA, 1, pasid=5)
    assert [e.code for e in w.events()] == [E.INVALID_DEVICE_REQUEST]
    w.fd.attach(w.dev_id, b)
    assert w.kernel.read_dte(w.dev.rid).giov
    assert w.dev.dma_read(IOVA, 1) == b"\xb5"
    w.fd.detach(w.dev_id)
    assert w.kernel.dev_data[w.dev.rid].gcr3 is None  # freed at detach
    assert not w.kernel.read_dte(w.dev.rid).gv


@pytest.mark.parametrize(
    ("options", "flags", "refs"),
    [
        ({"domain_levels": 3}, 0, 3),
        ({"domain_levels": 6}, 0, 6),
        ({"pgtable": "v2"}, 0, 2 + 4),  # 2-level GCR3 (16-bit PASIDs) + 4-level guest
        ({"guest_levels": 5}, U.IOMMU_HWPT_ALLOC_PASID, 2 + 5),
    ],
)
def test_table_depth_options(
    make_world: Any, options: dict[str, Any], flags: int, refs: int
) -> None:
    w = make_world(options)
    ioas = w.ioas()
    w.map(ioas, w.buffer(PAGE, fill=0x5A), PAGE, IOVA)
    w.fd.attach(w.dev_id, w.hwpt(ioas, flags))
    before = w.hw.stats.walk_mem_refs
    assert w.dev.dma_read(IOVA, 2) == b"\x5a\x5a"
    assert w.hw.stats.walk_mem_refs - before == refs
