"""The fail-nth sweep driver of the robustness tests, and the complete-state snapshot it checks.

``Runner.ioctl(label, cmd, struct)`` issues one ioctl of a sequence the way the kernel's
iommufd_fail_nth does, but per ioctl: for n = 1, 2, ... it arms ``fail_nth(n)`` around the
call; while the injection fires, the call must fail with the injected errno (ENOENT for an
object lookup, EFAULT for a user copy) and :func:`full_snapshot` must equal the one taken
before the call, and the invariants of ``tests/helpers.py`` must hold. The first n that no
longer fires is the real call, and the sequence goes on with its result.

:func:`full_snapshot` is ``helpers.snapshot`` plus what that one leaves out: every object's
holds, the IOAS internals (area pin/lock counts, the Pages' per-index users and access
records, domain order, warnings), the driver domains' complete state, every IOMMU instance's
state (a ``state_digest()`` method if the hardware has one, else a structural capture of its
attributes, IOTLBs included) and the bytes of every frame the kernel side owns (page tables
and other driver memory: every materialised frame no user mapping or memfd holds).
"""

from __future__ import annotations

import collections
import errno
import time
from collections.abc import Callable
from typing import Any

import attrs

from helpers import check_invariants, snapshot
from iommufd_model.core.main import IommuFd
from iommufd_model.core.objects import IommufdObject
from iommufd_model.failnth import FailNth, SweepResult, sweep
from iommufd_model.hw.iommu import HwStats, IommuHw
from iommufd_model.hw.iotlb import Iotlb
from iommufd_model.hw.memory import PhysicalMemory
from iommufd_model.hw.pci import PciDevice
from iommufd_model.uapi import iommufd as U
from iommufd_model.uapi.codec import UStruct

# -- the complete state ---------------------------------------------------------------------
_MAX_DEPTH = 10
# Plumbing, not state: hook relays (they cache callers lazily), back references.
_SKIP_ATTRS = frozenset({"hooks", "_hooks", "machine", "ictx"})


def _sorted(items: list[Any]) -> tuple[Any, ...]:
    try:
        return tuple(sorted(items))
    except TypeError:
        return tuple(sorted(items, key=repr))


def freeze(v: Any, depth: int = 0, path: frozenset[int] = frozenset()) -> Any:
    """A plain, comparable capture of ``v`` (objects by their fields, identities by name)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, IommufdObject):
        return ("obj", v.TYPE.value, v.id)
    if isinstance(v, PciDevice):
        return ("pci", v.rid)
    if (
        isinstance(v, (PhysicalMemory, HwStats))
        or type(v).__name__ == "Machine"
        or type(v).__module__.startswith("pluggy")
    ):
        return ("ref", type(v).__name__)
    if isinstance(v, IommuHw) and depth:
        return ("hw", v.name)
    if isinstance(v, Iotlb):
        return ("iotlb", _sorted(v.entries()))
    if id(v) in path or depth > _MAX_DEPTH:
        return ("...", type(v).__name__)
    path = path | {id(v)}
    d = depth + 1
    if isinstance(v, dict):
        return ("dict", _sorted([(freeze(k, d, path), freeze(x, d, path)) for k, x in v.items()]))
    if isinstance(v, (list, tuple, collections.deque)):
        return tuple(freeze(x, d, path) for x in v)
    if isinstance(v, (set, frozenset)):
        return ("set", _sorted([freeze(x, d, path) for x in v]))
    if callable(v) and not hasattr(v, "__dict__"):
        return ("fn", getattr(v, "__qualname__", type(v).__name__))
    fields: dict[str, Any] = {}
    if attrs.has(type(v)):
        fields = {f.name: getattr(v, f.name, None) for f in attrs.fields(type(v))}
    elif hasattr(v, "__dict__"):
        fields = dict(vars(v))
    else:
        for cls in type(v).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(v, name):
                    fields[name] = getattr(v, name)
    return (
        type(v).__name__,
        tuple((k, freeze(x, d, path)) for k, x in sorted(fields.items()) if k not in _SKIP_ATTRS),
    )


def hw_state(hw: IommuHw) -> Any:
    """An IOMMU instance's state: its own ``state_digest()`` if it has one, else its fields."""
    digest = getattr(hw, "state_digest", None)
    if callable(digest):
        return digest()
    return freeze(hw)


