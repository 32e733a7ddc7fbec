"""The typed facade (``iommufd_model.hooks.DriverHooks``) is the hookspec namespace: each
public method is a hookspec and calls its own hook with its own arguments; the facade gives a
missing hook the meaning the contract documents."""

from __future__ import annotations

import errno
import inspect
from typing import Any

import pluggy
import pytest

from iommufd_model import hookspecs
from iommufd_model.driver import Domain, DomainType, DriverInfo, UserData
from iommufd_model.hooks import DriverHooks
from iommufd_model.hookspecs import hookimpl
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.machine import Machine
from iommufd_model.mock.driver import MockDriver
from iommufd_model.plugins import DriverRegistry
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import iommufd as U

RW = 3
SPECS = {
    name: fn
    for name, fn in vars(DriverHooks).items()
    if callable(fn) and hasattr(fn, hookspecs.PROJECT + "_spec")
}
FACADE_HELPERS = {"takes"}  # the facade's one public method that is no hook


def test_every_public_facade_method_is_a_hookspec() -> None:
    public = {n for n, v in vars(DriverHooks).items() if callable(v) and not n.startswith("_")}
    assert public - FACADE_HELPERS == set(SPECS)
    assert len(SPECS) == 27
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(DriverHooks)
    for name, fn in SPECS.items():
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert getattr(pm.hook, name).spec.argnames == tuple(params), name


class Reached(Exception):
    """Raised by a recording hook implementation: which hook, with which arguments."""

    def __init__(self, hook: str, args: dict[str, object]) -> None:
        super().__init__(hook)
        self.hook, self.given = hook, args


def _recorder(name: str) -> object:
    """A plugin implementing only ``name``, with the hookspec's arguments, that raises
    :class:`Reached` with what it was given (pluggy reads argument names from the code
    object, so the function is compiled with them)."""
    params = [p for p in inspect.signature(SPECS[name]).parameters if p != "self"]
    src = f"def {name}(self, {', '.join(params)}):\n    raise Reached({name!r}, dict(locals()))"
    scope: dict[str, Any] = {"Reached": Reached}
    exec(src, scope)
    return type("Recorder", (), {name: hookimpl(scope[name])})()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_facade_method_calls_its_own_hook_with_its_arguments(name: str) -> None:
    """The facade method ``name`` reaches the driver's ``name`` and passes every argument
    under its own name (a swapped or misnamed keyword in a facade body fails here)."""
    params = [p for p in inspect.signature(SPECS[name]).parameters if p != "self"]
    values = {p: object() for p in params}
    hooks = _hooks(_recorder(name))
    with pytest.raises(Reached) as reached:
        getattr(hooks, name)(**values)
    assert reached.value.hook == name
    assert {k: v for k, v in reached.value.given.items() if k != "self"} == values


def test_the_design_cards_five_hooks_are_hookspecs() -> None:
    card = {"domain_alloc_user", "attach", "set_dev_pasid", "cache_invalidate_user", "viommu_alloc"}
    assert card <= set(SPECS)
    assert not {"domain_alloc_paging", "domain_alloc_nested", "attach_dev"} & set(SPECS)


def _hooks(plugin: object) -> DriverHooks:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(DriverHooks)
    pm.register(plugin)
    return DriverHooks(pm, plugin, "test")


