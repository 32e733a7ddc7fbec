"""The typed facade over one driver's hooks: every call from the core goes through here.

One method per hookspec of :mod:`iommufd_model.hookspecs`, with the hookspec's parameters
and types, in the manner of tox's plugin manager (its ``Plugin`` class calls
``manager.hook.tox_*`` from typed methods), so ``mypy --strict`` checks each call site
against the contract. ``tests/driver_contract/test_hooks_facade.py`` checks that facade and
hookspecs agree, name by name and parameter by parameter.

A :class:`DriverHooks` reaches exactly one driver plugin: it holds that plugin's pluggy
hook implementations and calls them as pluggy's ``_multicall`` does (arguments by the
implementation's own ``argnames``, so a driver may declare a subset). What the core does
when the driver lacks a hook is decided here, once, per hook:

* a hook the operation cannot do without raises ``OSError(EOPNOTSUPP)``: the call site
  never sees a missing hook, and a hook never returns a marker to say it exists;
* a hook whose absence has a kernel meaning gives that meaning: no ``probe_device`` -> no
  private data, no ``dev_reserved_regions`` -> none, no ``hw_info`` -> type NONE (Linux 7.2
  device.c), no ``domain_map_pages`` -> one ``domain_map`` per page, no
  ``hw_queue_supported`` -> ask ``hw_queue_alloc``, no destroy hook -> nothing to free.

A hook that must return an object and answers ``None`` is refused the same way
(EOPNOTSUPP); one answering an object of the wrong kind is a driver bug (``TypeError``,
which the conformance kit reports as a breach).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pluggy

from iommufd_model.driver import (
    Domain,
    DriverInfo,
    HwInfo,
    HwQueueBase,
    InvalidateResult,
    UserData,
    VdeviceBase,
    ViommuBase,
)
from iommufd_model.errors import err
from iommufd_model.hw.iommu import IommuHw
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from collections.abc import Callable

    from iommufd_model.core.mmap import MmapOwner
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.machine import Machine
    from iommufd_model.vmm import GuestIommu, Vm

T = TypeVar("T")


class DriverHooks:
    """The hooks of one driver plugin, typed; built by ``DriverRegistry.route``.

    Attributes:
        name: the driver's entry-point name.
        implemented: the names of the hooks the driver implements.
    """

    def __init__(self, pm: pluggy.PluginManager, plugin: object, name: str) -> None:
        self.name = name
        self._impls: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {}
        for hook, caller in vars(pm.hook).items():
            if not isinstance(caller, pluggy.HookCaller) or not caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:
                    self._impls[hook] = (impl.function, impl.argnames)
        self.implemented = frozenset(self._impls)

    # -- calling ----------------------------------------------------------------------------
    def takes(self, hook: str, arg: str) -> bool:
        """Whether the driver implements ``hook`` with the optional argument ``arg``."""
        impl = self._impls.get(hook)
        return impl is not None and arg in impl[1]

    def _call(self, hook: str, **kwargs: Any) -> Any:
        """Call the driver's ``hook`` (EOPNOTSUPP when it has none)."""
        impl = self._impls.get(hook)
        if impl is None:
            raise err(errno.EOPNOTSUPP, f"driver {self.name} does not implement {hook}")
        function, argnames = impl
        return function(*[kwargs[a] for a in argnames])

    def _call_or(self, hook: str, default: object, **kwargs: Any) -> Any:
        """Call the driver's ``hook``; ``default`` when it has none."""
        return self._call(hook, **kwargs) if hook in self._impls else default

    def _value(self, hook: str, kind: type[T], **kwargs: Any) -> T:
        """Call ``hook`` for a result of type ``kind``."""
        result = self._call(hook, **kwargs)
        if result is None:
            raise err(errno.EOPNOTSUPP, f"driver {self.name} answered None from {hook}")
        if not isinstance(result, kind):
            raise TypeError(
                f"driver {self.name}: {hook} returned {type(result).__name__}, not {kind.__name__}"
            )
        return result

    # -- identity and hardware ----------------------------------------------------------------
    def driver_info(self) -> DriverInfo:
        return self._value("driver_info", DriverInfo)

    def probe(self, machine: Machine, index: int, options: dict[str, Any]) -> IommuHw:
        return self._value("probe", IommuHw, machine=machine, index=index, options=options)

    def probe_device(self, iommu: IommuHw, dev: PciDevice) -> object:
        """The device's private data; None from a driver without the hook."""
        return self._call_or("probe_device", None, iommu=iommu, dev=dev)

    def dev_reserved_regions(self, iommu: IommuHw, dev: PciDevice) -> list[tuple[int, int]]:
        """``[]`` from a driver without the hook."""
        regions = self._call_or("dev_reserved_regions", [], iommu=iommu, dev=dev)
        return cast("list[tuple[int, int]]", regions)

    def hw_info(self, iommu: IommuHw, dev: PciDevice, data_type: int) -> HwInfo:
        """Type NONE with no data from a driver without the hook (Linux 7.2 device.c)."""
        if "hw_info" not in self._impls:
            return HwInfo(U.IOMMU_HW_INFO_TYPE_NONE, b"")
        return self._value("hw_info", HwInfo, iommu=iommu, dev=dev, data_type=data_type)

    # -- domains ----------------------------------------------------------------------------
    def domain_alloc_user(
        self,
        iommu: IommuHw,
        dev: PciDevice,
        flags: int,
        parent: Domain | None,
        viommu: ViommuBase | None,
        user_data: UserData | None,
    ) -> Domain:
        """EOPNOTSUPP, the driver not called, for a nested domain from a driver that declares
        no ``parent`` and for vendor data to one that declares no ``user_data``."""
        if parent is not None and not self.takes("domain_alloc_user", "parent"):
            raise err(errno.EOPNOTSUPP, f"driver {self.name} has no nested domains")
        if user_data is not None and not self.takes("domain_alloc_user", "user_data"):
            raise err(errno.EOPNOTSUPP, f"driver {self.name} takes no vendor data")
        return self._value(
            "domain_alloc_user",
            Domain,
            iommu=iommu,
            dev=dev,
            flags=flags,
            parent=parent,
            viommu=viommu,
            user_data=user_data,
        )

    def domain_free(self, domain: Domain) -> None:
        self._call_or("domain_free", None, domain=domain)

    def domain_map(self, domain: Domain, iova: int, pa: int, size: int, prot: int) -> None:
        self._call("domain_map", domain=domain, iova=iova, pa=pa, size=size, prot=prot)

    def domain_map_pages(
        self, domain: Domain, iova: int, pa: int, pgsize: int, pgcount: int, prot: int
    ) -> None:
        """A driver without the hook gets ``pgcount`` :meth:`domain_map` calls, the ones done
        unmapped again when one fails (all-or-nothing either way)."""
        if "domain_map_pages" in self._impls:
            self._call(
                "domain_map_pages",
                domain=domain,
                iova=iova,
                pa=pa,
                pgsize=pgsize,
                pgcount=pgcount,
                prot=prot,
            )
            return
        done = 0
        try:
            while done < pgcount:
                self.domain_map(domain, iova + done * pgsize, pa + done * pgsize, pgsize, prot)
                done += 1
        except OSError:
            if done:
                self.domain_unmap(domain, iova, done * pgsize)
            raise

    def domain_unmap(self, domain: Domain, iova: int, size: int) -> int:
        return self._value("domain_unmap", int, domain=domain, iova=iova, size=size)

    def domain_iova_to_phys(self, domain: Domain, iova: int) -> int:
        return self._value("domain_iova_to_phys", int, domain=domain, iova=iova)

    # -- attachment -------------------------------------------------------------------------
    def attach(self, iommu: IommuHw, dev: PciDevice, domain: Domain | None) -> None:
        self._call("attach", iommu=iommu, dev=dev, domain=domain)

    def set_dev_pasid(self, iommu: IommuHw, dev: PciDevice, pasid: int, domain: Domain) -> None:
        self._call("set_dev_pasid", iommu=iommu, dev=dev, pasid=pasid, domain=domain)

    def remove_dev_pasid(self, iommu: IommuHw, dev: PciDevice, pasid: int) -> None:
        self._call("remove_dev_pasid", iommu=iommu, dev=dev, pasid=pasid)

    # -- invalidation, dirty tracking, faults -------------------------------------------------
    def cache_invalidate_user(
        self, target: Domain | ViommuBase, data_type: int, entries: list[bytes]
    ) -> InvalidateResult:
        return self._value(
            "cache_invalidate_user",
            InvalidateResult,
            target=target,
            data_type=data_type,
            entries=entries,
        )

    def set_dirty_tracking(self, domain: Domain, enable: bool) -> None:
        self._call("set_dirty_tracking", domain=domain, enable=enable)

    def read_and_clear_dirty(
        self, domain: Domain, iova: int, length: int, clear: bool, report: bool
    ) -> list[tuple[int, int]]:
        return cast(
            "list[tuple[int, int]]",
            self._value(
                "read_and_clear_dirty",
                list,
                domain=domain,
                iova=iova,
                length=length,
                clear=clear,
                report=report,
            ),
        )

    def page_response(
        self, iommu: IommuHw, dev: PciDevice, pasid: int | None, grpid: int, code: int
    ) -> None:
        self._call("page_response", iommu=iommu, dev=dev, pasid=pasid, grpid=grpid, code=code)

    # -- vIOMMU and friends -------------------------------------------------------------------
    def viommu_alloc(
        self,
        iommu: IommuHw,
        dev: PciDevice,
        parent: Domain,
        viommu_type: int,
        data: bytes,
        mmap: MmapOwner,
    ) -> ViommuBase:
        return self._value(
            "viommu_alloc",
            ViommuBase,
            iommu=iommu,
            dev=dev,
            parent=parent,
            viommu_type=viommu_type,
            data=data,
            mmap=mmap,
        )

    def viommu_destroy(self, viommu: ViommuBase) -> None:
        self._call_or("viommu_destroy", None, viommu=viommu)

    def vdevice_alloc(self, viommu: ViommuBase, dev: PciDevice, virt_id: int) -> VdeviceBase:
        return self._value("vdevice_alloc", VdeviceBase, viommu=viommu, dev=dev, virt_id=virt_id)

    def vdevice_destroy(self, vdev: VdeviceBase) -> None:
        self._call_or("vdevice_destroy", None, vdev=vdev)

    def hw_queue_supported(self, viommu: ViommuBase, queue_type: int) -> bool:
        """True from a driver without the hook: ``hw_queue_alloc`` judges the type itself."""
        answer = self._call_or("hw_queue_supported", True, viommu=viommu, queue_type=queue_type)
        return answer is not False

    def hw_queue_alloc(
        self,
        viommu: ViommuBase,
        queue_type: int,
        index: int,
        base_iova: int,
        length: int,
        pfns: list[int],
    ) -> HwQueueBase:
        return self._value(
            "hw_queue_alloc",
            HwQueueBase,
            viommu=viommu,
            queue_type=queue_type,
            index=index,
            base_iova=base_iova,
            length=length,
            pfns=pfns,
        )

    def hw_queue_destroy(self, queue: HwQueueBase) -> None:
        self._call_or("hw_queue_destroy", None, queue=queue)

    # -- the guest side -------------------------------------------------------------------------
    def guest_iommu_alloc(self, vm: Vm, iommu: IommuHw, accelerated: bool) -> GuestIommu:
        """EOPNOTSUPP from a driver without a guest model."""
        if "guest_iommu_alloc" not in self._impls:
            raise err(errno.EOPNOTSUPP, f"{self.name} has no guest IOMMU model")
        return cast(
            "GuestIommu",
            self._value("guest_iommu_alloc", object, vm=vm, iommu=iommu, accelerated=accelerated),
        )
