"""Port of tools/testing/selftests/iommu/iommufd_fail_nth.c, checked harder than the kernel.

The kernel test arms ``/proc/self/fail-nth`` over a whole sequence and only looks for
splats. Here every ioctl of every sequence is swept on its own (``failsweep.Runner``): for
n = 1, 2, ... until the ioctl succeeds, the n-th failpoint it reaches fails, and the ioctl
must fail with the injected errno (ENOENT for a lookup, EFAULT for a user copy) leaving the
complete model state -- objects, refcounts, pins, every domain entry and kernel-owned frame
byte, the IOMMU's caches -- exactly as before; then the sequence goes on with the real call.

Cases: ``test_fail_nth__<kernel TEST_FAIL name>`` for the kernel's, ``test_fail_nth_model__*``
for sequences the kernel file lacks (PASID, dirty tracking, VFIO attach), and
``test_fail_nth_uapi[<command>]`` sweeping every uAPI command with the valid arguments of
``helpers.valid_cmd``.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Any

import pytest
from failsweep import Runner, Unsupported

import iommufd_model as im
from helpers import PAGE, Scenario, valid_cmd
from iommufd_model.core.main import registered_ops
from iommufd_model.mock import selftest as T
from iommufd_model.uapi import iommufd as U
from iommufd_model.uapi.codec import UStruct

BUFFER_SIZE = 2 << 20  # iommufd_fail_nth.c: BUFFER_SIZE = 2 MiB
MOCK_APERTURE_START = 1 << 24
RW = U.IOMMU_IOAS_MAP_WRITEABLE | U.IOMMU_IOAS_MAP_READABLE
RANGE = U.IommuIovaRange.SIZE


class Fx:
    """``FIXTURE(basic_fail_nth)`` plus the file's globals: ``buffer`` and the memfd ``mfd``."""

    def __init__(self) -> None:
        self.machine = im.Machine.build(iommus=["mock"])
        self.proc = self.machine.new_process()
        self.buffer = self.proc.mmap(BUFFER_SIZE)
        self.mfd = self.proc.memfd_create(BUFFER_SIZE)
        self.scratch = self.proc.mmap(1 << 16)  # the tests' stack arrays (ranges, tmp ...)
        self.fd = self.proc.open_iommufd()

    def runner(self, case: str, err: int = errno.ENOMEM) -> Runner:
        return Runner(self.fd, case, errno=err)


def tcmd(op: int, id_: int, payload: UStruct | None = None) -> bytearray:
    data = payload.pack() if payload is not None else b""
    cmd = T.IommuTestCmd(
        size=T.IommuTestCmd.SIZE, op=op, id=id_, payload=data.ljust(T.UNION_SIZE, b"\0")
    )
    return bytearray(cmd.pack())


def reply(buf: bytearray, cls: Any) -> Any:
    return cls.of(T.IommuTestCmd.unpack(bytes(buf)))


# -- the kernel's helpers, each one swept ------------------------------------------------------
def ioas_alloc(r: Runner) -> int:
    return int(r.ioctl("ioas_alloc", U.IOMMU_IOAS_ALLOC, U.IommuIoasAlloc()).out_ioas_id)


def ioas_map(r: Runner, ioas: int, va: int, length: int, iova: int | None = None) -> int:
    flags = RW | (U.IOMMU_IOAS_MAP_FIXED_IOVA if iova is not None else 0)
    st = U.IommuIoasMap(flags=flags, ioas_id=ioas, user_va=va, length=length, iova=iova or 0)
    return int(r.ioctl("ioas_map", U.IOMMU_IOAS_MAP, st).iova)


def ioas_map_file(r: Runner, ioas: int, mfd: int, start: int, length: int) -> int:
    st = U.IommuIoasMapFile(flags=RW, ioas_id=ioas, fd=mfd, start=start, length=length)
    return int(r.ioctl("ioas_map_file", U.IOMMU_IOAS_MAP_FILE, st).iova)


