"""Raw-bytes helpers for the port of tools/testing/selftests/iommu (iommufd_utils.h).

Every helper packs the kernel's struct layout by hand with :mod:`struct` and issues it through
``IommuFd.ioctl``, so the tests check the binary interface, not the model's typed layer.
Helpers return the errno (0 on success) the way the C helpers return ``ioctl()``'s result
with ``errno`` set; the ``*_ok`` variants assert success.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

import attrs

from iommufd_model.mock import selftest as T
from iommufd_model.uapi import iommufd as U

PAGE_SIZE = 4096
MOCK_PAGE_SIZE = PAGE_SIZE // 2
HUGEPAGE_SIZE = 2 << 20
BUFFER_SIZE = PAGE_SIZE * 16
MOCK_APERTURE_START = 1 << 24
MOCK_APERTURE_LAST = (1 << 31) - 1
U64_MAX = (1 << 64) - 1
RW = U.IOMMU_IOAS_MAP_WRITEABLE | U.IOMMU_IOAS_MAP_READABLE
TEST_CMD_SIZE = 72


def pack(fmt: str, *values: int) -> bytearray:
    return bytearray(struct.pack("<" + fmt, *values))


def field(buf: bytearray, fmt: str, offset: int) -> Any:
    return struct.unpack_from("<" + fmt, buf, offset)[0]


class Kfd:
    """One test process with the kernel tests' global ``buffer`` and an open /dev/iommu."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.proc = machine.new_process()
        # posix_memalign(HUGEPAGE_SIZE) + mmap(MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED)
        self.buffer = self.proc.mmap(BUFFER_SIZE, align=HUGEPAGE_SIZE)
        self.ictx = self.proc.open_iommufd()
        self.fd = self.ictx.fd

    # -- plumbing -------------------------------------------------------------------------
    def ioctl(self, cmd: int, buf: Any) -> int:
        try:
            self.ictx.ioctl(cmd, buf)
        except OSError as exc:
            assert exc.errno, "an ioctl failure must carry an errno"
            return exc.errno
        return 0

    def ioctl_value(self, cmd: int, arg: Any) -> tuple[int, int]:
        """An ioctl whose return value matters (the VFIO compat ones): (errno, value)."""
        try:
            return 0, self.ictx.ioctl(cmd, arg)
        except OSError as exc:
            assert exc.errno, "an ioctl failure must carry an errno"
            return exc.errno, -1

    def test_cmd(
        self, op: int, id_: int, payload: bytes | bytearray = b""
    ) -> tuple[int, bytearray]:
        """IOMMU_TEST_CMD with ``payload`` as the union; returns (errno, the struct after)."""
        buf = pack("IIII", TEST_CMD_SIZE, op, id_, 0) + bytearray(payload).ljust(48, b"\0")
        buf += pack("II", 0, 0)
        return self.ioctl(T.IOMMU_TEST_CMD, buf), buf

    def close(self) -> None:
        self.proc.close(self.fd)

    def mmap(self, length: int, offset: int) -> tuple[int, Any]:
        """``mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset)``:
        (errno, the mapping or None)."""
        try:
            return 0, self.ictx.mmap(offset, length)
        except OSError as exc:
            assert exc.errno, "an mmap failure must carry an errno"
            return exc.errno, None

    # -- iommufd.h commands ----------------------------------------------------------------
    def ioas_alloc(self) -> int:
        buf = pack("III", 12, 0, 0)
        assert self.ioctl(U.IOMMU_IOAS_ALLOC, buf) == 0
        return int(field(buf, "I", 8))

    def destroy(self, id_: int) -> int:
        return self.ioctl(U.IOMMU_DESTROY, pack("II", 8, id_))

    def map(
        self,
        ioas_id: int,
        va: int,
        length: int,
        iova: int = 0,
        *,
        fixed: bool = False,
        flags: int = RW,
    ) -> tuple[int, int]:
        if fixed:
            flags |= U.IOMMU_IOAS_MAP_FIXED_IOVA
        buf = pack("IIIIQQQ", 40, flags, ioas_id, 0, va, length, iova)
        return self.ioctl(U.IOMMU_IOAS_MAP, buf), int(field(buf, "Q", 32))

    def map_ok(self, ioas_id: int, va: int, length: int, iova: int = 0, **kw: Any) -> int:
        rc, out = self.map(ioas_id, va, length, iova, **kw)
        assert rc == 0, f"map failed with errno {rc}"
        return out

    def unmap(self, ioas_id: int, iova: int, length: int) -> tuple[int, int]:
        buf = pack("IIQQ", 24, ioas_id, iova, length)
        return self.ioctl(U.IOMMU_IOAS_UNMAP, buf), int(field(buf, "Q", 16))

    def unmap_ok(self, ioas_id: int, iova: int, length: int) -> int:
        rc, out = self.unmap(ioas_id, iova, length)
        assert rc == 0, f"unmap failed with errno {rc}"
        return out

    def copy(
        self,
        dst_ioas: int,
        src_ioas: int,
        length: int,
        dst_iova: int,
        src_iova: int,
        flags: int = U.IOMMU_IOAS_MAP_FIXED_IOVA | RW,
    ) -> int:
        buf = pack("IIIIQQQ", 40, flags, dst_ioas, src_ioas, length, dst_iova, src_iova)
        return self.ioctl(U.IOMMU_IOAS_COPY, buf)

    def allow_iovas(self, ioas_id: int, ranges: list[tuple[int, int]]) -> int:
        uptr = self.proc.mmap(max(16 * len(ranges), 1))
        self.proc.write(uptr, b"".join(struct.pack("<QQ", s, e) for s, e in ranges))
        buf = pack("IIIIQ", 24, ioas_id, len(ranges), 0, uptr)
        return self.ioctl(U.IOMMU_IOAS_ALLOW_IOVAS, buf)

    def option(self, option_id: int, op: int, object_id: int, val64: int) -> tuple[int, int]:
        buf = pack("IIHHIQ", 24, option_id, op, 0, object_id, val64)
        return self.ioctl(U.IOMMU_OPTION, buf), int(field(buf, "Q", 16))

    def hwpt_alloc(
        self,
        dev_id: int,
        pt_id: int,
        flags: int,
        data_type: int = 0,
        data: bytes | bytearray | None = None,
        *,
        data_len: int | None = None,
        fault_id: int = 0,
    ) -> tuple[int, int]:
        """IOMMU_HWPT_ALLOC; ``data`` goes to fresh user memory (None: a NULL data_uptr)."""
        uptr = self.user_bytes(data) if data else 0
        size = len(data) if data is not None else 0
        if data_len is not None:
            size = data_len
        buf = pack(
            "IIIIIIIIQII", 48, flags, dev_id, pt_id, 0, 0, data_type, size, uptr, fault_id, 0
        )
        return self.ioctl(U.IOMMU_HWPT_ALLOC, buf), int(field(buf, "I", 16))

    def hwpt_alloc_ok(self, dev_id: int, pt_id: int, flags: int = 0, *args: Any, **kw: Any) -> int:
        rc, hwpt = self.hwpt_alloc(dev_id, pt_id, flags, *args, **kw)
        assert rc == 0, f"hwpt_alloc failed with errno {rc}"
        return hwpt

    def user_bytes(self, data: bytes | bytearray) -> int:
        """Copy ``data`` into a new user mapping and return its address."""
        uptr: int = self.proc.mmap(max(len(data), 1))
        self.proc.write(uptr, bytes(data))
        return uptr

    def hwpt_invalidate(
        self, hwpt_id: int, reqs: bytes | bytearray | None, data_type: int, entry_len: int, num: int
    ) -> tuple[int, int]:
        """``_test_cmd_hwpt_invalidate()``: (errno, entry_num after); reqs None = NULL."""
        uptr = self.user_bytes(reqs) if reqs is not None else 0
        buf = pack("IIQIIII", 32, hwpt_id, uptr, data_type, entry_len, num, 0)
        return self.ioctl(U.IOMMU_HWPT_INVALIDATE, buf), int(field(buf, "I", 24))

    def fault_alloc(self) -> tuple[int, int]:
        buf = pack("IIII", 16, 0, 0, 0)
        assert self.ioctl(U.IOMMU_FAULT_QUEUE_ALLOC, buf) == 0
        fault_id, fault_fd = struct.unpack_from("<II", buf, 8)
        assert fault_id and fault_fd
        return fault_id, fault_fd

    def viommu_alloc(
        self,
        dev_id: int,
        hwpt_id: int,
        vtype: int,
        data: bytes | bytearray | None = None,
        flags: int = 0,
    ) -> tuple[int, int, bytes]:
        """(errno, viommu_id, the data buffer after the call)."""
        uptr = self.user_bytes(data) if data else 0
        size = len(data) if data else 0
        buf = pack("IIIIIIIIQ", 40, flags, vtype, dev_id, hwpt_id, 0, size, 0, uptr)
        rc = self.ioctl(U.IOMMU_VIOMMU_ALLOC, buf)
        out = self.proc.read(uptr, size) if size else b""
        return rc, int(field(buf, "I", 20)), out

    def vdevice_alloc(self, viommu_id: int, dev_id: int, virt_id: int) -> tuple[int, int]:
        buf = pack("IIIIQ", 24, viommu_id, dev_id, 0, virt_id)
        return self.ioctl(U.IOMMU_VDEVICE_ALLOC, buf), int(field(buf, "I", 12))

    def hw_queue_alloc(
        self, viommu_id: int, qtype: int, index: int, iova: int, length: int
    ) -> tuple[int, int]:
        buf = pack("IIIIIIQQ", 40, 0, viommu_id, qtype, index, 0, iova, length)
        return self.ioctl(U.IOMMU_HW_QUEUE_ALLOC, buf), int(field(buf, "I", 20))

    def veventq_alloc(self, viommu_id: int, qtype: int, depth: int = 2) -> tuple[int, int, int]:
        """``_test_cmd_veventq_alloc()`` (depth 2): (errno, veventq_id, veventq_fd)."""
        buf = pack("IIIIIIII", 32, 0, viommu_id, qtype, depth, 0, 0, 0)
        rc = self.ioctl(U.IOMMU_VEVENTQ_ALLOC, buf)
        return rc, int(field(buf, "I", 20)), int(field(buf, "I", 24))

    def read_file(self, fd: int, count: int) -> tuple[int, bytes]:
        """read(2) on a file of the process: (errno, bytes)."""
        try:
            return 0, self.proc.files[fd].read(count)
        except OSError as exc:
            return exc.errno or -1, b""

    def write_file(self, fd: int, data: bytes) -> tuple[int, int]:
        try:
            return 0, int(self.proc.files[fd].write(data))
        except OSError as exc:
            return exc.errno or -1, 0

    # -- IOMMU_TEST_CMD wrappers -----------------------------------------------------------
    def mock_domain(self, pt_id: int, dev_flags: int | None = None) -> tuple[int, int, int, int]:
        """(errno, stdev_id, hwpt_id, idev_id)."""
        if dev_flags is None:
            rc, buf = self.test_cmd(T.IOMMU_TEST_OP_MOCK_DOMAIN, pt_id)
        else:
            rc, buf = self.test_cmd(
                T.IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS, pt_id, pack("IIII", 0, 0, 0, dev_flags)
            )
        stdev, hwpt, idev = struct.unpack_from("<III", buf, 16)
        return rc, stdev, hwpt, idev

    def mock_domain_ok(self, pt_id: int, dev_flags: int | None = None) -> tuple[int, int, int]:
        rc, stdev, hwpt, idev = self.mock_domain(pt_id, dev_flags)
        assert rc == 0, f"mock_domain failed with errno {rc}"
        assert stdev and hwpt and idev
        return stdev, hwpt, idev

    def mock_domain_replace(self, stdev_id: int, pt_id: int) -> int:
        return self.test_cmd(T.IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE, stdev_id, pack("I", pt_id))[0]

    def add_reserved(self, ioas_id: int, start: int, length: int) -> int:
        return self.test_cmd(T.IOMMU_TEST_OP_ADD_RESERVED, ioas_id, pack("QQ", start, length))[0]

    def check_map(self, hwpt_id: int, iova: int, length: int, uptr: int) -> int:
        payload = pack("QQQ", iova, length, uptr)
        return self.test_cmd(T.IOMMU_TEST_OP_MD_CHECK_MAP, hwpt_id, payload)[0]

    def check_refs(self, uptr: int, length: int, refs: int) -> int:
        payload = pack("QQII", length, uptr, refs, 0)
        return self.test_cmd(T.IOMMU_TEST_OP_MD_CHECK_REFS, 0, payload)[0]

    def create_access(self, ioas_id: int, flags: int) -> int:
        rc, buf = self.test_cmd(T.IOMMU_TEST_OP_CREATE_ACCESS, ioas_id, pack("II", 0, flags))
        assert rc == 0, f"create_access failed with errno {rc}"
        return int(field(buf, "I", 16))

    def destroy_access(self, access_fd: int) -> None:
        self.proc.close(access_fd)

    def access_pages(
        self, access_fd: int, iova: int, length: int, uptr: int, flags: int = 0
    ) -> tuple[int, int]:
        payload = pack("IIQQQ", flags, 0, iova, length, uptr)
        rc, buf = self.test_cmd(T.IOMMU_TEST_OP_ACCESS_PAGES, access_fd, payload)
        return rc, int(field(buf, "I", 20))

    def destroy_access_pages(self, access_fd: int, item_id: int) -> int:
        payload = pack("I", item_id)
        return self.test_cmd(T.IOMMU_TEST_OP_DESTROY_ACCESS_PAGES, access_fd, payload)[0]

    def access_rw(self, access_fd: int, iova: int, length: int, uptr: int, flags: int) -> int:
        payload = pack("QQQII", iova, length, uptr, flags, 0)
        return self.test_cmd(T.IOMMU_TEST_OP_ACCESS_RW, access_fd, payload)[0]

    def access_replace_ioas(self, access_fd: int, ioas_id: int) -> int:
        payload = pack("I", ioas_id)
        return self.test_cmd(T.IOMMU_TEST_OP_ACCESS_REPLACE_IOAS, access_fd, payload)[0]

    def set_memory_limit(self, limit: int) -> int:
        return self.test_cmd(T.IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT, 0, pack("I", limit))[0]

    def check_iotlb(self, hwpt_id: int, iotlb_id: int, expected: int) -> int:
        payload = pack("II", iotlb_id, expected)
        return self.test_cmd(T.IOMMU_TEST_OP_MD_CHECK_IOTLB, hwpt_id, payload)[0]

    def check_iotlb_all(self, hwpt_id: int, expected: int) -> None:
        for i in range(T.MOCK_NESTED_DOMAIN_IOTLB_NUM):
            assert self.check_iotlb(hwpt_id, i, expected) == 0, (i, expected)

    def check_dev_cache(self, idev_id: int, cache_id: int, expected: int) -> int:
        payload = pack("II", cache_id, expected)
        return self.test_cmd(T.IOMMU_TEST_OP_DEV_CHECK_CACHE, idev_id, payload)[0]

    def check_dev_cache_all(self, idev_id: int, expected: int) -> None:
        for i in range(T.MOCK_DEV_CACHE_NUM):
            assert self.check_dev_cache(idev_id, i, expected) == 0, (i, expected)

    def trigger_iopf(self, dev_id: int, pasid: int, fault_fd: int) -> int:
        """``_test_cmd_trigger_iopf()``: trigger, read one fault, answer it with SUCCESS."""
        perm = U.IOMMU_PGFAULT_PERM_READ | U.IOMMU_PGFAULT_PERM_WRITE
        payload = pack("IIIIQ", dev_id, pasid, 0x2, perm, 0xDEADBEAF)
        rc = self.test_cmd(T.IOMMU_TEST_OP_TRIGGER_IOPF, 0, payload)[0]
        if rc:
            return rc
        rc, data = self.read_file(fault_fd, U.IommuHwptPgfault.SIZE)
        if rc or not data:
            return errno.EIO
        cookie = field(bytearray(data), "I", 36)
        response = struct.pack("<II", cookie, U.IOMMUFD_PAGE_RESP_SUCCESS)
        rc, done = self.write_file(fault_fd, response)
        return 0 if not rc and done > 0 else errno.EIO

    def trigger_vevents(self, dev_id: int, n: int) -> int:
        for _ in range(n):
            rc = self.test_cmd(T.IOMMU_TEST_OP_TRIGGER_VEVENT, 0, pack("I", dev_id))[0]
            if rc:
                return rc
        return 0

    def read_vevents(self, fd: int, n: int, virt_id: int, prev_seq: list[int]) -> int:
        """``_test_cmd_read_vevents()``; ``prev_seq`` is a one-element box (int *)."""
        rec = 8 + 4  # struct iommufd_vevent_header + struct iommu_viommu_event_selftest
        rc, data = self.read_file(fd, n * rec)
        if rc or not data:
            return errno.EFAULT
        data = data.ljust(n * rec, b"\0")  # the C buffer is calloc()ed
        for i in range(n):
            flags, seq = struct.unpack_from("<Ii", data, i * rec)
            if flags & U.IOMMU_VEVENTQ_FLAG_LOST_EVENTS or seq - prev_seq[0] > 1:
                prev_seq[0] = seq
                return errno.EOVERFLOW
            prev_seq[0] = seq
            # as the C helper: the payload looked at is always the first record's
            if struct.unpack_from("<I", data, 8)[0] != virt_id:
                return errno.EINVAL
        return 0

    def pasid_attach(self, stdev_id: int, pasid: int, pt_id: int) -> int:
        return self.test_cmd(T.IOMMU_TEST_OP_PASID_ATTACH, stdev_id, pack("II", pasid, pt_id))[0]

    def pasid_replace(self, stdev_id: int, pasid: int, pt_id: int) -> int:
        return self.test_cmd(T.IOMMU_TEST_OP_PASID_REPLACE, stdev_id, pack("II", pasid, pt_id))[0]

    def pasid_detach(self, stdev_id: int, pasid: int) -> int:
        return self.test_cmd(T.IOMMU_TEST_OP_PASID_DETACH, stdev_id, pack("I", pasid))[0]

    def pasid_check_hwpt(self, stdev_id: int, pasid: int, hwpt_id: int) -> int:
        payload = pack("II", pasid, hwpt_id)
        return self.test_cmd(T.IOMMU_TEST_OP_PASID_CHECK_HWPT, stdev_id, payload)[0]


