"""Timing helpers shared by the benchmarks: rates, never assertions."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from iommufd_model.hw.memory import PAGE_SHIFT, PhysicalMemory

SECONDS = 0.5  # how long each figure is measured for


def rate(fn: Callable[[int], object], args: Sequence[int], seconds: float = SECONDS) -> float:
    """Calls per second of ``fn``: whole passes over ``args`` for at least ``seconds``."""
    passes = 0
    begin = time.perf_counter()
    deadline = begin + seconds
    while not passes or time.perf_counter() < deadline:
        for arg in args:
            fn(arg)
        passes += 1
    return passes * len(args) / (time.perf_counter() - begin)


def own_loop(fn: Callable[[int], int], per_round: int, seconds: float = SECONDS / 2) -> float:
    """Operations per second of a driver that runs ``rounds`` passes in its own (compiled)
    loop: the rounds double until one call lasts ``seconds``, so call overhead vanishes."""
    rounds = 1
    while True:
        start = time.perf_counter()
        fn(rounds)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return rounds * per_round / elapsed
        rounds *= 4


def vendor() -> str:
    """The first installed vendor driver (the mock when none is installed)."""
    names = {ep.name for ep in entry_points(group="iommufd_model.drivers")}
    for name in ("amd", "intel_vtd", "arm_smmuv3"):
        if name in names:
            return name
    return "mock"


def c_reference(
    source: str, mem: PhysicalMemory, root: int, levels: int, iovas: list[int]
) -> float | None:
    """Walks per second of a C reference walker over the same tables, or None without a C
    compiler. ``source`` defines ``uint64_t bench(const uint8_t *mem, uint64_t size,
    uint64_t root, int levels, const uint64_t *iovas, int n, int rounds)``, built with
    ``cc -O2``; memory is copied into one flat buffer (physical address = offset)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    tmp = Path(tempfile.mkdtemp())
    (tmp / "walk.c").write_text(source)
    lib = tmp / "walk.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(tmp / "walk.c")], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.bench.restype = ctypes.c_uint64
    top = (max(mem._pages) + 1) << PAGE_SHIFT
    flat = bytearray(top)
    for pfn, page in mem._pages.items():
        flat[pfn << PAGE_SHIFT : (pfn + 1) << PAGE_SHIFT] = page
    buf = (ctypes.c_uint8 * top).from_buffer(flat)
    arr = (ctypes.c_uint64 * len(iovas))(*iovas)
    rounds = max(1, 200 * 4096 // len(iovas))
    start = time.perf_counter()
    dll.bench(buf, ctypes.c_uint64(top), ctypes.c_uint64(root), levels, arr, len(iovas), rounds)
    return rounds * len(iovas) / (time.perf_counter() - start)
