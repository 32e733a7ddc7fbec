"""Pinned-page accounting as Linux 7.2 does it (drivers/iommu/iommufd/pages.c
``iopt_alloc_pages()``, ``incr_user_locked_vm()``, ``update_mm_locked_vm()``,
``iopt_pages_update_pinned()``; ioas.c ``iommufd_ioas_change_process()``), through the
in-process API, whose caller is the Python process itself.

Each case runs in a fresh Python process whose credentials are set the documented way: its
own RLIMIT_MEMLOCK lowered with ``resource.setrlimit`` and CAP_IPC_LOCK cleared from its
effective set with ``creds.drop_effective`` (capset, as the kernel selftest's
``drop_cap_ipc_lock()``), never a fake capability.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import MOCK_APERTURE, PAGE, World, expect_errno, snapshot
from iommufd_model import creds, vfio
from iommufd_model.core.accounting import ACCOUNT_MM, ACCOUNT_NONE, ACCOUNT_USER, user_of
from iommufd_model.core.ioas import change_process
from iommufd_model.core.pages import ACCESS_RW_SLOW_PATH
from iommufd_model.failnth import fail_nth
from iommufd_model.machine import Machine
from iommufd_model.process import Process
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import iommufd as U

HERE = Path(__file__).resolve().parent
#: the RLIMIT_MEMLOCK every case runs with: 16 pages
LIMIT = 16
SKIP = 77  # a case's exit status when the runner cannot give it the credentials it needs


def _as_caller(case: str, *, ipc_lock: bool) -> None:
    """Run ``case`` of this module in a new Python process with RLIMIT_MEMLOCK at LIMIT
    pages and CAP_IPC_LOCK as asked (skip when this process cannot grant it)."""
    code = f"import test_accounting as t; t._setup({ipc_lock}); t.{case}()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    if done.returncode == SKIP:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-4000:]


def _setup(ipc_lock: bool) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (LIMIT * PAGE, hard))
    if ipc_lock and not creds.capable(creds.CAP_IPC_LOCK):
        print("the test process lacks CAP_IPC_LOCK: no caller to try ACCOUNT_NONE with")
        sys.exit(SKIP)
    if not ipc_lock:
        creds.drop_effective(creds.CAP_IPC_LOCK)
        assert not creds.capable(creds.CAP_IPC_LOCK)


def _world(*, per_mm: bool = False) -> tuple[World, int]:
    """A World whose IOAS has the mock device's domain (every mapped page is pinned);
    ``per_mm``: RLIMIT_MODE 1, set before the first object as the kernel requires."""
    w = World.__new__(World)
    w.machine = Machine.build(iommus=["mock"])
    w.dev = w.machine.add_pci_device(iommu=0)
    w.proc = w.machine.new_process()
    w.buf_len = 64 * PAGE
    w.va = w.proc.mmap(w.buf_len)
    w.fd = w.proc.open_iommufd()
    if per_mm:
        w.fd.option(U.IOMMU_OPTION_RLIMIT_MODE, U.IOMMU_OPTION_OP_SET, val64=1)
    w.dev_id = w.fd.bind(w.dev)
    ioas = w.fd.ioas_alloc()
    w.fd.attach(w.dev_id, ioas)
    return w, ioas


def _map(w: World, ioas: int, index: int, npages: int) -> int:
    """Map pages ``index`` .. of the buffer at the same page of the mock aperture."""
    iova = MOCK_APERTURE + index * PAGE
    return int(w.fd.ioas_map(ioas, w.va + index * PAGE, npages * PAGE, iova=iova))


def _map_cmd(ioas: int, va: int, npages: int, index: int) -> bytearray:
    st = U.IommuIoasMap(
        size=U.IommuIoasMap.SIZE,
        ioas_id=ioas,
        user_va=va,
        length=npages * PAGE,
        iova=MOCK_APERTURE + index * PAGE,
        flags=U.IOMMU_IOAS_MAP_FIXED_IOVA | U.IOMMU_IOAS_MAP_READABLE,
    )
    return bytearray(st.pack())


def _map_errno(w: World, ioas: int, index: int, npages: int, code: int) -> None:
    """The map of :func:`_map` fails with ``code`` and changes nothing."""
    cmd = _map_cmd(ioas, w.va + index * PAGE, npages, index)
    expect_errno(w.fd, U.IOMMU_IOAS_MAP, cmd, code)


def _map_as(w: World, proc: Process, ioas: int, index: int, npages: int) -> None:
    """``proc`` maps ``npages`` of a new buffer of its own at page ``index`` of the aperture."""
    va = proc.mmap(npages * PAGE)
    w.fd.ioctl(U.IOMMU_IOAS_MAP, _map_cmd(ioas, va, npages, index), caller=proc)


# -- the cases (run by _as_caller) --------------------------------------------------------
def _case_per_user() -> None:
    """ACCOUNT_USER: the user's locked_vm against RLIMIT_MEMLOCK, over every mm of that
    uid; the mm's pinned_vm (VmPin) counts, its locked_vm (VmLck) does not."""
    w, ioas = _world()
    user = user_of(w.proc)
    iova = _map(w, ioas, 0, 12)
    area = w.fd.objects.get_ioas(ioas).iopt.area_at(iova)
    assert area is not None and area.pages.account_mode == ACCOUNT_USER
    assert (user.locked_vm, w.proc.locked_pages, w.proc.locked_vm) == (12, 12, 0)
    _map_errno(w, ioas, 12, 5, errno.ENOMEM)  # 17 > 16: refused, nothing pinned
    assert (user.locked_vm, w.proc.locked_pages) == (12, 12)
    _map(w, ioas, 12, 4)  # exactly at the limit
    # another process of the same user, another mm: the same user_struct is full
    other = w.machine.new_process()
    assert_errno(errno.ENOMEM, lambda: _map_as(w, other, ioas, 40, 1))
    assert other.locked_pages == 0
    # copies share the pins: no new charge, even into another domain
    ioas2 = w.fd.ioas_alloc()
    w.fd.attach(w.fd.bind(w.machine.add_pci_device(iommu=0)), ioas2)
    w.fd.ioas_copy(ioas2, ioas, iova, 12 * PAGE, dst_iova=iova)
    assert user.locked_vm == 16
    # unmapping uncharges once the last user of the pages is gone
    w.fd.ioas_unmap(ioas, iova, 12 * PAGE)
    assert user.locked_vm == 16
    w.fd.ioas_unmap_all(ioas2)
    assert (user.locked_vm, w.proc.locked_pages) == (4, 4)
    w.fd.close()
    assert (user.locked_vm, w.proc.locked_pages) == (0, 0)


