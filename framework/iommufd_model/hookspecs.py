"""The driver contract: every hook a vendor plugin implements, documented where it is declared.

These mirror the kernel's ``iommu_ops``, ``iommu_domain_ops``, ``iommu_dirty_ops`` and
``iommufd_viommu_ops``. Every call is routed to exactly one plugin: the driver that owns the
IOMMU instance (``iommu``) or the domain/vIOMMU (whose ``owner`` is that instance); see
``plugins.DriverRegistry``; the core calls them through the typed facade
:class:`iommufd_model.hooks.DriverHooks`, which also says what a hook's absence means (for
most: ``EOPNOTSUPP``). Hooks that do something return nothing; hooks that answer return the
answer. A refusal is an ``OSError`` with the kernel's errno (use
:func:`iommufd_model.errors.err`); any other exception is a driver bug.

Required hooks (a plugin lacking one is refused at load time): ``driver_info``, ``probe``,
``domain_alloc_user``, ``domain_map``, ``domain_unmap``, ``attach``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from iommufd_model.core.mmap import MmapOwner
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
    from iommufd_model.hw.iommu import IommuHw
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.machine import Machine
    from iommufd_model.vmm import GuestIommu, Vm

PROJECT = "iommufd_model"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

REQUIRED_HOOKS = (
    "driver_info",
    "probe",
    "domain_alloc_user",
    "domain_map",
    "domain_unmap",
    "attach",
)


# -- identity and hardware --------------------------------------------------------------
@hookspec(firstresult=True)
def driver_info() -> DriverInfo:
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


@hookspec(firstresult=True)
def probe(machine: Machine, index: int, options: dict[str, Any]) -> IommuHw:
    """Create one IOMMU hardware instance in ``machine`` (registers, tables in its memory).

    Called by ``Machine.build`` / ``Machine.add_iommu`` for the plugin named by the user.
    ``options`` are driver-specific knobs (e.g. page-table levels); unknown keys -> EINVAL.
    """


@hookspec(firstresult=True)
def probe_device(iommu: IommuHw, dev: PciDevice) -> object:
    """A PCI device appeared behind ``iommu``: set up per-device state (stream ID, DTE...).

    Return any non-None object (stored as ``dev.iommu_priv``); raise ENODEV to refuse it.
    Drivers that need nothing may leave this hook out.
    """


@hookspec(firstresult=True)
def dev_reserved_regions(iommu: IommuHw, dev: PciDevice) -> list[tuple[int, int]]:
    """IOVA ranges ``(start, last)`` the device can never use for DMA (e.g. the MSI window).

    The core reserves them in any IOAS the device attaches to (kernel:
    ``iommu_get_resv_regions``). Return ``[]`` for none.
    """


@hookspec(firstresult=True)
def hw_info(iommu: IommuHw, dev: PciDevice, data_type: int) -> HwInfo:
    """Answer IOMMU_GET_HW_INFO. ``data_type`` is the requested type (0 = driver default).

    Raise EOPNOTSUPP for a type the driver does not report.
    """


# -- domains ----------------------------------------------------------------------------
@hookspec(firstresult=True)
def domain_alloc_user(
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
    kernel driver's ``iommu_copy_struct_from_user`` does: wrong type -> EOPNOTSUPP, wrong
    length or bad fields -> EINVAL (SMMUv3 uses EIO for an illegal STE, as the kernel).

    ``parent``, ``viommu`` and ``user_data`` are optional in an implementation: a driver
    that declares no ``parent`` has no nested domains, and one that declares no
    ``user_data`` takes no vendor data (leave them out of the signature, not defaulted:
    pluggy passes no defaulted argument); the core then answers EOPNOTSUPP without calling
    it. A driver that declares ``user_data`` but takes none for paging domains raises
    EOPNOTSUPP itself without reading it, as Linux 7.2's vendor drivers do.
    """


@hookspec(firstresult=True)
def domain_free(domain: Domain) -> None:
    """Release a domain the core no longer references (no device is attached to it)."""


@hookspec(firstresult=True)
def domain_map(domain: Domain, iova: int, pa: int, size: int, prot: int) -> None:
    """Map ``[iova, iova+size)`` to physically contiguous ``pa`` with IOMMU_READ/WRITE ``prot``.

    Sizes and alignment respect ``domain.pgsize_bitmap``; the driver picks the page sizes.
    All-or-nothing: on ENOMEM nothing of the range may stay mapped.
    """


@hookspec(firstresult=True)
def domain_map_pages(
    domain: Domain, iova: int, pa: int, pgsize: int, pgcount: int, prot: int
) -> None:
    """Map ``pgcount`` pages of exactly ``pgsize`` bytes (a size of ``domain.pgsize_bitmap``;
    ``iova`` and ``pa`` aligned to it): what ``pgcount`` calls of :func:`domain_map` with
    ``size=pgsize`` would build, in one call (the kernel's ``map_pages(pgsize, pgcount)``).

    The core uses it with ``pgsize=PAGE_SIZE`` when IOMMU_OPTION_HUGE_PAGES is off (the
    kernel's ``batch_iommu_map_small()``: one ``iommu_map()`` per 4 KiB page), for each
    physically contiguous run. All-or-nothing like :func:`domain_map`. Optional: without it
    the core makes the ``pgcount`` :func:`domain_map` calls itself.
    """


@hookspec(firstresult=True)
def domain_unmap(domain: Domain, iova: int, size: int) -> int:
    """Unmap ``[iova, iova+size)`` and flush the IOTLB; return the bytes unmapped."""


