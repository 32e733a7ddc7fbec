"""The conformance kit: a pytest plugin (``pytest11`` entry point ``iommufd_model``).

Modelled on SQLAlchemy's dialect compliance suite: the framework ships the contract tests
(:mod:`iommufd_model.testing.suite`), each driver declares its requirements through
``DriverInfo.features``, and the kit runs every test against every selected driver. A test
needing a feature the driver lacks is *skipped with reason* ``unsupported: <feature>`` so it
stays visible in ``-rs``; it is never dropped from collection.

Usage: ``pytest --iommu-driver NAME`` (repeatable) runs the shipped suite against ``NAME``;
``pytest --iommu-contract`` runs it against every installed driver. Without either option the
plugin only parametrises tests of your own that ask for the ``iommu_driver`` fixture.

The suite's hypothesis state machine (``test_uapi_machine``, skipped without hypothesis)
keeps its example database where the ``iommu_example_db`` ini option or the
``IOMMUFD_MODEL_EXAMPLE_DB`` env var says (one sub-directory per driver; read-only when
``CI`` is set); by default, hypothesis' own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from iommufd_model.driver import DriverInfo, Feature
from iommufd_model.plugins import DriverRegistry, default_registry

SUITE = Path(__file__).with_name("suite")
MARKER = "requires_feature"
# Where the kit's hypothesis state machines keep their example database (one sub-directory
# per driver); unset means hypothesis' own default. The env var wins over the ini option.
EXAMPLE_DB_ENV = "IOMMUFD_MODEL_EXAMPLE_DB"
EXAMPLE_DB_INI = "iommu_example_db"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("iommufd_model", "iommufd-model conformance kit")
    group.addoption(
        "--iommu-driver",
        action="append",
        default=[],
        metavar="NAME",
        help="run the driver contract suite against NAME (repeatable; default: all installed)",
    )
    group.addoption(
        "--iommu-contract",
        action="store_true",
        help="run the driver contract suite against every installed driver",
    )
    parser.addini(
        EXAMPLE_DB_INI,
        "directory of the example database of the kit's state machines (relative to the "
        f"rootdir; env {EXAMPLE_DB_ENV} overrides; default: hypothesis' own)",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(*features): the test needs these iommufd_model Feature values"
    )
    if config.getoption("iommu_driver") or config.getoption("iommu_contract"):
        # Collect the shipped suite as if it had been named on the command line.
        config.args.append(str(SUITE))


def selected_drivers(config: pytest.Config) -> list[str]:
    """Drivers named with ``--iommu-driver``, or every installed one; unknown -> usage error."""
    reg = default_registry()
    names: list[str] = config.getoption("iommu_driver") or sorted(reg.drivers)
    unknown = [n for n in names if n not in reg.drivers]
    if unknown:
        broken = {p.name: p.message for p in reg.problems}
        why = "; ".join(f"{n}: {broken.get(n, 'not installed')}" for n in unknown)
        raise pytest.UsageError(f"--iommu-driver: {why} (installed: {sorted(reg.drivers)})")
    return list(dict.fromkeys(names))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "iommu_driver" in metafunc.fixturenames:
        drivers = selected_drivers(metafunc.config)
        metafunc.parametrize("iommu_driver", drivers, ids=drivers)


def missing_features(info: DriverInfo, item: pytest.Item) -> list[Feature]:
    needed: list[Feature] = []
    for mark in item.iter_markers(MARKER):
        needed += [Feature(f) if isinstance(f, str) else f for f in mark.args]
    return [f for f in needed if f not in info.features]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    callspec = getattr(item, "callspec", None)
    if callspec is None or "iommu_driver" not in callspec.params:
        return
    info = default_registry().drivers[callspec.params["iommu_driver"]].info
    missing = missing_features(info, item)
    if missing:
        pytest.skip("unsupported: " + ", ".join(f.value for f in missing))


@pytest.fixture(scope="session")
def iommu_registry() -> DriverRegistry:
    """The registry the kit tests against (entry-point discovery, as users get it)."""
    return default_registry()


@pytest.fixture
def iommu_driver_info(iommu_registry: DriverRegistry, iommu_driver: str) -> DriverInfo:
    return iommu_registry.drivers[iommu_driver].info


@pytest.fixture(scope="session")
def iommu_example_db_dir(pytestconfig: pytest.Config) -> Path | None:
    """Example database directory for the state machines, or None for hypothesis' default.

    With ``CI`` set the suite opens it read-only, so CI replays but never writes.
    """
    raw = os.environ.get(EXAMPLE_DB_ENV) or str(pytestconfig.getini(EXAMPLE_DB_INI) or "")
    if not raw:
        return None
    path = Path(raw)
    return path if path.is_absolute() else Path(pytestconfig.rootpath) / path


class _EntryPointShim:
    """What the ``pytest11`` entry point registers: it adds this module unless ``-p`` did.

    pytest registers ``-p iommufd_model.testing`` before it autoloads entry points, and
    pluggy refuses one module under two names; registering the module from this shim (only
    when absent) makes both spellings work, together or alone.
    """

    def pytest_addhooks(self, pluginmanager: pytest.PytestPluginManager) -> None:
        module = sys.modules[__name__]
        if not pluginmanager.is_registered(module):
            pluginmanager.register(module, __name__)


entry_point = _EntryPointShim()
