"""Build hook: mypyc compiles the SMMUv3 table walkers (``iommufd_arm_smmuv3/walk.py``).

The plain source is installed instead, with identical behaviour, when the build runs with
``IOMMUFD_MODEL_PURE=1`` or has no mypyc to import. The build writes the stamp that makes the
package refuse a compiled walker older than its source. Both come from the framework's
``hw/compiled.py``, taken from this repository by path: a plugin is built beside the framework
here, and nothing is importable while the install's lanes build.
"""

import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "framework" / "iommufd_model" / "hw"))
import compiled  # noqa: E402

extensions = compiled.mypyc_extensions(["iommufd_arm_smmuv3/walk.py"])
compiled.write_stamp(
    HERE / "iommufd_arm_smmuv3",
    [(HERE / "iommufd_arm_smmuv3" / "walk.py", "walk")] if extensions else [],
)
setup(ext_modules=extensions)
