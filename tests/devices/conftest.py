"""A machine with its DMA mapped through iommufd, for the device models' tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import attrs
import pytest

import iommufd_model as im
from iommufd_model.devices import PciFunction

VENDORS = ["mock", "amd"]
MAP_BYTES = 1 << 22  # 4 MiB of process memory mapped for DMA


@attrs.define
class DmaSetup:
    """A function bound and attached to an IOAS mapping ``MAP_BYTES`` of process memory."""

    machine: im.Machine
    fn: PciFunction
    proc: Any
    fd: Any
    ioas: int
    va: int
    iova: int

    def write(self, iova: int, data: bytes) -> None:
        self.proc.write(self.va + iova - self.iova, data)

    def read(self, iova: int, n: int) -> bytes:
        return bytes(self.proc.read(self.va + iova - self.iova, n))

    def copy_buffers(self, size: int) -> tuple[int, int]:
        """Source and destination of a ``size``-byte copy at the start of the mapping:
        ``(src, dst)`` IOVAs, the source a byte pattern and the destination filled with
        ``y``, so that a copy that moved nothing (or the wrong bytes) shows."""
        src, dst = self.iova, self.iova + size
        self.write(src, bytes(range(256)) * (size // 256))
        self.write(dst, b"y" * size)
        return src, dst

    def map_area(self, length: int) -> tuple[int, int]:
        """A separate IOAS area (so it can be unmapped alone): ``(va, iova)``."""
        va = self.proc.mmap(length)
        return va, int(self.fd.ioas_map(self.ioas, va, length))

    def unmap(self, iova: int, length: int) -> None:
        self.fd.ioas_unmap(self.ioas, iova, length)


def dma_setup(vendor: str, kind: str, **opts: Any) -> DmaSetup:
    machine = im.Machine.build(iommus=[vendor])
    fn = machine.add_pci_function(kind, 0, **opts)
    proc = machine.new_process()
    va = proc.mmap(MAP_BYTES)
    fd = proc.open_iommufd()
    dev_id = fd.bind(fn)
    ioas = fd.ioas_alloc()
    fd.attach(dev_id, ioas)
    iova = fd.ioas_map(ioas, va, MAP_BYTES)
    return DmaSetup(machine, fn, proc, fd, ioas, va, iova)


class Driver(Protocol):
    """A Python port of a selftest driver (lib/drivers/*): probe then init."""

    def probe(self) -> bool: ...

    def init(self) -> None: ...


D = TypeVar("D", bound=Driver)


def driver_setup(vendor: str, kind: str, driver: Callable[[DmaSetup], D]) -> tuple[DmaSetup, D]:
    """A ``kind`` function behind ``vendor``, its selftest driver probed and initialised."""
    s = dma_setup(vendor, kind)
    drv = driver(s)
    assert drv.probe()
    drv.init()
    return s, drv


@pytest.fixture(params=VENDORS)
def vendor(request: pytest.FixtureRequest) -> str:
    return str(request.param)
