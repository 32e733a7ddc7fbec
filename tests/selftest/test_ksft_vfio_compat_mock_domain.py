"""Port of the ``vfio_compat_mock_domain`` fixture tests of iommufd.c (VFIO type1 on iommufd).

Variants Ver1v2 (VFIO_TYPE1v2_IOMMU) and Ver1v0 (VFIO_TYPE1_IOMMU). The fixture makes what
VFIO would call a group (an IOAS with a mock device), sets it as the compat IOAS and selects
the variant's type with VFIO_SET_IOMMU.
"""

from __future__ import annotations

import errno
import random
import struct
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from kutil import (
    BUFFER_SIZE,
    HUGEPAGE_SIZE,
    MOCK_APERTURE_LAST,
    MOCK_APERTURE_START,
    PAGE_SIZE,
    Kfd,
    pack,
    teardown_iommufd,
)

from iommufd_model.core import vfio_compat as V
from iommufd_model.uapi import iommufd as U

RW = V.VFIO_DMA_MAP_FLAG_READ | V.VFIO_DMA_MAP_FLAG_WRITE
INFO_SIZE = 24  # sizeof(struct vfio_iommu_type1_info)


@attrs.define
class VfioFixture:
    k: Kfd
    version: int
    ioas_id: int


@pytest.fixture(params=[V.VFIO_TYPE1v2_IOMMU, V.VFIO_TYPE1_IOMMU], ids=["Ver1v2", "Ver1v0"])
def vfio_compat_mock_domain(request: pytest.FixtureRequest, machine: Any) -> Iterator[Any]:
    k = Kfd(machine)
    t = VfioFixture(k, request.param, k.ioas_alloc())
    k.mock_domain_ok(t.ioas_id)
    assert k.ioctl(U.IOMMU_VFIO_IOAS, pack("IIHH", 12, t.ioas_id, U.IOMMU_VFIO_IOAS_SET, 0)) == 0
    assert k.ioctl_value(V.VFIO_SET_IOMMU, t.version) == (0, 0)
    yield t
    teardown_iommufd(k)


def _map(k: Kfd, vaddr: int, iova: int, size: int) -> int:
    return k.ioctl_value(V.VFIO_IOMMU_MAP_DMA, pack("IIQQQ", 32, RW, vaddr, iova, size))[0]


def _unmap(k: Kfd, iova: int, size: int, flags: int = 0) -> tuple[int, int]:
    """(errno, the size written back)."""
    buf = pack("IIQQ", 24, flags, iova, size)
    rc = k.ioctl_value(V.VFIO_IOMMU_UNMAP_DMA, buf)[0]
    return rc, struct.unpack_from("<Q", buf, 16)[0]


def test_vfio_compat_mock_domain__simple_close(vfio_compat_mock_domain: VfioFixture) -> None:
    assert vfio_compat_mock_domain.ioas_id


def test_vfio_compat_mock_domain__option_huge_pages(vfio_compat_mock_domain: VfioFixture) -> None:
    t = vfio_compat_mock_domain
    rc, val = t.k.option(U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_GET, t.ioas_id, 3)
    assert rc == 0
    assert val == (0 if t.version == V.VFIO_TYPE1_IOMMU else 1)


def _check_buf(k: Kfd, info: bytearray) -> None:
    """``ioctl_check_buf``: GET_INFO on ``buffer``; nothing past argsz may change."""
    argsz = struct.unpack_from("<I", info, 0)[0]
    info[argsz:] = b"\xaa" * (len(info) - argsz)
    assert k.ioctl_value(V.VFIO_IOMMU_GET_INFO, info) == (0, 0)
    assert info[argsz:] == b"\xaa" * (len(info) - argsz)


def _check_cap_chain(info: bytearray) -> None:
    """``check_vfio_info_cap_chain()``."""
    argsz, _, _, cap_offset = struct.unpack_from("<IIQI", info, 0)
    assert argsz >= cap_offset + 8
    cap = cap_offset
    while True:
        cap_id, version, nxt = struct.unpack_from("<HHI", info, cap)
        cap_size = (nxt if nxt else argsz) - cap
        assert version == 1
        if cap_id == V.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            assert struct.unpack_from("<I", info, cap + 8)[0] == 1  # nr_iovas
            start, end = struct.unpack_from("<QQ", info, cap + 16)
            assert (start, end) == (MOCK_APERTURE_START, MOCK_APERTURE_LAST)
        elif cap_id == V.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
            assert cap_size == 12  # sizeof(struct vfio_iommu_type1_info_dma_avail)
        else:
            raise AssertionError(f"unknown capability {cap_id}")
        if not nxt:
            break
        assert argsz >= nxt + 8 and nxt >= cap
        cap = nxt


