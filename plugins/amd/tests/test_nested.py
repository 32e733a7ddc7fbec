"""Nesting: nest parent + vIOMMU + nested HWPT from guest DTE words; bad data; bad tables."""

from __future__ import annotations

import contextlib
import errno
import struct
from typing import Any

import pytest
from iommufd_amd import commands as C
from iommufd_amd import events as E
from iommufd_amd.dte import Dte

import iommufd_model as im
from iommufd_model import uapi as U
from iommufd_model.testing import assert_errno

from .conftest import NestParent

PAGE = 4096
GPA = 1 << 20  # guest RAM starts at 1 MiB
GVA = 0x7F12_3456_7000
AMD = U.IOMMU_HWPT_DATA_AMD_GUEST


def gdte(gcr3: int, gdom: int = 7, **kw: Any) -> bytes:
    fields: dict[str, Any] = {
        "v": True,
        "tv": True,
        "gv": True,
        "giov": True,
        "glx": 0,
        "gcr3": gcr3,
        "domain_id": gdom,
        "gpt_level": 0,
    }
    fields.update(kw)
    return struct.pack("<4Q", *Dte(**fields).encode())


class Guest(NestParent):
    """A VM: guest RAM in a nest-parent IOAS, a vIOMMU, its GCR3 and v2 tables in its RAM."""

    def __init__(self, w: Any) -> None:
        super().__init__(w)
        self.viommu = w.viommu(self.parent)
        self.gcr3 = self.ram.alloc()
        self.cr3 = self.ram.alloc()
        self.ram.write_u64(self.gcr3, self.cr3 | 1)  # GCR3[PASID 0] = cr3, valid
        self.data = self.ram.alloc()
        self.ram.write(self.data, b"guest data")
        self.pte = self.ram.map_page(self.cr3, GVA, self.data)

    def nested(self, data: bytes | None = None, pt: int | None = None) -> int:
        return int(
            self.w.hwpt(
                self.viommu if pt is None else pt, 0, AMD, gdte(self.gcr3) if data is None else data
            )
        )


def test_a_grown_nest_parent_leaves_nested_dtes_on_the_old_top(world: Any) -> None:
    """amd_iommu_change_top() rewrites the DTEs on the parent's dev_list only; a nested attach
    (nested_attach_device) never puts the device there, so its DTE keeps the Mode and root it
    was written with (Linux 7.2), and its DMA still walks the old top, which stays entry 0
    of the new one."""
    w = world
    g = Guest(w)
    w.fd.attach(w.dev_id, g.nested())
    parent = w.fd.objects.get(g.parent).domain
    old_root = parent.pt.root
    seen = w.record_commands()
    w.map(g.ioas, w.buffer(PAGE), PAGE, 1 << 40)
    assert parent.mode == 4 and seen == []
    dte = w.kernel.read_dte(w.dev.rid)
    assert (dte.mode, dte.host_root) == (3, old_root)
    assert w.dev.dma_read(GVA, 10) == b"guest data"


def test_nested_dma_through_the_two_dimensional_walk(world: Any) -> None:
    w = world
    g = Guest(w)
    nested = g.nested()
    w.fd.attach(w.dev_id, nested)
    parent = w.fd.objects.get(g.parent).domain
    ndom = w.fd.objects.get(nested).domain
    dte = w.kernel.read_dte(w.dev.rid)
    assert (dte.mode, dte.host_root, dte.domain_id) == (
        parent.mode,
        parent.pt.root,
        ndom.ginfo.hdom_id,
    )
    assert dte.gv and dte.giov and dte.gcr3 == g.gcr3 and dte.ir and dte.iw
    refs = w.hw.stats.walk_mem_refs
    assert w.dev.dma_read(GVA, 10) == b"guest data"
    # The 2-D walk: GCR3 and 4 guest levels each translated by the host table (Mode 3 as
    # generic_pt starts it) and read, then the data's GPA: 5 * (3 + 1) + 3 = 23.
    assert parent.mode == 3
    assert w.hw.stats.walk_mem_refs - refs == (1 + 4) * (parent.mode + 1) + parent.mode
    w.dev.dma_write(GVA + 0x100, b"from the device")
    assert g.ram.read(g.data + 0x100, 15) == b"from the device"
    # The guest repoints its PTE and forgets to invalidate: the IOTLB keeps the old page.
    new = GPA + (1 << 20)  # a page of guest RAM the VMM mapped on its own
    w.map(g.ioas, w.buffer(PAGE, fill=0x21), PAGE, new)
    g.ram.write_u64(g.pte, new | 7)
    assert w.dev.dma_read(GVA, 10) == b"guest data"
    # INVALIDATE_IOMMU_PAGES for (hDomID, PASID 0, GN=1): the next DMA walks again.
    w.kernel.queue(C.inv_iommu_pages(ndom.ginfo.hdom_id, GVA, PAGE, pasid=0, gn=True))
    w.kernel.completion_wait()
    assert w.dev.dma_read(GVA, 10) == b"\x21" * 10
    # Stage 2 changes (the VMM unmaps guest RAM) are flushed under the hDomID by the driver.
    w.events()
    w.unmap(g.ioas, new, PAGE)
    with pytest.raises(im.DmaFault):
        w.dev.dma_read(GVA, 10)
    (ev,) = w.events()
    assert ev.code == E.IO_PAGE_FAULT and ev.address == GVA


