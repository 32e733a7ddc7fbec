"""Build hook: compile the framework's hot walkers with mypyc.

Skipped (pure Python is installed, with identical behaviour) when ``IOMMUFD_MODEL_PURE=1``
is set at install time or mypyc is not importable in the build environment.
"""

import os

from setuptools import Extension, setup

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


def ext_modules() -> list:  # type: ignore[type-arg]
    if os.environ.get("IOMMUFD_MODEL_PURE") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return [FRAME_COPY, LOCKCALL]
    # The walkers import nothing from the framework: compile them alone, without the
    # project's mypy configuration (which would pull in the whole package and its deps).
    extensions = mypycify(["--config-file=", "--follow-imports=silent", *COMPILED], opt_level="3")
    for ext in extensions:  # let the C compiler inline the small native helpers
        ext.extra_compile_args += [
            "-fno-semantic-interposition",
            "--param=max-inline-insns-auto=200",
        ]
    return [FRAME_COPY, LOCKCALL, *extensions]


# The LD_PRELOAD library of `iommufd-model run` (plain C, no Python API): built as an extension
# so that normal and editable installs both put it in the package, always (gcc only).
PRELOAD = Extension(
    "iommufd_model.run._preload",
    sources=["framework/iommufd_model/run/preload.c"],
    extra_compile_args=["-O2", "-Wall", "-fvisibility=default"],
)

# The run server's process_vm_readv/writev and pidfd_getfd (a CPython extension, gcc only).
UACCESS = Extension(
    "iommufd_model.run._uaccess",
    sources=["framework/iommufd_model/run/_uaccess.c"],
    extra_compile_args=["-O2", "-Wall"],
)

setup(ext_modules=[*ext_modules(), PRELOAD, UACCESS])
