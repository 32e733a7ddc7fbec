"""Object lifetimes through the uAPI: ids, automatic domains, replace, DMA visibility, pins."""

from __future__ import annotations

import errno
from collections import Counter

import pytest

import iommufd_model as im
from helpers import (
    MOCK_APERTURE,
    PAGE,
    U64_MAX,
    World,
    check_invariants,
    destroy,
    expect_errno,
    hwpt_alloc,
    ioas_alloc,
    ioas_copy,
    ioas_map,
    ioas_unmap,
    ioctl,
    mock_domain,
    snapshot,
)
from iommufd_model import uapi as U
from iommufd_model.mock.hw import MockIommu
from iommufd_model.testing import assert_errno


def _pte_refs(w: World) -> Counter[int]:
    refs: Counter[int] = Counter()
    for proc in w.machine.processes:
        for pfn in proc._ptes.values():
            refs[pfn] += 1
    return refs


def test_ids_are_lowest_free_from_one() -> None:
    w = World()
    assert w.dev_id == 1
    ids = [ioas_alloc(w.fd) for _ in range(4)]
    assert ids == [2, 3, 4, 5]
    destroy(w.fd, 3)
    assert ioas_alloc(w.fd) == 3
    destroy(w.fd, 5)
    destroy(w.fd, 2)
    assert [ioas_alloc(w.fd) for _ in range(3)] == [2, 5, 6]
    check_invariants(w.fd)


def test_destroyed_id_is_gone_for_every_command() -> None:
    w = World()
    ioas = ioas_alloc(w.fd)
    destroy(w.fd, ioas)
    expect_errno(w.fd, U.IOMMU_DESTROY, U.IommuDestroy(size=8, id=ioas), errno.ENOENT)
    st = U.IommuIoasMap(size=40, flags=6, ioas_id=ioas, user_va=w.va, length=PAGE)
    expect_errno(w.fd, U.IOMMU_IOAS_MAP, st, errno.ENOENT)


def test_auto_domain_is_shared_and_dies_with_its_last_device() -> None:
    w = World()
    dev2 = w.machine.add_pci_device(iommu=0)
    dev2_id = w.fd.bind(dev2)
    ioas = ioas_alloc(w.fd)
    h1 = w.fd.attach(w.dev_id, ioas)
    h2 = w.fd.attach(dev2_id, ioas)
    assert h1 == h2
    hwpt = w.fd.objects.get(h1)
    assert hwpt.TYPE.value == "hwpt_paging" and hwpt.users == 3
    # An auto domain cannot be destroyed by the user while attached.
    expect_errno(w.fd, U.IOMMU_DESTROY, U.IommuDestroy(size=8, id=h1), errno.EBUSY)
    w.fd.detach(w.dev_id)
    assert h1 in w.fd.objects.ids()
    w.fd.detach(dev2_id)
    assert h1 not in w.fd.objects.ids()
    assert w.fd.objects.get(ioas).users == 1
    check_invariants(w.fd)
    destroy(w.fd, ioas)


def test_manual_hwpt_survives_detach() -> None:
    w = World()
    ioas = ioas_alloc(w.fd)
    hwpt = hwpt_alloc(w.fd, w.dev_id, ioas)
    assert w.fd.attach(w.dev_id, hwpt) == hwpt
    # Attaching to the IOAS prefers an auto domain, never a user's HWPT.
    w.fd.detach(w.dev_id)
    assert hwpt in w.fd.objects.ids()
    assert w.fd.objects.get(hwpt).users == 1
    destroy(w.fd, hwpt)
    destroy(w.fd, ioas)
    assert w.fd.objects.ids() == [w.dev_id]
    check_invariants(w.fd)


def test_dma_sees_map_unmap_and_copy() -> None:
    w = World()
    ioas = ioas_alloc(w.fd)
    w.fd.attach(w.dev_id, ioas)
    iova = ioas_map(w.fd, ioas, w.va, 4 * PAGE)
    assert iova >= MOCK_APERTURE
    w.proc.write(w.va + 100, b"from the cpu")
    assert w.dev.dma_read(iova + 100, 12) == b"from the cpu"
    w.dev.dma_write(iova + PAGE + 7, b"from the device")
    assert w.proc.read(w.va + PAGE + 7, 15) == b"from the device"
    # Copy into a second IOAS; a second device sees the same memory there.
    ioas2 = ioas_alloc(w.fd)
    dev2 = w.machine.add_pci_device(iommu=0)
    dev2_id = w.fd.bind(dev2)
    w.fd.attach(dev2_id, ioas2)
    iova2 = ioas_copy(w.fd, ioas2, ioas, iova, 4 * PAGE, dst_iova=MOCK_APERTURE + (1 << 20))
    assert iova2 == MOCK_APERTURE + (1 << 20)
    assert dev2.dma_read(iova2 + PAGE + 7, 15) == b"from the device"
    dev2.dma_write(iova2 + 3 * PAGE, b"xyz")
    assert w.dev.dma_read(iova + 3 * PAGE, 3) == b"xyz"
    check_invariants(w.fd)
    # Unmap in the source: the device faults there, the copy still works.
    assert ioas_unmap(w.fd, ioas, iova, 4 * PAGE) == 4 * PAGE
    with pytest.raises(im.DmaFault):
        w.dev.dma_read(iova, 1)
    assert dev2.dma_read(iova2 + 100, 12) == b"from the cpu"
    check_invariants(w.fd)