@hookspec(firstresult=True)
def domain_iova_to_phys(domain: Domain, iova: int) -> int:
    """Software walk of a paging domain: the physical address at ``iova`` or -1."""


# -- attachment ---------------------------------------------------------------------------
@hookspec(firstresult=True)
def attach(iommu: IommuHw, dev: PciDevice, domain: Domain | None) -> None:
    """Make ``dev`` (its RID, PASID 0 / no PASID) translate through ``domain`` (Linux 7.2:
    ``iommu_domain_ops.attach_dev``).

    ``domain=None`` means blocked (the kernel's blocking domain). This is also *replace*:
    when the device already has a domain the switch must be hitless and all-or-nothing -- on
    failure the old domain stays in effect. Program the hardware (DTE / STE / PASID entry)
    and issue the invalidations the kernel driver issues.
    """


@hookspec(firstresult=True)
def set_dev_pasid(iommu: IommuHw, dev: PciDevice, pasid: int, domain: Domain) -> None:
    """Attach (or replace) ``domain`` on ``pasid`` of ``dev``; EOPNOTSUPP without PASID."""


@hookspec(firstresult=True)
def remove_dev_pasid(iommu: IommuHw, dev: PciDevice, pasid: int) -> None:
    """Detach whatever is attached to ``pasid`` of ``dev``; DMA with that PASID then faults."""


# -- invalidation, dirty tracking, faults ---------------------------------------------------
@hookspec(firstresult=True)
def cache_invalidate_user(
    target: Domain | ViommuBase, data_type: int, entries: list[bytes]
) -> InvalidateResult:
    """IOMMU_HWPT_INVALIDATE on a nested domain or a vIOMMU, ``entries`` already copied in.

    Handle entries in order; stop at the first bad one and report how many were handled and
    the errno (EOPNOTSUPP for an unsupported ``data_type``, EINVAL/EIO for a bad entry).
    """


@hookspec(firstresult=True)
def set_dirty_tracking(domain: Domain, enable: bool) -> None:
    """Turn hardware dirty-bit tracking of a paging domain on or off."""


@hookspec(firstresult=True)
def read_and_clear_dirty(
    domain: Domain, iova: int, length: int, clear: bool, report: bool
) -> list[tuple[int, int]]:
    """Report dirty ``(iova, size)`` runs in ``[iova, iova+length)``; clear the bits if asked.

    ``report=False`` is the core wiping stale bits before it enables tracking (the kernel's
    ``iopt_clear_dirty_data`` with no bitmap): clear, report nothing, never refuse. The core
    calls it once per contiguous run of IOAS areas. Linux 7.2's generic_pt drivers read and
    clear whether tracking is on or not; the core ignores an error (``iova_bitmap_for_each``'s
    result is dropped), so the bits reported up to then reach the user.
    """


@hookspec(firstresult=True)
def page_response(iommu: IommuHw, dev: PciDevice, pasid: int | None, grpid: int, code: int) -> None:
    """Deliver a user's IOPF response (``IOMMUFD_PAGE_RESP_*``) to the device (PRI response)."""


# -- vIOMMU and friends ---------------------------------------------------------------------
@hookspec(firstresult=True)
def viommu_alloc(
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
    vIOMMU is destroyed (after :func:`viommu_destroy`).
    """


@hookspec(firstresult=True)
def viommu_destroy(viommu: ViommuBase) -> None:
    """Free the vIOMMU's hardware resources (its vDEVICEs and queues are gone already)."""


@hookspec(firstresult=True)
def vdevice_alloc(viommu: ViommuBase, dev: PciDevice, virt_id: int) -> VdeviceBase:
    """Bind ``dev`` to virtual ID ``virt_id`` (vSID, guest DevID, vRID) inside ``viommu``."""


@hookspec(firstresult=True)
def vdevice_destroy(vdev: VdeviceBase) -> None:
    """Undo :func:`vdevice_alloc` (clear mapping-table entries)."""


@hookspec(firstresult=True)
def hw_queue_supported(viommu: ViommuBase, queue_type: int) -> bool:
    """Whether ``viommu`` can take HW queues of ``queue_type`` (the kernel's
    ``get_hw_queue_size``): asked before any guest memory is pinned; ``False`` makes
    IOMMU_HW_QUEUE_ALLOC fail with EOPNOTSUPP. Without this hook the type is judged by
    :func:`hw_queue_alloc`, after the pin (so a bad type costs a pin and gives its errno)."""


@hookspec(firstresult=True)
def hw_queue_alloc(
    viommu: ViommuBase, queue_type: int, index: int, base_iova: int, length: int, pfns: list[int]
) -> HwQueueBase:
    """Hand guest queue memory (``pfns``, pinned by the core) to the hardware.

    Unknown type -> EOPNOTSUPP; index/alignment/length rules of the type -> EINVAL.
    """


@hookspec(firstresult=True)
def hw_queue_destroy(queue: HwQueueBase) -> None:
    """Stop the hardware from consuming the queue."""


# -- the guest side (VMM and guest driver models, for scenarios) --------------------------------
@hookspec(firstresult=True)
def guest_iommu_alloc(vm: Vm, iommu: IommuHw, accelerated: bool) -> GuestIommu:
    """Model the guest's IOMMU driver and the VMM's vIOMMU emulation for ``iommu`` in ``vm``.

    Return a :class:`iommufd_model.vmm.GuestIommu`. ``accelerated`` asks for the vendor's
    hardware-accelerated guest queue (AMD HW-vIOMMU, a CMDQV-style queue): raise EOPNOTSUPP
    when the driver has none. Drivers without a guest model leave this hook out (the matrix
    then reports nested scenarios as unsupported).
    """