def test_gdomid_to_hdomid_mapping(world: Any) -> None:
    w = world
    g = Guest(w)
    a, b, c = g.nested(), g.nested(), g.nested(gdte(g.gcr3, gdom=9))
    dom = [w.fd.objects.get(x).domain for x in (a, b, c)]
    assert dom[0].ginfo.hdom_id == dom[1].ginfo.hdom_id != dom[2].ginfo.hdom_id
    hdom = dom[0].ginfo.hdom_id
    w.destroy(a)
    assert hdom in w.kernel.domids.used
    w.destroy(b)
    assert hdom not in w.kernel.domids.used
    # No nested domain straight on the nest parent: the AMD driver has no
    # iommu_ops.domain_alloc_nested (Linux 7.2), only the vIOMMU's.
    before = w.state()
    assert_errno(errno.EOPNOTSUPP, lambda: g.nested(pt=g.parent))
    assert w.state() == before


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (gdte(0x5000, mode=4), errno.EINVAL),  # Mode must be zero
        (gdte(0x5000, host_root=0x9000), errno.EINVAL),  # host table root must be zero
        (gdte(0), errno.EINVAL),  # V and GV without a GCR3 root
        (gdte(0x5000, gpt_level=2), errno.EINVAL),  # reserved guest paging mode
        (gdte(0x5000, glx=3), errno.EINVAL),  # GLX 3 is reserved
        (gdte(0x5000, gpt_level=1), errno.EOPNOTSUPP),  # 5-level guest on a 4-level host
        (gdte(0x5000)[:16], errno.EINVAL),  # shorter than struct iommu_hwpt_amd_guest
        # Longer than the struct is EINVAL, zero tail or not: Linux 7.2's
        # __iommu_copy_struct_from_user() checks the length before copy_struct_from_user().
        (gdte(0x5000) + b"\x01", errno.EINVAL),
        (gdte(0x5000) + bytes(8), errno.EINVAL),
    ],
)
def test_bad_guest_dte_is_refused_without_a_trace(world: Any, data: bytes, code: int) -> None:
    w = world
    g = Guest(w)
    before = w.state()
    assert_errno(code, lambda: g.nested(data))
    assert w.state() == before
    # the exact struct is fine; an unknown data type is not
    assert g.nested(gdte(g.gcr3))
    before = w.state()
    assert_errno(
        (
            errno.EOPNOTSUPP,
            errno.EINVAL,
        ),
        lambda: w.hwpt(g.viommu, 0, U.IOMMU_HWPT_DATA_VTD_S1, gdte(g.gcr3)),
    )
    assert w.state() == before


def test_nested_needs_a_nest_parent_and_an_amd_viommu(world: Any) -> None:
    w = world
    g = Guest(w)
    plain = w.hwpt(g.ioas)
    assert_errno(errno.EINVAL, lambda: g.nested(pt=plain))
    assert_errno(errno.EINVAL, lambda: w.viommu(plain))
    assert_errno(errno.EOPNOTSUPP, lambda: w.viommu(g.parent, U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3))


def test_malformed_guest_structures_fault_cleanly(world: Any) -> None:
    w = world
    g = Guest(w)
    w.fd.attach(w.dev_id, g.nested())
    w.events()
    # A guest PTE pointing outside guest RAM: stage 2 refuses it.
    g.ram.write_u64(g.pte, (1 << 40) | 7)
    with pytest.raises(im.DmaFault, match="stage-2"):
        w.dev.dma_read(GVA, 4)
    # A GCR3 entry pointing at a guest table that loops back on itself (PML4[i] = PML4).
    g.ram.write_u64(g.gcr3, g.cr3 | 1)
    for i in range(512):
        g.ram.write_u64(g.cr3 + 8 * i, g.cr3 | 7)
    w.kernel.queue(C.inv_iommu_all_pages(w.kernel.read_dte(w.dev.rid).domain_id, gn=True))
    w.kernel.completion_wait()
    for gva in (0, GVA, 0x1234_5678_9000):
        with contextlib.suppress(im.DmaFault):  # a translation or a fault, never a crash
            w.dev.dma_read(gva, 8)
    # A reserved PS bit at the top level is a bad entry: IO_PAGE_FAULT with RZ.
    g.ram.write_u64(g.cr3, g.cr3 | 7 | 0x80)
    w.kernel.queue(C.inv_iommu_all_pages(w.kernel.read_dte(w.dev.rid).domain_id, gn=True))
    w.kernel.completion_wait()
    w.events()
    with pytest.raises(im.DmaFault):
        w.dev.dma_read(0, 8)
    (ev,) = w.events()
    assert ev.code == E.IO_PAGE_FAULT and ev.flags & E.F_RZ


def test_v2_table_pointer_outside_memory_is_a_page_table_hardware_error(world: Any) -> None:
    w = world
    ioas = w.ioas()
    w.map(ioas, w.buffer(PAGE, fill=1), PAGE, 1 << 30)
    hwpt = w.hwpt(ioas, U.IOMMU_HWPT_ALLOC_PASID)
    w.fd.attach(w.dev_id, hwpt)
    assert w.dev.dma_read(1 << 30, 1) == b"\x01"
    dom = w.fd.objects.get(hwpt).domain
    entry = w.mem.read_u64(dom.pt.root)
    w.mem.write_u64(dom.pt.root, (entry & 0xFFF) | (w.mem.size + (1 << 21)))
    w.kernel.flush_domain(dom, 0, 1 << 64)
    w.events()
    with pytest.raises(im.DmaFault, match="outside memory"):
        w.dev.dma_read(1 << 30, 1)
    (ev,) = w.events()
    assert ev.code == E.PAGE_TAB_HARDWARE_ERROR and ev.address == w.mem.size + (1 << 21)
