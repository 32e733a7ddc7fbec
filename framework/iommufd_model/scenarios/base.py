"""The scenario machinery: records, the run context and raw-uAPI helpers.

Scenarios talk to the model only through the public contract (``Machine``, the iommufd fd,
ioctl numbers and packed structs, device DMA), so the same function runs unchanged against
every driver and checks what a VMM would observe, not what a driver keeps inside.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import Any

import attrs

from iommufd_model.driver import DEFAULT_OPTION_SET, DriverInfo, Feature, OptionSet
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.hw.pci import PciDevice
from iommufd_model.machine import Machine
from iommufd_model.plugins import DriverRegistry, default_registry
from iommufd_model.vmm import Vm

PASS = "pass"
FAIL = "fail"
UNSUPPORTED = "unsupported"
# Costs of one cell: VMM exits (and the commands the VMM re-issued for its guest), then the
# hardware's own counters (IommuHw.stats), summed over every VM and machine the scenario built.
VMM_COST_KEYS = ("traps", "forwarded")
HW_COST_KEYS = ("translations", "walk_mem_refs", "iotlb_hits", "iotlb_misses", "commands", "faults")
COST_KEYS = VMM_COST_KEYS + HW_COST_KEYS


def errno_name(code: int | None) -> str:
    """Symbolic errno; 95 is EOPNOTSUPP in the kernel's vocabulary (Python says ENOTSUP)."""
    if code is None:
        return "-"
    if code == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return errno.errorcode.get(code, str(code))


def describe_oserror(exc: OSError) -> str:
    """``EINVAL: why`` from an OSError raised through :func:`iommufd_model.errors.err`."""
    text = str(exc)
    if text.startswith("[Errno"):
        text = text.split("] ", 1)[-1]
    plain = os.strerror(exc.errno) if exc.errno else ""
    if plain and text.startswith(f"{plain} (") and text.endswith(")"):
        text = text[len(plain) + 2 : -1]  # the model's detail says more than strerror()
    return f"{errno_name(exc.errno)}: {text}"


class Divergence(Exception):
    """The model did something a correct driver would not: the first one ends the scenario."""


class Unsupported(Exception):
    """The driver refused a feature it does not declare, with the errno it gave (None where
    the kernel refuses without one: a page request the driver answers itself)."""

    def __init__(
        self, feature: Feature, errno_: int | None, detail: str = "", upstream: str = ""
    ) -> None:
        why = detail or errno_name(errno_)
        super().__init__(f"{feature.value}: {why}" + (f" ({upstream})" if upstream else ""))
        self.feature = feature
        self.errno = errno_
        #: The Linux 7.2 source that refuses the feature too (empty: a gap of the model).
        self.upstream = upstream


@attrs.frozen
class Scenario:
    """A named, vendor-neutral check and the features it needs from a driver."""

    name: str
    doc: str
    features: frozenset[Feature]
    fn: Callable[[ScenarioContext], None]


@attrs.define
class ScenarioResult:
    """One matrix cell: outcome, why (first divergence or refused feature), what it cost."""

    scenario: str
    driver: str
    status: str
    detail: str = ""
    option_set: str = DEFAULT_OPTION_SET.name
    feature: str | None = None
    errno: int | None = None
    costs: dict[str, int] = attrs.Factory(dict)
    wall_s: float = 0.0
    #: For an unsupported cell: the Linux 7.2 source that refuses the feature as well.
    upstream: str = ""

    @property
    def ok(self) -> bool:
        """Pass and unsupported are both acceptable; only a fail breaks the contract."""
        return self.status != FAIL

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["errno_name"] = errno_name(self.errno) if self.errno is not None else None
        return out


def check(cond: object, what: str) -> None:
    """Record a divergence unless ``cond`` holds."""
    if not cond:
        raise Divergence(what)


def expect_errno(expected: int | tuple[int, ...], fn: Callable[[], object], what: str) -> int:
    """``fn`` must fail with one of ``expected``; returns the errno it gave."""
    allowed = expected if isinstance(expected, tuple) else (expected,)
    names = "/".join(errno_name(e) for e in allowed)
    try:
        fn()
    except OSError as exc:
        got = exc.errno or 0
        check(got in allowed, f"{what}: expected {names}, got {errno_name(got)}")
        return got
    raise Divergence(f"{what}: expected {names}, but it succeeded")