def destroy(r: Runner, obj_id: int) -> None:
    r.ioctl("destroy", U.IOMMU_DESTROY, U.IommuDestroy(id=obj_id))


def set_temp_memory_limit(r: Runner, limit: int) -> None:
    buf = tcmd(T.IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT, 0, T.MemoryLimit(limit=limit))
    r.ioctl("set_temp_memory_limit", T.IOMMU_TEST_CMD, buf)


def mock_domain(r: Runner, ioas: int) -> tuple[int, int, int]:
    buf = r.ioctl("mock_domain", T.IOMMU_TEST_CMD, tcmd(T.IOMMU_TEST_OP_MOCK_DOMAIN, ioas))
    a = reply(buf, T.MockDomainArgs)
    return int(a.out_stdev_id), int(a.out_hwpt_id), int(a.out_idev_id)


def mock_domain_replace(r: Runner, stdev: int, pt_id: int) -> int:
    buf = tcmd(T.IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE, stdev, T.MockDomainReplace(pt_id=pt_id))
    return int(
        reply(r.ioctl("mock_domain_replace", T.IOMMU_TEST_CMD, buf), T.MockDomainReplace).pt_id
    )


def create_access(r: Runner, ioas: int, flags: int) -> int:
    buf = tcmd(T.IOMMU_TEST_OP_CREATE_ACCESS, ioas, T.CreateAccess(flags=flags))
    return int(reply(r.ioctl("create_access", T.IOMMU_TEST_CMD, buf), T.CreateAccess).out_access_fd)


def destroy_access(r: Runner, fx: Fx, access_fd: int) -> None:
    # _test_cmd_destroy_access(): close() of the access fd (cannot fail; swept all the same).
    r.call("destroy_access", lambda: fx.proc.close(access_fd))


def hwpt_alloc(
    r: Runner,
    dev: int,
    pt: int,
    flags: int = 0,
    *,
    fault: int = 0,
    data: tuple[int, int] = (0, 0),
    data_type: int = U.IOMMU_HWPT_DATA_NONE,
    optional: bool = False,
) -> int:
    st = U.IommuHwptAlloc(
        flags=flags,
        dev_id=dev,
        pt_id=pt,
        data_type=data_type,
        data_uptr=data[0],
        data_len=data[1],
        fault_id=fault,
    )
    return int(r.ioctl("hwpt_alloc", U.IOMMU_HWPT_ALLOC, st, optional=optional).out_hwpt_id)


# -- TEST_FAIL_NTH(basic_fail_nth, ...) ---------------------------------------------------------
def seq_basic(fx: Fx, r: Runner) -> None:
    """Cover ioas.c."""
    ioas = ioas_alloc(r)
    ranges = fx.scratch
    st = U.IommuIoasIovaRanges(ioas_id=ioas, num_iovas=10, allowed_iovas=ranges)
    r.ioctl("iova_ranges", U.IOMMU_IOAS_IOVA_RANGES, st)
    fx.proc.write(ranges, U.IommuIovaRange(16 * 1024, BUFFER_SIZE + 16 * 1024 * 600 - 1).pack())
    st2 = U.IommuIoasAllowIovas(ioas_id=ioas, num_iovas=1, allowed_iovas=ranges)
    r.ioctl("allow_iovas", U.IOMMU_IOAS_ALLOW_IOVAS, st2)
    iova = ioas_map(r, ioas, fx.buffer, BUFFER_SIZE)
    copy = U.IommuIoasCopy(
        flags=RW, dst_ioas_id=ioas, src_ioas_id=ioas, src_iova=iova, length=10 * RANGE
    )
    r.ioctl("ioas_copy", U.IOMMU_IOAS_COPY, copy)
    unmap = U.IommuIoasUnmap(ioas_id=ioas, iova=iova, length=BUFFER_SIZE)
    r.ioctl("ioas_unmap", U.IOMMU_IOAS_UNMAP, unmap)
    # Failure path of no IOVA to unmap
    r.ioctl("ioas_unmap (nothing mapped)", U.IOMMU_IOAS_UNMAP, unmap, expect=errno.ENOENT)


