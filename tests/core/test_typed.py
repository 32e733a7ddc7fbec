"""The typed layer drives the same dispatcher and leaves no scratch memory behind."""

from __future__ import annotations

import errno

import pytest

import iommufd_model as im
from iommufd_model import uapi as U
from iommufd_model.core.main import IommuFd
from iommufd_model.process import Process
from iommufd_model.testing import assert_errno


def _world() -> tuple[im.Machine, Process, IommuFd, int]:
    m = im.Machine.build(iommus=["mock"])
    dev = m.add_pci_device()
    proc = m.new_process()
    fd = proc.open_iommufd()
    return m, proc, fd, fd.bind(dev)


def test_map_dma_copy_unmap_through_typed_calls() -> None:
    m, proc, fd, dev_id = _world()
    ioas = fd.ioas_alloc()
    fd.attach(dev_id, ioas)
    va = proc.mmap(1 << 16)
    proc.write(va, b"typed")
    iova = fd.ioas_map(ioas, va, 1 << 16)
    assert m.iommus[0].devices[0x100].dma_read(iova, 5) == b"typed"
    other = fd.ioas_alloc()
    assert fd.ioas_copy(other, ioas, iova, 1 << 16, dst_iova=1 << 30) == 1 << 30
    ranges, align = fd.ioas_iova_ranges(ioas)
    assert align == 2048 and ranges[0][0] == 1 << 24  # the mock's aperture and granule
    assert fd.ioas_unmap_all(ioas) == 1 << 16
    assert_errno(errno.ENOENT, lambda: fd.ioas_unmap(ioas, iova, 1 << 16))


def test_scratch_memory_is_returned() -> None:
    m, _proc, fd, dev_id = _world()
    ioas = fd.ioas_alloc()
    before = m.memory.frames_in_use
    fd.ioas_allow_iovas(ioas, [(1 << 24, (1 << 30) - 1)])
    info = fd.hw_info(dev_id)
    assert info.data_type == 0xFEEDBEEF and info.max_pasid_log2 == 20
    assert m.memory.frames_in_use == before


def test_invalidate_refusal_carries_the_handled_count() -> None:
    _m, _proc, fd, dev_id = _world()
    ioas = fd.ioas_alloc()
    paging = fd.hwpt_alloc(dev_id, ioas)
    with pytest.raises(OSError) as exc:
        fd.hwpt_invalidate(paging, 0, [bytes(16)])
    assert exc.value.errno == errno.EINVAL and exc.value.handled == 0  # type: ignore[attr-defined]
    assert fd.option(U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_GET, object_id=ioas) == 1
