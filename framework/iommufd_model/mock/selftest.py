"""IOMMU_TEST_CMD: the self-test ioctl of the kernel's CONFIG_IOMMUFD_TEST (selftest.c).

Importing this module registers ``IOMMU_TEST_CMD`` with the core dispatcher; the mock driver
imports it, so loading the ``mock`` entry point is what turns the test ioctl on, as building
the kernel with ``CONFIG_IOMMUFD_TEST`` does.

The numbers and structs of ``iommufd_test.h`` live in :mod:`iommufd_model.mock.iommufd_test`
and are re-exported here, so a test reaches the whole test ioctl through this module. Each op
decodes its own member of the union and, when it answers, packs it back before the whole
struct is copied out.

Ops: ADD_RESERVED, MOCK_DOMAIN, MOCK_DOMAIN_FLAGS, MOCK_DOMAIN_REPLACE, MD_CHECK_MAP,
MD_CHECK_REFS, MD_CHECK_IOTLB, DEV_CHECK_CACHE, CREATE_ACCESS (+ close of the access fd),
DESTROY_ACCESS_PAGES, ACCESS_PAGES, ACCESS_RW, ACCESS_REPLACE_IOAS, SET_TEMP_MEMORY_LIMIT,
DIRTY, TRIGGER_IOPF, TRIGGER_VEVENT, PASID_ATTACH / REPLACE / DETACH / CHECK_HWPT,
DMABUF_GET (returns an fd), DMABUF_REVOKE; see docs/selftest-parity.md.
"""

from __future__ import annotations

import errno
import struct
import weakref
from typing import TYPE_CHECKING

import attrs

from iommufd_model.core.device import (
    Device,
    device_attach,
    device_bind,
    device_detach,
    device_unbind,
)
from iommufd_model.core.eventq import IopfFault, deliver_iopf_group
from iommufd_model.core.hw_pagetable import Hwpt, HwptNested, HwptPaging
from iommufd_model.core.io_pagetable import DirectWindow
from iommufd_model.core.ioas import Ioas
from iommufd_model.core.main import FAST_OPS
from iommufd_model.core.objects import IommufdObject, ObjType
from iommufd_model.core.pages import dmabuf_invalidate_mappings
from iommufd_model.core.ucmd import Ucmd, ioctl_op
from iommufd_model.errors import err
from iommufd_model.failnth import failpoint
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.mock.domain import MockDomain, MockNestedDomain, MockViommu
from iommufd_model.mock.hw import MockIommu
from iommufd_model.mock.iommufd_test import *  # noqa: F403 (the header's names, re-exported)
from iommufd_model.mock.iommufd_test import (
    DIRTY_MAX_BITS,
    IOMMU_NO_PASID,
    IOMMU_TEST_CMD,
    IOMMU_TEST_OP_ACCESS_PAGES,
    IOMMU_TEST_OP_ACCESS_REPLACE_IOAS,
    IOMMU_TEST_OP_ACCESS_RW,
    IOMMU_TEST_OP_ADD_RESERVED,
    IOMMU_TEST_OP_CREATE_ACCESS,
    IOMMU_TEST_OP_DESTROY_ACCESS_PAGES,
    IOMMU_TEST_OP_DEV_CHECK_CACHE,
    IOMMU_TEST_OP_DIRTY,
    IOMMU_TEST_OP_DMABUF_GET,
    IOMMU_TEST_OP_DMABUF_REVOKE,
    IOMMU_TEST_OP_MD_CHECK_IOTLB,
    IOMMU_TEST_OP_MD_CHECK_MAP,
    IOMMU_TEST_OP_MD_CHECK_REFS,
    IOMMU_TEST_OP_MOCK_DOMAIN,
    IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS,
    IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE,
    IOMMU_TEST_OP_PASID_ATTACH,
    IOMMU_TEST_OP_PASID_CHECK_HWPT,
    IOMMU_TEST_OP_PASID_DETACH,
    IOMMU_TEST_OP_PASID_REPLACE,
    IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT,
    IOMMU_TEST_OP_TRIGGER_IOPF,
    IOMMU_TEST_OP_TRIGGER_VEVENT,
    IOMMU_VEVENTQ_TYPE_SELFTEST,
    MOCK_ACCESS_RW_SLOW_PATH,
    MOCK_ACCESS_RW_WRITE,
    MOCK_DEV_CACHE_ID_MAX,
    MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES,
    MOCK_FLAGS_ACCESS_SYZ,
    MOCK_FLAGS_ACCESS_WRITE,
    MOCK_FLAGS_DEVICE_NO_DIRTY,
    MOCK_FLAGS_DEVICE_PASID,
    MOCK_NESTED_DOMAIN_IOTLB_ID_MAX,
    MOCK_PASID_WIDTH,
    AccessPages,
    AccessReplaceIoas,
    AccessRw,
    AddReserved,
    CheckIdValue,
    CheckMap,
    CheckRefs,
    CreateAccess,
    DestroyAccessPages,
    Dirty,
    DmaBufArgs,
    IommuTestCmd,
    MemoryLimit,
    MockDomainArgs,
    MockDomainReplace,
    PasidArgs,
    TriggerIopf,
    TriggerVevent,
)
from iommufd_model.process import MemFile