def _user_frames(machine: Any) -> set[int]:
    """Frames a user mapping or a memfd holds (they may fault in during a failed call)."""
    from iommufd_model.process import MemFile

    user: set[int] = set()
    for proc in machine.processes:
        user.update(proc._ptes.values())
        for f in proc.files.values():
            if isinstance(f, MemFile):
                user.update(f._pfns.values())
    return user


def _kernel_frames(machine: Any) -> dict[int, tuple[int, int]]:
    """Every frame no user mapping or memfd holds: its references and (once written) the hash
    of its bytes. A failed call that allocated a table or queue frame and kept it shows here
    even when the frame was never written."""
    user = _user_frames(machine)
    mem = machine.memory
    pages = mem._pages
    out = {pfn: (n, 0) for pfn, n in mem._refs.items() if pfn not in user}
    for pfn, page in pages.items():
        if pfn not in user:
            out[pfn] = (mem._refs.get(pfn, 0), hash(bytes(page)))
    return out


def _model_state(fd: IommuFd) -> dict[int, Any]:
    from iommufd_model.core.device import Device
    from iommufd_model.core.hw_pagetable import Hwpt
    from iommufd_model.core.ioas import Ioas

    out: dict[int, Any] = {}
    for obj in fd.objects:
        e: dict[str, Any] = {"holds": [(h.TYPE.value, h.id) for h in obj.holds]}
        if isinstance(obj, Ioas):
            iopt = obj.iopt
            e["areas"] = [
                (a.iova, a.last, a.num_accesses, a.num_locks, a.prevent_access)
                for a in iopt.area_objects()
            ]
            seen: dict[int, Any] = {}
            for a in iopt.area_objects():
                p = a.pages
                # Per-index (pfn, users) of the pinned indexes; the lazily allocated tables
                # themselves are not state.
                pinned = [
                    (i, pfn, u)
                    for i, (pfn, u) in enumerate(zip(p._pfns or (), p._uses or (), strict=True))
                    if pfn or u
                ]
                seen.setdefault(
                    id(p), (p.npages, p.refs, p.npinned, pinned, p._accesses, p.writable)
                )
            e["pages"] = freeze(list(seen.values()))
            e["domains"] = [getattr(getattr(d, "domain", None), "hwpt", None) for d in iopt.domains]
            e["domains"] = [h.id if h is not None else None for h in e["domains"]]
            e["accesses"] = len(iopt.accesses)
            e["warnings"] = list(iopt.warnings)
        elif isinstance(obj, Hwpt):
            e["domain"] = freeze(obj.domain)
        elif isinstance(obj, Device):
            e["resv"] = sorted(obj._resv.values())
            e["vdev"] = obj.vdev.id if obj.vdev is not None else None
        else:
            # Every other object by its fields (access items, vIOMMU tables, queues ...).
            e["fields"] = freeze(
                {k: v for k, v in vars(obj).items() if k not in ("holds", "users", *_SKIP_ATTRS)}
            )
        out[obj.id] = e
    return out


def full_snapshot(fd: IommuFd) -> dict[str, Any]:
    snap = snapshot(fd)
    machine = fd.machine
    snap["model"] = _model_state(fd)
    snap["hw"] = [hw_state(hw) for hw in machine.iommus]
    snap["kernel_frames"] = _kernel_frames(machine)
    snap["file_refs"] = fd.file_refs
    snap["internal_errors"] = len(fd.internal_errors)
    return snap


def _around(x: Any, y: Any) -> str:
    """The two reprs from a little before where they first differ."""
    a, b = repr(x), repr(y)
    i = next((i for i, (p, q) in enumerate(zip(a, b, strict=False)) if p != q), min(len(a), len(b)))
    start = max(0, i - 150)
    return f"...{a[start : i + 150]} -> ...{b[start : i + 150]}"


