"""HWPT objects (paging and nested) and their ioctls: alloc, invalidate, dirty tracking.

A paging HWPT wraps a driver domain that mirrors an IOAS; a nested HWPT wraps a driver
domain built from user vendor data over a nest parent (or a vIOMMU). The core reaches the
driver only through hooks routed to the domain's owner.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from iommufd_model.core.dirty_bits import byte_groups, span_bits
from iommufd_model.core.ioas import Ioas
from iommufd_model.core.objects import IommufdObject, ObjType
from iommufd_model.core.ucmd import Ucmd, ioctl_op
from iommufd_model.driver import Domain, InvalidateResult, UserData, ViommuBase
from iommufd_model.errors import err
from iommufd_model.failnth import failpoint
from iommufd_model.hooks import DriverHooks
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_model.core.device import Device
    from iommufd_model.core.eventq import Fault
    from iommufd_model.core.main import IommuFd
    from iommufd_model.core.viommu import Viommu

PAGING_FLAGS = (
    U.IOMMU_HWPT_ALLOC_NEST_PARENT
    | U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    | U.IOMMU_HWPT_FAULT_ID_VALID
    | U.IOMMU_HWPT_ALLOC_PASID
)
NESTED_FLAGS = U.IOMMU_HWPT_FAULT_ID_VALID | U.IOMMU_HWPT_ALLOC_PASID
INVALIDATE_ENTRY_NUM_MAX = 1 << 19  # IOMMU_HWPT_INVALIDATE_ENTRY_NUM_MAX (hw_pagetable.c)


def hooks_of(domain: Domain) -> DriverHooks:
    """The hooks of the driver that built ``domain``."""
    return domain.owner.machine.hooks(domain.owner.driver_name)


class DomainAdapter:
    """Presents a driver domain to the IoPagetable as its ``IoDomain`` (map/unmap via hooks)."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self._hooks = hooks_of(domain)

    @property
    def pgsize_bitmap(self) -> int:
        return self.domain.pgsize_bitmap

    @property
    def aperture_start(self) -> int:
        return self.domain.aperture_start

    @property
    def aperture_end(self) -> int:
        return self.domain.aperture_end

    def map(self, iova: int, pa: int, size: int, prot: int) -> None:
        failpoint("hook.domain_map")  # iommu_map(): page-table allocations
        self._map(iova, pa, size, prot)

    def _map(self, iova: int, pa: int, size: int, prot: int) -> None:
        self._hooks.domain_map(domain=self.domain, iova=iova, pa=pa, size=size, prot=prot)

    def map_pages(self, iova: int, pa: int, pgsize: int, pgcount: int, prot: int) -> None:
        failpoint("hook.domain_map")
        self._hooks.domain_map_pages(
            domain=self.domain, iova=iova, pa=pa, pgsize=pgsize, pgcount=pgcount, prot=prot
        )

    def unmap(self, iova: int, size: int) -> int:
        return self._hooks.domain_unmap(domain=self.domain, iova=iova, size=size)


class Hwpt(IommufdObject):
    """Common part of both HWPT kinds (``struct iommufd_hw_pagetable``)."""

    def __init__(self, ictx: IommuFd, domain: Domain) -> None:
        super().__init__(ictx)
        self.domain = domain
        domain.hwpt = self
        self.fault: Fault | None = None
        self.devices: list[Device] = []

    @property
    def pasid_compat(self) -> bool:
        return self.domain.pasid_compat

    def destroy(self) -> None:
        hooks_of(self.domain).domain_free(domain=self.domain)


class HwptPaging(Hwpt):
    TYPE = ObjType.HWPT_PAGING

    def __init__(self, ictx: IommuFd, domain: Domain, ioas: Ioas, *, auto_domain: bool) -> None:
        super().__init__(ictx, domain)
        self.ioas = ioas
        self.auto_domain = auto_domain
        self.nest_parent = domain.nest_parent
        self.adapter = DomainAdapter(domain)

    def destroy(self) -> None:
        self.ioas.iopt.remove_domain(self.adapter)
        self.ioas.hwpt_list.remove(self)
        super().destroy()


class HwptNested(Hwpt):
    TYPE = ObjType.HWPT_NESTED

    def __init__(
        self, ictx: IommuFd, domain: Domain, parent: HwptPaging, viommu: Viommu | None
    ) -> None:
        super().__init__(ictx, domain)
        self.parent = parent
        self.viommu = viommu

    @property
    def ioas(self) -> Ioas:
        return self.parent.ioas


