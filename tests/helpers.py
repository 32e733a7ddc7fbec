"""Shared test helpers: raw-bytes ioctl wrappers, a complete model snapshot, invariants.

Everything here talks to the model through the uAPI bytes (``fd.ioctl``) except
:func:`snapshot` and :func:`check_invariants`, which read internal state on purpose: they are
the oracle that a failed ioctl changed nothing and that reference counts add up.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, TypeVar

import iommufd_model as im
from iommufd_model import uapi as U
from iommufd_model.core.eventq import EventFile
from iommufd_model.core.main import IommuFd
from iommufd_model.core.objects import IommufdObject
from iommufd_model.mock.domain import MockDomain
from iommufd_model.mock.iommufd_test import IOMMU_VIOMMU_TYPE_SELFTEST
from iommufd_model.process import Process
from iommufd_model.testing import assert_errno
from iommufd_model.uapi.codec import UStruct

PAGE = 4096
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
MOCK_APERTURE = 1 << 24  # first IOVA the mock domains can map

T = TypeVar("T")


# -- raw ioctl ---------------------------------------------------------------------------
def ioctl(fd: IommuFd, cmd: int, st: UStruct) -> Any:
    """Pack ``st`` (its ``size`` set to SIZE if 0), issue ``cmd``, return the decoded reply."""
    if getattr(st, "size", None) == 0:
        st.size = st.SIZE  # type: ignore[attr-defined]
    buf = bytearray(st.pack())
    fd.ioctl(cmd, buf)
    return type(st).unpack(buf)


def expect_errno(fd: IommuFd, cmd: int, st: bytearray | UStruct, code: int) -> None:
    """Assert ``cmd`` fails with ``code`` and leaves the model exactly as it was."""
    if isinstance(st, UStruct):
        if getattr(st, "size", None) == 0:
            st.size = st.SIZE  # type: ignore[attr-defined]
        st = bytearray(st.pack())
    buf = st
    before = snapshot(fd)
    assert_errno(code, lambda: fd.ioctl(cmd, buf), f"ioctl {cmd:#x}")
    assert snapshot(fd) == before


# The fd's typed layer issues these commands through the same dispatcher; the short names
# below keep the tests readable.
def ioas_alloc(fd: IommuFd) -> int:
    return fd.ioas_alloc()


def ioas_map(
    fd: IommuFd,
    ioas_id: int,
    user_va: int,
    length: int,
    iova: int | None = None,
    flags: int = U.IOMMU_IOAS_MAP_READABLE | U.IOMMU_IOAS_MAP_WRITEABLE,
) -> int:
    return fd.ioas_map(ioas_id, user_va, length, iova=iova, flags=flags)


def ioas_unmap(fd: IommuFd, ioas_id: int, iova: int, length: int) -> int:
    return fd.ioas_unmap(ioas_id, iova, length)


def ioas_copy(
    fd: IommuFd, dst: int, src: int, src_iova: int, length: int, dst_iova: int | None = None
) -> int:
    return fd.ioas_copy(dst, src, src_iova, length, dst_iova=dst_iova)


def hwpt_alloc(fd: IommuFd, dev_id: int, pt_id: int, flags: int = 0) -> int:
    return fd.hwpt_alloc(dev_id, pt_id, flags=flags)


def destroy(fd: IommuFd, obj_id: int) -> None:
    fd.destroy(obj_id)


def fault_alloc(fd: IommuFd) -> int:
    return fd.fault_queue_alloc()[0]


def narrow(value: object, cls: type[T]) -> T:
    """``value``, which a test knows to be a ``cls`` where the framework's types say less (an
    object table's IommufdObject, a machine's IommuHw, a file table's FileLike)."""
    assert isinstance(value, cls), f"{value!r} is no {cls.__name__}"
    return value


def event_file(proc: Process, fd: int) -> EventFile:
    """The file of a FAULT or vEVENTQ object's ``fd`` in ``proc`` (read() and write())."""
    return narrow(proc.file(fd), EventFile)


def mock_domain(fd: IommuFd, hwpt_id: int) -> MockDomain:
    """The mock driver's domain behind paging HWPT ``hwpt_id`` (its IO page table, dirty bits)."""
    return narrow(fd.objects.get_hwpt_paging(hwpt_id).domain, MockDomain)