def _case_domain_attach_refused() -> None:
    """Pages mapped with no domain are charged when a domain arrives: over the limit the
    attach is ENOMEM and the IOAS is as it was (iopt_area_fill_domain() unwinds)."""
    w = World(64 * PAGE)
    ioas = w.fd.ioas_alloc()
    for i in range(0, 20, 4):  # 20 pages, nothing pinned yet
        _map(w, ioas, i, 4)
    assert w.proc.locked_pages == 0
    before = snapshot(w.fd)
    assert_errno(errno.ENOMEM, lambda: w.fd.attach(w.dev_id, ioas))
    assert snapshot(w.fd) == before and user_of(w.proc).locked_vm == 0
    w.fd.ioas_unmap(ioas, w.fd.objects.get_ioas(ioas).iopt.area_objects()[0].iova, 4 * PAGE)
    w.fd.attach(w.dev_id, ioas)
    assert (user_of(w.proc).locked_vm, w.proc.locked_pages) == (16, 16)


def _case_per_mm() -> None:
    """RLIMIT_MODE 1 (ACCOUNT_MM): each mm's locked_vm (VmLck) against RLIMIT_MEMLOCK; the
    user's count is untouched, another mm has its own room."""
    w, ioas = _world(per_mm=True)
    iova = _map(w, ioas, 0, 16)
    area = w.fd.objects.get_ioas(ioas).iopt.area_at(iova)
    assert area is not None and area.pages.account_mode == ACCOUNT_MM
    assert (w.proc.locked_pages, w.proc.locked_vm, user_of(w.proc).locked_vm) == (16, 16, 0)
    _map_errno(w, ioas, 16, 1, errno.ENOMEM)
    other = w.machine.new_process()
    _map_as(w, other, ioas, 40, 16)
    assert (other.locked_pages, other.locked_vm) == (16, 16)
    w.fd.close()
    assert (w.proc.locked_vm, other.locked_vm, w.proc.locked_pages) == (0, 0, 0)


