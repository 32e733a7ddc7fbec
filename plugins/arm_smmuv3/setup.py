"""Build hook: mypyc compiles the SMMUv3 table walkers (``walk.py``).

The plain sources are installed instead, with identical behaviour, when the build runs with
``IOMMUFD_MODEL_PURE=1`` or has no mypyc to import.
"""

import importlib.util
import os

from setuptools import setup

WALKERS = ["iommufd_arm_smmuv3/walk.py"]
compile_walkers = (
    os.environ.get("IOMMUFD_MODEL_PURE") != "1" and importlib.util.find_spec("mypyc") is not None
)
extensions = []
if compile_walkers:
    from mypyc.build import mypycify

    extensions = mypycify(WALKERS, opt_level="3")
    for ext in extensions:  # let the C compiler inline the small native helpers
        ext.extra_compile_args += [
            "-fno-semantic-interposition",
            "--param=max-inline-insns-auto=200",
        ]
setup(ext_modules=extensions)
