"""``iommufd_access_rw()``'s copy paths and partial effects, as Linux 7.2 has them
(drivers/iommu/iommufd/device.c ``iommufd_access_rw()``, pages.c ``iopt_pages_rw_access()``,
``iopt_pages_rw_page()``, ``iopt_pages_rw_slow()``)."""

from __future__ import annotations

import errno

import pytest

from helpers import MOCK_APERTURE, PAGE, World
from iommufd_model.core.io_pagetable import IoPagetable
from iommufd_model.core.pages import ACCESS_RW_KTHREAD, ACCESS_RW_SLOW_PATH
from iommufd_model.failnth import fail_nth
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import iommufd as U


def _pinned(npages: int = 2) -> tuple[World, IoPagetable, bytes]:
    """``npages`` of the process mapped at MOCK_APERTURE with a domain (so pinned)."""
    w = World()
    ioas = w.fd.ioas_alloc()
    w.fd.attach(w.dev_id, ioas)
    data = bytes(range(256)) * (npages * PAGE // 256)
    w.proc.write(w.va, data)
    w.fd.ioas_map(ioas, w.va, npages * PAGE, iova=MOCK_APERTURE)
    return w, w.fd.objects.get_ioas(ioas).iopt, data


def test_paths_read_what_the_kernel_reads() -> None:
    """Same mm: through the mm's addresses, so memory unmapped under the pins is EFAULT.
    Another mm or SLOW_PATH: one page is pinned from that mm (EFAULT once unmapped), more
    pages come from the pinned pages; a gone mm always falls back to the pinned pages."""
    w, iopt, data = _pinned()
    other = w.machine.new_process()
    near = MOCK_APERTURE + PAGE - 8  # 16 bytes over the page boundary
    one = MOCK_APERTURE + 8  # 16 bytes inside one page
    assert iopt.access_rw(near, 16, False, current=w.proc) == data[PAGE - 8 : PAGE + 8]
    w.proc.munmap(w.va, w.buf_len)  # the pins keep the frames and their bytes
    assert_errno(errno.EFAULT, lambda: iopt.access_rw(near, 16, False, current=w.proc))
    for flags, current in ((ACCESS_RW_SLOW_PATH, w.proc), (0, other)):
        got = iopt.access_rw(near, 16, False, flags=flags, current=current)
        assert got == data[PAGE - 8 : PAGE + 8]
        with pytest.raises(OSError) as exc:
            iopt.access_rw(one, 16, False, flags=flags, current=current)
        assert exc.value.errno == errno.EFAULT
    # a kernel thread borrowing the mm copies through it
    assert_errno(errno.EFAULT, lambda: iopt.access_rw(near, 16, False, flags=ACCESS_RW_KTHREAD))
    w.proc.gone = True
    for flags in (0, ACCESS_RW_SLOW_PATH, ACCESS_RW_KTHREAD):
        assert iopt.access_rw(one, 16, False, flags=flags) == data[8:24]
        assert iopt.access_rw(near, 16, False, flags=flags) == data[PAGE - 8 : PAGE + 8]


@pytest.mark.parametrize("flags", [0, ACCESS_RW_SLOW_PATH])
def test_a_write_fails_after_the_areas_before(flags: int) -> None:
    """The areas are copied as the walk reaches them: EPERM from a read-only area and
    ENOENT past the last area both come after the first area was written."""
    w = World()
    ioas = w.fd.ioas_alloc()
    iopt = w.fd.objects.get_ioas(ioas).iopt
    w.fd.ioas_map(ioas, w.va, PAGE, iova=MOCK_APERTURE)
    w.fd.ioas_map(
        ioas, w.va + PAGE, PAGE, iova=MOCK_APERTURE + PAGE, flags=U.IOMMU_IOAS_MAP_READABLE
    )
    at = MOCK_APERTURE + PAGE - 4
    assert_errno(
        errno.EPERM, lambda: iopt.access_rw(at, b"abcdefgh", True, flags=flags, current=w.proc)
    )
    assert w.proc.read(w.va + PAGE - 4, 8) == b"abcd" + bytes(4)
    w.fd.ioas_unmap(ioas, MOCK_APERTURE + PAGE, PAGE)
    assert_errno(
        errno.ENOENT, lambda: iopt.access_rw(at, b"ABCDEFGH", True, flags=flags, current=w.proc)
    )
    assert w.proc.read(w.va + PAGE - 4, 8) == b"ABCD" + bytes(4)


def test_rw_page_can_fail_by_injection() -> None:
    """``iopt_pages_rw_page()``'s iommufd_should_fail() is EINVAL; nothing is copied."""
    w, iopt, data = _pinned()
    with fail_nth(1) as fp:
        assert_errno(
            errno.EINVAL,
            lambda: iopt.access_rw(
                MOCK_APERTURE, b"xx", True, flags=ACCESS_RW_SLOW_PATH, current=w.proc
            ),
        )
    assert fp.fired_site == "pages.rw_page"
    assert w.proc.read(w.va, 2) == data[:2]
