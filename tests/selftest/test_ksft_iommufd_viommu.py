"""Port of the ``iommufd_viommu`` and ``iommufd_device_pasid`` fixture tests of iommufd.c.

``iommufd_viommu`` variants: no_viommu (a bare IOAS) and mock_viommu (a mock device, a
nest-parent HWPT, a selftest vIOMMU over it and a nested HWPT on that vIOMMU). Where the
kernel test SKIPs the no_viommu variant, the port runs the fixture alone for that variant.
``iommufd_device_pasid`` variants: no_pasid (plus a second device without PASID support)
and has_pasid.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from kutil import MOCK_APERTURE_START, PAGE_SIZE, U64_MAX, Kfd, pack, teardown_iommufd

from iommufd_model.mock import selftest as T
from iommufd_model.uapi import iommufd as U

SEL = T.IOMMU_HWPT_DATA_SELFTEST
NEST_PARENT = U.IOMMU_HWPT_ALLOC_NEST_PARENT
FAULT_VALID = U.IOMMU_HWPT_FAULT_ID_VALID
DATA = pack("II", T.IOMMU_TEST_IOTLB_DEFAULT, 0)  # struct iommu_hwpt_selftest


@attrs.define
class ViommuFixture:
    """FIXTURE(iommufd_viommu)."""

    k: Kfd
    ioas_id: int
    stdev_id: int = 0
    hwpt_id: int = 0
    nested_hwpt_id: int = 0
    device_id: int = 0
    viommu_id: int = 0


@pytest.fixture(params=[0, 1], ids=["no_viommu", "mock_viommu"])
def iommufd_viommu(request: pytest.FixtureRequest, machine: Any) -> Iterator[ViommuFixture]:
    k = Kfd(machine)
    t = ViommuFixture(k, k.ioas_alloc())
    assert k.set_memory_limit(T.DEFAULT_MEMORY_LIMIT) == 0
    if request.param:
        t.stdev_id, _, t.device_id = k.mock_domain_ok(t.ioas_id)
        t.hwpt_id = k.hwpt_alloc_ok(t.device_id, t.ioas_id, NEST_PARENT)
        rc, t.viommu_id, _ = k.viommu_alloc(t.device_id, t.hwpt_id, T.IOMMU_VIOMMU_TYPE_SELFTEST)
        assert rc == 0
        t.nested_hwpt_id = k.hwpt_alloc_ok(t.device_id, t.viommu_id, 0, SEL, DATA)
    yield t
    teardown_iommufd(k)


def test_iommufd_viommu__viommu_auto_destroy(iommufd_viommu: ViommuFixture) -> None:
    # Closing the fd destroys the vIOMMU, its nested HWPT and the parent in order.
    assert iommufd_viommu.ioas_id in iommufd_viommu.k.ictx.objects.ids()


def test_iommufd_viommu__viommu_negative_tests(iommufd_viommu: ViommuFixture) -> None:
    t, k = iommufd_viommu, iommufd_viommu.k
    sel = T.IOMMU_VIOMMU_TYPE_SELFTEST
    if not t.device_id:
        assert k.viommu_alloc(t.device_id, t.hwpt_id, sel)[0] == errno.ENOENT
        return
    # invalid hwpt (0); a HWPT that is not a nest parent; an unsupported type
    assert k.viommu_alloc(t.device_id, 0, sel)[0] == errno.ENOENT
    hwpt = k.hwpt_alloc_ok(t.device_id, t.ioas_id, 0)
    assert k.viommu_alloc(t.device_id, hwpt, sel)[0] == errno.EINVAL
    assert k.destroy(hwpt) == 0
    assert k.viommu_alloc(t.device_id, t.hwpt_id, 0xDEAD)[0] == errno.EOPNOTSUPP
    assert k.destroy(t.hwpt_id) == errno.EBUSY
    assert k.destroy(t.viommu_id) == errno.EBUSY


def test_iommufd_viommu__viommu_alloc_nested_iopf(iommufd_viommu: ViommuFixture) -> None:
    t, k = iommufd_viommu, iommufd_viommu.k
    if not t.device_id:
        return  # the kernel SKIPs the no_viommu variant
    dev, viommu = t.device_id, t.viommu_id
    fault_id, fault_fd = k.fault_alloc()
    rc, _ = k.hwpt_alloc(dev, viommu, FAULT_VALID, SEL, DATA, fault_id=0xFFFF_FFFF)
    assert rc == errno.ENOENT
    rc, _ = k.hwpt_alloc(dev, viommu, FAULT_VALID | (1 << 31), SEL, DATA, fault_id=fault_id)
    assert rc == errno.EOPNOTSUPP
    iopf_hwpt = k.hwpt_alloc_ok(dev, viommu, FAULT_VALID, SEL, DATA, fault_id=fault_id)
    # A vDEVICE must exist before the device attaches to a nested HWPT of the vIOMMU
    assert k.mock_domain_replace(t.stdev_id, iopf_hwpt) == errno.ENOENT
    assert k.vdevice_alloc(viommu, dev, 0x99)[0] == 0
    assert k.mock_domain_replace(t.stdev_id, iopf_hwpt) == 0
    assert k.destroy(iopf_hwpt) == errno.EBUSY
    assert k.trigger_iopf(dev, 0x1, fault_fd) == 0
    assert k.mock_domain_replace(t.stdev_id, t.ioas_id) == 0
    assert k.destroy(iopf_hwpt) == 0
    k.proc.close(fault_fd)
    assert k.destroy(fault_id) == 0


def test_iommufd_viommu__viommu_alloc_with_data(iommufd_viommu: ViommuFixture) -> None:
    t, k = iommufd_viommu, iommufd_viommu.k
    if not t.device_id:
        return  # the kernel SKIPs the no_viommu variant
    # struct iommu_viommu_selftest { in_data, out_data, out_mmap_offset, out_mmap_length }
    rc, t.viommu_id, out = k.viommu_alloc(
        t.device_id, t.hwpt_id, T.IOMMU_VIOMMU_TYPE_SELFTEST, pack("IIQQ", 0xBEEF, 0, 0, 0)
    )
    assert rc == 0
    in_data, out_data, mmap_offset, mmap_length = struct.unpack("<IIQQ", out)
    assert out_data == in_data == 0xBEEF
    # Negative mmap tests: neither the offset nor the length can change
    assert k.mmap(mmap_length, mmap_offset + PAGE_SIZE)[0] == errno.ENXIO
    assert k.mmap(mmap_length, mmap_offset + PAGE_SIZE * 2)[0] == errno.ENXIO
    assert k.mmap(mmap_length // 2, mmap_offset)[0] == errno.ENXIO
    assert k.mmap(mmap_length * 2, mmap_offset)[0] == errno.ENXIO
    # A correct mmap for the loopback test
    rc, test = k.mmap(mmap_length, mmap_offset)
    assert rc == 0
    assert struct.unpack("<I", test.read(0, 4))[0] == in_data
    # The owner of the mmap region is blocked while mapped
    assert k.destroy(t.viommu_id) == errno.EBUSY
    test.close()


def test_iommufd_viommu__vdevice_alloc(iommufd_viommu: ViommuFixture) -> None:
    t, k = iommufd_viommu, iommufd_viommu.k
    dev, viommu = t.device_id, t.viommu_id
    if not dev:
        assert k.vdevice_alloc(viommu, dev, 0x99)[0] == errno.ENOENT
        return
    prev_seq = [-1]
    # A vDEVICE must exist before the device attaches to a nested HWPT of the vIOMMU
    assert k.mock_domain_replace(t.stdev_id, t.nested_hwpt_id) == errno.ENOENT
    # A vEVENTQ of depth 2; one per type
    rc, veventq_id, veventq_fd = k.veventq_alloc(viommu, T.IOMMU_VEVENTQ_TYPE_SELFTEST)
    assert rc == 0
    assert k.veventq_alloc(viommu, T.IOMMU_VEVENTQ_TYPE_SELFTEST)[0] == errno.EEXIST
    # virt_id 0x99, one event, then unset it
    rc, vdev_id = k.vdevice_alloc(viommu, dev, 0x99)
    assert rc == 0
    assert k.mock_domain_replace(t.stdev_id, t.nested_hwpt_id) == 0
    assert k.trigger_vevents(dev, 1) == 0
    assert k.read_vevents(veventq_fd, 1, 0x99, prev_seq) == 0
    assert k.vdevice_alloc(viommu, dev, 0x99)[0] == errno.EEXIST
    assert k.mock_domain_replace(t.stdev_id, t.ioas_id) == 0
    assert k.destroy(vdev_id) == 0
    # Again with 0x88; three events overflow the depth-2 queue
    rc, vdev_id = k.vdevice_alloc(viommu, dev, 0x88)
    assert rc == 0
    assert k.mock_domain_replace(t.stdev_id, t.nested_hwpt_id) == 0
    assert k.trigger_vevents(dev, 3) == 0
    assert k.read_vevents(veventq_fd, 3, 0x88, prev_seq) == errno.EOVERFLOW
    # The overflow is gone after that read
    assert k.trigger_vevents(dev, 1) == 0
    assert k.read_vevents(veventq_fd, 1, 0x88, prev_seq) == 0
    k.proc.close(veventq_fd)
    assert k.mock_domain_replace(t.stdev_id, t.ioas_id) == 0
    assert k.destroy(vdev_id) == 0
    assert k.destroy(veventq_id) == 0


def test_iommufd_viommu__vdevice_cache(iommufd_viommu: ViommuFixture) -> None:
    t, k = iommufd_viommu, iommufd_viommu.k
    dev, viommu = t.device_id, t.viommu_id
    if not dev:
        return  # the kernel SKIPs the no_viommu variant
    sel = T.IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST
    rc, vdev_id = k.vdevice_alloc(viommu, dev, 0x99)
    assert rc == 0
    dflt = T.IOMMU_TEST_DEV_CACHE_DEFAULT
    k.check_dev_cache_all(dev, dflt)

    def inv(
        reqs: bytes | bytearray | None, num: int, *, dtype: int = sel, entry_len: int = 12
    ) -> tuple[int, int]:
        return k.hwpt_invalidate(viommu, reqs, dtype, entry_len, num)

    def req(flags: int, vdev: int, cache_id: int) -> bytearray:
        return pack("III", flags, vdev, cache_id)  # struct iommu_viommu_invalidate_selftest

    zero = bytes(24)
    assert inv(zero, 0) == (0, 0)  # type probe with an empty array
    assert inv(zero, 1, dtype=T.IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST_INVALID) == (errno.EINVAL, 0)
    # structure size sanity
    assert inv(zero, 1, entry_len=13) == (errno.EINVAL, 0)
    assert inv(zero, 1, entry_len=1) == (errno.EINVAL, 0)
    # invalid flags; NULL data_uptr; zero entry_len
    assert inv(req(0xFFFF_FFFF, 0x99, 0), 1) == (errno.EOPNOTSUPP, 0)
    assert inv(None, 1) == (errno.EINVAL, 0)
    assert inv(req(0, 0x99, 0), 1, entry_len=0) == (errno.EINVAL, 0)
    # invalid cache_id; invalid vdev_id
    too_big = T.MOCK_DEV_CACHE_ID_MAX + 1
    assert inv(req(0, 0x99, too_big), 1) == (errno.EINVAL, 0)
    assert inv(req(0, 0x9, 0), 1) == (errno.EINVAL, 0)

    def check(expected: list[int]) -> None:
        for i, value in enumerate(expected):
            assert k.check_dev_cache(dev, i, value) == 0, (i, value)

    # the 1st entry is handled, the 2nd fails on its flags, then on its cache_id
    assert inv(req(0, 0x99, 0) + req(0xFFFF_FFFF, 0x99, 1), 2) == (errno.EOPNOTSUPP, 1)
    check([0, dflt, dflt, dflt])
    assert inv(req(0, 0x99, 0) + req(0, 0x99, too_big), 2) == (errno.EINVAL, 1)
    check([0, dflt, dflt, dflt])
    # the 2nd entry; the 3rd and 4th; then all of them
    assert inv(req(0, 0x99, 1), 1) == (0, 1)
    check([0, 0, dflt, dflt])
    assert inv(req(0, 0x99, 2) + req(0, 0x99, 3), 2) == (0, 2)
    k.check_dev_cache_all(dev, 0)
    assert inv(req(T.IOMMU_TEST_INVALIDATE_FLAG_ALL, 0x99, 0), 1) == (0, 1)
    k.check_dev_cache_all(dev, 0)
    assert k.destroy(vdev_id) == 0


def test_iommufd_viommu__hw_queue(iommufd_viommu: ViommuFixture) -> None:
    t, k = iommufd_viommu, iommufd_viommu.k
    viommu = t.viommu_id
    if not viommu:
        return  # the kernel SKIPs the no_viommu variant
    sel = T.IOMMU_HW_QUEUE_TYPE_SELFTEST
    iova = MOCK_APERTURE_START
    # the DEFAULT type; zero length; an overflowing range; an IOVA that is not mapped
    rc = k.hw_queue_alloc(viommu, U.IOMMU_HW_QUEUE_TYPE_DEFAULT, 0, iova, PAGE_SIZE)[0]
    assert rc == errno.EOPNOTSUPP
    assert k.hw_queue_alloc(viommu, sel, 0, iova, 0)[0] == errno.EINVAL
    assert k.hw_queue_alloc(viommu, sel, 0, U64_MAX, PAGE_SIZE)[0] == errno.EOVERFLOW
    assert k.hw_queue_alloc(viommu, sel, 0, iova, PAGE_SIZE)[0] == errno.ENOENT
    iova = k.map_ok(t.ioas_id, k.buffer, PAGE_SIZE)
    iova2 = k.map_ok(t.ioas_id, k.buffer + PAGE_SIZE, PAGE_SIZE)
    # index 1 before index 0; index MAX
    assert k.hw_queue_alloc(viommu, sel, 1, iova, PAGE_SIZE)[0] == errno.EIO
    rc = k.hw_queue_alloc(viommu, sel, T.IOMMU_TEST_HW_QUEUE_MAX, iova, PAGE_SIZE)[0]
    assert rc == errno.EINVAL
    # index 0 owns its IOVA: a duplicate index fails, the page cannot be unmapped
    rc, q0 = k.hw_queue_alloc(viommu, sel, 0, iova, PAGE_SIZE)
    assert rc == 0
    assert k.hw_queue_alloc(viommu, sel, 0, iova, PAGE_SIZE)[0] == errno.EEXIST
    assert k.unmap(t.ioas_id, iova, PAGE_SIZE)[0] == errno.EBUSY
    k.unmap_ok(t.ioas_id, iova2, PAGE_SIZE)  # the second page is not pinned
    # index 1, unaligned, depends on index 0
    rc, q1 = k.hw_queue_alloc(viommu, sel, 1, iova + PAGE_SIZE // 2, PAGE_SIZE // 2)
    assert rc == 0
    assert k.destroy(q0) == errno.EBUSY
    assert k.destroy(q1) == 0
    assert k.destroy(q0) == 0
    k.unmap_ok(t.ioas_id, iova, PAGE_SIZE)


def test_iommufd_viommu__vdevice_tombstone(iommufd_viommu: ViommuFixture) -> None:
    t, k = iommufd_viommu, iommufd_viommu.k
    if not t.device_id:
        return  # the kernel SKIPs the no_viommu variant
    rc, vdev_id = k.vdevice_alloc(t.viommu_id, t.device_id, 0x99)
    assert rc == 0
    assert k.destroy(t.stdev_id) == 0
    assert k.destroy(vdev_id) == errno.ENOENT


# -- FIXTURE(iommufd_device_pasid) ------------------------------------------------------
@attrs.define
class DevicePasidFixture:
    k: Kfd
    pasid_capable: bool
    ioas_id: int
    stdev_id: int = 0
    hwpt_id: int = 0
    device_id: int = 0
    no_pasid_stdev_id: int = 0
    no_pasid_device_id: int = 0


@pytest.fixture(params=[False, True], ids=["no_pasid", "has_pasid"])
def iommufd_device_pasid(
    request: pytest.FixtureRequest, machine: Any
) -> Iterator[DevicePasidFixture]:
    k = Kfd(machine)
    t = DevicePasidFixture(k, request.param, k.ioas_alloc())
    t.stdev_id, t.hwpt_id, t.device_id = k.mock_domain_ok(t.ioas_id, T.MOCK_FLAGS_DEVICE_PASID)
    if not t.pasid_capable:
        t.no_pasid_stdev_id, _, t.no_pasid_device_id = k.mock_domain_ok(t.ioas_id, 0)
    yield t
    teardown_iommufd(k)


def test_iommufd_device_pasid__pasid_attach(iommufd_device_pasid: DevicePasidFixture) -> None:
    t, k = iommufd_device_pasid, iommufd_device_pasid.k
    dev, st = t.device_id, t.stdev_id
    alloc_pasid = U.IOMMU_HWPT_ALLOC_PASID
    pasid = 100
    # Detaching a PASID that was never attached is not an error
    assert k.pasid_detach(st, pasid) == 0
    # Two nested HWPTs sharing one parent; one with a fault queue; one on a vIOMMU
    parent = k.hwpt_alloc_ok(dev, t.ioas_id, NEST_PARENT)
    nested = [k.hwpt_alloc_ok(dev, parent, alloc_pasid, SEL, DATA) for _ in range(2)]
    fault_id, fault_fd = k.fault_alloc()
    iopf_hwpt = k.hwpt_alloc_ok(
        dev, parent, FAULT_VALID | alloc_pasid, SEL, DATA, fault_id=fault_id
    )
    rc, viommu, _ = k.viommu_alloc(dev, parent, T.IOMMU_VIOMMU_TYPE_SELFTEST)
    assert rc == 0
    nested.append(k.hwpt_alloc_ok(dev, viommu, alloc_pasid, SEL, DATA))
    s2 = k.hwpt_alloc_ok(dev, t.ioas_id, alloc_pasid)

    def check(p: int, hwpt: int) -> None:
        assert k.pasid_check_hwpt(st, p, hwpt) == 0, (p, hwpt)

    # RID on a non-PASID-compatible domain: PASID attach fails
    assert k.mock_domain_replace(st, parent) == 0
    assert k.pasid_attach(st, pasid, s2) == errno.EINVAL
    # RID on a PASID-compatible domain: PASID attach works, the RID cannot go back
    assert k.mock_domain_replace(st, s2) == 0
    assert k.pasid_attach(st, pasid, nested[0]) == 0
    assert k.mock_domain_replace(st, parent) == errno.EINVAL
    assert k.pasid_detach(st, pasid) == 0
    check(pasid, 0)
    if not t.pasid_capable:
        # A PASID-compatible domain serves a device without PASID; its PASIDs never attach
        assert k.mock_domain_replace(t.no_pasid_stdev_id, nested[0]) == 0
        assert k.mock_domain_replace(t.no_pasid_stdev_id, t.ioas_id) == 0
        assert k.pasid_attach(t.no_pasid_stdev_id, pasid, parent) == errno.EINVAL
        assert k.pasid_attach(t.no_pasid_stdev_id, pasid, s2) == errno.EINVAL
    # A non-PASID-compatible HWPT and an IOAS cannot go on a PASID
    assert k.pasid_attach(st, pasid, parent) == errno.EINVAL
    check(pasid, 0)
    assert k.pasid_attach(st, pasid, t.ioas_id) == errno.EINVAL
    check(pasid, 0)
    # s2 works; attach does not overwrite (EBUSY)
    assert k.pasid_attach(st, pasid, s2) == 0
    check(pasid, s2)
    assert k.pasid_attach(st, pasid, nested[0]) == errno.EBUSY
    assert k.pasid_detach(st, pasid) == 0
    check(pasid, 0)
    assert k.pasid_attach(st, pasid, nested[0]) == 0
    check(pasid, nested[0])
    assert k.pasid_attach(st, pasid, nested[0]) == errno.EBUSY
    assert k.pasid_detach(st, pasid) == 0
    # Replace
    pasid = 200
    assert k.pasid_replace(st, pasid, s2) == errno.EINVAL  # nothing to replace
    assert k.pasid_attach(st, pasid, s2) == 0
    check(pasid, s2)
    assert k.pasid_replace(st, pasid, t.ioas_id) == errno.EINVAL
    check(pasid, s2)
    assert k.pasid_replace(st, pasid, nested[0]) == 0
    check(pasid, nested[0])
    assert k.pasid_replace(st, pasid, nested[1]) == 0
    check(pasid, nested[1])
    assert k.pasid_detach(st, pasid) == 0
    # PASID 1024: the mock fails the second attach, the old domain stays
    pasid = T.IOMMU_TEST_PASID_RESERVED
    assert k.pasid_attach(st, pasid, s2) == 0
    check(pasid, s2)
    assert k.pasid_replace(st, pasid, nested[0]) == errno.ENOMEM
    check(pasid, s2)
    assert k.pasid_detach(st, pasid) == 0
    # An IOPF-capable HWPT on PASID 2048 gets the PASID's faults
    pasid = 2048
    assert k.pasid_attach(st, pasid, iopf_hwpt) == 0
    check(pasid, iopf_hwpt)
    assert k.trigger_iopf(dev, pasid, fault_fd) == 0
    assert k.pasid_replace(st, pasid, s2) == 0
    check(pasid, s2)
    assert k.pasid_detach(st, pasid) == 0
    assert k.destroy(iopf_hwpt) == 0
    k.proc.close(fault_fd)
    assert k.destroy(fault_id) == 0
    assert k.mock_domain_replace(st, t.ioas_id) == 0