def test_vfio_compat_mock_domain__get_info(vfio_compat_mock_domain: VfioFixture) -> None:
    k = vfio_compat_mock_domain.k
    caps = V.VFIO_IOMMU_INFO_PGSIZES | V.VFIO_IOMMU_INFO_CAPS
    # Pre-cap ABI: argsz = offsetof(cap_offset)
    info = bytearray(BUFFER_SIZE)
    info[0:4] = struct.pack("<I", 16)
    _check_buf(k, info)
    _, flags, pgsizes = struct.unpack_from("<IIQ", info, 0)
    assert pgsizes and flags == caps
    # Read the cap chain size
    info = bytearray(BUFFER_SIZE)
    info[0:4] = struct.pack("<I", INFO_SIZE)
    _check_buf(k, info)
    caplen, flags, pgsizes, cap_offset = struct.unpack_from("<IIQI", info, 0)
    assert pgsizes and flags == caps and cap_offset == 0
    assert caplen > INFO_SIZE
    # Read the caps with every argsz below the full size: never a corrupted chain
    for argsz in range(INFO_SIZE, caplen):
        info = bytearray(BUFFER_SIZE)
        info[0:4] = struct.pack("<I", argsz)
        _check_buf(k, info)
        assert struct.unpack_from("<I", info, 4)[0] == caps
        if struct.unpack_from("<I", info, 16)[0]:
            _check_cap_chain(info)


def test_vfio_compat_mock_domain__map(vfio_compat_mock_domain: VfioFixture) -> None:
    k = vfio_compat_mock_domain.k
    # Simple map/unmap; unmapping nothing is a success
    assert _map(k, k.buffer, MOCK_APERTURE_START, BUFFER_SIZE) == 0
    assert _unmap(k, MOCK_APERTURE_START, BUFFER_SIZE) == (0, BUFFER_SIZE)
    assert _unmap(k, MOCK_APERTURE_START, BUFFER_SIZE)[0] == 0
    # UNMAP_FLAG_ALL requires iova 0 and size 0
    assert _map(k, k.buffer, MOCK_APERTURE_START, BUFFER_SIZE) == 0
    unmap_all = V.VFIO_DMA_UNMAP_FLAG_ALL
    assert _unmap(k, MOCK_APERTURE_START, BUFFER_SIZE, unmap_all)[0] == errno.EINVAL
    assert _unmap(k, 0, 0, unmap_all) == (0, BUFFER_SIZE)
    # Small pages, unmapped in random order
    pages = [MOCK_APERTURE_START + i * PAGE_SIZE for i in range(BUFFER_SIZE // PAGE_SIZE)]
    for i, iova in enumerate(pages):
        assert _map(k, k.buffer + i * PAGE_SIZE, iova, PAGE_SIZE) == 0
    random.Random(0).shuffle(pages)
    for iova in pages:
        assert _unmap(k, iova, PAGE_SIZE)[0] == 0


def test_vfio_compat_unmap_zero_and_wrapping(vfio_compat_mock_domain: VfioFixture) -> None:
    """Not a port: iopt_unmap_iova() refuses a zero length (EINVAL) and a range past the last
    IOVA (EOVERFLOW); the unmapped size 0 is still written back and nothing is unmapped."""
    k = vfio_compat_mock_domain.k
    assert _map(k, k.buffer, MOCK_APERTURE_START, BUFFER_SIZE) == 0
    assert _unmap(k, MOCK_APERTURE_START, 0) == (errno.EINVAL, 0)
    assert _unmap(k, MOCK_APERTURE_START, (1 << 64) - MOCK_APERTURE_START + 1) == (
        errno.EOVERFLOW,
        0,
    )
    assert _unmap(k, MOCK_APERTURE_START, BUFFER_SIZE) == (0, BUFFER_SIZE)


def test_vfio_compat_mock_domain__huge_map(vfio_compat_mock_domain: VfioFixture) -> None:
    # MAP_HUGETLB is modelled by 4 KiB pages over the same 2 x 2 MiB buffer.
    t, k = vfio_compat_mock_domain, vfio_compat_mock_domain.k
    size = HUGEPAGE_SIZE * 2
    buf = k.proc.mmap(size, align=HUGEPAGE_SIZE)
    assert _map(k, buf, MOCK_APERTURE_START, size) == 0
    piece = size // 16
    pages = [MOCK_APERTURE_START + i * piece for i in range(16)]
    random.Random(0).shuffle(pages)
    # type1 may cut up a mapping, type1v2 always fails
    for iova in pages:
        rc = _unmap(k, iova, piece)[0]
        assert rc == (0 if t.version == V.VFIO_TYPE1_IOMMU else errno.ENOENT)