def test_readonly_mapping_blocks_dma_writes() -> None:
    w = World()
    ioas = ioas_alloc(w.fd)
    w.fd.attach(w.dev_id, ioas)
    iova = ioas_map(w.fd, ioas, w.va, PAGE, flags=U.IOMMU_IOAS_MAP_READABLE)
    assert w.dev.dma_read(iova, 4) == bytes(4)
    with pytest.raises(im.DmaFault):
        w.dev.dma_write(iova, b"no")
    assert w.proc.read(w.va, 2) == bytes(2)


def test_map_before_attach_is_filled_into_the_new_domain() -> None:
    w = World()
    ioas = ioas_alloc(w.fd)
    w.proc.write(w.va, b"early")
    iova = ioas_map(w.fd, ioas, w.va, 2 * PAGE, iova=MOCK_APERTURE)
    with pytest.raises(im.DmaFault):
        w.dev.dma_read(iova, 5)  # not attached: blocked
    hwpt = w.fd.attach(w.dev_id, ioas)
    assert w.dev.dma_read(iova, 5) == b"early"
    domain = mock_domain(w.fd, hwpt)
    assert len(domain.entries) == 2 * PAGE // 2048  # mock IO pages are 2 KiB
    check_invariants(w.fd)


def test_replace_switches_dma_and_frees_the_old_auto_domain() -> None:
    w = World()
    a, b = ioas_alloc(w.fd), ioas_alloc(w.fd)
    va_b = w.proc.mmap(PAGE)
    w.proc.write(w.va, b"AAAA")
    w.proc.write(va_b, b"BBBB")
    ioas_map(w.fd, a, w.va, PAGE, iova=MOCK_APERTURE)
    ioas_map(w.fd, b, va_b, PAGE, iova=MOCK_APERTURE)
    old = w.fd.attach(w.dev_id, a)
    assert w.dev.dma_read(MOCK_APERTURE, 4) == b"AAAA"
    new = w.fd.attach(w.dev_id, b)
    assert new != old
    assert old not in w.fd.objects.ids()
    assert w.dev.dma_read(MOCK_APERTURE, 4) == b"BBBB"
    assert w.fd.objects.get(a).users == 1
    check_invariants(w.fd)
    # Replacing to the same target is a no-op.
    before = snapshot(w.fd)
    assert w.fd.attach(w.dev_id, b) == new
    assert snapshot(w.fd) == before


def test_pins_are_released_by_unmap_detach_and_close() -> None:
    w = World()
    ioas = ioas_alloc(w.fd)
    w.fd.attach(w.dev_id, ioas)
    ioas_map(w.fd, ioas, w.va, 16 * PAGE)
    ioas_map(w.fd, ioas, w.va + 4 * PAGE, 4 * PAGE)  # the same pages twice
    # Each mapping pins (and accounts) its own pages, as two iopt_pages do in the kernel.
    assert w.proc.locked_pages == 20
    mem = w.machine.memory
    extra = Counter({p: n - _pte_refs(w)[p] for p, n in mem._refs.items()})
    assert sorted(Counter(extra.values()).items()) == [(1, 12), (2, 4)]
    check_invariants(w.fd)
    assert ioas_unmap(w.fd, ioas, 0, U64_MAX) == 20 * PAGE
    assert dict(mem._refs) == dict(_pte_refs(w))
    assert w.proc.locked_pages == 0
    w.fd.detach(w.dev_id)
    w.fd.close()
    assert dict(mem._refs) == dict(_pte_refs(w))


def test_close_destroys_everything() -> None:
    w = World()
    ioas = ioas_alloc(w.fd)
    ioas2 = ioas_alloc(w.fd)
    w.fd.attach(w.dev_id, ioas)
    hwpt_alloc(w.fd, w.dev_id, ioas, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    ioas_map(w.fd, ioas, w.va, 8 * PAGE)
    ioas_copy(w.fd, ioas2, ioas, MOCK_APERTURE, 8 * PAGE)
    fault = ioctl(w.fd, U.IOMMU_FAULT_QUEUE_ALLOC, U.IommuFaultAlloc())
    ioctl(w.fd, U.IOMMU_VFIO_IOAS, U.IommuVfioIoas(ioas_id=ioas2, op=U.IOMMU_VFIO_IOAS_SET))
    assert w.proc.locked_pages == 8
    w.proc.close(fault.out_fault_fd)
    w.fd.close()
    assert w.fd.closed
    assert list(w.fd.objects) == []
    assert w.dev.bound_to is None
    assert isinstance(w.dev.iommu, MockIommu)
    assert w.dev.iommu.context[w.dev.rid] is None
    assert w.proc.locked_pages == 0
    assert dict(w.machine.memory._refs) == dict(_pte_refs(w))
    with pytest.raises(im.DmaFault):
        w.dev.dma_read(MOCK_APERTURE, 1)
    # The device can be bound again by a new iommufd.
    fd2 = w.proc.open_iommufd()
    assert fd2.bind(w.dev) == 1


def test_unbind_detaches_and_drops_the_auto_domain() -> None:
    w = World()
    ioas = ioas_alloc(w.fd)
    hwpt = w.fd.attach(w.dev_id, ioas)
    w.fd.unbind(w.dev_id)
    assert w.fd.objects.ids() == [ioas]
    assert hwpt not in w.fd.objects.ids()
    assert w.dev.bound_to is None
    check_invariants(w.fd)


def test_bind_twice_is_ebusy() -> None:
    w = World()
    other = w.proc.open_iommufd()
    assert_errno(errno.EBUSY, lambda: other.bind(w.dev))
    assert list(other.objects) == []