def hwpt_paging_alloc(
    ictx: IommuFd,
    ioas: Ioas,
    idev: Device,
    flags: int,
    *,
    auto_domain: bool,
    data_type: int = U.IOMMU_HWPT_DATA_NONE,
    data_len: int = 0,
    user_data: Callable[[], bytes] | None = None,
) -> HwptPaging:
    """Allocate a paging domain for ``idev`` and fill it from ``ioas`` (all-or-nothing).

    ``user_data`` reads the ``data_len`` bytes of vendor data of IOMMU_HWPT_ALLOC (Linux 7.2
    hands it to ``domain_alloc_paging_flags``; the self-test's generic page table takes its
    ``pagetable_type`` there); a driver that takes none refuses it with EOPNOTSUPP unread, as
    the 7.2 vendor drivers do. The new object is not yet in the table; the
    caller installs it.
    """
    if flags & ~PAGING_FLAGS:
        raise err(errno.EOPNOTSUPP, f"unknown hwpt flags {flags:#x}")
    if flags & U.IOMMU_HWPT_FAULT_ID_VALID and flags & U.IOMMU_HWPT_ALLOC_NEST_PARENT:
        raise err(errno.EOPNOTSUPP, "a nest parent cannot take IOPF")
    hooks = idev.hooks
    data = UserData(data_type, data_len, user_data) if user_data is not None else None
    failpoint("hook.domain_alloc_user")
    domain = hooks.domain_alloc_user(
        iommu=idev.hw,
        dev=idev.dev,
        flags=flags & ~U.IOMMU_HWPT_FAULT_ID_VALID,
        parent=None,
        viommu=None,
        user_data=data,
    )
    hwpt = HwptPaging(ictx, domain, ioas, auto_domain=auto_domain)
    try:
        ioas.iopt.add_domain(hwpt.adapter)
    except OSError:
        hooks.domain_free(domain=domain)
        raise
    ioas.hwpt_list.append(hwpt)
    hwpt.hold(ioas)
    return hwpt


def hwpt_nested_alloc(
    ictx: IommuFd,
    parent: HwptPaging,
    viommu: Viommu | None,
    idev: Device,
    flags: int,
    data_type: int,
    data: bytes,
) -> HwptNested:
    if flags & ~NESTED_FLAGS or not data:
        raise err(errno.EOPNOTSUPP, "bad flags or no vendor data for a nested HWPT")
    if parent.auto_domain or not parent.nest_parent or parent.domain.owner is not idev.hw:
        raise err(errno.EINVAL, "parent must be a nest-parent HWPT of the device's IOMMU")
    failpoint("hook.domain_alloc_user")
    domain = idev.hooks.domain_alloc_user(
        iommu=idev.hw,
        dev=idev.dev,
        flags=flags & ~U.IOMMU_HWPT_FAULT_ID_VALID,
        parent=parent.domain,
        viommu=viommu.drv if viommu is not None else None,
        user_data=UserData.of(data_type, data),
    )
    hwpt = HwptNested(ictx, domain, parent, viommu)
    hwpt.hold(viommu if viommu is not None else parent)
    return hwpt