if TYPE_CHECKING:
    from iommufd_model.core.main import IommuFd
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.machine import Machine
    from iommufd_model.process import Process

# selftest.c: the default of iommufd_test_memory_limit, which the tests restore.
DEFAULT_MEMORY_LIMIT = 65536
# access_pages / access_rw refuse more than this before allocating (syzkaller guard).
ACCESS_MAX_LENGTH = 16 * 1024 * 1024
_PAGE_MASK = PAGE_SIZE - 1
_U64 = (1 << 64) - 1


# -- global test knobs (selftest.c keeps them in module globals) ---------------------------
@attrs.define
class SelftestState:
    """Per-machine stand-in for selftest.c's globals.

    ``memory_limit`` is ``iommufd_test_memory_limit``: in the kernel it caps the temporary
    batch allocations of pages.c, so that small limits force the multi-batch paths. The
    model's page code has no batches, so the value is kept (and validated) but changes no
    observable result; this is exactly what the kernel promises too.
    """

    memory_limit: int = DEFAULT_MEMORY_LIMIT
    mock_dev_num: int = 0


_STATE: weakref.WeakKeyDictionary[Machine, SelftestState] = weakref.WeakKeyDictionary()


def selftest_state(machine: Machine) -> SelftestState:
    state = _STATE.get(machine)
    if state is None:
        state = _STATE[machine] = SelftestState()
    return state


# -- the SELFTEST object (a mock device bound and attached for the test) -------------------
class SelftestIdev(IommufdObject):
    """``struct selftest_obj`` of type ``TYPE_IDEV``: owns a mock PCI device and its binding.

    Destroying it (IOMMU_DESTROY of ``stdev_id``) detaches and unbinds the device and unplugs
    the mock PCI function, as ``iommufd_selftest_destroy()`` does.
    """

    TYPE = ObjType.SELFTEST

    def __init__(self, ictx: IommuFd) -> None:
        super().__init__(ictx)
        self.pci: PciDevice | None = None
        self.idev: Device | None = None

    def destroy(self) -> None:
        idev, pci = self.idev, self.pci
        self.idev = self.pci = None
        if idev is not None and pci is not None and pci.bound_to is self.ictx:
            device_unbind(self.ictx, idev)
        if pci is not None:
            _unplug(pci)


def _first_mock_iommu(machine: Machine) -> MockIommu:
    for hw in machine.iommus:
        if isinstance(hw, MockIommu):
            return hw
    raise err(errno.ENODEV, "no mock IOMMU in this machine")


def _unplug(pci: PciDevice) -> None:
    hw = pci.iommu
    hw.devices.pop(pci.rid, None)
    if isinstance(hw, MockIommu):
        hw.context.pop(pci.rid, None)
        for key in [k for k in hw.pasid_context if k[0] == pci.rid]:
            del hw.pasid_context[key]


def _mock_dev_create(machine: Machine, dev_flags: int) -> PciDevice:
    """``mock_dev_create()``: unknown device flags are EINVAL."""
    if dev_flags & ~(MOCK_FLAGS_DEVICE_NO_DIRTY | MOCK_FLAGS_DEVICE_PASID):
        raise err(errno.EINVAL, f"unsupported mock device flags {dev_flags:#x}")
    hw = _first_mock_iommu(machine)
    pasid_bits = MOCK_PASID_WIDTH if dev_flags & MOCK_FLAGS_DEVICE_PASID else 0
    dev = machine.add_pci_device(hw.index, pasid_bits=pasid_bits)
    dev.iommu_priv["no_dirty"] = bool(dev_flags & MOCK_FLAGS_DEVICE_NO_DIRTY)
    dev.iommu_priv["flags"] = dev_flags
    selftest_state(machine).mock_dev_num += 1
    return dev