def seq_map_domain(fx: Fx, r: Runner) -> None:
    """iopt_area_fill_domains() and iopt_area_fill_domain()."""
    ioas = ioas_alloc(r)
    set_temp_memory_limit(r, 32)
    stdev, _, _ = mock_domain(r, ioas)
    ioas_map(r, ioas, fx.buffer, 262144)
    destroy(r, stdev)
    mock_domain(r, ioas)


def seq_map_file_domain(fx: Fx, r: Runner) -> None:
    ioas = ioas_alloc(r)
    set_temp_memory_limit(r, 32)
    stdev, _, _ = mock_domain(r, ioas)
    ioas_map_file(r, ioas, fx.mfd, 0, 262144)
    destroy(r, stdev)
    mock_domain(r, ioas)


def seq_map_two_domains(fx: Fx, r: Runner) -> None:
    ioas = ioas_alloc(r)
    set_temp_memory_limit(r, 32)
    stdev, _, _ = mock_domain(r, ioas)
    stdev2, _, _ = mock_domain(r, ioas)
    ioas_map(r, ioas, fx.buffer, 262144)
    destroy(r, stdev)
    destroy(r, stdev2)
    mock_domain(r, ioas)
    mock_domain(r, ioas)


def seq_access_rw(fx: Fx, r: Runner) -> None:
    ioas = ioas_alloc(r)
    set_temp_memory_limit(r, 32)
    iova = ioas_map(r, ioas, fx.buffer, 262144)
    access = create_access(r, ioas, 0)
    tmp = fx.scratch  # uint16_t tmp[32]
    for flags in (
        0,
        T.MOCK_ACCESS_RW_WRITE,
        T.MOCK_ACCESS_RW_SLOW_PATH,
        T.MOCK_ACCESS_RW_SLOW_PATH | T.MOCK_ACCESS_RW_WRITE,
    ):
        rw = T.AccessRw(iova=iova, length=64, uptr=tmp, flags=flags)
        r.ioctl(
            f"access_rw flags={flags}",
            T.IOMMU_TEST_CMD,
            tcmd(T.IOMMU_TEST_OP_ACCESS_RW, access, rw),
        )
    big = T.AccessRw(iova=iova, length=4096 * 8, uptr=tmp, flags=T.MOCK_ACCESS_RW_SLOW_PATH)
    r.ioctl("access_rw big", T.IOMMU_TEST_CMD, tcmd(T.IOMMU_TEST_OP_ACCESS_RW, access, big))
    destroy_access(r, fx, access)


def _access_pin(fx: Fx, r: Runner, ioas: int, iova: int) -> None:
    access = create_access(r, ioas, T.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)
    pages = T.AccessPages(iova=iova, length=BUFFER_SIZE, uptr=fx.buffer)
    buf = r.ioctl(
        "access_pages", T.IOMMU_TEST_CMD, tcmd(T.IOMMU_TEST_OP_ACCESS_PAGES, access, pages)
    )
    item = reply(buf, T.AccessPages).out_access_pages_id
    d = T.DestroyAccessPages(access_pages_id=item)
    r.ioctl(
        "destroy_access_pages",
        T.IOMMU_TEST_CMD,
        tcmd(T.IOMMU_TEST_OP_DESTROY_ACCESS_PAGES, access, d),
    )
    destroy_access(r, fx, access)


def seq_access_pin(fx: Fx, r: Runner) -> None:
    """pages.c access functions."""
    ioas = ioas_alloc(r)
    set_temp_memory_limit(r, 32)
    iova = ioas_map(r, ioas, fx.buffer, BUFFER_SIZE)
    _access_pin(fx, r, ioas, iova)


