"""Build hook: compile the framework's hot walkers with mypyc, and its C extensions.

The walkers are skipped (pure Python is installed, with identical behaviour) when
``IOMMUFD_MODEL_PURE=1`` is set at install time or mypyc is not importable in the build
environment. Every build writes the stamp that makes the package refuse a build older than its
sources (``hw/compiled.py``).
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "framework" / "iommufd_model"
# hw/compiled.py, by path: the package cannot be imported while it is being built.
sys.path.insert(0, str(PACKAGE / "hw"))
import compiled  # noqa: E402

COMPILED = [
    "framework/iommufd_model/hw/walk_x86.py",
    "framework/iommufd_model/hw/tlb_entry.py",
    "framework/iommufd_model/hw/tlb_run.py",
    "framework/iommufd_model/hw/xlate.py",
]

# Whole frames filled with memcpy (plain C, no mypyc; hw/memory.py rebuilds frames without it).
FRAME_COPY = Extension(
    "iommufd_model.hw.frame_copy",
    sources=["framework/iommufd_model/hw/frame_copy.c"],
    extra_compile_args=["-O2", "-Wall"],
)

# The model lock and its method wrapper (plain C; locking.py falls back to threading.RLock).
LOCKCALL = Extension(
    "iommufd_model._lockcall",
    sources=["framework/iommufd_model/_lockcall.c"],
    extra_compile_args=["-O2", "-Wall"],
)

# The LD_PRELOAD library of `iommufd-model run` (plain C, no Python API): built as an extension
# so that normal and editable installs both put it in the package, always (gcc only).
# The run's spin page (a header of the preload's and the server's, run/spin_page.h).
SPIN_PAGE_H = "framework/iommufd_model/run/spin_page.h"

PRELOAD = Extension(
    "iommufd_model.run._preload",
    sources=["framework/iommufd_model/run/preload.c"],
    depends=[SPIN_PAGE_H],
    extra_compile_args=["-O2", "-Wall", "-fvisibility=default"],
)

# The run server's process_vm_readv/writev and pidfd_getfd (a CPython extension, gcc only).
UACCESS = Extension(
    "iommufd_model.run._uaccess",
    sources=["framework/iommufd_model/run/_uaccess.c"],
    depends=[SPIN_PAGE_H],
    extra_compile_args=["-O2", "-Wall"],
)

# The run server's compiled ACCESS_RW short path (run/_fastrw.c; the server runs without it).
FASTRW = Extension(
    "iommufd_model.run._fastrw",
    sources=["framework/iommufd_model/run/_fastrw.c"],
    extra_compile_args=["-O2", "-Wall"],
)

# The mock page table's dirty loops (plain C; mock/iommupt.py runs the same loops without it).
MOCK_DIRTY = Extension(
    "iommufd_model.mock._dirty",
    sources=["framework/iommufd_model/mock/_dirty.c"],
    extra_compile_args=["-O2", "-Wall"],
)

# The dirty runs of GET_DIRTY_BITMAP as bitmap bits (plain C; core/dirty_bits.py without it).
DIRTY_BITS = Extension(
    "iommufd_model.core._dirty_bits",
    sources=["framework/iommufd_model/core/_dirty_bits.c"],
    extra_compile_args=["-O2", "-Wall"],
)

PURE = os.environ.get("IOMMUFD_MODEL_PURE") == "1"
C_EXTENSIONS = (
    [PRELOAD, UACCESS]
    if PURE
    else [FRAME_COPY, LOCKCALL, PRELOAD, UACCESS, FASTRW, MOCK_DIRTY, DIRTY_BITS]
)
# The walkers import nothing from the framework: compile them alone, without the
# project's mypy configuration (which would pull in the whole package and its deps).
MYPYC = compiled.mypyc_extensions(COMPILED, ("--config-file=", "--follow-imports=silent"))

built = [(HERE / source, source[len("framework/iommufd_model/") : -3]) for source in COMPILED]
built = built if MYPYC else []
for ext in C_EXTENSIONS:
    module = ext.name.removeprefix("iommufd_model.").replace(".", "/")
    # a header the extension includes is one of its sources to the stamp
    built += [(HERE / source, module) for source in [*ext.sources, *ext.depends]]
compiled.write_stamp(PACKAGE, built)

setup(ext_modules=[*C_EXTENSIONS, *MYPYC])
