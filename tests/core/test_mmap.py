"""mmap() of the iommufd (core/mmap.py) against Linux 7.2's driver.c / main.c rules.

The mock vIOMMU with selftest data registers two pages (selftest.c ``mock_viommu_init``);
these tests map them and check every errno of ``iommufd_fops_mmap`` and of the syscall
before it, the users reference a mapping holds, the deferred release of the context while a
mapping lives, and that failed allocations leave no region behind.
"""

from __future__ import annotations

import errno
import struct

import pytest

from helpers import PAGE, World, check_invariants, snapshot
from iommufd_model.core.mmap import (
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    MmapOwner,
    MmapTable,
    MmioRegion,
    PhysicalRegion,
)
from iommufd_model.failnth import sweep
from iommufd_model.hw.regs import Mmio
from iommufd_model.mock import selftest as T
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import iommufd as U

DATA = struct.pack("<IIQQ", 0xBEEF, 0, 0, 0)  # struct iommu_viommu_selftest


class ViommuWorld(World):
    """A bound mock device, a nest-parent HWPT on an IOAS, and helpers for vIOMMUs."""

    def __init__(self) -> None:
        super().__init__()
        self.ioas = self.fd.ioas_alloc()
        self.parent = self.fd.hwpt_alloc(
            self.dev_id, self.ioas, flags=U.IOMMU_HWPT_ALLOC_NEST_PARENT
        )

    def viommu(self, data: bytes = DATA) -> tuple[int, int, int]:
        """(vIOMMU id, out_mmap_offset, out_mmap_length)."""
        vid, out = self.fd.viommu_alloc_data(
            self.dev_id, self.parent, T.IOMMU_VIOMMU_TYPE_SELFTEST, data
        )
        if len(out) < 24:
            return vid, 0, 0
        _in, _out, offset, length = struct.unpack("<IIQQ", out)
        return vid, offset, length


def test_mock_viommu_region_is_two_pages_after_the_first() -> None:
    w = ViommuWorld()
    vid, offset, length = w.viommu()
    # _iommufd_alloc_mmap skips the first page; mock_viommu_init maps two pages
    assert (offset, length) == (PAGE, 2 * PAGE)
    _vid2, offset2, _ = w.viommu()
    assert offset2 == 3 * PAGE  # lowest free range after the first region
    w.fd.destroy(vid)
    _vid3, offset3, _ = w.viommu()
    assert offset3 == PAGE  # the freed range is reused
    assert w.fd.mmaps.regions() == [(PAGE, 2 * PAGE), (3 * PAGE, 2 * PAGE)]
    check_invariants(w.fd)


def test_loopback_read_write_and_ebusy_while_mapped() -> None:
    w = ViommuWorld()
    vid, offset, length = w.viommu()
    vma = w.fd.mmap(offset, length)
    assert struct.unpack("<I", vma.read(0, 4))[0] == 0xBEEF
    assert vma.read(4, PAGE - 4) == bytes(PAGE - 4)  # __GFP_ZERO
    vma.write(PAGE + 8, b"\x11\x22")
    assert vma.read(PAGE + 8, 2) == b"\x11\x22"
    assert_errno(errno.EFAULT, lambda: vma.read(length - 1, 2))  # beyond the VMA
    assert_errno(errno.EBUSY, lambda: w.fd.destroy(vid))
    # a second mapping (or a fork's copy) holds its own reference
    other = vma.dup()
    vma.close()
    vma.close()  # munmap of an unmapped range is no error
    assert_errno(errno.EFAULT, lambda: vma.read(0, 4))
    assert_errno(errno.EBUSY, lambda: w.fd.destroy(vid))
    other.close()
    w.fd.destroy(vid)
    assert w.fd.mmaps.regions() == []
    check_invariants(w.fd)


