"""Load a hot-path module compiled by mypyc, or its identical pure-Python source.

Walkers are plain typed modules; installing a distribution compiles them with mypyc (see each
``setup.py``) and the extension module shadows the ``.py`` beside it. ``IOMMUFD_MODEL_PURE=1``
forces the source to be loaded instead, under a private name, so both can run side by side in
one process and be compared. :func:`is_compiled` tells which one a module is.

An editable install compiles the sources as they are at install time; a later edit or ``git
pull`` changes the ``.py`` while the old extension keeps shadowing it, which shows up far away
as a TypeError or a wrong answer. So each build writes a stamp beside the package
(:func:`write_stamp`: every compiled module and the SHA-256 of the source it was compiled
from), and :func:`load_walker` refuses, with the remedy in the message, to hand out a module of
a package whose compiled sources no longer match their stamp (:func:`stale_sources`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

PURE_ENV = "IOMMUFD_MODEL_PURE"
STAMP = "_compiled_sources.txt"
_checked: set[str] = set()


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mypyc_extensions(sources: list[str], options: tuple[str, ...] = ()) -> list[Any]:
    """The mypyc extensions of ``sources`` for a distribution's ``setup.py``, or none.

    None when the build runs with ``IOMMUFD_MODEL_PURE=1`` or without mypyc: the plain sources
    are installed and behave identically (the tests compare the two). Every distribution
    builds its walkers with the same C flags, which let the compiler inline mypyc's small
    native helpers.
    """
    if os.environ.get(PURE_ENV) == "1" or importlib.util.find_spec("mypyc") is None:
        return []
    from mypyc.build import mypycify

    extensions: list[Any] = mypycify([*options, *sources], opt_level="3")
    for ext in extensions:
        ext.extra_compile_args += [
            "-fno-semantic-interposition",
            "--param=max-inline-insns-auto=200",
        ]
    return extensions


def setup_plugin(setup_file: str, package: str, sources: tuple[str, ...] = ("walk.py",)) -> None:
    """A vendor plugin's whole build: its walkers compiled, the stamp written, ``setup()``.

    ``sources`` are the modules under ``package`` that mypyc compiles; the rest of the
    distribution's metadata is its ``pyproject.toml``.
    """
    setup = importlib.import_module("setuptools").setup
    here = Path(setup_file).resolve().parent
    extensions = mypyc_extensions([f"{package}/{source}" for source in sources])
    built = [(here / package / source, source.removesuffix(".py")) for source in sources]
    write_stamp(here / package, built if extensions else [])
    setup(ext_modules=extensions)


def write_stamp(package_dir: Path, built: Iterable[tuple[Path, str]]) -> None:
    """Record, for a build, what each compiled module was compiled from.

    ``built`` pairs a source (``.py`` for mypyc, ``.c`` for a plain extension) with the
    extension module's path under ``package_dir`` (``hw/tlb_run``, ``run/_preload``). Called by
    the distributions' ``setup.py``, so it needs nothing but the standard library; a pure build
    passes nothing, which removes the stamp.
    """
    stamp = package_dir / STAMP
    lines = [
        f"{source.relative_to(package_dir).as_posix()} {module} {source_digest(source)}"
        for source, module in sorted(built)
    ]
    if lines:
        stamp.write_text("\n".join(lines) + "\n")
    else:
        stamp.unlink(missing_ok=True)


def stale_sources(package_dir: Path) -> list[Path]:
    """The sources of ``package_dir`` edited since their extension module was built."""
    stamp = package_dir / STAMP
    if not stamp.is_file():
        return []
    stale = []
    for line in stamp.read_text().splitlines():
        relpath, module, digest = line.split(" ")
        source = package_dir / relpath
        extension = package_dir / module
        built = list(extension.parent.glob(extension.name + ".*.so"))
        if built and source.is_file() and source_digest(source) != digest:
            stale.append(source)
    return stale


def check_fresh(name: str) -> None:
    """Refuse to run a package's compiled modules once their sources have changed."""
    package = name.partition(".")[0]
    if package in _checked:
        return
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            stale = stale_sources(Path(location))
            if stale:
                names = ", ".join(str(path) for path in stale)
                raise ImportError(
                    f"{names}: changed since it was compiled, and the old build would shadow "
                    "it; re-install the distribution (`bash .ci/install` in the repository) "
                    "to compile the new source"
                )
    _checked.add(package)


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
    check_fresh(name)
    if os.environ.get(PURE_ENV) == "1":
        return load_pure(name)
    return importlib.import_module(name)


def load_c_helper(name: str) -> ModuleType | None:
    """A plain-C extension that speeds up Python code which runs without it (``mock/_dirty.c``,
    ``core/_dirty_bits.c``): None in a pure build (``IOMMUFD_MODEL_PURE=1`` at install or run
    time), when it is not built, or when its package's build is stale (then the Python code
    runs, rather than an old build)."""
    if os.environ.get(PURE_ENV) == "1":
        return None
    try:
        check_fresh(name)
        return importlib.import_module(name)
    except ImportError:
        return None
