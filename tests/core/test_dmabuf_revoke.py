"""dma-buf areas and their revocation, as Linux 7.2 has them (drivers/iommu/iommufd/pages.c
``iopt_alloc_dmabuf_pages()``, ``iopt_revoke_notify()``, ``iopt_area_fill_domain(s)()``,
``iopt_area_unfill_domain(s)()``; io_pagetable.c ``iopt_fill_domain()``,
``iopt_unfill_domain()``, ``iopt_area_split()``; selftest.c ``iommufd_test_dmabuf_revoke()``)."""

from __future__ import annotations

import contextlib
import errno

from helpers import MOCK_APERTURE, PAGE, World, expect_errno, snapshot
from iommufd_model.core.io_pagetable import IoPagetable
from iommufd_model.core.ioas import change_process
from iommufd_model.failnth import fail_nth
from iommufd_model.mock.iommufd_test import (
    IOMMU_TEST_CMD,
    IOMMU_TEST_OP_DMABUF_GET,
    IOMMU_TEST_OP_DMABUF_REVOKE,
    DmaBufArgs,
    IommuTestCmd,
)
from iommufd_model.paging import PagingDomain
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import iommufd as U

N = 4  # pages of the dma-buf


def _dmabuf(w: World) -> int:
    """A self-test dma-buf of N pages: its fd."""
    return int(w.fd.ioctl(IOMMU_TEST_CMD, _test_cmd(IOMMU_TEST_OP_DMABUF_GET, N * PAGE, 0)))


def _test_cmd(op: int, a: int, b: int) -> bytearray:
    cmd = IommuTestCmd(size=IommuTestCmd.SIZE, op=op)
    DmaBufArgs(a=a, b=b).store(cmd)
    return bytearray(cmd.pack())


def _revoke(w: World, dfd: int, revoked: bool) -> None:
    w.fd.ioctl(IOMMU_TEST_CMD, _test_cmd(IOMMU_TEST_OP_DMABUF_REVOKE, dfd, int(revoked)))


def _map_file_cmd(ioas: int, dfd: int, iova: int | None = None) -> bytearray:
    """IOAS_MAP_FILE of the whole dma-buf, read-only, at ``iova`` (None: anywhere)."""
    flags = U.IOMMU_IOAS_MAP_READABLE
    if iova is not None:
        flags |= U.IOMMU_IOAS_MAP_FIXED_IOVA
    st = U.IommuIoasMapFile(
        size=U.IommuIoasMapFile.SIZE,
        ioas_id=ioas,
        fd=dfd,
        start=0,
        length=N * PAGE,
        iova=iova or 0,
        flags=flags,
    )
    return bytearray(st.pack())


def _domain_maps(w: World, ioas: int, iova: int) -> list[int]:
    """What each domain of the IOAS translates the dma-buf's pages to (-1: nothing)."""
    maps = []
    for hwpt in w.fd.objects.get_ioas(ioas).hwpt_list:
        assert isinstance(hwpt.domain, PagingDomain)
        maps += [hwpt.domain.iova_to_phys(iova + i * PAGE) for i in range(N)]
    return maps


def _setup() -> tuple[World, int, IoPagetable, int, int]:
    """A World whose IOAS has a domain and the dma-buf mapped: (w, ioas, iopt, dfd, iova)."""
    w = World()
    ioas = w.fd.ioas_alloc()
    w.fd.attach(w.dev_id, ioas)
    dfd = _dmabuf(w)
    iova = w.fd.ioas_map_file(ioas, dfd, 0, N * PAGE, iova=MOCK_APERTURE)
    return w, ioas, w.fd.objects.get_ioas(ioas).iopt, dfd, iova


def test_revoke_zaps_the_iotes_and_keeps_the_area() -> None:
    """iopt_revoke_notify(): every domain's IOPTEs of the area go, the area stays; the
    pages pinned and charged nothing before and after."""
    w, ioas, iopt, dfd, iova = _setup()
    assert -1 not in _domain_maps(w, ioas, iova)
    got = iopt.lookup(iova)
    assert got is not None and w.proc.locked_pages == 0
    refs = w.machine.memory.frame_refs(got[0])
    _revoke(w, dfd, True)
    assert set(_domain_maps(w, ioas, iova)) == {-1}
    assert [a.iova for a in iopt.area_objects()] == [iova] and iopt.lookup(iova) is None
    # the model's frame of the exported page is the exporter's alone again
    assert w.machine.memory.frame_refs(got[0]) == refs - 1 and w.proc.locked_pages == 0
    assert iopt.warnings == []


