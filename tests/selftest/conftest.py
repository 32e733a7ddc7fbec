"""The kernel self-test's fixtures, as pytest fixtures.

``iommufd``: an open /dev/iommu. ``iommufd_ioas``: plus an IOAS and, per variant, mock
domains (FIXTURE_VARIANT_ADD no_domain / mock_domain / two_mock_domain / mock_domain_limit).
Test ids read ``test_<fixture>__<kernel test name>[<variant>]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

# kutil.py (the port of iommufd_utils.h) is importable through pytest's ``pythonpath``.
from kutil import IOAS_VARIANTS, MOCK_APERTURE_START, IoasFixture, Kfd, teardown_iommufd

from iommufd_model.mock import selftest as T


@pytest.fixture
def iommufd(machine: Any) -> Iterator[Kfd]:
    k = Kfd(machine)
    yield k
    teardown_iommufd(k)


@pytest.fixture(params=list(IOAS_VARIANTS))
def iommufd_ioas(request: pytest.FixtureRequest, machine: Any) -> Iterator[IoasFixture]:
    variant = IOAS_VARIANTS[request.param]
    k = Kfd(machine)
    t = IoasFixture(k, variant, ioas_id=k.ioas_alloc())
    limit = variant.memory_limit or T.DEFAULT_MEMORY_LIMIT
    assert k.set_memory_limit(limit) == 0
    for _ in range(variant.mock_domains):
        t.stdev_id, t.hwpt_id, t.device_id = k.mock_domain_ok(t.ioas_id)
        k.check_dev_cache_all(t.device_id, T.IOMMU_TEST_DEV_CACHE_DEFAULT)
        t.base_iova = MOCK_APERTURE_START
    if variant.pasid_capable:
        t.device_pasid_id = k.mock_domain_ok(t.ioas_id, T.MOCK_FLAGS_DEVICE_PASID)[2]
    yield t
    assert k.set_memory_limit(T.DEFAULT_MEMORY_LIMIT) == 0
    teardown_iommufd(k)