def seq_access_pin_domain(fx: Fx, r: Runner) -> None:
    """iopt_pages_fill_xarray()."""
    ioas = ioas_alloc(r)
    set_temp_memory_limit(r, 32)
    stdev, _, _ = mock_domain(r, ioas)
    iova = ioas_map(r, ioas, fx.buffer, BUFFER_SIZE)
    _access_pin(fx, r, ioas, iova)
    destroy(r, stdev)


def seq_device(fx: Fx, r: Runner) -> None:
    """device.c (+ viommu.c, eventq.c in newer kernels)."""
    ioas = ioas_alloc(r)
    ioas2 = ioas_alloc(r)
    iova = MOCK_APERTURE_START
    ioas_map(r, ioas, fx.buffer, PAGE, iova)
    ioas_map(r, ioas2, fx.buffer, PAGE, iova)
    stdev, _, idev = mock_domain(r, ioas)
    info = U.IommuHwInfo(dev_id=idev, data_len=8, data_uptr=fx.scratch)
    r.ioctl("get_hw_info", U.IOMMU_GET_HW_INFO, info)
    hwpt = hwpt_alloc(r, idev, ioas)
    mock_domain_replace(r, stdev, ioas2)
    mock_domain_replace(r, stdev, hwpt)
    parent = hwpt_alloc(r, idev, ioas, U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    # The tail needs the mock vIOMMU and nested domains; it stops where the mock refuses.
    v = U.IommuViommuAlloc(type=T.IOMMU_VIOMMU_TYPE_SELFTEST, dev_id=idev, hwpt_id=parent)
    viommu = r.ioctl("viommu_alloc", U.IOMMU_VIOMMU_ALLOC, v, optional=True).out_viommu_id
    vd = U.IommuVdeviceAlloc(viommu_id=viommu, dev_id=idev, virt_id=0)
    r.ioctl("vdevice_alloc", U.IOMMU_VDEVICE_ALLOC, vd, optional=True)
    q = U.IommuHwQueueAlloc(
        viommu_id=viommu,
        type=T.IOMMU_HW_QUEUE_TYPE_SELFTEST,
        index=0,
        nesting_parent_iova=iova,
        length=PAGE,
    )
    r.ioctl("hw_queue_alloc", U.IOMMU_HW_QUEUE_ALLOC, q, optional=True)
    f = r.ioctl("fault_alloc", U.IOMMU_FAULT_QUEUE_ALLOC, U.IommuFaultAlloc())
    r.call("close fault_fd", lambda: fx.proc.close(f.out_fault_fd))
    data = fx.scratch + PAGE
    fx.proc.write(data, T.IOMMU_TEST_IOTLB_DEFAULT.to_bytes(4, "little"))
    hwpt_alloc(
        r,
        idev,
        parent,
        U.IOMMU_HWPT_FAULT_ID_VALID,
        fault=f.out_fault_id,
        data=(data, 4),
        data_type=T.IOMMU_HWPT_DATA_SELFTEST,
        optional=True,
    )


KERNEL_CASES = {
    "basic": seq_basic,
    "map_domain": seq_map_domain,
    "map_file_domain": seq_map_file_domain,
    "map_two_domains": seq_map_two_domains,
    "access_rw": seq_access_rw,
    "access_pin": seq_access_pin,
    "access_pin_domain": seq_access_pin_domain,
    "device": seq_device,
}


def _run(name: str, seq: Any, err: int = errno.ENOMEM) -> Runner:
    fx = Fx()
    r = fx.runner(name, err)
    with contextlib.suppress(Unsupported):
        seq(fx, r)
    stats = r.done()
    assert stats.points > 0, f"{name}: no failure point was tried"
    assert not fx.fd.internal_errors
    fx.fd.close()
    assert not fx.proc.locked_pages
    return r


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_fail_nth(name: str) -> None:
    _run(name, KERNEL_CASES[name])


def test_fail_nth__basic_eagain() -> None:
    """The injected errno is what comes out (EAGAIN instead of ENOMEM)."""
    _run("basic[EAGAIN]", seq_basic, errno.EAGAIN)


# -- sequences the kernel file lacks ---------------------------------------------------------
def seq_pasid(fx: Fx, r: Runner) -> None:
    ioas = ioas_alloc(r)
    ioas_map(r, ioas, fx.buffer, 1 << 16, MOCK_APERTURE_START)
    buf = tcmd(
        T.IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS,
        ioas,
        T.MockDomainArgs(dev_flags=T.MOCK_FLAGS_DEVICE_PASID),
    )
    a = reply(r.ioctl("mock_domain_flags(PASID)", T.IOMMU_TEST_CMD, buf), T.MockDomainArgs)
    idev = int(a.out_idev_id)
    pasid_hwpt = hwpt_alloc(r, idev, ioas, U.IOMMU_HWPT_ALLOC_PASID)
    pasid_hwpt2 = hwpt_alloc(r, idev, ioas, U.IOMMU_HWPT_ALLOC_PASID)
    fd = fx.fd
    r.call("attach rid -> pasid hwpt", lambda: fd.attach(idev, pasid_hwpt))
    r.call("attach pasid 5", lambda: fd.attach(idev, pasid_hwpt, pasid=5))
    r.call("replace pasid 5", lambda: fd.attach(idev, pasid_hwpt2, pasid=5))
    # Automatic domains are not PASID-compatible: EINVAL after the domain was built.
    r.call(
        "attach pasid 6 to the IOAS", lambda: fd.attach(idev, ioas, pasid=6), expect=errno.EINVAL
    )
    r.call("detach pasid 5", lambda: fd.detach(idev, pasid=5))
    r.call("detach pasid 6", lambda: fd.detach(idev, pasid=6))


def seq_dirty(fx: Fx, r: Runner) -> None:
    ioas = ioas_alloc(r)
    _, _, idev = mock_domain(r, ioas)
    hwpt = hwpt_alloc(r, idev, ioas, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    iova = ioas_map(r, ioas, fx.buffer, 1 << 16, MOCK_APERTURE_START)
    st = U.IommuHwptSetDirtyTracking(flags=U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE, hwpt_id=hwpt)
    r.ioctl("set_dirty_tracking", U.IOMMU_HWPT_SET_DIRTY_TRACKING, st)
    bitmap = fx.scratch
    fx.proc.write(bitmap, b"\xff" * 4)
    d = T.Dirty(iova=iova, length=32 * 2048, page_size=2048, uptr=bitmap)
    r.ioctl("test dirty", T.IOMMU_TEST_CMD, tcmd(T.IOMMU_TEST_OP_DIRTY, hwpt, d))
    get = U.IommuHwptGetDirtyBitmap(
        hwpt_id=hwpt, iova=iova, length=1 << 16, page_size=PAGE, data=fx.scratch + PAGE
    )
    r.ioctl("get_dirty_bitmap", U.IOMMU_HWPT_GET_DIRTY_BITMAP, get)
    off = U.IommuHwptSetDirtyTracking(flags=0, hwpt_id=hwpt)
    r.ioctl("set_dirty_tracking off", U.IOMMU_HWPT_SET_DIRTY_TRACKING, off)


def seq_vfio_attach(fx: Fx, r: Runner) -> None:
    ioas = ioas_alloc(r)
    ioas2 = ioas_alloc(r)
    ioas_map(r, ioas, fx.buffer, 1 << 16, MOCK_APERTURE_START)
    ioas_map(r, ioas2, fx.buffer, 1 << 16, MOCK_APERTURE_START)
    dev = fx.machine.add_pci_device(iommu=0)
    fd = fx.fd
    dev_id = r.call("bind", lambda: fd.bind(dev))
    r.call("attach ioas", lambda: fd.attach(dev_id, ioas))
    r.call("replace ioas2", lambda: fd.attach(dev_id, ioas2))
    hwpt = hwpt_alloc(r, dev_id, ioas)
    r.call("replace hwpt", lambda: fd.attach(dev_id, hwpt))
    r.call("detach", lambda: fd.detach(dev_id))
    r.call("unbind", lambda: fd.unbind(dev_id))


def seq_nested(fx: Fx, r: Runner) -> None:
    ioas = ioas_alloc(r)
    ioas_map(r, ioas, fx.buffer, 1 << 16, MOCK_APERTURE_START)
    _, _, idev = mock_domain(r, ioas)
    parent = hwpt_alloc(r, idev, ioas, U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    v = U.IommuViommuAlloc(type=T.IOMMU_VIOMMU_TYPE_SELFTEST, dev_id=idev, hwpt_id=parent)
    viommu = r.ioctl("viommu_alloc", U.IOMMU_VIOMMU_ALLOC, v, optional=True).out_viommu_id
    data = fx.scratch
    fx.proc.write(data, T.IOMMU_TEST_IOTLB_DEFAULT.to_bytes(4, "little"))
    nested = hwpt_alloc(
        r, idev, viommu, data=(data, 4), data_type=T.IOMMU_HWPT_DATA_SELFTEST, optional=True
    )
    entries = fx.scratch + PAGE
    fx.proc.write(entries, bytes(8) + (1).to_bytes(4, "little") + (2).to_bytes(4, "little"))
    inv = U.IommuHwptInvalidate(
        hwpt_id=nested,
        data_uptr=entries,
        data_type=T.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
        entry_len=8,
        entry_num=2,
    )
    r.ioctl("hwpt_invalidate", U.IOMMU_HWPT_INVALIDATE, inv)
    q = U.IommuVeventqAlloc(viommu_id=viommu, type=T.IOMMU_VEVENTQ_TYPE_SELFTEST, veventq_depth=4)
    qfd = r.ioctl("veventq_alloc", U.IOMMU_VEVENTQ_ALLOC, q, optional=True).out_veventq_fd
    vd = U.IommuVdeviceAlloc(viommu_id=viommu, dev_id=idev, virt_id=0x10)
    r.ioctl("vdevice_alloc", U.IOMMU_VDEVICE_ALLOC, vd, optional=True)
    r.call("attach nested", lambda: fx.fd.attach(idev, nested))
    r.call("close veventq fd", lambda: fx.proc.close(qfd))


MODEL_CASES = {
    "pasid": seq_pasid,
    "dirty": seq_dirty,
    "vfio_attach": seq_vfio_attach,
    "nested": seq_nested,
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_fail_nth_model(name: str) -> None:
    _run(f"model:{name}", MODEL_CASES[name])


# -- every uAPI command through the generic sweep ------------------------------------------------
def _uapi_cmds() -> Iterator[Any]:
    sc = Scenario()
    for cmd in sorted(registered_ops()):
        try:
            valid_cmd(sc, cmd)
        except KeyError:
            continue
        yield pytest.param(cmd, id=registered_ops()[cmd].struct.__name__)


@pytest.mark.parametrize("cmd", list(_uapi_cmds()))
def test_fail_nth_uapi(cmd: int) -> None:
    sc = Scenario()
    name = f"uapi:{registered_ops()[cmd].struct.__name__}"
    r = Runner(sc.fd, name)
    r.ioctl(name, cmd, valid_cmd(sc, cmd), expect=None)
    stats = r.done()
    assert not sc.fd.internal_errors
    if cmd != U.IOMMU_IOAS_CHANGE_PROCESS:  # nothing in it can fail: no lookup, no allocation
        assert stats.points > 0, f"{name}: no failure point was tried"
