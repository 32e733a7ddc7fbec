"""The typed layer: one method per command on the open iommufd, over the same dispatcher.

Each method packs the command's attrs record, calls :meth:`IommuFd.ioctl` exactly as a user
would, and returns the outputs. Arguments that the uAPI passes by user pointer (vendor data,
range arrays, bitmaps, invalidation arrays) are staged in scratch memory of the calling
process, so the bytes the model sees are the bytes a real program would hand the kernel.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import attrs

from iommufd_model.hw.memory import PAGE_MASK
from iommufd_model.uapi import iommufd as U
from iommufd_model.uapi.codec import UStruct

if TYPE_CHECKING:
    from iommufd_model.process import Process

RW = U.IOMMU_IOAS_MAP_READABLE | U.IOMMU_IOAS_MAP_WRITEABLE
S = TypeVar("S", bound=UStruct)


@attrs.define
class HwInfoReply:
    """What :meth:`TypedCalls.hw_info` returns: IOMMU_GET_HW_INFO's outputs."""

    data_type: int
    data: bytes
    capabilities: int
    max_pasid_log2: int


class TypedCalls:
    """One method per iommufd command, mixed into :class:`~iommufd_model.core.main.IommuFd`:
    each packs the uAPI record, goes through :meth:`ioctl` and returns the outputs."""

    proc: Process

    def ioctl(self, cmd: int, buf: bytearray | memoryview, *, caller: Process | None = None) -> int:
        raise NotImplementedError  # provided by IommuFd

    # -- plumbing ---------------------------------------------------------------------------
    def call(self, cmd: int, st: S) -> S:
        """Issue ``cmd`` with record ``st`` (a zero ``size`` becomes the full size)."""
        if getattr(st, "size", None) == 0:
            object.__setattr__(st, "size", st.SIZE)
        buf = bytearray(st.pack())
        self.ioctl(cmd, buf)
        return type(st).unpack(buf)

    @contextlib.contextmanager
    def _user(self, data: bytes | int) -> Iterator[int]:
        """Scratch user memory holding ``data`` (or ``data`` zero bytes); yields its VA."""
        n = data if isinstance(data, int) else len(data)
        if n == 0:
            yield 0
            return
        va = self.proc.mmap(n)
        try:
            if not isinstance(data, int):
                self.proc.write(va, data)
            yield va
        finally:
            self.proc.munmap(va, (n + PAGE_MASK) & ~PAGE_MASK)

    # -- IOAS ---------------------------------------------------------------------------------
    def ioas_alloc(self) -> int:
        """IOMMU_IOAS_ALLOC: a new, empty IOAS; returns its id."""
        return int(self.call(U.IOMMU_IOAS_ALLOC, U.IommuIoasAlloc()).out_ioas_id)

    def ioas_map(
        self, ioas_id: int, user_va: int, length: int, *, iova: int | None = None, flags: int = RW
    ) -> int:
        """IOMMU_IOAS_MAP of ``length`` bytes at the caller's ``user_va`` (``flags``: READABLE,
        WRITEABLE); at ``iova`` when given (FIXED_IOVA), else where the kernel picks. Returns
        the IOVA."""
        if iova is not None:
            flags |= U.IOMMU_IOAS_MAP_FIXED_IOVA
        st = U.IommuIoasMap(
            flags=flags, ioas_id=ioas_id, user_va=user_va, length=length, iova=iova or 0
        )
        return int(self.call(U.IOMMU_IOAS_MAP, st).iova)

    def ioas_map_file(
        self, ioas_id: int, mfd: int, start: int, length: int, *, iova: int | None = None,
        flags: int = RW,
    ) -> int:  # fmt: skip
        """IOMMU_IOAS_MAP_FILE: ``length`` bytes of memfd ``mfd`` from offset ``start``, as
        :meth:`ioas_map`. Returns the IOVA."""
        if iova is not None:
            flags |= U.IOMMU_IOAS_MAP_FIXED_IOVA
        st = U.IommuIoasMapFile(
            flags=flags, ioas_id=ioas_id, fd=mfd, start=start, length=length, iova=iova or 0
        )
        return int(self.call(U.IOMMU_IOAS_MAP_FILE, st).iova)

    def ioas_copy(
        self, dst_ioas_id: int, src_ioas_id: int, src_iova: int, length: int, *,
        dst_iova: int | None = None, flags: int = RW,
    ) -> int:  # fmt: skip
        """IOMMU_IOAS_COPY: map into ``dst_ioas_id`` what ``src_iova`` .. ``+ length`` maps in
        ``src_ioas_id`` (the same pinned pages). Returns the destination IOVA."""
        if dst_iova is not None:
            flags |= U.IOMMU_IOAS_MAP_FIXED_IOVA
        st = U.IommuIoasCopy(
            flags=flags, dst_ioas_id=dst_ioas_id, src_ioas_id=src_ioas_id, length=length,
            dst_iova=dst_iova or 0, src_iova=src_iova,
        )  # fmt: skip
        return int(self.call(U.IOMMU_IOAS_COPY, st).dst_iova)

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """IOMMU_IOAS_UNMAP of the whole areas inside ``iova`` .. ``iova + length - 1``; returns
        the bytes unmapped (ENOENT if that would split an area)."""
        st = U.IommuIoasUnmap(ioas_id=ioas_id, iova=iova, length=length)
        return int(self.call(U.IOMMU_IOAS_UNMAP, st).length)

    def ioas_unmap_all(self, ioas_id: int) -> int:
        """IOMMU_IOAS_UNMAP of everything (``iova=0, length=U64_MAX``); returns the bytes."""
        return self.ioas_unmap(ioas_id, 0, U.U64_MAX)

    def ioas_iova_ranges(self, ioas_id: int) -> tuple[list[tuple[int, int]], int]:
        """Allowed ranges and the IOVA alignment (asks twice when the first array is short)."""
        st = U.IommuIoasIovaRanges(ioas_id=ioas_id, num_iovas=0)
        st.size = st.SIZE
        buf = bytearray(st.pack())
        try:
            self.ioctl(U.IOMMU_IOAS_IOVA_RANGES, buf)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                raise
        n = U.IommuIoasIovaRanges.unpack(buf).num_iovas
        size = U.IommuIovaRange.SIZE
        with self._user(n * size) as va:
            st = U.IommuIoasIovaRanges(ioas_id=ioas_id, num_iovas=n, allowed_iovas=va)
            reply = self.call(U.IOMMU_IOAS_IOVA_RANGES, st)
            raw = self.proc.read(va, n * size) if n else b""
        ranges = [
            (r.start, r.last)
            for r in (U.IommuIovaRange.unpack(raw[i * size : (i + 1) * size]) for i in range(n))
        ]
        return ranges, int(reply.out_iova_alignment)

    def ioas_allow_iovas(self, ioas_id: int, ranges: Sequence[tuple[int, int]]) -> None:
        """IOMMU_IOAS_ALLOW_IOVAS: automatic IOVAs only inside ``ranges`` (inclusive pairs)."""
        blob = b"".join(U.IommuIovaRange(s, last).pack() for s, last in ranges)
        with self._user(blob) as va:
            st = U.IommuIoasAllowIovas(ioas_id=ioas_id, num_iovas=len(ranges), allowed_iovas=va)
            self.call(U.IOMMU_IOAS_ALLOW_IOVAS, st)

    def option(self, option_id: int, op: int, *, object_id: int = 0, val64: int = 0) -> int:
        """IOMMU_OPTION: set or get (``op``) ``option_id`` globally or on ``object_id``;
        returns ``val64`` as the kernel left it."""
        st = U.IommuOption(option_id=option_id, op=op, object_id=object_id, val64=val64)
        return int(self.call(U.IOMMU_OPTION, st).val64)

    # -- HWPT -----------------------------------------------------------------------------------
    def hwpt_alloc(
        self, dev_id: int, pt_id: int, *, flags: int = 0, data_type: int = 0,
        data: bytes = b"", fault_id: int | None = None,
    ) -> int:  # fmt: skip
        """IOMMU_HWPT_ALLOC for ``dev_id`` on ``pt_id``: a paging HWPT on an IOAS (``flags``:
        NEST_PARENT, DIRTY_TRACKING, PASID), or a nested one on a nest parent or vIOMMU from
        vendor ``data`` of ``data_type``. Returns the HWPT id."""
        if fault_id is not None:
            flags |= U.IOMMU_HWPT_FAULT_ID_VALID
        with self._user(data) as va:
            st = U.IommuHwptAlloc(
                flags=flags, dev_id=dev_id, pt_id=pt_id, data_type=data_type,
                data_len=len(data), data_uptr=va, fault_id=fault_id or 0,
            )  # fmt: skip
            return int(self.call(U.IOMMU_HWPT_ALLOC, st).out_hwpt_id)

    def hw_info(
        self, dev_id: int, *, data_type: int | None = None, data_len: int = 256
    ) -> HwInfoReply:
        """IOMMU_GET_HW_INFO for ``dev_id``: the vendor data of ``data_type`` (0: the driver's
        default), its capabilities and max PASID width."""
        flags = U.IOMMU_HW_INFO_FLAG_INPUT_TYPE if data_type is not None else 0
        with self._user(data_len) as va:
            st = U.IommuHwInfo(
                flags=flags, dev_id=dev_id, data_len=data_len, data_uptr=va,
                data_type=data_type or 0,
            )  # fmt: skip
            r = self.call(U.IOMMU_GET_HW_INFO, st)
            n = min(r.data_len, data_len)
            data = self.proc.read(va, n) if n else b""
        return HwInfoReply(r.data_type, data, r.out_capabilities, r.out_max_pasid_log2)

    def hwpt_set_dirty_tracking(self, hwpt_id: int, enable: bool) -> None:
        """IOMMU_HWPT_SET_DIRTY_TRACKING: start or stop dirty tracking on ``hwpt_id``."""
        flags = U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE if enable else 0
        self.call(
            U.IOMMU_HWPT_SET_DIRTY_TRACKING,
            U.IommuHwptSetDirtyTracking(flags=flags, hwpt_id=hwpt_id),
        )

    def hwpt_get_dirty_bitmap(
        self, hwpt_id: int, iova: int, length: int, page_size: int, *, clear: bool = True
    ) -> list[int]:
        """The IOVAs (one per ``page_size`` page) the hardware saw written."""
        nbits = -(-length // page_size)
        nbytes = -(-nbits // 64) * 8
        flags = 0 if clear else U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
        with self._user(nbytes) as va:
            st = U.IommuHwptGetDirtyBitmap(
                hwpt_id=hwpt_id, flags=flags, iova=iova, length=length, page_size=page_size,
                data=va,
            )  # fmt: skip
            self.call(U.IOMMU_HWPT_GET_DIRTY_BITMAP, st)
            bitmap = int.from_bytes(self.proc.read(va, nbytes), "little")
        return [iova + i * page_size for i in range(nbits) if bitmap >> i & 1]

    def hwpt_invalidate(
        self,
        hwpt_id: int,
        data_type: int,
        entries: Sequence[bytes],
        *,
        entry_len: int | None = None,
    ) -> int:
        """Returns the entries handled; a refusal raises OSError carrying ``handled``."""
        elen = entry_len if entry_len is not None else (len(entries[0]) if entries else 0)
        blob = b"".join(entries)
        with self._user(blob) as va:
            st = U.IommuHwptInvalidate(
                hwpt_id=hwpt_id, data_uptr=va, data_type=data_type, entry_len=elen,
                entry_num=len(entries),
            )  # fmt: skip
            st.size = st.SIZE
            buf = bytearray(st.pack())
            try:
                self.ioctl(U.IOMMU_HWPT_INVALIDATE, buf)
            except OSError as exc:
                exc.handled = U.IommuHwptInvalidate.unpack(buf).entry_num  # type: ignore[attr-defined]
                raise
        return int(U.IommuHwptInvalidate.unpack(buf).entry_num)

    # -- vIOMMU and queues --------------------------------------------------------------------
    def fault_queue_alloc(self) -> tuple[int, int]:
        """IOMMU_FAULT_QUEUE_ALLOC: ``(fault object id, fault fd)``."""
        r = self.call(U.IOMMU_FAULT_QUEUE_ALLOC, U.IommuFaultAlloc())
        return r.out_fault_id, r.out_fault_fd

    def viommu_alloc(self, dev_id: int, hwpt_id: int, viommu_type: int, data: bytes = b"") -> int:
        """IOMMU_VIOMMU_ALLOC of ``viommu_type`` for ``dev_id`` over nest parent ``hwpt_id``,
        with the type's ``data``; returns the vIOMMU id."""
        return self.viommu_alloc_data(dev_id, hwpt_id, viommu_type, data)[0]

    def viommu_alloc_data(
        self, dev_id: int, hwpt_id: int, viommu_type: int, data: bytes = b""
    ) -> tuple[int, bytes]:
        """``(vIOMMU id, the driver data as the kernel wrote it back)``, e.g. an mmap offset."""
        with self._user(data) as va:
            st = U.IommuViommuAlloc(
                type=viommu_type, dev_id=dev_id, hwpt_id=hwpt_id, data_len=len(data), data_uptr=va
            )
            viommu_id = int(self.call(U.IOMMU_VIOMMU_ALLOC, st).out_viommu_id)
            return viommu_id, self.proc.read(va, len(data)) if data else b""

    def vdevice_alloc(self, viommu_id: int, dev_id: int, virt_id: int) -> int:
        """IOMMU_VDEVICE_ALLOC: ``dev_id`` inside ``viommu_id`` as guest ID ``virt_id``;
        returns the vDEVICE id."""
        st = U.IommuVdeviceAlloc(viommu_id=viommu_id, dev_id=dev_id, virt_id=virt_id)
        return int(self.call(U.IOMMU_VDEVICE_ALLOC, st).out_vdevice_id)

    def veventq_alloc(self, viommu_id: int, veventq_type: int, depth: int) -> tuple[int, int]:
        """IOMMU_VEVENTQ_ALLOC on ``viommu_id``: ``(vEVENTQ id, its fd)``."""
        st = U.IommuVeventqAlloc(viommu_id=viommu_id, type=veventq_type, veventq_depth=depth)
        r = self.call(U.IOMMU_VEVENTQ_ALLOC, st)
        return r.out_veventq_id, r.out_veventq_fd

    def hw_queue_alloc(
        self, viommu_id: int, queue_type: int, index: int, iova: int, length: int
    ) -> int:
        """IOMMU_HW_QUEUE_ALLOC: a HW queue the hardware reads from guest memory; returns
        its id."""
        st = U.IommuHwQueueAlloc(
            viommu_id=viommu_id, type=queue_type, index=index, nesting_parent_iova=iova,
            length=length,
        )  # fmt: skip
        return int(self.call(U.IOMMU_HW_QUEUE_ALLOC, st).out_hw_queue_id)

    def destroy(self, obj_id: int) -> None:
        """IOMMU_DESTROY of object ``obj_id`` (EBUSY while in use, ENOENT if gone)."""
        self.call(U.IOMMU_DESTROY, U.IommuDestroy(id=obj_id))
