"""Build hook of iommufd_arm_smmuv3: mypyc compiles the SMMUv3 stage-1, stage-2 and nested walkers.

The build itself is the framework's ``hw/compiled.setup_plugin``, taken from this repository by
path (nothing is importable while the install's lanes build).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "framework" / "iommufd_model" / "hw"))
import compiled

compiled.setup_plugin(__file__, "iommufd_arm_smmuv3")