def expect_refused(fn: Callable[[], object], what: str) -> int:
    """``fn`` must fail with some errno (the kernel's choice is not part of the contract)."""
    try:
        fn()
    except OSError as exc:
        return exc.errno or 0
    raise Divergence(f"{what}: expected a refusal, but it succeeded")


def expect_fault(fn: Callable[[], object], what: str) -> None:
    """``fn`` (a DMA) must be refused by the IOMMU."""
    try:
        fn()
    except DmaFault:
        return
    raise Divergence(f"{what}: DMA went through, expected an IOMMU fault")


def pattern(seed: int, n: int) -> bytes:
    """Recognisable bytes, different per seed, so a DMA from the wrong page is caught."""
    return bytes((seed * 37 + i * 11 + (i >> 8)) & 0xFF for i in range(n))


class Rig:
    """One VMM with one device bound to an open iommufd: the starting point of most scenarios."""

    def __init__(self, machine: Machine, dev: PciDevice | None = None) -> None:
        self.machine = machine
        self.dev = dev if dev is not None else machine.add_pci_device(iommu=0)
        self.proc = machine.new_process()
        self.fd = self.proc.open_iommufd()
        self.dev_id = self.fd.bind(self.dev)

    def rebind(self) -> Rig:
        """The same device bound to a new iommufd in a new process (after a teardown)."""
        return Rig(self.machine, self.dev)

    # -- the uAPI through the fd's typed layer, with this rig's device filled in ------------
    def ioas_alloc(self) -> int:
        return self.fd.ioas_alloc()

    def buffer(self, length: int, seed: int) -> int:
        """mmap ``length`` bytes in the VMM and fill them with :func:`pattern`."""
        va = self.proc.mmap(length)
        self.proc.write(va, pattern(seed, length))
        return va

    def ioas_map(self, ioas: int, va: int, length: int, iova: int | None = None) -> int:
        return self.fd.ioas_map(ioas, va, length, iova=iova)

    def ioas_unmap(self, ioas: int, iova: int, length: int) -> int:
        return self.fd.ioas_unmap(ioas, iova, length)

    def hwpt_alloc(self, pt_id: int, flags: int = 0, data_type: int = 0, data: bytes = b"") -> int:
        return self.fd.hwpt_alloc(self.dev_id, pt_id, flags=flags, data_type=data_type, data=data)

    def destroy(self, obj_id: int) -> None:
        self.fd.destroy(obj_id)

    def set_dirty_tracking(self, hwpt: int, enable: bool) -> None:
        self.fd.hwpt_set_dirty_tracking(hwpt, enable)

    def dirty_pages(self, hwpt: int, iova: int, length: int, *, clear: bool = True) -> list[int]:
        """GET_DIRTY_BITMAP at CPU page granularity: the indexes of the dirty pages."""
        dirty = self.fd.hwpt_get_dirty_bitmap(hwpt, iova, length, PAGE_SIZE, clear=clear)
        return [(a - iova) // PAGE_SIZE for a in dirty]

    def viommu_alloc(self, hwpt: int, viommu_type: int, data: bytes = b"") -> int:
        return self.fd.viommu_alloc(self.dev_id, hwpt, viommu_type, data)

    def vdevice_alloc(self, viommu: int, virt_id: int) -> int:
        return self.fd.vdevice_alloc(viommu, self.dev_id, virt_id)


class ScenarioContext:
    """What a scenario gets: the driver under test and a factory of fresh machines.

    Costs are summed over every machine the scenario built, so a scenario that needs several
    machines (one per teardown order) is charged for all of them. Every machine's IOMMU is
    probed with ``option_set``'s options, and ``info`` is the driver's declaration less the
    features that configuration lacks, so the scenarios need not know about option sets.
    """

    def __init__(
        self, driver: str, registry: DriverRegistry, option_set: OptionSet = DEFAULT_OPTION_SET
    ) -> None:
        self.driver = driver
        self.registry = registry
        self.option_set = option_set
        declared = registry.drivers[driver].info
        self.info: DriverInfo = attrs.evolve(
            declared, features=option_set.features(declared.features)
        )
        self.machines: list[Machine] = []
        self.vms: list[Vm] = []

    def machine(self) -> Machine:
        m = Machine.build(
            iommus=[self.driver],
            registry=self.registry,
            options={self.driver: dict(self.option_set.options)},
        )
        self.machines.append(m)
        return m

    def rig(self) -> Rig:
        return Rig(self.machine())

    def has(self, feature: Feature) -> bool:
        return feature in self.info.features

    def need(self, feature: Feature, probe: Callable[[], object]) -> None:
        """Gate on a declared feature; when undeclared, ``probe`` must be refused with an errno.

        The refusal becomes :class:`Unsupported` carrying the errno the driver actually gave.
        A driver that accepts what it does not declare is a divergence: the matrix would
        otherwise hide a half-implemented feature.
        """
        if self.has(feature):
            return
        try:
            probe()
        except OSError as exc:
            raise self.unsupported(feature, exc) from exc
        raise Divergence(f"driver accepted {feature.value} but does not declare it")

    def unsupported(self, feature: Feature, exc: OSError) -> Unsupported:
        """The refusal ``exc`` of ``feature``, with the 7.2 source when 7.2 refuses it too."""
        upstream = self.info.unsupported_upstream.get(feature, "")
        return Unsupported(feature, exc.errno or 0, describe_oserror(exc), upstream)

    def driver_type(
        self, feature: Feature, types: frozenset[int], probe: Callable[[int], object], unknown: int
    ) -> int:
        """The driver's own uAPI type for ``feature`` (the lowest it declares in ``types``).

        A driver that declares no type (or not the feature) is unsupported: ``probe(unknown)``
        must be refused, and the errno the core or the driver gave is the reason.
        """
        if self.has(feature) and types:
            return min(types)
        try:
            probe(unknown)
        except OSError as exc:
            raise self.unsupported(feature, exc) from exc
        raise Divergence(f"driver accepted {feature.value} type {unknown:#x} it does not declare")

    def vm(self, machine: Machine | None = None, **kwargs: Any) -> Vm:
        """A VM on ``machine`` (a fresh one by default) whose VMM traps count in the costs."""
        vm = Vm(machine if machine is not None else self.machine(), **kwargs)
        self.vms.append(vm)
        return vm

    def costs(self) -> dict[str, int]:
        """VMM traps of every VM, plus ``hw.stats`` of every IOMMU of every machine built."""
        total = dict.fromkeys(COST_KEYS, 0)
        for vm in self.vms:
            total["traps"] += vm.stats.traps
            total["forwarded"] += vm.stats.forwarded
        for m in self.machines:
            for hw in m.iommus:
                for key, value in hw.stats.snapshot().items():
                    total[key] = total.get(key, 0) + value
        return total


def run_scenario(
    scenario: Scenario,
    driver: str,
    registry: DriverRegistry | None = None,
    option_set: OptionSet = DEFAULT_OPTION_SET,
) -> ScenarioResult:
    """Run one cell on fresh machines; never raises for a model or driver failure."""
    reg = registry if registry is not None else default_registry()
    ctx = ScenarioContext(driver, reg, option_set)
    start = time.perf_counter()
    result = ScenarioResult(scenario.name, driver, PASS, option_set=option_set.name)
    try:
        scenario.fn(ctx)
    except Unsupported as exc:
        result.status = UNSUPPORTED
        result.feature = exc.feature.value
        result.errno = exc.errno
        result.detail = str(exc)
        result.upstream = exc.upstream
    except Divergence as exc:
        result.status = FAIL
        result.detail = str(exc)
    except DmaFault as exc:
        result.status = FAIL
        result.detail = f"unexpected fault: {exc}"
    except OSError as exc:
        result.status = FAIL
        result.errno = exc.errno
        result.detail = f"unexpected {describe_oserror(exc)}"
    except Exception as exc:
        result.status = FAIL
        result.detail = f"driver/model bug: {type(exc).__name__}: {exc}"
    result.wall_s = time.perf_counter() - start
    result.costs = ctx.costs()
    return result