def _case_access_pin_and_rw() -> None:
    """An in-kernel access's pin is charged (iopt_pages_fill_xarray()); the slow CPU copy
    pins and unpins without a charge (iopt_pages_rw_slow())."""
    w = World(64 * PAGE)
    ioas = w.fd.ioas_alloc()
    iova = _map(w, ioas, 0, 20)  # no domain: nothing pinned
    iopt = w.fd.objects.get_ioas(ioas).iopt
    before = snapshot(w.fd)
    assert_errno(errno.ENOMEM, lambda: iopt.access_pin(iova, 17 * PAGE, False))
    assert snapshot(w.fd) == before
    iopt.access_pin(iova, 16 * PAGE, False)
    assert user_of(w.proc).locked_vm == 16
    # a slow-path copy over all 20 pages: 4 transient pins, never charged
    got = iopt.access_rw(iova, 20 * PAGE, False, flags=ACCESS_RW_SLOW_PATH, current=w.proc)
    assert got is not None and len(got) == 20 * PAGE
    assert (user_of(w.proc).locked_vm, w.proc.locked_pages) == (16, 16)
    iopt.access_unpin(iova, 16 * PAGE)
    assert (user_of(w.proc).locked_vm, w.proc.locked_pages) == (0, 0)


def _case_change_process() -> None:
    """CHANGE_PROCESS moves the charge to the caller first (ENOMEM over its limit, nothing
    changed), then uncharges the old mm (ioas.c charge_current(), change_mm())."""
    w, ioas = _world(per_mm=True)
    mfd = w.proc.memfd_create(8 * PAGE)
    w.fd.ioas_map_file(ioas, mfd, 0, 4 * PAGE)
    # 14 pages of another mm, mapped into an IOAS with no domain and pinned by an access
    other = w.machine.new_process()
    ioas_other = w.fd.ioas_alloc()
    _map_as(w, other, ioas_other, 0, 14)
    iopt_other = w.fd.objects.get_ioas(ioas_other).iopt
    iova_other = iopt_other.area_objects()[0].iova
    iopt_other.access_pin(iova_other, 14 * PAGE, False)
    assert (other.locked_vm, w.proc.locked_vm) == (14, 4)
    iopts = [w.fd.objects.get_ioas(ioas).iopt]
    before = (w.proc.locked_pages, w.proc.locked_vm, other.locked_pages, other.locked_vm)
    assert_errno(errno.ENOMEM, lambda: change_process(iopts, other))  # 14 + 4 > 16
    assert (w.proc.locked_pages, w.proc.locked_vm, other.locked_pages, other.locked_vm) == before
    iopt_other.access_unpin(iova_other, 14 * PAGE)
    change_process(iopts, other)
    assert (w.proc.locked_pages, w.proc.locked_vm) == (0, 0)
    assert (other.locked_pages, other.locked_vm) == (4, 4)
    w.fd.ioas_unmap_all(ioas)
    assert (other.locked_pages, other.locked_vm) == (0, 0)


def _case_change_process_from_a_gone_mm() -> None:
    """RLIMIT_MODE 1 and the old mm gone: the uncharge fails (update_mm_locked_vm()'s
    mmget_not_zero()), the call is EINVAL after the move, and the moved charge stays with the
    new mm even once everything is unmapped (last_npinned was left at 0), as in 7.2."""
    w, ioas = _world(per_mm=True)
    mfd = w.proc.memfd_create(4 * PAGE)
    w.fd.ioas_map_file(ioas, mfd, 0, 4 * PAGE)
    other = w.machine.new_process()
    w.proc.gone = True
    iopts = [w.fd.objects.get_ioas(ioas).iopt]
    assert_errno(errno.EINVAL, lambda: change_process(iopts, other))
    assert (other.locked_pages, other.locked_vm) == (4, 4)
    assert iopts[0].area_objects()[0].pages.proc is other
    w.fd.ioas_unmap_all(ioas)
    assert (other.locked_pages, other.locked_vm) == (4, 4)


