"""Driver discovery and routing.

Drivers are found through the entry-point group ``iommufd_model.drivers`` (the mock driver
too). All of them live in one pluggy ``PluginManager`` so hooks are validated in one place,
by pluggy itself: ``register`` refuses an implementation whose arguments the hookspec does
not declare, and ``check_pending`` refuses one whose name no hookspec declares (a misspelled
hook). Each call is routed to exactly one driver: :meth:`DriverRegistry.route` gives the
typed :class:`~iommufd_model.hooks.DriverHooks` of that driver's implementations alone, so a
driver never sees another vendor's objects.
"""

from __future__ import annotations

import errno
import importlib.metadata as md
from typing import Any

import attrs
import pluggy

from iommufd_model import hookspecs
from iommufd_model.driver import DriverInfo
from iommufd_model.errors import err
from iommufd_model.hooks import DriverHooks

ENTRY_POINT_GROUP = "iommufd_model.drivers"


@attrs.define
class DriverEntry:
    """One loaded driver plugin."""

    name: str
    plugin: object
    distribution: str
    version: str
    info: DriverInfo


@attrs.define
class PluginProblem:
    """A plugin that could not be loaded, and why (shown by ``iommufd-model drivers``)."""

    name: str
    distribution: str
    message: str

    def one_line_message(self) -> str:
        """The reason on one line (pluggy's validation errors span several)."""
        return " ".join(self.message.split())

    def line(self) -> str:
        """``NAME (distribution DIST): reason``, how the CLI and the kit report it."""
        return f"{self.name} (distribution {self.distribution}): {self.one_line_message()}"


class DriverRegistry:
    """Every installed driver, and the typed hooks of each."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(DriverHooks)
        self.drivers: dict[str, DriverEntry] = {}
        self.problems: list[PluginProblem] = []
        self._routes: dict[str, DriverHooks] = {}

    # -- loading ------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load every ``iommufd_model.drivers`` entry point; a broken one is recorded."""
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if ep.name in self.drivers:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                self.problems.append(
                    PluginProblem(ep.name, dist, f"import failed: {type(exc).__name__}: {exc}")
                )
                continue
            self.register(ep.name, plugin, distribution=dist, version=version)

    def register(
        self, name: str, plugin: object, *, distribution: str = "?", version: str = "?"
    ) -> DriverEntry | None:
        """Validate and add one driver; on failure record a :class:`PluginProblem`."""
        if name in self.drivers:
            self.problems.append(PluginProblem(name, distribution, "duplicate driver name"))
            return None
        try:
            self.pm.register(plugin, name=f"driver:{name}")
        except (ValueError, pluggy.PluginValidationError) as exc:
            self.problems.append(PluginProblem(name, distribution, f"invalid hooks: {exc}"))
            return None
        hooks = DriverHooks(self.pm, plugin, name)
        missing = [h for h in hookspecs.REQUIRED_HOOKS if h not in hooks.implemented]
        unknown = self._unknown_hooks(plugin)
        problem = ""
        if missing:
            problem = f"missing required hook(s): {', '.join(missing)}"
        elif unknown:
            problem = f"unknown hook(s) (misspelled?): {', '.join(unknown)}"
        info: Any = None
        if not problem:
            try:
                info = hooks.driver_info()
            except Exception as exc:
                problem = f"driver_info() failed: {type(exc).__name__}: {exc}"
        if problem:
            self.pm.unregister(plugin)
            self.problems.append(PluginProblem(name, distribution, problem))
            return None
        entry = DriverEntry(name, plugin, distribution, version, info)
        self.drivers[name] = entry
        self._routes[name] = hooks
        return entry

    def _unknown_hooks(self, plugin: object) -> list[str]:
        """Hook implementations of ``plugin`` that no hookspec declares, as pluggy's
        ``check_pending`` finds them (the other plugins passed it when they registered)."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError:
            return sorted(
                name
                for name, caller in vars(self.pm.hook).items()
                if isinstance(caller, pluggy.HookCaller)
                and not caller.has_spec()
                and any(impl.plugin is plugin for impl in caller.get_hookimpls())
            )
        return []

    # -- routing ------------------------------------------------------------------------
    def route(self, driver: str) -> DriverHooks:
        """The typed hooks of ``driver``, reaching that driver only."""
        hooks = self._routes.get(driver)
        if hooks is None:
            raise err(errno.ENODEV, f"no driver named {driver!r} is installed")
        return hooks


_default: DriverRegistry | None = None


def default_registry() -> DriverRegistry:
    """The process-wide registry, loaded from entry points on first use."""
    global _default
    if _default is None:
        reg = DriverRegistry()
        reg.load_entry_points()
        _default = reg
    return _default