def _mock_domain(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    ictx = ucmd.ictx
    args = MockDomainArgs.of(cmd)
    dev_flags = args.dev_flags if cmd.op == IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS else 0
    # The kernel allocates the selftest object first, so its id precedes the device's.
    sobj = SelftestIdev(ictx)
    ictx.objects.alloc_id(sobj)
    try:
        sobj.pci = _mock_dev_create(ictx.machine, dev_flags)
        idev_id = device_bind(ictx, sobj.pci)
        sobj.idev = ictx.device(idev_id)
        hwpt_id = device_attach(sobj.idev, cmd.id, None, replace=False)
    except OSError:
        ictx.objects.remove(sobj)
        raise
    args.out_stdev_id = sobj.id
    args.out_hwpt_id = hwpt_id
    args.out_idev_id = idev_id
    args.store(cmd)
    ucmd.respond()


def _mock_domain_replace(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    sobj = ucmd.ictx.objects.get(cmd.id, ObjType.SELFTEST)
    assert isinstance(sobj, SelftestIdev)
    if sobj.idev is None:
        raise err(errno.EINVAL, "selftest object holds no device")
    args = MockDomainReplace.of(cmd)
    args.pt_id = device_attach(sobj.idev, args.pt_id, None, replace=True)
    args.store(cmd)
    ucmd.respond()


def _add_reserved(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    """``iommufd_test_add_reserved()``: the range is checked before the IOAS is looked up."""
    args = AddReserved.of(cmd)
    if not args.length:
        raise err(errno.EINVAL, "empty reserved range")
    if args.start + args.length - 1 > _U64:
        raise err(errno.EOVERFLOW, "reserved range wraps")
    ioas = ucmd.ictx.objects.get_ioas(cmd.id)
    # iopt_reserve_iova(start, start + length - 1, owner NULL); the model needs an owner key.
    ioas.iopt.reserve(_TEST_RESERVED, args.start, args.start + args.length - 1)


_TEST_RESERVED = object()  # owner of ADD_RESERVED ranges: never released, like owner NULL


def _md_pagetable(ucmd: Ucmd, hwpt_id: int) -> MockDomain:
    """``get_md_pagetable()``: a paging HWPT (ENOENT) whose domain is a mock one (EINVAL)."""
    hwpt = ucmd.ictx.objects.get_hwpt_paging(hwpt_id)
    if not isinstance(hwpt.domain, MockDomain):
        raise err(errno.EINVAL, "not a mock paging domain")
    return hwpt.domain


def _md_check_map(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    """``iommufd_test_md_check_pa()``: the HWPT first, then the checks in units of the
    domain's smallest page size; an unmapped IOVA translates to 0 (EINVAL)."""
    args = CheckMap.of(cmd)
    iova, length, uptr = args.iova, args.length, args.uptr
    mock = _md_pagetable(ucmd, cmd.id)
    page_size = mock.pgsize_bitmap & -mock.pgsize_bitmap
    if (iova | length | uptr) % page_size or uptr + length > _U64:
        raise err(errno.EINVAL, "check_map needs arguments aligned to the smallest page")
    proc = ucmd.caller
    while length:
        pfn = proc.translate(uptr & ~_PAGE_MASK)  # get_user_pages_fast: EFAULT if unmapped
        if mock.pt.iova_to_phys(iova) != pfn * PAGE_SIZE + uptr % PAGE_SIZE:
            raise err(errno.EINVAL, f"IOVA {iova:#x} does not map user VA {uptr:#x}")
        iova += page_size
        uptr += page_size
        length -= page_size


def pin_count(proc: Process, va: int) -> int:
    """The model's ``page_ref_count(page) / GUP_PIN_COUNTING_BIAS`` for the page under ``va``.

    A frame's references in the model are: one per page-table entry that maps it (the
    caller's), one held by a memfd's page cache while the file owns the frame, and one per
    pin (``pin_user_pages`` / ``memfd_pin_folios``, i.e. what iommufd's pages take). The
    kernel's MD_CHECK_REFS counts only pins, because plain references are far below the
    1024 bias; so the model counts pins as all references minus the mapping's own ones.
    iommufd pins each page once however many domains and accesses use it, so a mapped page
    reads 1 while anything needs it pinned and 0 otherwise.
    """
    pfn = proc.translate(va)
    base = 1  # the caller's PTE, faulted in by translate() as get_user_pages_fast would
    vma = proc._vma(va)
    if vma is not None and vma.file is not None:
        index = (vma.offset + (va - vma.start)) // PAGE_SIZE
        if vma.file._pfns.get(index) == pfn:
            base += 1
    return proc.memory.frame_refs(pfn) - base


def _md_check_refs(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    args = CheckRefs.of(cmd)
    length, uptr = args.length, args.uptr
    if length % PAGE_SIZE or uptr % PAGE_SIZE or uptr + length > _U64:
        raise err(errno.EINVAL, "check_refs needs page aligned arguments")
    while length:
        got = pin_count(ucmd.caller, uptr)
        if got != args.refs:
            raise err(errno.EIO, f"page at {uptr:#x} has {got} pins, expected {args.refs}")
        uptr += PAGE_SIZE
        length -= PAGE_SIZE


# -- access objects -------------------------------------------------------------------------
@attrs.define
class AccessItem:
    """``struct selftest_access_item``: one ACCESS_PAGES pin, undone by id or by unmap."""

    id: int
    iova: int
    length: int


class SelftestAccess(IommufdObject):
    """An ``iommufd_access`` created by CREATE_ACCESS (``struct selftest_access``).

    It sits in the object table (ObjType.ACCESS) with an extra user held by its driver, so
    IOMMU_DESTROY of it is EBUSY; it holds a user of its IOAS. It is what the IoPagetable
    sees as an ``IoAccess``: ``iova_alignment`` is PAGE_SIZE when it pins pages, and
    ``unmap`` is ``iommufd_test_access_unmap()``: unpin every item touching the range.
    """

    TYPE = ObjType.ACCESS

    def __init__(self, ictx: IommuFd, needs_pin: bool) -> None:
        super().__init__(ictx)
        self.needs_pin = needs_pin
        self.ioas: Ioas | None = None
        self.items: list[AccessItem] = []
        self.next_id = 0

    @property
    def iova_alignment(self) -> int:
        return PAGE_SIZE if self.needs_pin else 1

    def unmap(self, iova: int, length: int) -> None:
        last = iova + length - 1
        assert self.ioas is not None
        for item in list(self.items):
            if iova > item.iova + item.length - 1 or last < item.iova:
                continue
            self.items.remove(item)
            self.ioas.iopt.access_unpin(item.iova, item.length)

    def attach(self, ioas: Ioas) -> None:
        ioas.iopt.add_access(self)
        ioas.users += 1
        self.ioas = ioas

    def detach(self) -> None:
        ioas = self.ioas
        if ioas is None:
            return
        self.unmap(0, _U64 + 1)
        ioas.iopt.remove_access(self)
        ioas.users -= 1
        self.ioas = None


class AccessFile:
    """The anonymous file CREATE_ACCESS returns; closing its last fd destroys the access."""

    def __init__(self, access: SelftestAccess) -> None:
        self.access = access

    def release(self) -> None:
        access = self.access
        access.detach()
        access.users -= 1  # the driver's reference
        access.ictx.objects.remove(access)
        access.ictx.put_file_ref()  # the access held the iommufd context (iommufd_ctx_get)


def _access_get(ucmd: Ucmd, fd: int) -> SelftestAccess:
    """``iommufd_access_get()``: the fd must be an access file, else EBADFD."""
    f = ucmd.caller.files.get(fd)
    if not isinstance(f, AccessFile):
        raise err(errno.EBADFD, f"fd {fd} is not a selftest access")
    return f.access


def _syz_iova(access: SelftestAccess, iova: int) -> int:
    """``iommufd_test_syz_conv_iova()``: low u32 = nth area, high u32 = offset into it."""
    nth, offset = iova & 0xFFFF_FFFF, iova >> 32
    assert access.ioas is not None
    for i, (area_iova, *_rest) in enumerate(access.ioas.iopt.areas()):
        if i == nth:
            return area_iova + offset
    return 0


def _create_access(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    args = CreateAccess.of(cmd)
    if args.flags & ~MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES:
        raise err(errno.EOPNOTSUPP, f"unknown create_access flags {args.flags:#x}")
    ictx = ucmd.ictx
    access = SelftestAccess(ictx, bool(args.flags & MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES))
    ictx.objects.alloc_id(access)
    access.users += 1  # the calling driver is a user until iommufd_access_destroy()
    try:
        access.attach(ictx.objects.get_ioas(cmd.id))
    except OSError:
        access.users -= 1
        ictx.objects.remove(access)
        raise
    args.out_access_fd = ucmd.caller.install_file(AccessFile(access))
    ictx.file_refs += 1
    args.store(cmd)
    ucmd.respond()


def _access_replace_ioas(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    access = _access_get(ucmd, cmd.id)
    new = ucmd.ictx.objects.get_ioas(AccessReplaceIoas.of(cmd).ioas_id)
    if access.ioas is None:
        raise err(errno.ENOENT, "access is not attached")
    if access.ioas is new:
        return
    new.iopt.add_access(access)  # may fail: then nothing changed
    new.users += 1
    access.detach()
    access.ioas = new


def _access_pages(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    args = AccessPages.of(cmd)
    if args.length > ACCESS_MAX_LENGTH:
        raise err(errno.ENOMEM, "access_pages length above 16 MiB")
    if args.flags & ~(MOCK_FLAGS_ACCESS_WRITE | MOCK_FLAGS_ACCESS_SYZ):
        raise err(errno.EOPNOTSUPP, f"unknown access_pages flags {args.flags:#x}")
    access = _access_get(ucmd, cmd.id)
    if not access.needs_pin:
        raise err(errno.EOPNOTSUPP, "access was created without NEEDS_PIN_PAGES")
    if access.ioas is None:
        raise err(errno.ENOENT, "access is not attached")
    iova = args.iova
    if args.flags & MOCK_FLAGS_ACCESS_SYZ:
        iova = _syz_iova(access, iova)
    iopt = access.ioas.iopt
    pfns = iopt.access_pin(iova, args.length, bool(args.flags & MOCK_FLAGS_ACCESS_WRITE))
    try:
        if args.uptr:
            # iommufd_test_check_pages(): the pinned pages are the user's pages, else EBADE.
            va = args.uptr - iova % PAGE_SIZE
            for i, pfn in enumerate(pfns):
                if ucmd.caller.translate(va + i * PAGE_SIZE) != pfn:
                    raise err(errno.EBADE, "pinned page differs from the user's page")
    except OSError:
        iopt.access_unpin(iova, args.length)
        raise
    item = AccessItem(access.next_id, iova, args.length)
    access.next_id += 1
    access.items.append(item)
    args.out_access_pages_id = item.id
    args.store(cmd)
    ucmd.respond()


def _destroy_access_pages(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    access = _access_get(ucmd, cmd.id)
    item_id = DestroyAccessPages.of(cmd).access_pages_id
    for item in access.items:
        if item.id == item_id:
            access.items.remove(item)
            assert access.ioas is not None
            access.ioas.iopt.access_unpin(item.iova, item.length)
            return
    raise err(errno.ENOENT, f"no access pages item {item_id}")


def _access_rw(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    args = AccessRw.of(cmd)
    if args.length > ACCESS_MAX_LENGTH:
        raise err(errno.ENOMEM, "access_rw length above 16 MiB")
    if args.flags & ~(MOCK_ACCESS_RW_WRITE | MOCK_ACCESS_RW_SLOW_PATH | MOCK_FLAGS_ACCESS_SYZ):
        raise err(errno.EOPNOTSUPP, f"unknown access_rw flags {args.flags:#x}")
    access = _access_get(ucmd, cmd.id)
    write = bool(args.flags & MOCK_ACCESS_RW_WRITE)
    data = ucmd.caller.read(args.uptr, args.length) if write else b""
    if access.ioas is None:
        raise err(errno.ENOENT, "access is not attached")
    iova = args.iova
    if args.flags & MOCK_FLAGS_ACCESS_SYZ:
        iova = _syz_iova(access, iova)
    # MOCK_ACCESS_RW_WRITE and _SLOW_PATH are the kernel's IOMMUFD_ACCESS_RW_* bits
    iopt, flags, caller = access.ioas.iopt, args.flags & ~MOCK_FLAGS_ACCESS_SYZ, ucmd.caller
    if write:
        iopt.access_rw(iova, data, True, flags=flags, current=caller)
        return
    out = iopt.access_rw(iova, args.length, False, flags=flags, current=caller)
    assert out is not None
    caller.write(args.uptr, out)


@attrs.frozen
class DirectAccessRw:
    """What :func:`access_rw_fast` did, for a caller that repeats it (run/_fastrw.c): an
    ACCESS_RW on access fd ``fd`` (the file ``file``) at ``iova`` copied through one area,
    whose ``window`` says how later requests inside it copy (None: no caller may repeat
    them)."""

    fd: int
    file: AccessFile
    iova: int
    window: DirectWindow | None


#: ``struct iommu_test_cmd``'s header and ACCESS_RW's member as they lie in its bytes: size,
#: op, id (the access fd), __reserved, iova, length, uptr, flags
_ACCESS_RW_WIRE = struct.Struct("<IIIIQQQI")
assert _ACCESS_RW_WIRE.size == IommuTestCmd.offsetof("payload") + AccessRw.offsetofend("flags")
#: the smallest struct size iommufd_test's ioctl_op row (below) accepts
ACCESS_RW_SIZE_MIN = IommuTestCmd.offsetofend("last")


def access_rw_fast(ictx: IommuFd, data: bytes, caller: Process) -> DirectAccessRw | None:
    """IOMMU_TEST_CMD's short path (``FAST_OPS``, the model's own): an ACCESS_RW within one
    area, straight from the struct's bytes.

    It takes a request only when the general path (``IommuFd.ioctl`` -> :func:`_access_rw`
    -> ``IoPagetable.access_rw``) would pass every check before the area's copy: a struct
    size the table accepts with no tail, no flag but MOCK_ACCESS_RW_WRITE and _SLOW_PATH,
    a length within the limit, an access fd attached to an IOAS, and
    ``access_rw_area``'s one area. It then makes the same calls in the same order (the
    user's buffer through the caller, the area's ``Pages.rw_access`` with every path of
    Linux 7.2's), so the bytes, errnos, pins and fault-injection sites are those of the
    general path. Returns what it did, or None, having done nothing, for any other
    request."""
    if len(data) < _ACCESS_RW_WIRE.size:
        return None
    size, op, fd, _reserved, iova, length, uptr, flags = _ACCESS_RW_WIRE.unpack_from(data)
    if op != IOMMU_TEST_OP_ACCESS_RW or not ACCESS_RW_SIZE_MIN <= size <= IommuTestCmd.SIZE:
        return None
    if flags & ~(MOCK_ACCESS_RW_WRITE | MOCK_ACCESS_RW_SLOW_PATH):
        return None
    if not 0 < length <= ACCESS_MAX_LENGTH:
        return None
    f = caller.files.get(fd)
    if not isinstance(f, AccessFile) or f.access.ioas is None:
        return None
    write = bool(flags & MOCK_ACCESS_RW_WRITE)
    area = f.access.ioas.iopt.access_rw_area(iova, length, write)
    if area is None:
        return None
    # MOCK_ACCESS_RW_WRITE and _SLOW_PATH are the kernel's IOMMUFD_ACCESS_RW_* bits
    start = area.start_byte_at(iova)
    if write:
        area.pages.rw_access(start, caller.read(uptr, length), flags, caller)
    else:
        out = area.pages.rw_access(start, length, flags, caller)
        assert out is not None
        caller.write(uptr, out)
    return DirectAccessRw(fd, f, iova, DirectWindow.of(area, caller))


def _set_temp_memory_limit(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    limit = MemoryLimit.of(cmd).limit
    if limit < 8 + 4:  # sizeof(unsigned long) + sizeof(u32): protects _batch_init()
        raise err(errno.EINVAL, "memory limit below one batch element")
    selftest_state(ucmd.ictx.machine).memory_limit = limit


def _dirty(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    """``iommufd_test_dirty()``: ``set_dirty`` of the generic page table at ``iova + i *
    page_size`` for every set bit ``i`` of the user's bitmap; ``out_nr_dirty`` counts the
    set bits (whether or not anything is mapped there), as Linux 7.2 does."""
    args = Dirty.of(cmd)
    page_size, length, iova = args.page_size, args.length, args.iova
    if not page_size or not length or iova % page_size or length % page_size or not args.uptr:
        raise err(errno.EINVAL, "bad dirty range")
    nbits = length // page_size
    if nbits > DIRTY_MAX_BITS:
        raise err(errno.EOVERFLOW, "dirty bitmap above 16 MiB")
    mock = _md_pagetable(ucmd, cmd.id)
    if not mock.dirty_enabled:
        raise err(errno.EINVAL, "dirty tracking is not enabled on this domain")
    failpoint("selftest.dirty_alloc")  # kvzalloc of the bitmap copy
    bitmap = ucmd.caller.read(args.uptr, -(-nbits // 8))
    args.out_nr_dirty = mock.pt.set_dirty_bits(iova, page_size, bitmap, nbits)
    args.store(cmd)
    ucmd.respond()


# -- nested domain, device cache, IOPF, vEVENT --------------------------------------------
def _md_check_iotlb(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    """``get_md_pagetable_nested()``: a nested HWPT (ENOENT) of the mock (EINVAL)."""
    args = CheckIdValue.of(cmd)
    hwpt = ucmd.ictx.objects.get_hwpt_nested(cmd.id)
    nested = hwpt.domain
    if not isinstance(nested, MockNestedDomain):
        raise err(errno.EINVAL, "not a mock nested domain")
    if args.id > MOCK_NESTED_DOMAIN_IOTLB_ID_MAX or nested.iotlb[args.id] != args.value:
        raise err(errno.EINVAL, f"iotlb[{args.id}] is not {args.value:#x}")


def _dev_check_cache(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    args = CheckIdValue.of(cmd)
    idev = ucmd.ictx.objects.get_device(cmd.id)
    cache = idev.dev.iommu_priv.get("cache")
    if cache is None:
        raise err(errno.EINVAL, "not a mock device")
    if args.id > MOCK_DEV_CACHE_ID_MAX or cache[args.id] != args.value:
        raise err(errno.EINVAL, f"cache[{args.id}] is not {args.value:#x}")


def fault_hwpt(idev: Device, pasid: int) -> Hwpt | None:
    """Where ``iommu_report_device_fault()`` delivers a page request of ``idev``.

    A PASID-tagged request goes to that PASID's HWPT; with none there, the mock (which keeps
    the PASID table in the guest, ``user_pasid_table``) routes it to the RID's nested HWPT.
    """
    if pasid != IOMMU_NO_PASID:
        hwpt = idev.pasid_hwpts.get(pasid)
        if hwpt is not None:
            return hwpt
        return idev.hwpt if isinstance(idev.hwpt, HwptNested) else None
    return idev.hwpt


def _trigger_iopf(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    """``iommufd_test_trigger_iopf()``: one LAST_PAGE request; undeliverable ones are
    dropped (the kernel logs and auto-responds), the ioctl itself still succeeds."""
    args = TriggerIopf.of(cmd)
    idev = ucmd.ictx.objects.get_device(args.dev_id)
    hwpt = fault_hwpt(idev, args.pasid)
    pasid = args.pasid if args.pasid != IOMMU_NO_PASID else None
    fault = IopfFault(args.addr, args.perm, pasid)
    deliver_iopf_group(None if hwpt is None else hwpt.domain, idev.dev, args.grpid, [fault])


def _trigger_vevent(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    """``iommufd_test_trigger_vevent()``: report {virt_id} to the vIOMMU the device was
    last attached through (a nested HWPT of that vIOMMU); ENOENT without one, EOPNOTSUPP
    when the vIOMMU has no vEVENTQ of the selftest type."""
    idev = ucmd.ictx.objects.get_device(TriggerVevent.of(cmd).dev_id)
    priv = idev.dev.iommu_priv
    viommu = priv.get("viommu")
    if not isinstance(viommu, MockViommu) or not priv.get("vdev_id") or viommu.core is None:
        raise err(errno.ENOENT, "device is not attached through a vIOMMU vDEVICE")
    data = int(priv["vdev_id"]).to_bytes(4, "little")
    if not viommu.core.report_event(IOMMU_VEVENTQ_TYPE_SELFTEST, data):
        raise err(errno.EOPNOTSUPP, "no vEVENTQ of the selftest type")


# -- dma-buf (iommufd_test_dmabuf_get / _revoke) -----------------------------------------
class SelftestDmaBuf(MemFile):
    """The self-test's dma-buf: zeroed memory of whole pages, exported through an fd.

    IOAS_MAP_FILE checks its range and its revocation when mapping (``check_map``).
    DMABUF_REVOKE sets the flag and invalidates the mappings (core/pages.py
    ``dmabuf_invalidate_mappings``), which revokes every area mapped before, as 7.2's
    ``iommufd_test_dmabuf_revoke()`` does.
    """

    is_dmabuf = True

    def __init__(self, machine: Machine, size: int) -> None:
        super().__init__(machine.memory, size)
        self.revoked = False

    def check_map(self, start: int, length: int) -> None:
        if not length or start + length > self.size:
            raise err(errno.EINVAL, "range beyond the dma-buf")
        if self.revoked:
            raise err(errno.ENODEV, "dma-buf is revoked")


def _dmabuf_get(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    """The new fd is the ioctl's return value."""
    length = (DmaBufArgs.of(cmd).a + _PAGE_MASK) & ~_PAGE_MASK
    if not length or length > PAGE_SIZE * 512:
        raise err(errno.EINVAL, "dma-buf of 1 to 512 pages")
    ucmd.retval = ucmd.caller.install_file(SelftestDmaBuf(ucmd.ictx.machine, length))


def _dmabuf_revoke(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    args = DmaBufArgs.of(cmd)
    f = ucmd.caller.files.get(args.a - (1 << 32) if args.a >= 1 << 31 else args.a)
    if f is None:
        raise err(errno.EBADF, "not an open fd")
    if not isinstance(f, MemFile):
        raise err(errno.EINVAL, "not a dma-buf")
    if not isinstance(f, SelftestDmaBuf):
        raise err(errno.EOPNOTSUPP, "not the self-test's dma-buf")
    f.revoked = bool(args.b)
    dmabuf_invalidate_mappings(f)


# -- PASID ops -----------------------------------------------------------------------------
def _selftest_idev(ucmd: Ucmd, stdev_id: int) -> Device:
    sobj = ucmd.ictx.objects.get(stdev_id, ObjType.SELFTEST)
    assert isinstance(sobj, SelftestIdev)
    if sobj.idev is None:
        raise err(errno.EINVAL, "selftest object holds no device")
    return sobj.idev


def _pasid_attach(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    idev = _selftest_idev(ucmd, cmd.id)
    args = PasidArgs.of(cmd)
    replace = cmd.op == IOMMU_TEST_OP_PASID_REPLACE
    if not replace and args.pasid in idev.pasid_hwpts:
        # iommufd_device_attach() never overwrites: use REPLACE
        raise err(errno.EBUSY, f"PASID {args.pasid} is attached already")
    if replace and args.pasid not in idev.pasid_hwpts:
        raise err(errno.EINVAL, f"PASID {args.pasid} is not attached: nothing to replace")
    args.pt_id = device_attach(idev, args.pt_id, args.pasid, replace=replace)
    args.store(cmd)
    ucmd.respond()


def _pasid_detach(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    idev = _selftest_idev(ucmd, cmd.id)
    device_detach(idev, PasidArgs.of(cmd).pasid)


def _pasid_check_hwpt(ucmd: Ucmd, cmd: IommuTestCmd) -> None:
    """hwpt_id 0: the PASID must be detached; else it must use that HWPT's domain."""
    idev = _selftest_idev(ucmd, cmd.id)
    args = PasidArgs.of(cmd)
    attached = idev.pasid_hwpts.get(args.pasid)
    if not args.pt_id:
        if attached is not None:
            raise err(errno.EINVAL, f"PASID {args.pasid} is attached")
        return
    want = ucmd.ictx.objects.get(args.pt_id)
    if not isinstance(want, (HwptPaging, HwptNested)):
        raise err(errno.EINVAL, f"object {args.pt_id} is not a HWPT")
    if attached is None or attached.domain is not want.domain:
        raise err(errno.EINVAL, f"PASID {args.pasid} does not use HWPT {args.pt_id}")


_HANDLERS = {
    IOMMU_TEST_OP_ADD_RESERVED: _add_reserved,
    IOMMU_TEST_OP_MOCK_DOMAIN: _mock_domain,
    IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS: _mock_domain,
    IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: _mock_domain_replace,
    IOMMU_TEST_OP_MD_CHECK_MAP: _md_check_map,
    IOMMU_TEST_OP_MD_CHECK_REFS: _md_check_refs,
    IOMMU_TEST_OP_CREATE_ACCESS: _create_access,
    IOMMU_TEST_OP_ACCESS_REPLACE_IOAS: _access_replace_ioas,
    IOMMU_TEST_OP_ACCESS_PAGES: _access_pages,
    IOMMU_TEST_OP_ACCESS_RW: _access_rw,
    IOMMU_TEST_OP_DESTROY_ACCESS_PAGES: _destroy_access_pages,
    IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT: _set_temp_memory_limit,
    IOMMU_TEST_OP_DIRTY: _dirty,
    IOMMU_TEST_OP_MD_CHECK_IOTLB: _md_check_iotlb,
    IOMMU_TEST_OP_DEV_CHECK_CACHE: _dev_check_cache,
    IOMMU_TEST_OP_TRIGGER_IOPF: _trigger_iopf,
    IOMMU_TEST_OP_TRIGGER_VEVENT: _trigger_vevent,
    IOMMU_TEST_OP_PASID_ATTACH: _pasid_attach,
    IOMMU_TEST_OP_PASID_REPLACE: _pasid_attach,
    IOMMU_TEST_OP_PASID_DETACH: _pasid_detach,
    IOMMU_TEST_OP_PASID_CHECK_HWPT: _pasid_check_hwpt,
    IOMMU_TEST_OP_DMABUF_GET: _dmabuf_get,
    IOMMU_TEST_OP_DMABUF_REVOKE: _dmabuf_revoke,
}


@ioctl_op(IOMMU_TEST_CMD, IommuTestCmd, "last")
def iommufd_test(ucmd: Ucmd) -> None:
    """``iommufd_test()``: dispatch on ``op``; an op the model lacks is EOPNOTSUPP."""
    cmd = ucmd.cmd
    assert isinstance(cmd, IommuTestCmd)
    handler = _HANDLERS.get(cmd.op)
    if handler is None:
        raise err(errno.EOPNOTSUPP, f"IOMMU_TEST_CMD op {cmd.op} not supported")
    handler(ucmd, cmd)


FAST_OPS[IOMMU_TEST_CMD] = access_rw_fast