# -- a small world -----------------------------------------------------------------------
class World:
    """A mock machine, one process with a 1 MiB buffer, an iommufd, one bound device."""

    def __init__(self, buf_len: int = 1 << 20) -> None:
        self.machine = im.Machine.build(iommus=["mock"])
        self.dev = self.machine.add_pci_device(iommu=0)
        self.proc = self.machine.new_process()
        self.buf_len = buf_len
        self.va = self.proc.mmap(buf_len)
        self.fd = self.proc.open_iommufd()
        self.dev_id = self.fd.bind(self.dev)


# -- snapshot and invariants -------------------------------------------------------------
def _owner_key(owner: object) -> object:
    if isinstance(owner, IommufdObject):
        return ("obj", owner.id)
    return ("other", type(owner).__name__)


def _domain_state(domain: Any) -> object:
    entries = getattr(domain, "entries", None)
    return (
        type(domain).__name__,
        dict(entries) if entries is not None else None,
        getattr(domain, "dirty_enabled", None),
    )


def snapshot(fd: IommuFd) -> dict[str, Any]:
    """Everything a failed ioctl must leave untouched, as plain comparable data."""
    from iommufd_model.core.device import Device
    from iommufd_model.core.hw_pagetable import Hwpt
    from iommufd_model.core.ioas import Ioas

    machine = fd.machine
    objs: dict[int, Any] = {}
    for obj in fd.objects:
        entry: dict[str, Any] = {"type": obj.TYPE.value, "users": obj.users}
        if isinstance(obj, Ioas):
            iopt = obj.iopt
            entry["areas"] = [
                (iova, last, prot, start_byte, pages.npages, pages.base, pages.npinned)
                for iova, last, prot, pages, start_byte in iopt.areas()
            ]
            entry["reserved"] = [(s, last, _owner_key(o)) for s, last, o in iopt.reserved()]
            entry["allowed"] = iopt.allowed()
            entry["iova_alignment"] = iopt.iova_alignment
            entry["large_pages"] = iopt.allow_large_pages
            entry["ndomains"] = len(iopt.domains)
            entry["hwpts"] = sorted(h.id for h in obj.hwpt_list)
        elif isinstance(obj, Hwpt):
            entry["domain"] = _domain_state(obj.domain)
            entry["devices"] = sorted(d.id for d in obj.devices)
            entry["fault"] = obj.fault.id if obj.fault is not None else None
        elif isinstance(obj, Device):
            entry["hwpt"] = obj.hwpt.id if obj.hwpt is not None else None
            entry["pasids"] = {p: h.id for p, h in obj.pasid_hwpts.items()}
        objs[obj.id] = entry
    contexts = []
    for hw in machine.iommus:
        ctx = getattr(hw, "context", {})
        contexts.append(
            {
                rid: (_domain_state(d), getattr(getattr(d, "hwpt", None), "id", None))
                if d is not None
                else None
                for rid, d in ctx.items()
            }
        )
    return {
        "ids": fd.objects.ids(),
        "objects": objs,
        "vfio_ioas": fd.vfio_ioas.id if fd.vfio_ioas is not None else None,
        "account_mode": fd.account_mode,
        "contexts": contexts,
        # Pins only: demand-faulting a user page on copy_from_user is not a state change.
        "pins": _pins(machine),
        "locked": [p.locked_pages for p in machine.processes],
        "files": [sorted(p.files) for p in machine.processes],
        "mmaps": fd.mmaps.regions(),
    }


def _mapping_refs(machine: Any) -> Counter[int]:
    """References held by user page tables and open memfds (everything but pins)."""
    from iommufd_model.process import MemFile

    refs: Counter[int] = Counter()
    memfiles: dict[int, MemFile] = {}
    for proc in machine.processes:
        refs.update(proc._ptes.values())
        for f in proc.files.values():
            if isinstance(f, MemFile):
                memfiles[id(f)] = f
    for mf in memfiles.values():
        refs.update(mf._pfns.values())
    return refs


def _pins(machine: Any) -> dict[int, int]:
    base = _mapping_refs(machine)
    return {p: n - base[p] for p, n in machine.memory._refs.items() if n != base[p]}