def teardown_iommufd(k: Kfd) -> None:
    """``teardown_iommufd()``: close, then a fresh fd must see no pins left on ``buffer``."""
    errors = list(k.ictx.internal_errors)
    k.close()
    assert not errors, errors
    fresh = k.proc.open_iommufd()
    checker = Kfd.__new__(Kfd)
    checker.machine, checker.proc, checker.buffer = k.machine, k.proc, k.buffer
    checker.ictx, checker.fd = fresh, fresh.fd
    assert checker.check_refs(k.buffer, BUFFER_SIZE, 0) == 0
    checker.close()


@attrs.frozen
class IoasVariant:
    mock_domains: int = 0
    memory_limit: int = 0
    pasid_capable: bool = False


IOAS_VARIANTS = {
    "no_domain": IoasVariant(),
    "mock_domain": IoasVariant(mock_domains=1, pasid_capable=True),
    "two_mock_domain": IoasVariant(mock_domains=2),
    "mock_domain_limit": IoasVariant(mock_domains=1, memory_limit=16),
}


@attrs.define
class IoasFixture:
    """FIXTURE(iommufd_ioas): the fd, the IOAS and the last mock domain created."""

    k: Kfd
    variant: IoasVariant
    ioas_id: int = 0
    stdev_id: int = 0
    hwpt_id: int = 0
    device_id: int = 0
    base_iova: int = 0
    device_pasid_id: int = 0
