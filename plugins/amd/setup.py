"""Install-time compilation of the AMD walkers (``iommufd_amd/walk.py``) with mypyc.

The pure-Python module is installed instead -- same behaviour, slower -- when the build runs
with ``IOMMUFD_MODEL_PURE=1`` or without mypyc.
"""

import os

from setuptools import setup


def compiled_walkers() -> list:  # type: ignore[type-arg]
    wanted = os.environ.get("IOMMUFD_MODEL_PURE") != "1"
    try:
        from mypyc.build import mypycify
    except ImportError:
        wanted = False
    if not wanted:
        return []
    extensions = mypycify(["iommufd_amd/walk.py"], opt_level="3")
    for ext in extensions:  # let the C compiler inline the small native helpers
        ext.extra_compile_args += [
            "-fno-semantic-interposition",
            "--param=max-inline-insns-auto=200",
        ]
    return extensions


setup(ext_modules=compiled_walkers())
