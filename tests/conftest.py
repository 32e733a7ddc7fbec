"""Shared fixtures of the framework's tests (strict mode is set by the root conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def machine() -> Iterator[object]:
    import iommufd_model as im

    yield im.Machine.build(iommus=["mock"])
