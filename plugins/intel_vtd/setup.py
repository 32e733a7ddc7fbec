"""Build hook for iommufd-model-intel-vtd: mypyc compiles the hot walkers (``walk.py``).

With ``IOMMUFD_MODEL_PURE=1`` at install time, or when the build environment has no mypyc,
the plain source is installed; it behaves identically (the tests compare the two).
"""

import importlib.util
import os

from setuptools import setup

HOT_PATHS = ["iommufd_intel_vtd/walk.py"]
want_pure = os.environ.get("IOMMUFD_MODEL_PURE") == "1"
have_mypyc = importlib.util.find_spec("mypyc") is not None

if want_pure or not have_mypyc:
    setup()
else:
    from mypyc.build import mypycify

    extensions = mypycify(HOT_PATHS, opt_level="3")
    for ext in extensions:  # let the C compiler inline the small native helpers
        ext.extra_compile_args += [
            "-fno-semantic-interposition",
            "--param=max-inline-insns-auto=200",
        ]
    setup(ext_modules=extensions)
