"""The pluggy markers of the driver contract and the hooks a driver must implement.

The hookspecs themselves are the methods of :class:`iommufd_model.hooks.DriverHooks`: each
is declared there once, with its contract as its docstring, and is also the typed call the
core makes (``plugins.DriverRegistry`` adds that class to pluggy as the spec namespace).
Drivers mark their implementations with :data:`hookimpl` (re-exported by
``iommufd_model.api``).
"""

from __future__ import annotations

import pluggy

PROJECT = "iommufd_model"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# A plugin lacking one of these is refused at load time (``iommufd-model drivers``: BROKEN).
REQUIRED_HOOKS = (
    "driver_info",
    "probe",
    "domain_alloc_user",
    "domain_map",
    "domain_unmap",
    "attach",
)