def _case_rows_keep_their_charge() -> None:
    """One-page areas kept as rows (io_pagetable.py) carry their charge: unmapping them
    (they become objects again) uncharges the user exactly."""
    w, ioas = _world()
    iopt = w.fd.objects.get_ioas(ioas).iopt
    for i in range(8):
        _map(w, ioas, i, 1)
    assert iopt._rows == 8 and user_of(w.proc).locked_vm == 8
    _map_errno(w, ioas, 8, 9, errno.ENOMEM)
    for i in range(8):
        w.fd.ioas_unmap(ioas, MOCK_APERTURE + i * PAGE, PAGE)
    assert (user_of(w.proc).locked_vm, w.proc.locked_pages, iopt._rows) == (0, 0, 0)


def _case_failpoint_of_the_charge() -> None:
    """The charge's own fault-injection site (pfn_reader_user_update_pinned()'s
    iommufd_should_fail()): the map fails with ENOMEM and leaves nothing."""
    w, ioas = _world()
    w.proc.write(w.va, bytes(4 * PAGE))  # faulted in: every attempt reaches the same sites
    before = snapshot(w.fd)
    n, seen = 1, False
    while True:
        with fail_nth(n) as fp:
            try:
                w.fd.ioctl(U.IOMMU_IOAS_MAP, _map_cmd(ioas, w.va, 4, 0))
            except OSError as e:
                assert e.errno == fp.fired_errno
        if not fp.fired:
            break
        assert snapshot(w.fd) == before and user_of(w.proc).locked_vm == 0, fp.fired_site
        if fp.fired_site == "pages.update_pinned":
            assert fp.fired_errno == errno.ENOMEM
            seen = True
        n += 1
    assert seen and user_of(w.proc).locked_vm == 4


def _case_none_with_cap_ipc_lock() -> None:
    """A caller with CAP_IPC_LOCK makes ACCOUNT_NONE pages: no limit, pinned_vm still
    counts; CHANGE_PROCESS moves them without their pinned_vm (7.2's need_charge_update()
    is false for them), so the new mm's count goes below zero as they are unpinned."""
    w, ioas = _world(per_mm=True)
    iova = _map(w, ioas, 0, 20)
    area = w.fd.objects.get_ioas(ioas).iopt.area_at(iova)
    assert area is not None and area.pages.account_mode == ACCOUNT_NONE
    assert (w.proc.locked_pages, w.proc.locked_vm) == (20, 0)
    w.fd.ioas_unmap_all(ioas)
    mfd = w.proc.memfd_create(4 * PAGE)
    w.fd.ioas_map_file(ioas, mfd, 0, 4 * PAGE)
    other = w.machine.new_process()
    change_process([w.fd.objects.get_ioas(ioas).iopt], other)
    assert (w.proc.locked_pages, other.locked_pages) == (4, 0)
    w.fd.ioas_unmap_all(ioas)
    assert (w.proc.locked_pages, other.locked_pages) == (4, -4)


def _case_granted_cap_ipc_lock() -> None:
    """A caller without CAP_IPC_LOCK whose machine grants it (``Machine.grant_caps``, the
    Python API's ``run --cap``) makes ACCOUNT_NONE pages: 20 pages map under a 16-page
    RLIMIT_MEMLOCK and nothing is charged; without the grant the same map is ENOMEM."""
    w, ioas = _world()
    _map_errno(w, ioas, 0, 20, errno.ENOMEM)
    w.machine.grant_caps("CAP_IPC_LOCK")
    assert w.proc.capable_ipc_lock and not creds.capable(creds.CAP_IPC_LOCK)
    iova = _map(w, ioas, 0, 20)
    area = w.fd.objects.get_ioas(ioas).iopt.area_at(iova)
    assert area is not None and area.pages.account_mode == ACCOUNT_NONE
    assert (user_of(w.proc).locked_vm, w.proc.locked_pages) == (0, 20)


# -- the tests ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    [
        "_case_per_user",
        "_case_domain_attach_refused",
        "_case_per_mm",
        "_case_access_pin_and_rw",
        "_case_change_process",
        "_case_change_process_from_a_gone_mm",
        "_case_rows_keep_their_charge",
        "_case_failpoint_of_the_charge",
    ],
)
def test_without_cap_ipc_lock(case: str) -> None:
    _as_caller(case, ipc_lock=False)


def test_a_granted_cap_ipc_lock_is_not_charged() -> None:
    _as_caller("_case_granted_cap_ipc_lock", ipc_lock=False)