@pytest.mark.parametrize(
    ("delta_off", "length", "prot", "flags", "code"),
    [
        (PAGE, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, errno.ENXIO),  # inside: not exact
        (2 * PAGE, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, errno.ENXIO),
        (0, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, errno.ENXIO),  # length / 2
        (0, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, errno.ENXIO),  # length * 2
        (-PAGE, 2 * PAGE, PROT_READ, MAP_SHARED, errno.ENXIO),  # offset 0: never a region
        (100 * PAGE, 2 * PAGE, PROT_READ, MAP_SHARED, errno.ENXIO),
        (0, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, errno.EINVAL),  # !VM_SHARED
        (0, 2 * PAGE, PROT_READ | PROT_EXEC, MAP_SHARED, errno.EPERM),  # VM_EXEC
        (1, 2 * PAGE, PROT_READ, MAP_SHARED, errno.EINVAL),  # offset not page aligned
        (0, 0, PROT_READ, MAP_SHARED, errno.EINVAL),  # zero length
        (0, 2 * PAGE, PROT_READ, 0, errno.EINVAL),  # no mapping type
        (0, 2 * PAGE - 1, PROT_READ, MAP_SHARED, 0),  # do_mmap rounds the length up
    ],
)
def test_mmap_errnos(delta_off: int, length: int, prot: int, flags: int, code: int) -> None:
    w = ViommuWorld()
    vid, offset, _ = w.viommu()
    before = snapshot(w.fd)
    users = w.fd.objects.get(vid).users
    try:
        vma = w.fd.mmap(offset + delta_off, length, prot, flags)
    except OSError as exc:
        assert exc.errno == code
        assert snapshot(w.fd) == before
        assert w.fd.objects.get(vid).users == users
        assert w.fd.file_refs == 0
        return
    assert code == 0
    assert vma.length == 2 * PAGE
    vma.close()


def test_read_only_mapping_refuses_writes() -> None:
    w = ViommuWorld()
    _, offset, length = w.viommu()
    with w.fd.mmap(offset, length, PROT_READ) as vma:
        assert_errno(errno.EFAULT, lambda: vma.write(0, b"x"))
        assert struct.unpack("<I", vma.read(0, 4))[0] == 0xBEEF


def test_no_region_without_data_and_short_data() -> None:
    w = ViommuWorld()
    w.viommu(b"")  # no user data: no pages, no region (mock_viommu_init with NULL data)
    assert w.fd.mmaps.regions() == []
    # data shorter than the struct: out_data only (minimum), the region is still made
    _vid, out = w.fd.viommu_alloc_data(
        w.dev_id, w.parent, T.IOMMU_VIOMMU_TYPE_SELFTEST, struct.pack("<II", 7, 0)
    )
    assert out == struct.pack("<II", 7, 7)
    assert w.fd.mmaps.regions() == [(PAGE, 2 * PAGE)]
    with w.fd.mmap(PAGE, 2 * PAGE) as vma:
        assert vma.read(0, 4) == struct.pack("<I", 7)
        check_invariants(w.fd)
    check_invariants(w.fd)


def test_close_with_live_mapping_defers_release() -> None:
    """The VMA holds the file (vma->vm_file): closing the fd releases nothing until munmap."""
    w = ViommuWorld()
    vid, offset, length = w.viommu()
    vma = w.fd.mmap(offset, length)
    frames = w.machine.memory.frames_in_use
    w.fd.close()
    assert not w.fd.closed
    assert vid in w.fd.objects.ids()
    assert struct.unpack("<I", vma.read(0, 4))[0] == 0xBEEF
    vma.close()
    assert w.fd.closed
    assert len(w.fd.objects) == 0
    assert w.fd.mmaps.regions() == []
    assert w.machine.memory.frames_in_use < frames  # the two pages went back
    assert_errno(errno.EBADF, lambda: w.fd.mmap(offset, length))


def _alloc_buf(w: ViommuWorld, data_uptr: int) -> bytearray:
    st = U.IommuViommuAlloc(
        size=U.IommuViommuAlloc.SIZE,
        type=T.IOMMU_VIOMMU_TYPE_SELFTEST,
        dev_id=w.dev_id,
        hwpt_id=w.parent,
        data_len=len(DATA),
        data_uptr=data_uptr,
    )
    return bytearray(st.pack())


def _failing_alloc_world() -> tuple[ViommuWorld, int, dict[str, object], int]:
    """A vIOMMU world with the selftest driver data at user address ``va``, for an
    IOMMU_VIOMMU_ALLOC made to fail, and what a failure must leave as it was: the objects'
    snapshot and the frames in use. Returns ``(w, va, snapshot, frames)``."""
    w = ViommuWorld()
    va = w.proc.mmap(PAGE)
    w.proc.write(va, DATA)
    return w, va, snapshot(w.fd), w.machine.memory.frames_in_use


def test_failed_viommu_alloc_leaves_no_region_nor_pages() -> None:
    w, va, before, frames = _failing_alloc_world()

    def check(fp: object, exc: OSError | None) -> None:
        assert exc is not None
        assert snapshot(w.fd) == before
        assert w.machine.memory.frames_in_use == frames

    res = sweep(lambda: w.fd.ioctl(U.IOMMU_VIOMMU_ALLOC, _alloc_buf(w, va)), check)
    assert {"mmap.alloc", "memory.alloc_contiguous"} <= set(res.sites)
    assert w.fd.mmaps.regions() == [(PAGE, 2 * PAGE)]
    assert struct.unpack("<IIQQ", w.proc.read(va, len(DATA)))[2:] == (PAGE, 2 * PAGE)
    check_invariants(w.fd)