@ioctl_op(U.IOMMU_HWPT_ALLOC, U.IommuHwptAlloc, "reserved")
def _hwpt_alloc(ucmd: Ucmd) -> None:
    cmd = ucmd.zeroed("reserved", "reserved2")
    ictx = ucmd.ictx
    objs = ictx.objects
    none = cmd.data_type == U.IOMMU_HWPT_DATA_NONE
    if (none and cmd.data_len) or (not none and not cmd.data_len):
        raise err(errno.EINVAL, "data_len must be 0 exactly when data_type is NONE")
    idev = objs.get_device(cmd.dev_id)
    try:
        pt_obj = objs.get(cmd.pt_id)
    except OSError:
        raise err(errno.EINVAL, f"pt_id {cmd.pt_id} does not exist") from None
    # The pt's kind by its ObjType (viommu.py imports this module: no class check here).
    if pt_obj.TYPE not in (ObjType.IOAS, ObjType.HWPT_PAGING, ObjType.VIOMMU):
        raise err(errno.EINVAL, f"pt_id {cmd.pt_id} is a {pt_obj.TYPE.value}")

    def user_data() -> bytes:
        # The kernel's driver copies the vendor data itself, once the pt type is known.
        return ucmd.caller.read(cmd.data_uptr, cmd.data_len) if cmd.data_len else b""

    hwpt: Hwpt
    if isinstance(pt_obj, Ioas):
        hwpt = hwpt_paging_alloc(
            ictx,
            pt_obj,
            idev,
            cmd.flags,
            auto_domain=False,
            data_type=cmd.data_type,
            data_len=cmd.data_len,
            user_data=None if none else user_data,
        )
    elif isinstance(pt_obj, HwptPaging):
        hwpt = hwpt_nested_alloc(ictx, pt_obj, None, idev, cmd.flags, cmd.data_type, user_data())
    else:
        viommu = cast("Viommu", pt_obj)
        hwpt = hwpt_nested_alloc(
            ictx, viommu.hwpt, viommu, idev, cmd.flags, cmd.data_type, user_data()
        )
    if cmd.flags & U.IOMMU_HWPT_FAULT_ID_VALID:
        # As the kernel: the fault object is looked up only after the HWPT exists.
        try:
            fault = objs.get_fault(cmd.fault_id)
        except OSError:
            hwpt.destroy()
            hwpt.release_holds()
            raise
        hwpt.fault = fault
        hwpt.hold(fault)
    try:
        cmd.out_hwpt_id = objs.alloc_id(hwpt)
    except OSError:
        # iommufd_object_abort_and_destroy(): the domain leaves the IOAS and is freed.
        hwpt.destroy()
        hwpt.release_holds()
        raise
    ucmd.respond()


@ioctl_op(U.IOMMU_HWPT_INVALIDATE, U.IommuHwptInvalidate, "reserved")
def _hwpt_invalidate(ucmd: Ucmd) -> None:
    cmd = ucmd.cmd
    requested = cmd.entry_num
    result = InvalidateResult(0)
    try:
        if cmd.reserved:
            raise err(errno.EOPNOTSUPP, "hwpt_invalidate __reserved must be 0")
        # Linux 7.2 bounds the array before any user memory is read.
        if requested and (
            not cmd.data_uptr
            or not cmd.entry_len
            or cmd.entry_len > PAGE_SIZE
            or requested > INVALIDATE_ENTRY_NUM_MAX
        ):
            raise err(errno.EINVAL, "bad data_uptr, entry_len or entry_num")
        target = ucmd.ictx.objects.get(cmd.hwpt_id)
        drv_target: Domain | ViommuBase
        if isinstance(target, HwptNested):
            drv_target = target.domain
            owner = target.domain.owner
        elif target.TYPE is ObjType.VIOMMU:
            drv_target = cast("Viommu", target).drv
            owner = drv_target.owner
        else:
            raise err(errno.EINVAL, f"object {cmd.hwpt_id} cannot be invalidated")
        hooks = owner.machine.hooks(owner.driver_name)
        # The array is read only once the target is known to take one (the driver reads it).
        entries = [
            ucmd.caller.read(cmd.data_uptr + i * cmd.entry_len, cmd.entry_len)
            for i in range(requested)
        ]
        failpoint("hook.cache_invalidate_user")
        result = hooks.cache_invalidate_user(
            target=drv_target, data_type=cmd.data_type, entries=entries
        )
    finally:
        cmd.entry_num = result.handled
        ucmd.respond()
    if result.error:
        raise err(result.error, f"invalidation stopped at entry {result.handled}")


@ioctl_op(U.IOMMU_HWPT_SET_DIRTY_TRACKING, U.IommuHwptSetDirtyTracking, "reserved")
def _set_dirty_tracking(ucmd: Ucmd) -> None:
    cmd = ucmd.cmd
    # The kernel ignores __reserved here (only the flags are checked).
    if cmd.flags & ~U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE:
        raise err(errno.EOPNOTSUPP, "unknown dirty tracking flags")
    hwpt = ucmd.ictx.objects.get_hwpt_paging(cmd.hwpt_id)
    if not hwpt.domain.dirty_tracking:
        raise err(errno.EOPNOTSUPP, "HWPT was not allocated with DIRTY_TRACKING")
    enable = bool(cmd.flags & U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE)
    hooks = hooks_of(hwpt.domain)
    failpoint("hook.set_dirty_tracking")  # before the wipe, so an injected failure changes nothing
    if enable:
        # iopt_set_dirty_tracking(): wipe stale dirty bits first, for a clean snapshot.
        for iova, last, *_rest in hwpt.ioas.iopt.areas():
            hooks.read_and_clear_dirty(
                domain=hwpt.domain, iova=iova, length=last - iova + 1, clear=True, report=False
            )
    hooks.set_dirty_tracking(domain=hwpt.domain, enable=enable)
    hwpt.domain.dirty_enabled = enable


