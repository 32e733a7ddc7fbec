"""IOMMU_HWPT_GET_DIRTY_BITMAP into a bitmap whose middle page is unmapped.

Linux 7.2 (drivers/iommu/iommufd/iova_bitmap.c ``iova_bitmap_set()``,
``iova_bitmap_advance_to()``, ``iova_bitmap_get()``; io_pagetable.c
``iommu_read_and_clear_dirty()``): each dirty run the driver records pins the bitmap from its
first byte on; its bits in the pages pinned before the first unmapped page land, the rest of
the run is dropped, a run starting in the unmapped page is dropped whole (even where it
reaches a mapped page again), and a later run in a mapped page pins afresh and lands. The
ioctl still returns 0, and the IOPTEs' dirty bits are cleared unless NO_CLEAR.
"""

from __future__ import annotations

import pytest

from helpers import MOCK_APERTURE, PAGE, World, mock_domain
from iommufd_model.uapi import iommufd as U

K2 = 2048
#: the mock's dirty runs here are 2 KiB; at 128 bytes a bit each covers 16 bits, 2 bytes
PAGE_SIZE_BITS = 128
#: the bitmap starts 5 bytes before the end of its first page
DATA_OFF = PAGE - 5


def _session(flags: int) -> tuple[World, int, list[tuple[int, int]], bytes, bytes]:
    w = World(buf_len=8 << 20)
    ioas = w.fd.ioas_alloc()
    w.fd.ioas_map(ioas, w.va, 6 << 20, iova=MOCK_APERTURE)
    hwpt = w.fd.hwpt_alloc(w.dev_id, ioas, flags=U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    w.fd.attach(w.dev_id, hwpt)
    w.fd.hwpt_set_dirty_tracking(hwpt, True)
    pt = mock_domain(w.fd, hwpt).pt
    # each run's first bitmap byte: offset / 1024 past the bitmap's start
    offsets = [
        0,  # bytes PAGE-5, PAGE-4: page 0
        4096,  # bytes PAGE-1 | PAGE: from page 0 into the unmapped page 1
        8192,  # bytes PAGE+3, PAGE+4: inside page 1
        (PAGE + 4) * 1024,  # bytes 2*PAGE-1 | 2*PAGE: from page 1 into page 2
        (PAGE + 8) * 1024,  # bytes 2*PAGE+3, 2*PAGE+4: page 2
    ]
    for off in offsets:
        assert pt.set_dirty(MOCK_APERTURE + off)
    runs = pt.read_and_clear_dirty(MOCK_APERTURE, 6 << 20, False)
    assert runs == [(MOCK_APERTURE + off, K2) for off in offsets]
    bitmap_va = w.proc.mmap(3 * PAGE)
    w.proc.munmap(bitmap_va + PAGE, PAGE)
    # returns 0 (no OSError): iommu_read_and_clear_dirty() ignores what the bitmap did
    bitmap = U.IommuHwptGetDirtyBitmap(hwpt_id=hwpt, flags=flags, iova=MOCK_APERTURE)
    bitmap.length, bitmap.page_size, bitmap.data = 6 << 20, PAGE_SIZE_BITS, bitmap_va + DATA_OFF
    w.fd.call(U.IOMMU_HWPT_GET_DIRTY_BITMAP, bitmap)
    page0 = w.proc.read(bitmap_va, PAGE)
    page2 = w.proc.read(bitmap_va + 2 * PAGE, PAGE)
    return w, hwpt, runs, page0, page2


@pytest.mark.parametrize("flags", [0, U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR])
def test_a_run_into_an_unmapped_bitmap_page_keeps_its_pinned_bits(flags: int) -> None:
    w, hwpt, runs, page0, page2 = _session(flags)
    want0 = bytearray(PAGE)
    want0[PAGE - 5] = want0[PAGE - 4] = 0xFF  # the run inside page 0
    want0[PAGE - 1] = 0xFF  # the crossing run's bits in page 0 (its page 1 half is lost)
    assert page0 == bytes(want0)
    want2 = bytearray(PAGE)
    want2[3] = want2[4] = 0xFF  # a later run in page 2 lands; the one from page 1 does not
    assert page2 == bytes(want2)
    pt = mock_domain(w.fd, hwpt).pt
    left = pt.read_and_clear_dirty(MOCK_APERTURE, 6 << 20, False)
    # the D bits of every run, the dropped ones' too, are cleared (kept with NO_CLEAR)
    assert left == ([] if flags == 0 else runs)
