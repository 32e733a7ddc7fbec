"""Import every vendor's harnesses (registering them) and return the registry."""

from __future__ import annotations

import fuzzlib
import harness_amd  # noqa: F401  (registers)
import harness_smmuv3  # noqa: F401
import harness_vtd  # noqa: F401

REGISTRY = fuzzlib.REGISTRY
