"""Driver discovery and routing.

Drivers are found through the entry-point group ``iommufd_model.drivers`` (the mock driver
too). All of them live in one pluggy ``PluginManager`` so hook signatures are validated in one
place, and each call is routed to exactly one driver with ``subset_hook_caller``: the caller
for driver X excludes every other plugin, so a driver never sees another vendor's objects
and a firstresult hook cannot be answered by the wrong vendor. The per-driver callers are
built once and cached.
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


class _Routed:
    """Attribute access yields the hook caller restricted to one plugin."""

    def __init__(self, registry: DriverRegistry, name: str) -> None:
        self._registry = registry
        self._name = name
        self._cache: dict[str, Any] = {}

    def __getattr__(self, hook: str) -> Any:
        caller = self._cache.get(hook)
        if caller is None:
            reg = self._registry
            others = [e.plugin for n, e in reg.drivers.items() if n != self._name]
            caller = reg.pm.subset_hook_caller(hook, remove_plugins=others)
            self._cache[hook] = caller
        return caller


class DriverRegistry:
    """Every installed driver, and a routed hook relay per driver."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.drivers: dict[str, DriverEntry] = {}
        self.problems: list[PluginProblem] = []
        self._routes: dict[str, _Routed] = {}

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
        missing = [h for h in hookspecs.REQUIRED_HOOKS if not self._implements(plugin, h)]
        unknown = self._unknown_hooks(plugin)
        problem = ""
        if missing:
            problem = f"missing required hook(s): {', '.join(missing)}"
        elif unknown:
            problem = f"unknown hook(s) (misspelled?): {', '.join(unknown)}"
        info: Any = None
        if not problem:
            try:
                info = plugin.driver_info()  # type: ignore[attr-defined]
            except Exception as exc:
                problem = f"driver_info() failed: {type(exc).__name__}: {exc}"
            else:
                if not isinstance(info, DriverInfo):
                    problem = "driver_info() must return iommufd_model.driver.DriverInfo"
        if problem:
            self.pm.unregister(plugin)
            self.problems.append(PluginProblem(name, distribution, problem))
            return None
        entry = DriverEntry(name, plugin, distribution, version, info)
        self.drivers[name] = entry
        self._routes.clear()
        return entry

    def _implements(self, plugin: object, hook: str) -> bool:
        caller = getattr(self.pm.hook, hook, None)
        if caller is None:
            return False
        return any(impl.plugin is plugin for impl in caller.get_hookimpls())

    def _unknown_hooks(self, plugin: object) -> list[str]:
        """Methods marked ``@hookimpl`` whose name no hookspec declares."""
        unknown = []
        for attr in dir(plugin):
            obj = getattr(plugin, attr, None)
            marked = callable(obj) and hasattr(obj, hookspecs.PROJECT + "_impl")
            if marked and not hasattr(hookspecs, attr):
                unknown.append(attr)
        return sorted(unknown)

    # -- routing ------------------------------------------------------------------------
    def route(self, driver: str) -> Any:
        """The hook relay that reaches only ``driver``."""
        routed = self._routes.get(driver)
        if routed is None:
            if driver not in self.drivers:
                raise err(errno.ENODEV, f"no driver named {driver!r} is installed")
            routed = self._routes[driver] = _Routed(self, driver)
        return routed


_default: DriverRegistry | None = None


def default_registry() -> DriverRegistry:
    """The process-wide registry, loaded from entry points on first use."""
    global _default
    if _default is None:
        reg = DriverRegistry()
        reg.load_entry_points()
        _default = reg
    return _default
