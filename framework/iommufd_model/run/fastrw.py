"""The compiled short path of ``iommufd-model run`` for IOMMU_TEST_OP_ACCESS_RW (the model's
own design; the C is ``_fastrw.c``).

The server serves an ACCESS_RW request in Python first (``IommuFd.fast_ioctl``: the mock's
``access_rw_fast``), which reports the area it copied through (``DirectAccessRw``); the
server then lets the C table take the same connection's next requests on that access fd
inside that area (:func:`learn`). The table holds no model object, only numbers, and every
event the server handles in Python forgets it all (``Table.invalidate``), so whatever
changes an IOAS, an area, an access, a process or a file (each is such an event) is seen
before the table serves again. The fd number is checked at each request against the access
file's identity, so a number closed and reused names the new file, as ``fget()`` would.

Without the C extension (``IOMMUFD_MODEL_PURE=1``) or with ``IOMMUFD_MODEL_SHORT_PATHS=0``
the server runs without the table (and, with the latter, without ``fast_ioctl`` too).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

from iommufd_model.hw import compiled
from iommufd_model.mock import selftest as T
from iommufd_model.mock.selftest import DirectAccessRw

__all__ = ["DirectAccessRw", "enabled", "make_table"]


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


def make_table(op_ioctl: int, req_size: int, inline_size: int) -> Any:
    """The C table for one server (None when short paths are off or it is not built)."""
    mod = _module()
    if mod is None or not enabled():
        return None
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
    )