@ioctl_op(U.IOMMU_HWPT_GET_DIRTY_BITMAP, U.IommuHwptGetDirtyBitmap, "data")
def _get_dirty_bitmap(ucmd: Ucmd) -> None:
    """``iommufd_hwpt_get_dirty_bitmap()`` as Linux 7.2 does it (hw_pagetable.c,
    io_pagetable.c, iova_bitmap.c).

    After the range checks, the driver reads and clears one contiguous run of areas at a
    time from ``iova``; the first gap ends the walk. Errors of that walk are dropped
    (``iova_bitmap_for_each()``'s result is ignored) and so are bits whose bitmap page
    cannot be pinned (``iova_bitmap_set()`` gives up on them): the ioctl then still
    succeeds. Bits are only ever set in the user's bitmap, never cleared.

    A run whose bits reach from a mapped bitmap page into an unmapped one keeps the bits
    in the mapped pages up to the first unmapped one and loses the rest (``iova_bitmap_set()``
    pins from the run's first byte on and gives up at the first page it cannot pin); a run
    whose first byte is unmapped loses all its bits; later runs pin afresh from their own
    first byte. The dirty bits of the IOPTEs are cleared all the same (unless NO_CLEAR).
    """
    cmd = ucmd.cmd
    if cmd.flags & ~U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR or cmd.reserved:
        raise err(errno.EOPNOTSUPP, "unknown dirty bitmap flags")
    hwpt = ucmd.ictx.objects.get_hwpt_paging(cmd.hwpt_id)
    iopt = hwpt.ioas.iopt
    page_size = cmd.page_size
    # iommufd_check_iova_range()
    last = cmd.iova + ((cmd.length - 1) & U.U64_MAX)
    if last > U.U64_MAX:
        raise err(errno.EOVERFLOW, "iova + length wraps")
    end = (last + 1) & U.U64_MAX
    align = iopt.iova_alignment
    if cmd.iova & (align - 1) or end & (align - 1):
        raise err(errno.EINVAL, "dirty bitmap range not aligned to the IOAS")
    if not page_size:
        raise err(errno.EINVAL, "page_size 0")
    if cmd.iova & (page_size - 1) or end & (page_size - 1):
        raise err(errno.EINVAL, "dirty bitmap range not aligned to page_size")
    if not hwpt.domain.dirty_tracking:
        raise err(errno.EOPNOTSUPP, "HWPT was not allocated with DIRTY_TRACKING")
    failpoint("hook.read_and_clear_dirty")  # iova_bitmap_alloc()
    hooks = hooks_of(hwpt.domain)

    def walk(clear: bool) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        cur = cmd.iova
        for area_iova, area_last, *_rest in iopt.areas():
            if area_last < cur:
                continue
            if area_iova > cur or cur > last:
                break  # a gap (or the end): iopt_for_each_contig_area() stops
            seg_last = min(last, area_last)
            try:
                runs += hooks.read_and_clear_dirty(
                    domain=hwpt.domain,
                    iova=cur,
                    length=seg_last - cur + 1,
                    clear=clear,
                    report=True,
                )
            except OSError:
                break
            cur = seg_last + 1
        return runs

    shift = (page_size & -page_size).bit_length() - 1  # __ffs(page_size)

    def byte_spans(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """``(first bit, last bit)`` of each run in the user's bitmap."""
        start = cmd.iova
        return [
            (
                ((iova if iova > start else start) - start) >> shift,
                ((iova + size - 1 if iova + size - 1 < last else last) - start) >> shift,
            )
            for iova, size in runs
        ]

    # The bitmap bytes the bits land in are read (their pages faulted in) before any dirty
    # bit is cleared, so that an injected failure leaves the D bits alone; the kernel pins
    # them while it records (iova_bitmap_set()), which the result does not tell apart.
    cache: dict[int, int] = {}  # user bitmap byte address -> its value

    def load(first_bit: int, last_bit: int) -> bool:
        lo, hi = cmd.data + (first_bit >> 3), cmd.data + (last_bit >> 3)
        if lo < 0 or not ucmd.caller.is_mapped(lo, hi - lo + 1):
            return False  # not all pinnable: pinned_prefix() cuts the run to what lands
        if lo not in cache or hi not in cache or any(a not in cache for a in range(lo, hi + 1)):
            got = ucmd.caller.read(lo, hi - lo + 1)
            for addr, byte in zip(range(lo, hi + 1), got, strict=True):
                cache.setdefault(addr, byte)
        return True

    def groups(spans: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """Spans whose bitmap bytes touch, together: one read and one write each."""
        out: list[list[tuple[int, int]]] = []
        for span in sorted(spans):
            if out and span[0] >> 3 <= (out[-1][-1][1] >> 3) + 1:
                out[-1].append(span)
            else:
                out.append([span])
        return out

    def pinned_prefix(first_bit: int, last_bit: int) -> tuple[int, int] | None:
        """The part of one run's bits ``iova_bitmap_set()`` (Linux 7.2 iova_bitmap.c) lands
        when its bitmap bytes are not all mapped: ``iova_bitmap_advance_to()`` pins the
        bitmap from the run's first byte on and ``pin_user_pages_fast()`` stops at the
        first page it cannot pin, so the bits in the mapped pages before it are set; past
        them ``iova_bitmap_get()`` fails to pin the next page (-EFAULT) and the rest of
        the run is dropped. None when the first byte's page itself is unmapped."""
        lo, hi = cmd.data + (first_bit >> 3), cmd.data + (last_bit >> 3)
        if not ucmd.caller.is_mapped(lo, 1):
            return None
        page = (lo | (PAGE_SIZE - 1)) + 1
        while page <= hi:
            if not ucmd.caller.is_mapped(page, 1):
                return first_bit, ((page - cmd.data) << 3) - 1
            page += PAGE_SIZE
        return first_bit, last_bit

    def parts(group: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """The group at once when its bytes are all mapped, else run by run, each cut to
        the bits in the bitmap pages the kernel could pin (:func:`pinned_prefix`)."""
        whole = (group[0][0], max(last for _, last in group))
        if load(*whole):
            return [group]
        cut = [pinned_prefix(*span) for span in group]
        return [[span] for span in cut if span is not None and load(*span)]

    runs = walk(False)
    clear = not cmd.flags & U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
    second: list[tuple[int, int]] | None = None
    # All the bits at once (core/dirty_bits.py) when the runs allow it and every byte they
    # touch is mapped: the same reads, walks and writes as group by group below.
    built = span_bits(runs, cmd.iova, last, shift, max(1 << 16, len(runs) << 6))
    spans = byte_groups(built[1]) if built is not None else []
    if built is not None and spans:
        base, bits = built
        lo, hi = cmd.data + base + spans[0][0], cmd.data + base + spans[-1][1]
        if ucmd.caller.is_mapped(lo, hi - lo + 1):
            olds = [ucmd.caller.read(cmd.data + base + a, b - a + 1) for a, b in spans]
            second = walk(True) if clear else runs
            if second == runs:
                for (a, b), old in zip(spans, olds, strict=True):
                    new = int.from_bytes(old, "little") | int.from_bytes(bits[a : b + 1], "little")
                    ucmd.caller.write(
                        cmd.data + base + a, new.to_bytes(b - a + 1, "little"), pinned=True
                    )
                return
            for (a, b), old in zip(spans, olds, strict=True):
                cache.update(
                    zip(range(cmd.data + base + a, cmd.data + base + b + 1), old, strict=True)
                )
    if second is None:
        for group in groups(byte_spans(runs)):
            parts(group)
        second = walk(True) if clear else runs
    for group in groups(byte_spans(second)):
        for part in parts(group):
            # the part's bits as a string of '0'/'1' digits, bit 0 first (one slice store
            # per span), then ORed into its bytes as one little-endian integer
            first_byte = part[0][0] >> 3
            lo = cmd.data + first_byte
            hi = cmd.data + (max(last for _, last in part) >> 3)
            size = hi - lo + 1
            base_bit = first_byte << 3
            digits = bytearray(b"0") * (size << 3)
            for first_bit, last_bit in part:
                digits[first_bit - base_bit : last_bit - base_bit + 1] = b"1" * (
                    last_bit - first_bit + 1
                )
            value = int.from_bytes(bytes(map(cache.__getitem__, range(lo, hi + 1))), "little")
            out = (value | int(digits[::-1], 2)).to_bytes(size, "little")
            cache.update(zip(range(lo, hi + 1), out, strict=True))
            ucmd.caller.write(lo, out, pinned=True)