def snapshot_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = [k for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
    lines = []
    for k in sorted(keys):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            sub = [s for s in x.keys() | y.keys() if x.get(s) != y.get(s)]
            for s in sorted(sub, key=repr)[:4]:
                lines.append(f"  {k}[{s!r}]: {_around(x.get(s), y.get(s))}")
        else:
            lines.append(f"  {k}: {_around(x, y)}")
    return "\n".join(lines)


def invariants(fd: IommuFd) -> None:
    """``helpers.check_invariants`` plus the references in-kernel accesses hold.

    A selftest access (ObjType.ACCESS) holds a ``users`` reference on its IOAS and its driver
    holds one on the access, neither through ``holds``: they are taken out for the check.
    """
    from iommufd_model.core.objects import ObjType

    extra: collections.Counter[int] = collections.Counter()
    objs = {o.id: o for o in fd.objects}
    for o in objs.values():
        if o.TYPE is ObjType.ACCESS:
            extra[o.id] += 1
            ioas = getattr(o, "ioas", None)
            if ioas is not None:
                extra[ioas.id] += 1
    for i, n in extra.items():
        objs[i].users -= n
    try:
        check_invariants(fd)
    finally:
        for i, n in extra.items():
            objs[i].users += n


# -- the sweep --------------------------------------------------------------------------------
class Unsupported(Exception):
    """An optional step the driver refuses (EOPNOTSUPP): the sequence stops there."""


@attrs.define
class CaseStats:
    points: int = 0
    steps: int = 0
    sites: collections.Counter[str] = attrs.Factory(collections.Counter)
    unsupported: list[str] = attrs.Factory(list)
    seconds: float = 0.0


# case name -> stats, for the totals the session prints
TOTALS: dict[str, CaseStats] = {}


def allowed_errnos(fp: FailNth, cmd: int | None) -> set[int]:
    assert fp.fired_errno is not None
    allowed = {fp.fired_errno}
    # iommufd_hwpt_alloc(): a failed lookup of pt_id is reported as EINVAL.
    if fp.fired_site == "objects.get" and cmd == U.IOMMU_HWPT_ALLOC:
        allowed.add(errno.EINVAL)
    return allowed


class Runner:
    """Sweeps every call of one sequence; ``stats`` counts the (sequence, n) points."""

    def __init__(self, fd: IommuFd, case: str, *, errno: int = errno.ENOMEM) -> None:
        self.fd = fd
        self.case = case
        self.errno = errno
        self.stats = TOTALS.setdefault(case, CaseStats())
        self._t0 = time.perf_counter()

    def done(self) -> CaseStats:
        self.stats.seconds += time.perf_counter() - self._t0
        self._t0 = time.perf_counter()
        return self.stats

    def call(
        self,
        label: str,
        fn: Callable[[], Any],
        *,
        cmd: int | None = None,
        expect: int | None = 0,
        optional: bool = False,
    ) -> Any:
        """Sweep ``fn``; ``expect`` is the errno of the real call (0: success, None: any)."""
        fd = self.fd
        before = full_snapshot(fd)

        def check(fp: FailNth, exc: OSError | None) -> None:
            where = f"{self.case}: {label}: n={fp.n} at {fp.fired_site}"
            assert exc is not None, f"{where}: the injected failure was swallowed"
            assert exc.errno in allowed_errnos(fp, cmd), (
                f"{where}: errno {errno.errorcode.get(exc.errno or 0)}, injected "
                f"{errno.errorcode.get(fp.fired_errno or 0)}"
            )
            after = full_snapshot(fd)
            assert after == before, f"{where}: state changed:\n{snapshot_diff(before, after)}"
            invariants(fd)

        self.stats.steps += 1
        res = SweepResult()
        try:
            sweep(fn, check, errno=self.errno, out=res)
        except OSError as exc:
            self.stats.points += res.points
            self.stats.sites.update(res.sites)
            after = full_snapshot(fd)
            assert after == before, (
                f"{self.case}: {label}: the real call failed ({exc}) and changed state:\n"
                f"{snapshot_diff(before, after)}"
            )
            if optional and exc.errno == errno.EOPNOTSUPP:
                self.stats.unsupported.append(label)
                raise Unsupported(label) from exc
            if expect is None or exc.errno == expect:
                return None
            raise AssertionError(f"{self.case}: {label}: real call failed: {exc}") from exc
        self.stats.points += res.points
        self.stats.sites.update(res.sites)
        assert expect in (0, None), f"{self.case}: {label}: succeeded, expected errno {expect}"
        invariants(fd)
        return res.result

    def ioctl(
        self,
        label: str,
        cmd: int,
        st: UStruct | bytearray,
        *,
        expect: int | None = 0,
        optional: bool = False,
    ) -> Any:
        """Sweep one ioctl; returns the decoded reply (or the raw buffer) of the real call."""
        if isinstance(st, UStruct):
            if getattr(st, "size", None) == 0:
                st.size = st.SIZE  # type: ignore[attr-defined]
            data = st.pack()
        else:
            data = bytes(st)

        def fn() -> bytearray:
            buf = bytearray(data)
            self.fd.ioctl(cmd, buf)
            return buf

        buf = self.call(label, fn, cmd=cmd, expect=expect, optional=optional)
        if buf is None or not isinstance(st, UStruct):
            return buf
        return type(st).unpack(bytes(buf))
