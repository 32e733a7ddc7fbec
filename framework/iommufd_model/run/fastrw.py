"""The compiled short path of ``iommufd-model run`` for IOMMU_TEST_OP_ACCESS_RW (the model's
own design; the C is ``_fastrw.c``).

The server serves an ACCESS_RW request in Python first (``IommuFd.fast_ioctl``: the mock's
``access_rw_fast``), which reports the area it copied through (``DirectAccessRw``); the
server then lets the C table take the same connection's next requests on that access fd
inside that area (``Table.learn``): through an mm's addresses, or through the pinned pages
near the request (:func:`frame_records`: their PFNs and where their bytes live). The table
holds no model object but the memory's frame dict and the model lock, and every event the
server handles in Python forgets what it learned (``Table.invalidate``), so whatever
changes an IOAS, an area, a pin, an access, a process or a file (each is such an event) is
seen before the table serves again. The fd number is checked at each request against the
access file's identity, so a number closed and reused names the new file, as ``fget()``
would.

Without the C extension (``IOMMUFD_MODEL_PURE=1``) or with ``IOMMUFD_MODEL_SHORT_PATHS=0``
the server runs without the table (and, with the latter, without ``fast_ioctl`` too).
"""

from __future__ import annotations

import importlib
import os
import struct
from types import ModuleType
from typing import Any

from iommufd_model.core.io_pagetable import DirectWindow
from iommufd_model.hw import compiled
from iommufd_model.hw import memory as memory_module
from iommufd_model.hw.memory import PAGE_SHIFT, PhysicalMemory
from iommufd_model.locking import MODEL_LOCK
from iommufd_model.mock import selftest as T
from iommufd_model.mock.selftest import DirectAccessRw
from iommufd_model.run.process import MIRROR_NONE, Mirrors

__all__ = ["FRAMES_MAX", "DirectAccessRw", "enabled", "frame_records", "make_table"]

#: pinned pages the table learns per entry (_fastrw.c's FRAMES_MAX)
FRAMES_MAX = 64
#: one learned page: its PFN, and where its bytes live (kind, pid or fd, address or offset)
FRAME_RECORD = struct.Struct("<QIiQ")


def enabled() -> bool:
    """Short paths are on unless ``IOMMUFD_MODEL_SHORT_PATHS=0`` (the differential tests'
    switch: the same program run both ways must give the same results)."""
    return os.environ.get("IOMMUFD_MODEL_SHORT_PATHS", "1") != "0"


def _module() -> ModuleType | None:
    if os.environ.get("IOMMUFD_MODEL_PURE") == "1":
        return None
    try:
        compiled.check_fresh("iommufd_model.run._fastrw")  # a stale build never runs
        return importlib.import_module("iommufd_model.run._fastrw")
    except ImportError:
        return None


def make_table(op_ioctl: int, req_size: int, inline_size: int, memory: PhysicalMemory) -> Any:
    """The C table for one server (None when short paths are off or it is not built).

    It copies through ``memory``'s pinned frames in place, as ``hw/frame_copy.c`` does,
    when that build is in use (otherwise frames are rebuilt on write, and those requests
    stay in Python)."""
    mod = _module()
    if mod is None or not enabled():
        return None
    in_place: dict[str, Any] = {}
    if frames_in_place():
        in_place = {
            "frames": memory._pages,
            "memory": memory,
            "acquire": MODEL_LOCK.acquire,
            "release": MODEL_LOCK.release,
        }
    return mod.Table(
        req_size=req_size,
        inline_size=inline_size,
        op_ioctl=op_ioctl,
        test_cmd=T.IOMMU_TEST_CMD,
        cmd_size_min=T.ACCESS_RW_SIZE_MIN,
        cmd_size_max=T.IommuTestCmd.SIZE,
        rw_op=T.IOMMU_TEST_OP_ACCESS_RW,
        rw_write=T.MOCK_ACCESS_RW_WRITE,
        rw_slow=T.MOCK_ACCESS_RW_SLOW_PATH,
        max_length=T.ACCESS_MAX_LENGTH,
        **in_place,
    )


def frames_in_place() -> bool:
    """The memory's frames are written in place (``hw/frame_copy.c``), so the table may
    write them too."""
    return memory_module._IN_PLACE


def frame_records(window: DirectWindow, iova: int, mirrors: Mirrors) -> tuple[int, bytes]:
    """The pinned pages of ``window`` the table learns for requests near ``iova``: up to
    :data:`FRAMES_MAX` pages from a little before the page of ``iova``, as ``(first index,
    records)``, each record the page's PFN (0: not pinned) and where its bytes live
    (``Mirrors.where``)."""
    pages = window.pages
    first_index = window.start_byte >> PAGE_SHIFT
    last_index = (window.start_byte + window.last - window.first) >> PAGE_SHIFT
    at = (window.start_byte + iova - window.first) >> PAGE_SHIFT
    lo = max(first_index, min(at - FRAMES_MAX // 4, last_index - FRAMES_MAX + 1))
    hi = min(last_index, lo + FRAMES_MAX - 1)
    out = bytearray()
    for pfn in pages.pinned_pfns(lo, hi):
        kind, ident, addr = mirrors.where(pfn) if pfn else (MIRROR_NONE, 0, 0)
        out += FRAME_RECORD.pack(pfn, kind, ident, addr)
    return lo, bytes(out)
