"""A machine with modelled PCI functions behind the mock IOMMU and one vendor, for the VFIO
tests; helpers that issue VFIO ioctls with the uAPI's bytes."""

from __future__ import annotations

import struct
from typing import Any, TypeVar

import attrs
import pytest

import iommufd_model as im
from iommufd_model import vfio
from iommufd_model.uapi import vfio as V
from iommufd_model.uapi.codec import UStruct

VENDORS = ["mock", "amd"]


@attrs.define
class VfioSetup:
    machine: im.Machine
    fn: Any
    proc: Any
    iommufd: Any

    @property
    def cdev_path(self) -> str:
        vdev = vfio.registry(self.machine).by_function(self.fn)
        assert vdev is not None
        return f"/dev/vfio/devices/{vdev.name}"

    def open_cdev(self) -> Any:
        fd = vfio.open_fd(self.proc, self.cdev_path)
        return self.proc.files[fd]

    def bind(self, df: Any, iommufd: int | None = None, **kw: Any) -> int:
        b = V.VfioDeviceBindIommufd(
            argsz=V.VfioDeviceBindIommufd.SIZE,
            iommufd=self.iommufd.fd if iommufd is None else iommufd,
            **kw,
        )
        buf = bytearray(b.pack())
        df.ioctl(V.VFIO_DEVICE_BIND_IOMMUFD, buf, self.proc)
        return int(V.VfioDeviceBindIommufd.unpack(buf).out_devid)


S = TypeVar("S", bound=UStruct)


def call(df: Any, cmd: int, st: S, proc: Any, tail: bytes = b"") -> S:
    """Pack ``st`` (+ ``tail``), issue ``cmd`` on ``df``, decode the reply."""
    buf = bytearray(st.pack() + tail)
    df.ioctl(cmd, buf, proc)
    return type(st).unpack(buf)


def irq_set(index: int, flags: int, start: int, count: int, data: bytes = b"") -> bytearray:
    argsz = V.VfioIrqSet.SIZE + len(data)
    hdr = V.VfioIrqSet(argsz=argsz, flags=flags, index=index, start=start, count=count)
    return bytearray(hdr.pack() + data)


def fds(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}i", *values)


@pytest.fixture(params=VENDORS)
def setup(request: pytest.FixtureRequest) -> VfioSetup:
    machine = im.Machine.build(iommus=[request.param])
    fn = machine.add_pci_function("generic", 0)
    proc = machine.new_process()
    return VfioSetup(machine, fn, proc, proc.open_iommufd())