def test_a_later_domain_maps_nothing_and_unmap_touches_none() -> None:
    """The selftest's dmabuf_revoke: a HWPT allocated on the IOAS after the revocation
    maps nothing for it; a new map of the revoked dma-buf is ENODEV; unmapping the revoked
    area unmaps no domain."""
    w, ioas, iopt, dfd, iova = _setup()
    _revoke(w, dfd, True)
    hwpt = w.fd.hwpt_alloc(w.dev_id, ioas)
    assert set(_domain_maps(w, ioas, iova)) == {-1}
    expect_errno(w.fd, U.IOMMU_IOAS_MAP_FILE, _map_file_cmd(ioas, dfd), errno.ENODEV)
    assert w.fd.ioas_unmap(ioas, iova, N * PAGE) == N * PAGE
    assert iopt.warnings == [] and not iopt.area_objects()
    w.fd.destroy(hwpt)


def test_un_revoking_invalidates_too() -> None:
    """DMABUF_REVOKE with revoked=false lets new maps in, and its invalidation revokes the
    areas mapped before (iopt_revoke_notify() does not ask why), as in 7.2."""
    w, ioas, _, dfd, iova = _setup()
    _revoke(w, dfd, True)
    _revoke(w, dfd, False)
    iova2 = w.fd.ioas_map_file(ioas, dfd, 0, N * PAGE, iova=MOCK_APERTURE + N * PAGE)
    assert -1 not in _domain_maps(w, ioas, iova2) and set(_domain_maps(w, ioas, iova)) == {-1}
    _revoke(w, dfd, False)
    assert set(_domain_maps(w, ioas, iova2)) == {-1}
    # the selftest's ending: restore the first IOVA with a live map
    w.fd.ioas_unmap(ioas, iova, N * PAGE)
    _revoke(w, dfd, False)
    w.fd.ioas_map_file(ioas, dfd, 0, N * PAGE, iova=iova)
    assert -1 not in _domain_maps(w, ioas, iova)


def test_copies_are_revoked_with_their_source() -> None:
    """An IOAS_COPY shares the dma-buf's pages: a revocation zaps both IOASes' domains."""
    w, ioas, _, dfd, iova = _setup()
    ioas2 = w.fd.ioas_alloc()
    dev2 = w.fd.bind(w.machine.add_pci_device(iommu=0))
    w.fd.attach(dev2, ioas2)
    w.fd.ioas_copy(ioas2, ioas, iova, N * PAGE, dst_iova=iova)
    assert -1 not in _domain_maps(w, ioas2, iova)
    _revoke(w, dfd, True)
    assert set(_domain_maps(w, ioas, iova) + _domain_maps(w, ioas2, iova)) == {-1}
    w.fd.ioas_unmap_all(ioas2)
    w.fd.ioas_unmap_all(ioas)


def test_what_dma_buf_areas_refuse() -> None:
    """In-kernel accesses: EINVAL; a split: EOPNOTSUPP; CHANGE_PROCESS: EINVAL (not a
    memfd); each leaves everything as it was."""
    w, _, iopt, _, iova = _setup()
    before = snapshot(w.fd)
    assert_errno(errno.EINVAL, lambda: iopt.access_pin(iova, PAGE, False))
    assert_errno(errno.EOPNOTSUPP, lambda: iopt.cut_iova([iova + PAGE - 1]))
    assert_errno(errno.EINVAL, lambda: change_process([iopt], w.proc))
    assert snapshot(w.fd) == before


def test_fail_nth_over_a_dma_buf_map_and_attach() -> None:
    """Every fault-injection site of a dma-buf map into an IOAS with two domains, and of a
    domain attach over a dma-buf area, fails cleanly."""
    w, ioas, _, dfd, _ = _setup()
    w.fd.hwpt_alloc(w.dev_id, ioas)
    cmd = _map_file_cmd(ioas, dfd, MOCK_APERTURE + 16 * PAGE)
    sites: set[str] = set()
    n = 1
    while True:
        before = snapshot(w.fd)
        with fail_nth(n) as fp:
            try:
                w.fd.ioctl(U.IOMMU_IOAS_MAP_FILE, bytearray(cmd))
            except OSError as e:
                assert e.errno == fp.fired_errno
        if not fp.fired:
            break
        assert snapshot(w.fd) == before, fp.fired_site
        sites.add(str(fp.fired_site))
        n += 1
    assert "pages.dmabuf_track" in sites
    n = 1
    while True:
        before = snapshot(w.fd)
        # (a failed lookup of pt_id is EINVAL there, as in 7.2, not the site's errno)
        with fail_nth(n) as fp, contextlib.suppress(OSError):
            hwpt = w.fd.hwpt_alloc(w.dev_id, ioas)
        if not fp.fired:
            break
        assert snapshot(w.fd) == before, fp.fired_site
        n += 1
    assert -1 not in _domain_maps(w, ioas, MOCK_APERTURE + 16 * PAGE)
    w.fd.destroy(hwpt)