def expected_frame_refs(machine: Any) -> Counter[int]:
    """Frame references the model should hold: user PTEs, memfd pages, and pins."""
    from iommufd_model.core.ioas import Ioas
    from iommufd_model.core.mmap import PhysicalRegion
    from iommufd_model.process import MemFile

    want: Counter[int] = Counter()
    memfiles: dict[int, MemFile] = {}
    pages_seen: dict[int, Any] = {}
    fds: dict[int, IommuFd] = {}
    for proc in machine.processes:
        for pfn in proc._ptes.values():
            want[pfn] += 1
        for f in proc.files.values():
            if isinstance(f, MemFile):
                memfiles[id(f)] = f
            if isinstance(f, IommuFd) and not f.closed:
                fds[id(f)] = f
                for obj in f.objects:
                    if isinstance(obj, Ioas):
                        for *_, pages, _sb in obj.iopt.areas():
                            pages_seen[id(pages)] = pages
    for mf in memfiles.values():
        for pfn in mf._pfns.values():
            want[pfn] += 1
    for ictx in fds.values():
        # RAM a driver exposes through mmap (the mock vIOMMU's two pages) is the driver's.
        for immap in ictx.mmaps:
            if isinstance(immap.region, PhysicalRegion):
                first = immap.region.pa // 4096
                for pfn in range(first, first + immap.length // 4096):
                    want[pfn] += 1
    for pages in pages_seen.values():
        if pages._uses is None:
            continue
        for pfn, uses in zip(pages._pfns, pages._uses, strict=True):
            if uses:
                want[pfn] += 1
    return want


def check_invariants(fd: IommuFd, *, kernel_frames: bool = True) -> None:
    """No dangling ids, users counts consistent, frame refcounts equal PTEs + files + pins.

    ``kernel_frames=False``: frames nothing in user space explains (a vendor's page tables,
    device tables and queues) are left out of the frame check."""
    from iommufd_model.core.device import Device
    from iommufd_model.core.eventq import _EventObject
    from iommufd_model.core.hw_pagetable import Hwpt, HwptPaging
    from iommufd_model.core.ioas import Ioas

    live = {o.id: o for o in fd.objects}
    users: Counter[int] = Counter()
    for obj in live.values():
        assert obj.id >= 1
        for held in obj.holds:
            assert held.id in live and live[held.id] is held, f"{obj} holds a dead {held}"
            users[held.id] += 1
        if isinstance(obj, Device):
            users[obj.id] += 1  # the VFIO device file
            if obj.hwpt is not None:
                assert live.get(obj.hwpt.id) is obj.hwpt, f"{obj} attached to a dead HWPT"
                users[obj.hwpt.id] += 1
            for h in obj.pasid_hwpts.values():
                assert live.get(h.id) is h
                users[h.id] += 1
        if isinstance(obj, _EventObject) and obj.fd in fd.proc.files:
            users[obj.id] += 1
        if isinstance(obj, HwptPaging):
            assert obj in obj.ioas.hwpt_list
            assert obj.adapter in obj.ioas.iopt.domains
        if isinstance(obj, Ioas):
            assert len(obj.iopt.domains) == len(obj.hwpt_list)
        if isinstance(obj, Hwpt):
            for d in obj.devices:
                assert live.get(d.id) is d
    for vma in fd.mmaps.vmas:
        users[vma.obj.id] += 1  # a mapping of the object's mmap region
    for obj in live.values():
        assert obj.users == 1 + users[obj.id], f"{obj}: expected {1 + users[obj.id]} users"
    if fd.vfio_ioas is not None:
        assert live.get(fd.vfio_ioas.id) is fd.vfio_ioas
    refs = fd.machine.memory._refs
    want = expected_frame_refs(fd.machine)
    wrong = {
        p: (refs.get(p), want.get(p))
        for p in refs.keys() | want.keys()
        if refs.get(p) != want.get(p) and (kernel_frames or p in want)
    }
    assert not wrong, f"frame refcounts (have, explained by PTEs + files + pins): {wrong}"


class Scenario(World):
    """A populated world every command has valid arguments in (ids are deterministic).

    ioas: device attached (auto domain ``hwpt_auto``), 64 KiB mapped at ``iova``;
    ioas2: empty; spare: an IOAS nothing uses; hwpt_dirty: a manual dirty-tracking HWPT on ioas;
    memfd: a 64 KiB memfd; scratch: a user VA for output arrays.
    """

    def __init__(self) -> None:
        super().__init__()
        fd = self.fd
        self.ioas = ioas_alloc(fd)
        self.ioas2 = ioas_alloc(fd)
        self.spare = ioas_alloc(fd)
        self.hwpt_auto = fd.attach(self.dev_id, self.ioas)
        self.iova = MOCK_APERTURE
        ioas_map(fd, self.ioas, self.va, 1 << 16, iova=self.iova)
        self.hwpt_dirty = hwpt_alloc(fd, self.dev_id, self.ioas, U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
        self.memfd = self.proc.memfd_create(1 << 16)
        self.scratch = self.proc.mmap(1 << 16)


RW = U.IOMMU_IOAS_MAP_READABLE | U.IOMMU_IOAS_MAP_WRITEABLE


def valid_cmd(sc: Scenario, cmd: int) -> UStruct:
    """Arguments for ``cmd`` that the kernel would accept in ``sc`` (or refuse for a reason
    unrelated to struct sizes, e.g. a driver lacking vIOMMU support)."""
    table: dict[int, UStruct] = {
        U.IOMMU_DESTROY: U.IommuDestroy(id=sc.spare),
        U.IOMMU_IOAS_ALLOC: U.IommuIoasAlloc(),
        U.IOMMU_IOAS_ALLOW_IOVAS: U.IommuIoasAllowIovas(ioas_id=sc.ioas2),
        U.IOMMU_IOAS_COPY: U.IommuIoasCopy(
            flags=RW, dst_ioas_id=sc.ioas2, src_ioas_id=sc.ioas, length=PAGE, src_iova=sc.iova
        ),
        U.IOMMU_IOAS_IOVA_RANGES: U.IommuIoasIovaRanges(
            ioas_id=sc.ioas, num_iovas=16, allowed_iovas=sc.scratch
        ),
        U.IOMMU_IOAS_MAP: U.IommuIoasMap(
            flags=RW, ioas_id=sc.ioas, user_va=sc.va + (1 << 16), length=PAGE
        ),
        U.IOMMU_IOAS_UNMAP: U.IommuIoasUnmap(ioas_id=sc.ioas, iova=sc.iova, length=1 << 16),
        U.IOMMU_OPTION: U.IommuOption(
            option_id=U.IOMMU_OPTION_HUGE_PAGES, op=U.IOMMU_OPTION_OP_GET, object_id=sc.ioas
        ),
        U.IOMMU_VFIO_IOAS: U.IommuVfioIoas(ioas_id=sc.ioas, op=U.IOMMU_VFIO_IOAS_SET),
        U.IOMMU_HWPT_ALLOC: U.IommuHwptAlloc(dev_id=sc.dev_id, pt_id=sc.ioas),
        U.IOMMU_GET_HW_INFO: U.IommuHwInfo(dev_id=sc.dev_id, data_len=64, data_uptr=sc.scratch),
        U.IOMMU_HWPT_SET_DIRTY_TRACKING: U.IommuHwptSetDirtyTracking(
            flags=U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE, hwpt_id=sc.hwpt_dirty
        ),
        U.IOMMU_HWPT_GET_DIRTY_BITMAP: U.IommuHwptGetDirtyBitmap(
            hwpt_id=sc.hwpt_dirty, iova=sc.iova, length=1 << 16, page_size=PAGE, data=sc.scratch
        ),
        U.IOMMU_HWPT_INVALIDATE: U.IommuHwptInvalidate(hwpt_id=sc.hwpt_auto),
        U.IOMMU_FAULT_QUEUE_ALLOC: U.IommuFaultAlloc(),
        U.IOMMU_IOAS_MAP_FILE: U.IommuIoasMapFile(
            flags=RW, ioas_id=sc.ioas, fd=sc.memfd, start=0, length=PAGE
        ),
        # The mock's own type: its get_viommu_size() refuses any other before the HWPT lookup.
        U.IOMMU_VIOMMU_ALLOC: U.IommuViommuAlloc(
            type=IOMMU_VIOMMU_TYPE_SELFTEST, dev_id=sc.dev_id, hwpt_id=sc.hwpt_dirty
        ),
        U.IOMMU_VDEVICE_ALLOC: U.IommuVdeviceAlloc(viommu_id=99, dev_id=sc.dev_id, virt_id=1),
        U.IOMMU_IOAS_CHANGE_PROCESS: U.IommuIoasChangeProcess(),
        U.IOMMU_VEVENTQ_ALLOC: U.IommuVeventqAlloc(
            viommu_id=99, type=U.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, veventq_depth=4
        ),
        U.IOMMU_HW_QUEUE_ALLOC: U.IommuHwQueueAlloc(
            viommu_id=99,
            type=U.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV,
            nesting_parent_iova=sc.iova,
            length=PAGE,
        ),
    }
    st = table[cmd]
    st.size = st.SIZE  # type: ignore[attr-defined]
    return st


def run(fd: IommuFd, cmd: int, buf: bytearray) -> int:
    """Issue ``cmd`` on ``buf``; return 0 or the errno. Only OSError may escape the model."""
    try:
        fd.ioctl(cmd, buf)
    except OSError as exc:
        assert exc.errno is not None
        return exc.errno
    return 0
