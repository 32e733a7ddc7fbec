"""Vendor-neutral scenarios: the cells of ``iommufd-model matrix`` and the core of the kit.

A scenario is a short function over the public API; it declares the features it needs and
returns, through :func:`run_scenario`, pass / fail (first divergence) / unsupported (the
feature and the errno the driver gave), with the hardware costs and wall time it took.
"""

from iommufd_model.scenarios.base import (
    FAIL,
    PASS,
    UNSUPPORTED,
    Divergence,
    Rig,
    Scenario,
    ScenarioContext,
    ScenarioResult,
    Unsupported,
    run_scenario,
)
from iommufd_model.scenarios.catalog import SCENARIOS
from iommufd_model.scenarios.iopf import iopf_fault_queue  # registers itself, too

# isort: split
# (the matrix lists the rows in registration order: the IOPF row before the nested ones)
from iommufd_model.scenarios.guest_events import GUEST_SCENARIOS  # registers itself, too
from iommufd_model.scenarios.nested import NESTED_SCENARIOS  # registers itself in SCENARIOS

__all__ = [
    "FAIL",
    "GUEST_SCENARIOS",
    "NESTED_SCENARIOS",
    "PASS",
    "SCENARIOS",
    "UNSUPPORTED",
    "Divergence",
    "Rig",
    "Scenario",
    "ScenarioContext",
    "ScenarioResult",
    "Unsupported",
    "iopf_fault_queue",
    "run_scenario",
]
