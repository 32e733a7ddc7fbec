"""The conformance kit: a pytest plugin (``pytest11`` entry point ``iommufd_model``).

Modelled on SQLAlchemy's dialect compliance suite: the framework ships the contract tests
(:mod:`iommufd_model.testing.suite`), each driver declares its requirements through
``DriverInfo.features``, and the kit runs every test against every selected driver. A test
needing a feature the driver lacks is *skipped with reason* ``unsupported: <feature>`` so it
stays visible in ``-rs``; it is never dropped from collection.

Usage: ``pytest --iommu-driver NAME`` (repeatable) runs the shipped suite against ``NAME``;
``pytest --iommu-contract`` runs it against every installed driver. Without either option the
plugin only parametrises tests of your own that ask for the ``iommu_driver`` fixture.

With the suite selected the kit runs in strict mode (``IOMMUFD_MODEL_STRICT=1`` unless the
environment sets it, ``0`` turns it off): a hook that raises anything but ``OSError`` fails
the test with that exception, named as a contract breach in the report, instead of reaching
the caller as EIO. A plugin that fails to load is reported in one line (a usage error when
it is asked for, a line in the header otherwise).

:func:`assert_errno` is the one errno assertion for tests of the uAPI.

The suite's hypothesis state machine (``test_uapi_machine``, skipped without hypothesis)
keeps its example database where the ``iommu_example_db`` ini option or the
``IOMMUFD_MODEL_EXAMPLE_DB`` env var says (one sub-directory per driver; read-only when
``CI`` is set); by default, hypothesis' own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Container, Generator
from pathlib import Path
from typing import Any

import pytest

from iommufd_model.driver import DriverInfo, Feature
from iommufd_model.errors import STRICT_ENV
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.plugins import DriverRegistry, default_registry
from iommufd_model.scenarios.base import errno_name

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
        os.environ.setdefault(STRICT_ENV, "1")
        selected_drivers(config)  # a bad name stops the run here, as one line


def pytest_report_header(config: pytest.Config) -> list[str]:
    """One line per installed driver plugin that failed to load, and why."""
    if not (config.getoption("iommu_driver") or config.getoption("iommu_contract")):
        return []
    return [f"iommufd-model: BROKEN {p.line()}" for p in default_registry().problems]


def selected_drivers(config: pytest.Config) -> list[str]:
    """Drivers named with ``--iommu-driver``, or every installed one; unknown -> usage error."""
    reg = default_registry()
    names: list[str] = config.getoption("iommu_driver") or sorted(reg.drivers)
    broken = {p.name: p for p in reg.problems}
    for n in names:
        if n in broken:
            raise pytest.UsageError(f"--iommu-driver: BROKEN {broken[n].line()}")
    if config.getoption("iommu_contract") and reg.problems:
        raise pytest.UsageError(f"--iommu-contract: BROKEN {reg.problems[0].line()}")
    unknown = [n for n in names if n not in reg.drivers]
    if unknown:
        raise pytest.UsageError(
            f"--iommu-driver: {', '.join(unknown)}: not installed "
            f"(installed: {', '.join(sorted(reg.drivers))})"
        )
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


# What a failing test's exception says about the driver when it is neither an assertion of
# the suite nor a refusal: a hook broke the contract by raising something else.
_EXPECTED = (AssertionError, OSError, DmaFault)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    callspec = getattr(item, "callspec", None)
    exc = call.excinfo
    if (
        report.failed
        and exc is not None
        and callspec is not None
        and "iommu_driver" in callspec.params
        and not isinstance(exc.value, (*_EXPECTED, pytest.skip.Exception))
    ):
        driver = callspec.params["iommu_driver"]
        report.sections.append(
            (
                "iommufd-model contract breach",
                f"driver {driver}: a hook raised {exc.typename}: {exc.value} (a refusal must be "
                "OSError with the kernel's errno; anything else is a driver bug)",
            )
        )
    return report


def assert_errno(expected: int | Container[int], fn: Callable[[], Any], what: str = "") -> int:
    """``fn()`` must raise ``OSError`` with the errno ``expected`` (or one of them); returns
    the errno it gave. The message names the call (``what``), what came and what was due."""
    allowed = (expected,) if isinstance(expected, int) else expected
    label = f"{what}: " if what else ""
    try:
        got = fn()
    except OSError as exc:
        if exc.errno not in allowed:
            raise AssertionError(
                f"{label}errno {errno_name(exc.errno)} ({exc}), expected {_names(allowed)}"
            ) from exc
        return exc.errno or 0
    raise AssertionError(f"{label}succeeded (returned {got!r}), expected {_names(allowed)}")


def _names(allowed: Container[int]) -> str:
    if isinstance(allowed, (tuple, list, set, frozenset)):
        return " or ".join(errno_name(c) for c in allowed)
    return repr(allowed)


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
