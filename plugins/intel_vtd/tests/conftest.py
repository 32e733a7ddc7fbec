"""Fixtures for the VT-d plugin tests: a machine with one VT-d unit and a raw-uAPI world."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd.hw import IntelVtd
from iommufd_intel_vtd.kernel import QI_DONE

import iommufd_model as im
from iommufd_model import uapi as U
from iommufd_model.uapi.codec import UStruct

RW = U.IOMMU_IOAS_MAP_READABLE | U.IOMMU_IOAS_MAP_WRITEABLE


class World:
    """One VT-d unit, one process with a buffer, an open iommufd, bound devices."""

    def __init__(self, buf_len: int = 1 << 22, ndev: int = 1, **options: Any) -> None:
        self.machine = im.Machine.build(
            iommus=["intel_vtd"], options={"intel_vtd": options} if options else None
        )
        hw = self.machine.iommus[0]
        assert isinstance(hw, IntelVtd)
        self.hw = hw
        self.devs = [self.machine.add_pci_device(iommu=0) for _ in range(ndev)]
        self.dev = self.devs[0]
        self.proc = self.machine.new_process()
        self.va = self.proc.mmap(buf_len, align=1 << 21)
        self.buf_len = buf_len
        self.fd = self.proc.open_iommufd()
        self.dev_ids = [self.fd.bind(d) for d in self.devs]
        self.dev_id = self.dev_ids[0]

    # -- raw ioctls --------------------------------------------------------------------------
    def ioctl(self, cmd: int, st: UStruct) -> Any:
        if getattr(st, "size", None) == 0:
            st.size = st.SIZE  # type: ignore[attr-defined]
        buf = bytearray(st.pack())
        self.fd.ioctl(cmd, buf)
        return type(st).unpack(buf)

    # The commands themselves go through the fd's typed layer (the same dispatcher).
    def ioas(self) -> int:
        return self.fd.ioas_alloc()

    def map(
        self, ioas: int, iova: int, length: int, va: int | None = None, flags: int = RW
    ) -> None:
        self.fd.ioas_map(ioas, self.va if va is None else va, length, iova=iova, flags=flags)

    def unmap(self, ioas: int, iova: int, length: int) -> None:
        self.fd.ioas_unmap(ioas, iova, length)

    def hwpt(
        self,
        pt_id: int,
        flags: int = 0,
        data_type: int = 0,
        data: bytes = b"",
        dev_id: int | None = None,
    ) -> int:
        return self.fd.hwpt_alloc(
            self.dev_id if dev_id is None else dev_id,
            pt_id,
            flags=flags,
            data_type=data_type,
            data=data,
        )

    def invalidate(
        self, hwpt_id: int, entries: list[bytes], data_type: int = 0, entry_len: int | None = None
    ) -> tuple[int, int]:
        """IOMMU_HWPT_INVALIDATE; returns ``(errno, entry_num)``."""
        n = entry_len if entry_len is not None else (len(entries[0]) if entries else 24)
        try:
            return 0, self.fd.hwpt_invalidate(hwpt_id, data_type, entries, entry_len=n)
        except OSError as exc:
            return exc.errno or errno.EIO, int(exc.handled)  # type: ignore[attr-defined]


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def make_world() -> Callable[..., World]:
    return World


class QiStream:
    """The invalidation-queue stream as comparable tuples (the ``qi`` fixture): ``d(type,
    **fields)`` builds one, ``WAIT`` is qi_submit_sync()'s own wait descriptor (SW, status
    QI_DONE, no fence, no interrupt; its status address is the model's memory), ``WAIT+PD``
    the same with the page-request drain of QI_OPT_WAIT_DRAIN, ``Stream(world).take()``
    what the driver submitted since the last take."""

    WAIT = ("WAIT",)

    @classmethod
    def fmt(cls, desc: Q.Descriptor) -> tuple[Any, ...]:
        sw_done = (desc["sw"], desc["fn"], desc["iflag"], desc["status_data"]) == (1, 0, 0, QI_DONE)
        if desc.type == Q.WAIT and sw_done:
            return ("WAIT+PD",) if desc["pd"] else cls.WAIT
        return (desc.type, tuple(sorted((k, v) for k, v in desc.fields.items() if v)))

    @classmethod
    def d(cls, type_: int, **fields: int) -> tuple[Any, ...]:
        return cls.fmt(Q.make(type_, **fields))

    @classmethod
    def iotlb(cls, did: int, g: int, addr: int = 0, am: int = 0, ih: int = 0) -> tuple[Any, ...]:
        """qi_desc_iotlb(): the model's unit has CAP.DRD and CAP.DWD: DR = DW = 1 always."""
        return cls.d(Q.IOTLB, g=g, did=did, dr=1, dw=1, addr=addr >> 12, am=am, ih=ih)

    class Stream:
        """Records what the driver submits from now on."""

        def __init__(self, world: Any) -> None:
            self.st = world.hw.driver_state
            self.mark = len(self.st.issued)

        def take(self) -> list[tuple[Any, ...]]:
            out = [QiStream.fmt(x) for x in self.st.issued[self.mark :]]
            self.mark = len(self.st.issued)
            return out


@pytest.fixture
def qi() -> type[QiStream]:
    return QiStream
