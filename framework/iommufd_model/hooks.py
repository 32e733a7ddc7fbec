"""The driver contract and the typed facade the core calls it through, in one class.

Each public method of :class:`DriverHooks` but ``takes`` is a hookspec (marked
``@hookspec``; ``plugins.DriverRegistry`` adds the class to pluggy as the spec namespace)
and, with the same signature, the typed call the core makes, in the manner of tox's plugin
manager (its ``Plugin`` class calls ``manager.hook.tox_*`` from typed methods). So each
hook's signature is written once, ``mypy --strict`` checks every call site against it, and
its docstring is the contract: when the core calls it, which errno means what.

The hooks mirror the kernel's ``iommu_ops``, ``iommu_domain_ops``, ``iommu_dirty_ops`` and
``iommufd_viommu_ops`` (docs/writing-a-driver.md maps each to its Linux 7.2 op). Hooks that
do something return nothing; hooks that answer return the answer. A refusal is an
``OSError`` with the kernel's errno (use :func:`iommufd_model.errors.err`); any other
exception is a driver bug. The required hooks are ``hookspecs.REQUIRED_HOOKS``.

A :class:`DriverHooks` reaches exactly one driver plugin (the driver that owns the IOMMU
instance, or the domain/vIOMMU whose ``owner`` is that instance): it holds that plugin's
pluggy hook implementations and calls them as pluggy's ``_multicall`` does (arguments by the
implementation's own ``argnames``, so a driver may declare a subset). Each method hands its
``locals()`` on: its parameters are the hookspec's, so no argument is named twice.

What the core does when the driver lacks a hook is decided here, once, per hook:

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
from iommufd_model.hookspecs import hookspec
from iommufd_model.hw.iommu import IommuHw
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

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

    def _call(self, hook: str, args: Mapping[str, Any]) -> Any:
        """Call the driver's ``hook`` (EOPNOTSUPP when it has none) with the arguments it
        declares, taken by name from ``args``. A facade method passes its ``locals()``: its
        parameters are the hookspec's, so each argument reaches the hook under its own name
        (``self`` is no hook argument and is never taken)."""
        impl = self._impls.get(hook)
        if impl is None:
            raise err(errno.EOPNOTSUPP, f"driver {self.name} does not implement {hook}")
        function, argnames = impl
        return function(*[args[a] for a in argnames])

    def _call_or(self, hook: str, default: object, args: Mapping[str, Any]) -> Any:
        """Call the driver's ``hook``; ``default`` when it has none."""
        return self._call(hook, args) if hook in self._impls else default

    def _value(self, hook: str, kind: type[T], args: Mapping[str, Any]) -> T:
        """Call ``hook`` for a result of type ``kind``."""
        result = self._call(hook, args)
        if result is None:
            raise err(errno.EOPNOTSUPP, f"driver {self.name} answered None from {hook}")
        if not isinstance(result, kind):
            raise TypeError(
                f"driver {self.name}: {hook} returned {type(result).__name__}, not {kind.__name__}"
            )
        return result

    # -- identity and hardware ----------------------------------------------------------------
    @hookspec(firstresult=True)
    def driver_info(self) -> DriverInfo:
        """Describe the driver: name (the entry-point name), features, accepted vendor types.

        Called once at discovery; the result drives ``iommufd-model drivers``, the conformance
        kit's feature gating and the matrix's "unsupported" cells.

        ``option_sets`` declares the driver's option space for ``iommufd-model matrix --sweep``:
        named :class:`~iommufd_model.driver.OptionSet` records, each a dict of ``probe`` options
        (page-table levels, address widths, PASID widths...) and the features that configuration
        lacks. The sweep runs every scenario under each of them and under the defaults
        (``default``, no options); the kit (``test_option_sets``) checks that each set probes, a
        device attaches and DMA translates under it, and that names are unique.
        """
        return self._value("driver_info", DriverInfo, locals())

    @hookspec(firstresult=True)
    def probe(self, machine: Machine, index: int, options: dict[str, Any]) -> IommuHw:
        """Create one IOMMU hardware instance in ``machine`` (registers, tables in its memory).

        Called by ``Machine.build`` / ``Machine.add_iommu`` for the plugin named by the user.
        ``options`` are driver-specific knobs (e.g. page-table levels); unknown keys -> EINVAL.
        """
        return self._value("probe", IommuHw, locals())

    @hookspec(firstresult=True)
    def probe_device(self, iommu: IommuHw, dev: PciDevice) -> object:
        """A PCI device appeared behind ``iommu``: set up per-device state (stream ID, DTE...).

        Return any non-None object (stored as ``dev.iommu_priv``); raise ENODEV to refuse it.
        Drivers that need nothing may leave this hook out.

        Without the hook the device has no private data (None).
        """
        return self._call_or("probe_device", None, locals())

    @hookspec(firstresult=True)
    def dev_reserved_regions(self, iommu: IommuHw, dev: PciDevice) -> list[tuple[int, int]]:
        """IOVA ranges ``(start, last)`` the device can never use for DMA (e.g. the MSI window).

        The core reserves them in any IOAS the device attaches to (kernel:
        ``iommu_get_resv_regions``). Return ``[]`` for none.

        Without the hook: none.
        """
        regions = self._call_or("dev_reserved_regions", [], locals())
        return cast("list[tuple[int, int]]", regions)

    @hookspec(firstresult=True)
    def hw_info(self, iommu: IommuHw, dev: PciDevice, data_type: int) -> HwInfo:
        """Answer IOMMU_GET_HW_INFO. ``data_type`` is the requested type (0 = driver default).

        Raise EOPNOTSUPP for a type the driver does not report.

        Without the hook: type NONE with no data (Linux 7.2 device.c).
        """
        if "hw_info" not in self._impls:
            return HwInfo(U.IOMMU_HW_INFO_TYPE_NONE, b"")
        return self._value("hw_info", HwInfo, locals())

    # -- domains ----------------------------------------------------------------------------
    @hookspec(firstresult=True)
    def domain_alloc_user(
        self,
        iommu: IommuHw,
        dev: PciDevice,
        flags: int,
        parent: Domain | None,
        viommu: ViommuBase | None,
        user_data: UserData | None,
    ) -> Domain:
        """Allocate a domain for IOMMU_HWPT_ALLOC: a paging domain, or a nested one over ``parent``.

        The one allocation hook, as ``iommu_ops.domain_alloc_user`` was when the HW-vIOMMU was
        designed; Linux 7.2 splits it into ``domain_alloc_paging_flags`` (``parent`` is None)
        and ``domain_alloc_nested`` / ``iommufd_viommu_ops.alloc_domain_nested`` (``parent``
        set, ``viommu`` set when the HWPT is allocated on a vIOMMU).

        ``flags`` are IOMMU_HWPT_ALLOC_* (NEST_PARENT, DIRTY_TRACKING, PASID; the core strips
        FAULT_ID_VALID); an unsupported flag -> EOPNOTSUPP. A paging domain starts empty and
        blocks all DMA.

        ``user_data`` is the vendor data (the kernel's ``struct iommu_user_data``), None when
        the user gave none; ``user_data.read()`` copies it from user memory. Validate it as the
        kernel driver's ``iommu_copy_struct_from_user`` does (the framework's
        :func:`~iommufd_model.driver.iommu_copy_struct_from_user` has its length rule): wrong
        type -> EOPNOTSUPP, wrong length or bad fields -> EINVAL (SMMUv3 uses EIO for an
        illegal STE, as the kernel).

        ``parent``, ``viommu`` and ``user_data`` are optional in an implementation: a driver
        that declares no ``parent`` has no nested domains, and one that declares no
        ``user_data`` takes no vendor data (leave them out of the signature, not defaulted:
        pluggy passes no defaulted argument); the core then answers EOPNOTSUPP without calling
        it. A driver that declares ``user_data`` but takes none for paging domains raises
        EOPNOTSUPP itself without reading it, as Linux 7.2's vendor drivers do.
        """
        if parent is not None and not self.takes("domain_alloc_user", "parent"):
            raise err(errno.EOPNOTSUPP, f"driver {self.name} has no nested domains")
        if user_data is not None and not self.takes("domain_alloc_user", "user_data"):
            raise err(errno.EOPNOTSUPP, f"driver {self.name} takes no vendor data")
        return self._value("domain_alloc_user", Domain, locals())

    @hookspec(firstresult=True)
    def domain_free(self, domain: Domain) -> None:
        """Release a domain the core no longer references (no device is attached to it)."""
        self._call_or("domain_free", None, locals())

    @hookspec(firstresult=True)
    def domain_map(self, domain: Domain, iova: int, pa: int, size: int, prot: int) -> None:
        """Map ``[iova, iova+size)`` to physically contiguous ``pa`` with IOMMU_READ/WRITE ``prot``.

        Sizes and alignment respect ``domain.pgsize_bitmap``; the driver picks the page sizes.
        All-or-nothing: on ENOMEM nothing of the range may stay mapped.
        """
        self._call("domain_map", locals())

    @hookspec(firstresult=True)
    def domain_map_pages(
        self, domain: Domain, iova: int, pa: int, pgsize: int, pgcount: int, prot: int
    ) -> None:
        """Map ``pgcount`` pages of exactly ``pgsize`` bytes (a size of ``domain.pgsize_bitmap``;
        ``iova`` and ``pa`` aligned to it): what ``pgcount`` calls of :meth:`domain_map` with
        ``size=pgsize`` would build, in one call (the kernel's ``map_pages(pgsize, pgcount)``).

        The core uses it with ``pgsize=PAGE_SIZE`` when IOMMU_OPTION_HUGE_PAGES is off (the
        kernel's ``batch_iommu_map_small()``: one ``iommu_map()`` per 4 KiB page), for each
        physically contiguous run. All-or-nothing like :meth:`domain_map`. Optional: without it
        the facade makes the ``pgcount`` :meth:`domain_map` calls, unmapping the ones done when
        one fails (all-or-nothing either way).
        """
        if "domain_map_pages" in self._impls:
            self._call("domain_map_pages", locals())
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

    @hookspec(firstresult=True)
    def domain_unmap(self, domain: Domain, iova: int, size: int) -> int:
        """Unmap ``[iova, iova+size)`` and flush the IOTLB; return the bytes unmapped."""
        return self._value("domain_unmap", int, locals())

    @hookspec(firstresult=True)
    def domain_iova_to_phys(self, domain: Domain, iova: int) -> int:
        """Software walk of a paging domain: the physical address at ``iova`` or -1."""
        return self._value("domain_iova_to_phys", int, locals())

    # -- attachment -------------------------------------------------------------------------
    @hookspec(firstresult=True)
    def attach(self, iommu: IommuHw, dev: PciDevice, domain: Domain | None) -> None:
        """Make ``dev`` (its RID, PASID 0 / no PASID) translate through ``domain`` (Linux 7.2:
        ``iommu_domain_ops.attach_dev``).

        ``domain=None`` means blocked (the kernel's blocking domain). This is also *replace*:
        when the device already has a domain, switch as the vendor's 7.2 ``attach_dev`` does,
        failures included. 7.2's core does not re-attach the old domain to the device whose
        ``attach_dev`` failed (``__iommu_group_set_domain_internal()`` reverts only the group's
        other devices). So where the 7.2 driver tears down before a step that can fail (VT-d's
        ``device_block_translation()``, AMD's ``detach_device()``) a failed attach leaves the
        device without its old domain; where it prepares everything before it writes
        (SMMUv3's ``arm_smmu_attach_prepare()``) the old domain stays in effect. Program the
        hardware (DTE / STE / PASID entry) and issue the invalidations the kernel driver issues.
        """
        self._call("attach", locals())

    @hookspec(firstresult=True)
    def set_dev_pasid(self, iommu: IommuHw, dev: PciDevice, pasid: int, domain: Domain) -> None:
        """Attach (or replace) ``domain`` on ``pasid`` of ``dev``; EOPNOTSUPP without PASID."""
        self._call("set_dev_pasid", locals())

    @hookspec(firstresult=True)
    def remove_dev_pasid(self, iommu: IommuHw, dev: PciDevice, pasid: int) -> None:
        """Detach whatever is attached to ``pasid`` of ``dev``; DMA with that PASID then faults."""
        self._call("remove_dev_pasid", locals())

    # -- invalidation, dirty tracking, faults -------------------------------------------------
    @hookspec(firstresult=True)
    def cache_invalidate_user(
        self, target: Domain | ViommuBase, data_type: int, entries: list[bytes]
    ) -> InvalidateResult:
        """IOMMU_HWPT_INVALIDATE on a nested domain or a vIOMMU, ``entries`` already copied in.

        Handle entries in order; stop at the first bad one and report how many were handled and
        the errno (EOPNOTSUPP for an unsupported ``data_type``, EINVAL/EIO for a bad entry).
        """
        return self._value("cache_invalidate_user", InvalidateResult, locals())

    @hookspec(firstresult=True)
    def set_dirty_tracking(self, domain: Domain, enable: bool) -> None:
        """Turn hardware dirty-bit tracking of a paging domain on or off."""
        self._call("set_dirty_tracking", locals())

    @hookspec(firstresult=True)
    def read_and_clear_dirty(
        self, domain: Domain, iova: int, length: int, clear: bool, report: bool
    ) -> list[tuple[int, int]]:
        """Report dirty ``(iova, size)`` runs in ``[iova, iova+length)``; clear the bits if asked.

        ``report=False`` is the core wiping stale bits before it enables tracking (the kernel's
        ``iopt_clear_dirty_data`` with no bitmap): clear, report nothing, never refuse. The core
        calls it once per contiguous run of IOAS areas. Linux 7.2's generic_pt drivers read and
        clear whether tracking is on or not; the core ignores an error (``iova_bitmap_for_each``'s
        result is dropped), so the bits reported up to then reach the user.
        """
        return cast(
            "list[tuple[int, int]]",
            self._value("read_and_clear_dirty", list, locals()),
        )

    @hookspec(firstresult=True)
    def page_response(
        self, iommu: IommuHw, dev: PciDevice, pasid: int | None, grpid: int, code: int
    ) -> None:
        """Deliver a user's IOPF response (``IOMMUFD_PAGE_RESP_*``) to the device (PRI response)."""
        self._call("page_response", locals())

    # -- vIOMMU and friends -------------------------------------------------------------------
    @hookspec(firstresult=True)
    def viommu_alloc(
        self,
        iommu: IommuHw,
        dev: PciDevice,
        parent: Domain,
        viommu_type: int,
        data: bytes,
        mmap: MmapOwner,
    ) -> ViommuBase:
        """Allocate the vIOMMU slice of ``iommu`` over nest parent ``parent``.

        Unknown ``viommu_type`` -> EOPNOTSUPP; bad driver data -> EINVAL; hardware slots
        exhausted -> ENOSPC. Data to return to the user goes in ``viommu.out_data`` (bytes).

        ``mmap`` (optional: leave it out of the signature when unused) is the kernel's
        ``iommufd_viommu_alloc_mmap`` / ``_destroy_mmap`` bound to this vIOMMU:
        ``mmap.alloc(region)`` registers an :class:`iommufd_model.core.mmap.MmapRegion` (a
        :class:`~iommufd_model.core.mmap.PhysicalRegion` or
        :class:`~iommufd_model.core.mmap.MmioRegion`) and returns the offset the user passes to
        ``mmap()`` of the iommufd; ``mmap.destroy(offset)`` erases it. Regions left registered
        are erased when this hook fails, when the allocation fails after it, and when the
        vIOMMU is destroyed (after :meth:`viommu_destroy`).
        """
        return self._value("viommu_alloc", ViommuBase, locals())

    @hookspec(firstresult=True)
    def get_viommu_size(self, iommu: IommuHw, dev: PciDevice, viommu_type: int) -> int:
        """Linux 7.2's ``iommu_ops.get_viommu_size``: non-zero when ``dev`` can have a vIOMMU of
        ``viommu_type``, 0 when not (the ioctl then fails with EOPNOTSUPP).

        The core asks it before it looks up the nest parent (``iommufd_viommu_alloc_ioctl``),
        so an unsupported type is EOPNOTSUPP whatever ``hwpt_id`` holds. The kernel returns the
        size of the driver's vIOMMU structure; the model only compares the answer with 0 (a
        driver may return 1). A driver without this hook offers no vIOMMU: EOPNOTSUPP, as 7.2
        answers when the op is absent.
        """
        size = self._call_or("get_viommu_size", 0, locals())
        return 0 if size is None else int(size)  # None (a hook that answered nothing): 0

    @hookspec(firstresult=True)
    def viommu_destroy(self, viommu: ViommuBase) -> None:
        """Free the vIOMMU's hardware resources (its vDEVICEs and queues are gone already)."""
        self._call_or("viommu_destroy", None, locals())

    @hookspec(firstresult=True)
    def vdevice_alloc(self, viommu: ViommuBase, dev: PciDevice, virt_id: int) -> VdeviceBase:
        """Bind ``dev`` to virtual ID ``virt_id`` (vSID, guest DevID, vRID) inside ``viommu``."""
        return self._value("vdevice_alloc", VdeviceBase, locals())

    @hookspec(firstresult=True)
    def vdevice_destroy(self, vdev: VdeviceBase) -> None:
        """Undo :meth:`vdevice_alloc` (clear mapping-table entries)."""
        self._call_or("vdevice_destroy", None, locals())

    @hookspec(firstresult=True)
    def hw_queue_supported(self, viommu: ViommuBase, queue_type: int) -> bool:
        """Whether ``viommu`` can take HW queues of ``queue_type`` (the kernel's
        ``get_hw_queue_size``): asked before any guest memory is pinned; ``False`` makes
        IOMMU_HW_QUEUE_ALLOC fail with EOPNOTSUPP. Without this hook the type is judged by
        :meth:`hw_queue_alloc`, after the pin (so a bad type costs a pin and gives its errno).
        """
        answer = self._call_or("hw_queue_supported", True, locals())
        return answer is not False

    @hookspec(firstresult=True)
    def hw_queue_alloc(
        self,
        viommu: ViommuBase,
        queue_type: int,
        index: int,
        base_iova: int,
        length: int,
        pfns: list[int],
    ) -> HwQueueBase:
        """Hand guest queue memory (``pfns``, pinned by the core) to the hardware.

        Unknown type -> EOPNOTSUPP; index/alignment/length rules of the type -> EINVAL.
        """
        return self._value("hw_queue_alloc", HwQueueBase, locals())

    @hookspec(firstresult=True)
    def hw_queue_destroy(self, queue: HwQueueBase) -> None:
        """Stop the hardware from consuming the queue."""
        self._call_or("hw_queue_destroy", None, locals())

    # -- the guest side -------------------------------------------------------------------------
    @hookspec(firstresult=True)
    def guest_iommu_alloc(self, vm: Vm, iommu: IommuHw, accelerated: bool) -> GuestIommu:
        """Model the guest's IOMMU driver and the VMM's vIOMMU emulation for ``iommu`` in ``vm``.

        Return a :class:`iommufd_model.vmm.GuestIommu`. ``accelerated`` asks for the vendor's
        hardware-accelerated guest queue (AMD HW-vIOMMU, a CMDQV-style queue): raise EOPNOTSUPP
        when the driver has none. Drivers without a guest model leave this hook out (the matrix
        then reports nested scenarios as unsupported).
        """
        if "guest_iommu_alloc" not in self._impls:
            raise err(errno.EOPNOTSUPP, f"{self.name} has no guest IOMMU model")
        return cast(
            "GuestIommu",
            self._value("guest_iommu_alloc", object, locals()),
        )
