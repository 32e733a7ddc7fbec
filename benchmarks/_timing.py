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


def print_figures(
    figures: dict[str, float], unit: str = "", shown: Callable[[float], str] | None = None
) -> None:
    """The table each benchmark's ``main()`` prints: one figure a line, the names aligned,
    the value as ``shown`` formats it (whole numbers with thousands separators by default),
    then ``unit``."""
    width = max(map(len, figures))
    for key, value in figures.items():
        text = shown(value) if shown is not None else f"{value:>14,.0f}"
        print(f"{key:<{width}}  {text}{' ' + unit if unit else ''}")


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


def own_loop(
    fn: Callable[[int], int], per_round: int, seconds: float = SECONDS / 2, trials: int = 3
) -> float:
    """Operations per second of a driver that runs ``rounds`` passes in its own (compiled or
    C) loop: the rounds grow until one call lasts ``seconds``, so call overhead vanishes; the
    best of ``trials`` such calls. Timed in this thread's CPU time: on a machine shared with
    other work, wall time also counts the time slices other processes take, which differ from
    one figure to the next and made the ratios of two figures (compiled against C) swing by 2x;
    the CPU time a loop needs does not depend on when it was scheduled."""
    rounds = 1
    while True:
        start = time.thread_time()
        fn(rounds)
        elapsed = time.thread_time() - start
        if elapsed >= seconds:
            break
        rounds *= 4 if elapsed < seconds / 8 else 2
    best = elapsed
    for _ in range(trials - 1):
        start = time.thread_time()
        fn(rounds)
        best = min(best, time.thread_time() - start)
    return rounds * per_round / best


def vendor() -> str:
    """The first installed vendor driver (the mock when none is installed)."""
    names = {ep.name for ep in entry_points(group="iommufd_model.drivers")}
    for name in ("amd", "intel_vtd", "arm_smmuv3"):
        if name in names:
            return name
    return "mock"


C_DIR = Path(__file__).resolve().parent / "c"
_BUILT: dict[str, ctypes.CDLL] = {}


def c_reference(
    name: str, func: str, mem: PhysicalMemory, iovas: list[int], *args: int
) -> float | None:
    """Walks per second of ``func`` of the C reference ``benchmarks/c/<name>.c`` over the
    same tables, or None without a C compiler. ``func`` has the signature ``uint64_t func(const
    uint8_t *mem, uint64_t size, const uint64_t *iovas, uint64_t n, uint64_t rounds, uint64_t
    ...args)``; the library is built with ``cc -O2`` once per process; memory is copied into
    one flat buffer (physical address = offset). Timed as :func:`own_loop` times a compiled
    walker's own loop."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    dll = _BUILT.get(name)
    if dll is None:
        lib = Path(tempfile.mkdtemp()) / f"{name}.so"
        src = C_DIR / f"{name}.c"
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
        dll = _BUILT[name] = ctypes.CDLL(str(lib))
    fn = getattr(dll, func)
    fn.restype = ctypes.c_uint64
    top = (max(mem._pages) + 1) << PAGE_SHIFT
    flat = bytearray(top)
    for pfn, page in mem._pages.items():
        flat[pfn << PAGE_SHIFT : (pfn + 1) << PAGE_SHIFT] = page
    buf = (ctypes.c_uint8 * top).from_buffer(flat)
    arr = (ctypes.c_uint64 * len(iovas))(*iovas)
    extra = [ctypes.c_uint64(a) for a in args]
    n = ctypes.c_uint64(len(iovas))
    size = ctypes.c_uint64(top)
    return own_loop(lambda r: int(fn(buf, size, arr, n, ctypes.c_uint64(r), *extra)), len(iovas))
