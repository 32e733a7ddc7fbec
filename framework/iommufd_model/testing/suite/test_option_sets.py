"""The driver's declared option space (``DriverInfo.option_sets``), which ``matrix --sweep``
runs every scenario under: each set is well formed and actually probes and translates."""

from __future__ import annotations

from iommufd_model.plugins import DriverRegistry
from iommufd_model.sweep import option_set_problems


def test_option_sets(iommu_driver: str, iommu_registry: DriverRegistry) -> None:
    problems = option_set_problems(iommu_registry, iommu_driver)
    assert not problems, "\n".join(problems)
