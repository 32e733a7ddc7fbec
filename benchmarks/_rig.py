"""The machine setup the translate benchmarks share: a device behind one IOMMU, attached to
an IOAS of one-page areas, so that every translation walks a 4 KiB leaf at the deepest level."""

from __future__ import annotations

from typing import Any, NamedTuple

import iommufd_model as im
from iommufd_model import uapi as U

BASE = 1 << 32  # the first area's IOVA
STRIDE = 1 << 21  # one area per 2 MiB: each page its own last-level table entry


class PageRig(NamedTuple):
    """What :func:`one_page_areas` built: the device, its process and iommufd, the IOAS, and
    one IOVA 16 bytes into each mapped page."""

    dev: Any
    proc: Any
    fd: Any
    ioas: int
    iovas: list[int]


def one_page_areas(machine: im.Machine, n: int, base: int = BASE) -> PageRig:
    """A device on IOMMU 0 of ``machine`` attached to an IOAS holding ``n`` one-page areas
    ``STRIDE`` apart from ``base``, with huge pages off (so 4 KiB leaves, every level walked)."""
    dev = machine.add_pci_device(iommu=0)
    proc = machine.new_process()
    fd = proc.open_iommufd()
    dev_id = fd.bind(dev)
    ioas = fd.ioas_alloc()
    fd.option(U.IOMMU_OPTION_HUGE_PAGES, U.IOMMU_OPTION_OP_SET, object_id=ioas, val64=0)
    for i in range(n):
        fd.ioas_map(ioas, proc.mmap(4096), 4096, iova=base + i * STRIDE)
    fd.attach(dev_id, ioas)
    return PageRig(dev, proc, fd, ioas, [base + i * STRIDE + 16 for i in range(n)])
