"""The model lock: one re-entrant lock that every entry point into the model takes.

A VMM is many threads (vCPUs trapping MMIO, I/O threads mapping, devices doing DMA) and the
kernel serves them all at once with a hierarchy of locks (docs/concurrency.md lists them). The
model collapses that hierarchy into one re-entrant lock per Python process, :data:`MODEL_LOCK`
(``threading.RLock``'s interface, in C), held for the whole of each entry point: an ioctl, a
device's DMA, an MMIO access, a guest driver's call, a process's memory access, a file's
read/write/close, the construction of a machine. Each entry point is therefore atomic against
every other, which is a legal schedule of the kernel's finer locks, and no compound state change
relies on the GIL (the model is correct on a free-threaded CPython too).

The lock is taken *structurally*, so code written later is covered without doing anything:

- :func:`serialized` wraps every public method a class defines (the framework's entry-point
  classes: ``IommuFd``, ``Process``, ``PciDevice``, ``Mmio``, ``EventFile``, ``Machine``,
  ``Vm``, ``GuestMemory``);
- :class:`SerializedSubclasses` does the same for every subclass as it is defined (vendor
  guest IOMMU models, :class:`~iommufd_model.vmm.GuestIommu`);
- :func:`locked` marks a single method (the DMA engine of
  :class:`~iommufd_model.hw.iommu.IommuHw`).

Never block while holding the lock (no sleeping, no waiting on another thread): a thread that
must wait for an event uses :func:`wait_for`, which releases the lock while it sleeps.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import threading
import types
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound=type)


def _lockcall() -> types.ModuleType | None:
    """``_lockcall.c`` (the lock and its wrapper in C), or None in a pure build
    (``IOMMUFD_MODEL_PURE=1`` at install or run time): ``threading.RLock`` and wrappers
    generated in Python then, with the same behaviour."""
    if os.environ.get("IOMMUFD_MODEL_PURE") == "1":
        return None
    try:
        return importlib.import_module("iommufd_model._lockcall")
    except ImportError:
        return None


_C = _lockcall()
#: The one lock of the model (re-entrant: an entry point may call another): the C RLock of
#: ``_lockcall.c`` (``threading.RLock``'s interface, including what ``threading.Condition``
#: needs, with acquisitions counted), or ``threading.RLock`` in a pure build.
MODEL_LOCK: Any = threading.RLock() if _C is None else _C.RLock()
#: Signalled (under :data:`MODEL_LOCK`) whenever an event or fault is queued for a reader.
MODEL_EVENT = threading.Condition(MODEL_LOCK)


def locked(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` holding :data:`MODEL_LOCK`.

    Built, the wrapper is ``_lockcall.LockedCall``: the lock taken and released in C around a
    vectorcall of ``fn`` with the arguments as received (no frame of its own; it binds as a
    method like a function). In a pure build it is generated in Python with ``fn``'s own
    parameter list (as attrs and dataclasses generate their methods), taking the lock with
    its ``acquire``/``release`` bound once: no ``*args``/``**kwargs`` packing and no ``with``
    protocol (benchmarks/bench_lock.py measures both). Either way a re-entry from inside
    another entry point only counts up on a lock the thread owns.
    """
    wrapper: Callable[P, R]
    code = getattr(fn, "__code__", None)
    if _C is not None:
        wrapper = _C.LockedCall(fn, MODEL_LOCK)
    elif code is None:
        wrapper = _generic(fn, MODEL_LOCK)
    else:
        wrapper = _with_signature(fn, code, MODEL_LOCK)
    functools.update_wrapper(wrapper, fn)
    wrapper.__model_locked__ = True  # type: ignore[attr-defined]
    return wrapper


def _generic(fn: Callable[P, R], lock: Any) -> Callable[P, R]:
    """The wrapper for callables without Python code (builtins, compiled functions)."""
    acquire, release = lock.acquire, lock.release

    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        acquire()
        try:
            return fn(*args, **kwargs)
        finally:
            release()

    return wrapper


def _with_signature(fn: Callable[P, R], code: types.CodeType, lock: Any) -> Callable[P, R]:
    """A wrapper holding ``lock`` whose parameters are ``fn``'s (names, kinds and defaults)."""
    names = code.co_varnames
    npos, nposonly, nkw = code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount
    positional = list(names[:npos])
    keyword = list(names[npos : npos + nkw])
    params = positional[:nposonly] + (["/"] if nposonly else []) + positional[nposonly:]
    args = list(positional)
    rest = npos + nkw
    if code.co_flags & inspect.CO_VARARGS:
        params.append("*" + names[rest])
        args.append("*" + names[rest])
        rest += 1
    elif keyword:
        params.append("*")
    params += keyword
    args += [f"{k}={k}" for k in keyword]
    if code.co_flags & inspect.CO_VARKEYWORDS:
        params.append("**" + names[rest])
        args.append("**" + names[rest])
    source = (
        "def __model_factory(__model_fn, __model_acquire, __model_release):\n"
        f"    def wrapper({', '.join(params)}):\n"
        "        __model_acquire()\n"
        "        try:\n"
        f"            return __model_fn({', '.join(args)})\n"
        "        finally:\n"
        "            __model_release()\n"
        "    return wrapper\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # the source holds only the code object's parameter names
    wrapper: Callable[P, R] = namespace["__model_factory"](fn, lock.acquire, lock.release)
    wrapper.__defaults__ = getattr(fn, "__defaults__", None)
    kwdefaults = getattr(fn, "__kwdefaults__", None)
    wrapper.__kwdefaults__ = None if kwdefaults is None else dict(kwdefaults)
    return wrapper


def _wrap_public(cls: type, unlocked: frozenset[str]) -> None:
    for name, value in list(vars(cls).items()):
        if name.startswith("_") or name in unlocked:
            continue
        # Plain functions only: properties, static and class methods stay as they are.
        function = isinstance(value, types.FunctionType)
        if function and not getattr(value, "__model_locked__", False):
            setattr(cls, name, locked(value))


def serialized(*, unlocked: tuple[str, ...] = ()) -> Callable[[C], C]:
    """Class decorator: every public method the class defines holds :data:`MODEL_LOCK`.

    ``unlocked`` names methods left alone (pure lookups on a hot path, called only from
    inside other entry points)."""

    def deco(cls: C) -> C:
        _wrap_public(cls, frozenset(unlocked))
        return cls

    return deco


class SerializedSubclasses:
    """Base whose subclasses get every public method they define wrapped by :func:`locked`
    when the subclass is created (vendor classes are covered without knowing it)."""

    #: methods of subclasses that stay unlocked (set on the base that uses this mixin)
    UNLOCKED_METHODS: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _wrap_public(cls, cls.UNLOCKED_METHODS)


def notify_event() -> None:
    """Wake :func:`wait_for` sleepers: something was queued for a reader."""
    with MODEL_EVENT:
        MODEL_EVENT.notify_all()


def wait_for(predicate: Callable[[], bool], timeout: float | None = None) -> bool:
    """Sleep until ``predicate()`` (evaluated under the lock) is true or ``timeout`` passes.

    The lock is released while sleeping, even when the caller holds it re-entrantly, so the
    thread that will queue the event can run; returns the predicate's last value."""
    with MODEL_EVENT:
        return MODEL_EVENT.wait_for(predicate, timeout)