def test_rollback_when_out_data_cannot_be_written() -> None:
    """The copy back of the driver data fails after the driver registered its region."""
    w, va, before, frames = _failing_alloc_world()
    real_write = w.proc.write

    def failing_write(
        va: int, data: bytes | bytearray | memoryview, *, pinned: bool = False
    ) -> None:
        raise OSError(errno.EFAULT, "copy_to_user")

    w.proc.write = failing_write  # type: ignore[method-assign]
    try:
        assert_errno(errno.EFAULT, lambda: w.fd.ioctl(U.IOMMU_VIOMMU_ALLOC, _alloc_buf(w, va)))
    finally:
        w.proc.write = real_write  # type: ignore[method-assign]
    assert snapshot(w.fd) == before
    assert w.machine.memory.frames_in_use == frames


def test_driver_leftover_regions_die_with_the_viommu() -> None:
    """A region the driver never erased is erased by the core when its vIOMMU goes."""
    w = ViommuWorld()
    vid, _offset, _length = w.viommu()
    viommu = w.fd.objects.get(vid)
    pfn = w.machine.memory.alloc_frame()
    extra = viommu.mmap.alloc(PhysicalRegion(w.machine.memory, pfn * PAGE, PAGE))  # type: ignore[attr-defined]
    assert extra == 3 * PAGE
    w.fd.destroy(vid)
    assert w.fd.mmaps.regions() == []
    w.machine.memory.put_frame(pfn)
    check_invariants(w.fd)


def test_table_alloc_rules() -> None:
    class Obj:
        users = 1

    class Fake:
        mmaps = MmapTable()
        closed = False

    ictx = Fake()
    owner = MmapOwner(ictx)  # type: ignore[arg-type]
    mem = World().machine.memory
    pa = mem.alloc_contiguous(4) * PAGE
    assert_errno(errno.EINVAL, lambda: owner.alloc(PhysicalRegion(mem, pa, 0)))
    assert_errno(errno.EINVAL, lambda: owner.alloc(PhysicalRegion(mem, pa, PAGE + 1)))
    assert_errno(errno.EINVAL, lambda: PhysicalRegion(mem, pa + 8, PAGE))
    a = owner.alloc(PhysicalRegion(mem, pa, PAGE))
    b = owner.alloc(PhysicalRegion(mem, pa, 3 * PAGE))
    c = owner.alloc(PhysicalRegion(mem, pa, PAGE))
    assert (a, b, c) == (PAGE, 2 * PAGE, 5 * PAGE)
    owner.destroy(b)
    assert owner.alloc(PhysicalRegion(mem, pa, 2 * PAGE)) == 2 * PAGE  # first fit
    assert owner.alloc(PhysicalRegion(mem, pa, 2 * PAGE)) == 6 * PAGE  # 4*PAGE hole is 1 page
    with pytest.raises(ValueError):
        MmapOwner(ictx).destroy(a)  # type: ignore[arg-type]  # not its region: a driver bug
    owner.release()
    assert ictx.mmaps.regions() == []


def test_mmio_region_goes_through_the_registers() -> None:
    mmio = Mmio("vintf")
    seen: list[tuple[int, int]] = []
    mmio.define("CONFIG", 0x0, width=4, on_write=lambda old, new: seen.append((old, new)))
    mmio.define("STATUS", 0x4, width=4, reset=0x5, writable=0)
    mmio.define("BASE", 0x8, width=8)
    region = MmioRegion(mmio, 0, PAGE)
    region.write(0, struct.pack("<IIQ", 1, 0xFF, 0x1234_5678_9ABC_D000))
    assert seen == [(0, 1)]
    assert region.read(0, 16) == struct.pack("<IIQ", 1, 0x5, 0x1234_5678_9ABC_D000)
    assert region.read(0xC, 4) == struct.pack("<I", 0x1234_5678)  # upper half of BASE
    assert region.read(0x100, 8) == bytes(8)  # reserved space reads as zero
    assert_errno(errno.EINVAL, lambda: region.read(2, 4))
    assert_errno(errno.EINVAL, lambda: region.write(0, b"\x01"))
    assert_errno(errno.EFAULT, lambda: region.read(PAGE - 4, 8))
    assert_errno(errno.EINVAL, lambda: MmioRegion(mmio, 0x10, PAGE))