def test_capability_names() -> None:
    """``--cap`` names are Linux 7.2's (include/uapi/linux/capability.h); case and the CAP_
    prefix are optional; an unknown name is refused, and a grant adds bits only."""
    assert creds.cap_mask(["CAP_SYS_RESOURCE"]) == 1 << 24
    assert creds.cap_mask(["ipc_lock", "CAP_CHECKPOINT_RESTORE"]) == 1 << 14 | 1 << 40
    assert creds.cap_mask([]) == 0
    assert len(creds.CAP_NAMES) == 41 and creds.CAP_NAMES["CAP_SETFCAP"] == 31
    with pytest.raises(ValueError, match="CAP_NOPE"):
        creds.cap_mask(["CAP_IPC_LOCK", "CAP_NOPE"])
    machine = Machine.build(iommus=["mock"])
    with pytest.raises(ValueError):
        machine.grant_caps("CAP_SYS_RESOURCE", "bogus")
    assert machine.granted_caps == 0  # nothing granted by a refused call
    machine.grant_caps("CAP_SYS_RESOURCE")
    machine.grant_caps("CAP_SYS_RESOURCE", "CAP_NET_ADMIN")
    assert machine.granted_caps == 1 << 24 | 1 << 12


def test_a_granted_cap_sys_resource_sets_rlimit_mode() -> None:
    """IOMMU_OPTION RLIMIT_MODE SET: EPERM for a caller without CAP_SYS_RESOURCE, allowed
    once the machine grants it (every process of the machine)."""
    machine = Machine.build(iommus=["mock"])
    proc = machine.new_process()
    proc.capable_sys_resource = False
    fd = proc.open_iommufd()
    rlimit, set_ = U.IOMMU_OPTION_RLIMIT_MODE, U.IOMMU_OPTION_OP_SET
    assert_errno(errno.EPERM, lambda: fd.option(rlimit, set_, val64=1))
    machine.grant_caps("CAP_SYS_RESOURCE")
    assert proc.capable_sys_resource
    fd.option(rlimit, set_, val64=1)
    assert fd.option(rlimit, U.IOMMU_OPTION_OP_GET) == 1
    other = machine.new_process()
    other.capable_sys_resource = False
    other.open_iommufd().option(rlimit, set_, val64=1)


def test_with_cap_ipc_lock() -> None:
    _as_caller("_case_none_with_cap_ipc_lock", ipc_lock=True)


def test_the_caller_is_this_process() -> None:
    """The in-process model reads the Python process's own credentials."""
    w = World(PAGE)
    assert w.proc.uid == os.getuid()
    assert w.proc.capable_ipc_lock == creds.capable(creds.CAP_IPC_LOCK)
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    assert w.proc.memlock_limit == (creds.RLIM_INFINITY if soft < 0 else soft)


def test_the_vfio_container_accounts_per_mm() -> None:
    """iommufd_fops_open(): an iommufd opened as /dev/vfio/vfio starts in RLIMIT_MODE 1
    (VFIO type1's accounting); /dev/iommu in 0."""
    w = World(PAGE)
    container = vfio.open_path(w.machine, vfio.CONTAINER_PATH, proc=w.proc)
    get = U.IOMMU_OPTION_OP_GET
    assert container.option(U.IOMMU_OPTION_RLIMIT_MODE, get) == 1
    assert w.fd.option(U.IOMMU_OPTION_RLIMIT_MODE, get) == 0


def test_a_dma_buf_is_never_charged() -> None:
    """iopt_alloc_dmabuf_pages(): ACCOUNT_NONE, and nothing pinned (no VmPin)."""
    w, ioas = _world()
    fd = w.fd
    from iommufd_model.mock.selftest import SelftestDmaBuf

    buf = SelftestDmaBuf(w.machine, 4 * PAGE)
    w.proc.files[99] = buf
    iova = fd.ioas_map_file(ioas, 99, 0, 4 * PAGE)
    area = fd.objects.get_ioas(ioas).iopt.area_at(iova)
    assert area is not None and area.pages.account_mode == ACCOUNT_NONE
    assert (w.proc.locked_pages, area.pages.npinned) == (0, 0)
    fd.ioas_unmap_all(ioas)
    assert w.proc.locked_pages == 0
