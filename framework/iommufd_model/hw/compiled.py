"""Load a hot-path module compiled by mypyc, or its identical pure-Python source.

Walkers are plain typed modules; installing a distribution compiles them with mypyc (see each
``setup.py``) and the extension module shadows the ``.py`` beside it. ``IOMMUFD_MODEL_PURE=1``
forces the source to be loaded instead, under a private name, so both can run side by side in
one process and be compared. :func:`is_compiled` tells which one a module is.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

PURE_ENV = "IOMMUFD_MODEL_PURE"


def is_compiled(module: ModuleType) -> bool:
    return not str(getattr(module, "__file__", "")).endswith(".py")


def load_pure(name: str) -> ModuleType:
    """Import the ``.py`` source of module ``name`` even when a compiled build shadows it."""
    private = name + "__pure"
    if private in sys.modules:
        return sys.modules[private]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find module {name}")
    source = Path(spec.origin)
    if source.suffix != ".py":
        source = source.parent / (name.rsplit(".", 1)[-1] + ".py")
    pure_spec = importlib.util.spec_from_file_location(private, source)
    if pure_spec is None or pure_spec.loader is None:
        raise ImportError(f"cannot load the source of {name}")
    module = importlib.util.module_from_spec(pure_spec)
    sys.modules[private] = module
    pure_spec.loader.exec_module(module)
    return module


def load_walker(name: str) -> ModuleType:
    """The module the hardware should use: compiled when built, pure when forced or absent."""
    if os.environ.get(PURE_ENV) == "1":
        return load_pure(name)
    return importlib.import_module(name)