class MapOnly:
    """A driver with ``domain_map`` and ``domain_unmap`` alone; the third map fails."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    @hookimpl
    def domain_map(self, domain: Domain, iova: int, pa: int, size: int, prot: int) -> None:
        self.calls.append(("map", iova, size))
        if len(self.calls) == 3:
            raise OSError(errno.ENOMEM, "out of table pages")

    @hookimpl
    def domain_unmap(self, domain: Domain, iova: int, size: int) -> int:
        self.calls.append(("unmap", iova, size))
        return size


@pytest.fixture(scope="module")
def domain() -> Domain:
    return Domain(Machine.build(["mock"]).iommus[0], DomainType.PAGING)


def test_map_pages_falls_back_to_a_map_per_page(domain: Domain) -> None:
    """A driver without domain_map_pages gets one domain_map per page; a refusal midway
    unmaps the pages mapped before it (map_pages stays all-or-nothing)."""
    drv = MapOnly()
    hooks = _hooks(drv)
    hooks.domain_map_pages(domain, 0x10000, 0x50000, PAGE_SIZE, 2, RW)
    assert drv.calls == [("map", 0x10000, PAGE_SIZE), ("map", 0x11000, PAGE_SIZE)]
    drv.calls[:] = [("map", 0, 0)]  # the next map call is the third: it fails
    assert_errno(
        errno.ENOMEM, lambda: hooks.domain_map_pages(domain, 0x20000, 0x60000, PAGE_SIZE, 4, RW)
    )
    assert drv.calls[1:] == [
        ("map", 0x20000, PAGE_SIZE),
        ("map", 0x21000, PAGE_SIZE),
        ("unmap", 0x20000, PAGE_SIZE),
    ]


def test_missing_hooks_have_their_documented_meaning(domain: Domain) -> None:
    hooks = _hooks(MapOnly())
    m = Machine.build(["mock"])
    hw, dev = m.iommus[0], m.add_pci_device()
    # Operations the core cannot do without: EOPNOTSUPP from the facade.
    for call in (
        lambda: hooks.attach(hw, dev, None),
        lambda: hooks.set_dev_pasid(hw, dev, 1, domain),
        lambda: hooks.set_dirty_tracking(domain, True),
        lambda: hooks.read_and_clear_dirty(domain, 0, PAGE_SIZE, True, True),
        lambda: hooks.cache_invalidate_user(domain, 0, []),
        lambda: hooks.domain_alloc_user(hw, dev, 0, None, None, None),
        lambda: hooks.domain_iova_to_phys(domain, 0),
    ):
        assert_errno(errno.EOPNOTSUPP, call)
    # Hooks whose absence has a kernel meaning.
    assert hooks.probe_device(hw, dev) is None
    assert hooks.dev_reserved_regions(hw, dev) == []
    info = hooks.hw_info(hw, dev, 0)
    assert (info.data_type, info.data) == (U.IOMMU_HW_INFO_TYPE_NONE, b"")
    hooks.domain_free(domain)  # nothing to free
    assert hooks.implemented == {"domain_map", "domain_unmap"}


class PagingOnly:
    """``domain_alloc_user`` without ``parent`` or ``user_data``: paging domains only."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    @hookimpl
    def domain_alloc_user(self, iommu: object, dev: object, flags: int) -> Domain:
        return self.domain


class Answers:
    """Value hooks answering None, or an object of the wrong kind."""

    @hookimpl
    def domain_iova_to_phys(self, domain: Domain, iova: int) -> object:
        return None

    @hookimpl
    def domain_unmap(self, domain: Domain, iova: int, size: int) -> object:
        return "all of it"


def test_optional_arguments_of_domain_alloc_user(domain: Domain) -> None:
    hooks = _hooks(PagingOnly(domain))
    m = Machine.build(["mock"])
    hw, dev = m.iommus[0], m.add_pci_device()
    assert hooks.domain_alloc_user(hw, dev, 0, None, None, None) is domain

    def unread() -> bytes:
        raise AssertionError("the data of a driver that takes none is never read")

    data = UserData(U.IOMMU_HWPT_DATA_NONE + 1, 8, unread)
    assert_errno(errno.EOPNOTSUPP, lambda: hooks.domain_alloc_user(hw, dev, 0, None, None, data))
    assert_errno(errno.EOPNOTSUPP, lambda: hooks.domain_alloc_user(hw, dev, 0, domain, None, data))
    assert not hooks.takes("domain_alloc_user", "parent")
    mock = _hooks(MockDriver())
    assert mock.takes("domain_alloc_user", "parent") and mock.takes(
        "domain_alloc_user", "user_data"
    )


def test_a_value_hook_answering_none_or_a_wrong_kind(domain: Domain) -> None:
    hooks = _hooks(Answers())
    assert_errno(errno.EOPNOTSUPP, lambda: hooks.domain_iova_to_phys(domain, 0))
    with pytest.raises(TypeError, match="domain_unmap returned str"):
        hooks.domain_unmap(domain, 0, PAGE_SIZE)


class Other(MockDriver):
    @hookimpl
    def driver_info(self) -> DriverInfo:
        info = super().driver_info()
        info.name = "other"
        return info


def test_hooks_reach_one_driver_only() -> None:
    """Two drivers of one hook set in one registry: each one's hooks reach it alone."""
    reg = DriverRegistry()
    reg.register("mock", MockDriver())
    reg.register("other", Other())
    assert reg.problems == []
    assert reg.route("mock").driver_info().name == "mock"
    assert reg.route("other").driver_info().name == "other"
    assert_errno(errno.ENODEV, lambda: reg.route("nope"))
