"""What a driver plugin builds on: the objects it returns to the core and the records it fills.

This is the model's ``include/linux/iommu.h``: the core never looks inside a vendor's domain,
only at the attributes declared here. A driver subclasses :class:`Domain` (and the vIOMMU /
vDEVICE / HW queue bases) and hangs its vendor state off them.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from iommufd_model.errors import err

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw

S = TypeVar("S")

# include/linux/iommu.h prot bits; iommufd always adds IOMMU_CACHE (conv_iommu_prot()).
IOMMU_READ = 1
IOMMU_WRITE = 2
IOMMU_CACHE = 4


class DomainType(enum.Enum):
    """``iommu_domain->type``: what the domain translates with."""

    PAGING = "paging"  # kernel-owned IO page table, filled from an IOAS
    NESTED = "nested"  # user-owned stage-1 over a nest parent's stage-2
    BLOCKED = "blocked"
    IDENTITY = "identity"


class Feature(enum.Enum):
    """Features a driver declares; the conformance kit and the matrix run what applies."""

    PAGING = "paging"
    NEST_PARENT = "nest_parent"
    NESTED = "nested"
    PASID = "pasid"
    DIRTY_TRACKING = "dirty_tracking"
    VIOMMU = "viommu"
    VDEVICE = "vdevice"
    VEVENTQ = "veventq"
    HW_QUEUE = "hw_queue"
    IOPF = "iopf"
    HWPT_INVALIDATE = "hwpt_invalidate"
    VIOMMU_INVALIDATE = "viommu_invalidate"
    LARGE_PAGES = "large_pages"


def driver_state(iommu: IommuHw, kind: type[S]) -> S:
    """The driver's per-IOMMU state of ``iommu`` (its ``struct amd_iommu``, ``intel_iommu``,
    ``arm_smmu_device``...), which its ``probe`` hook stored in ``iommu.driver_state``.

    Every driver keeps its state there and reaches it through this one call. An instance of
    another driver (or one without state of ``kind``) is EINVAL: Linux 7.2 answers EINVAL
    when an attach names a domain of another driver (iommu.c ``domain_iommu_ops_compatible()``
    in ``__iommu_attach_group()`` and ``iommu_attach_device_pasid()``). The routing of hook
    calls makes that a driver bug here; the check keeps it from going further.
    """
    state = iommu.driver_state
    if not isinstance(state, kind):
        raise err(errno.EINVAL, f"{iommu.name} is not an IOMMU of this driver")
    return state


@attrs.frozen
class OptionSet:
    """One named configuration of a driver's ``probe`` options that ``matrix --sweep`` runs
    every scenario under (say AMD with 4-level host tables, VT-d with 57-bit addresses).

    ``lacks`` names the features this configuration takes away from ``DriverInfo.features``
    (VT-d without first-stage translation has no nesting): the sweep's cells then expect the
    driver to *refuse* them, exactly as for an undeclared feature, so a configuration cannot
    hide a feature that still half-works. ``adds`` names those only this configuration has
    (SMMUv3 delivers IO page faults only from stalling masters). ``doc`` says what the
    configuration models.
    """

    name: str
    options: dict[str, Any] = attrs.field(factory=dict, hash=False)
    lacks: frozenset[Feature] = frozenset()
    doc: str = ""
    adds: frozenset[Feature] = frozenset()

    def features(self, declared: frozenset[Feature]) -> frozenset[Feature]:
        """The features a driver declaring ``declared`` has in this configuration."""
        return (declared | self.adds) - self.lacks


#: The configuration every driver has: ``probe`` with no options (the driver's defaults).
DEFAULT_OPTION_SET = OptionSet("default", doc="the driver's defaults (probe with no options)")


@attrs.define
class DriverInfo:
    """A driver's self-description, returned by the ``driver_info`` hook."""

    name: str
    description: str
    features: frozenset[Feature]
    hwpt_data_types: frozenset[int] = frozenset()
    viommu_types: frozenset[int] = frozenset()
    hw_info_type: int = 0
    veventq_types: frozenset[int] = frozenset()  # IOMMU_VEVENTQ_TYPE_* the driver reports
    hw_queue_types: frozenset[int] = frozenset()  # IOMMU_HW_QUEUE_TYPE_* the driver accepts
    #: The configurations ``matrix --sweep`` runs besides :data:`DEFAULT_OPTION_SET`.
    option_sets: tuple[OptionSet, ...] = ()
    #: Features the driver refuses because the Linux 7.2 driver it models refuses them too,
    #: each with the 7.2 source that shows it: the matrix labels such a refusal "unsupported
    #: upstream" (a parity fact), apart from a gap of the model.
    unsupported_upstream: Mapping[Feature, str] = attrs.field(factory=dict)


@attrs.define
class HwInfo:
    """The answer to IOMMU_GET_HW_INFO for one device."""

    data_type: int
    data: bytes
    capabilities: int = 0
    max_pasid_log2: int = 0
    #: ``capable(dev, IOMMU_CAP_PCI_ATS_SUPPORTED)``: whether the driver lets the device use
    #: ATS; None (the default) answers with the device's PCI ATS capability. The core adds
    #: IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED when it is false (Linux 7.2 device.c).
    ats_supported: bool | None = None


@attrs.frozen
class UserData:
    """``struct iommu_user_data`` (Linux 7.2 include/linux/iommu.h): the vendor data of
    IOMMU_HWPT_ALLOC, handed to ``domain_alloc_user``.

    The bytes are copied from user memory only when the driver calls :meth:`read`, as the
    kernel's drivers copy with ``iommu_copy_struct_from_user`` (a driver that refuses the
    data never touches the user's pointer).
    """

    type: int
    length: int
    reader: Callable[[], bytes] = attrs.field(repr=False)

    def read(self) -> bytes:
        """The ``length`` bytes the user passed (OSError EFAULT when they are unmapped)."""
        return self.reader()

    @classmethod
    def of(cls, data_type: int, data: bytes) -> UserData:
        """Data already copied in (the core reads a nested HWPT's data before the hook)."""
        return cls(data_type, len(data), lambda: data)


def copy_struct_from_user(data: bytes, size: int) -> bytes:
    """``copy_struct_from_user()`` (Linux 7.2 include/linux/uaccess.h) of user bytes into a
    ``size``-byte struct: shorter is zero-filled, longer must have a zero tail (E2BIG).

    What ``iommu_copy_struct_from_full_user_array()`` does per entry when the user's entry
    length differs from the driver's (SMMUv3's vCMDs)."""
    if len(data) > size and any(data[size:]):
        raise err(errno.E2BIG, f"non-zero bytes past the {size}-byte struct")
    return bytes(data[:size]).ljust(size, b"\0")


def iommu_copy_struct_from_user(data: bytes, size: int, min_len: int | None = None) -> bytes:
    """``__iommu_copy_struct_from_user()`` (Linux 7.2 include/linux/iommu.h) of a driver's
    user data (vendor HWPT data, an entry of ``iommu_copy_struct_from_user_array()``): shorter
    than ``min_len`` (the struct's first version, ``offsetofend`` of its ``min_last``; the
    whole struct by default) or longer than the struct's ``size`` is EINVAL, checked before
    ``copy_struct_from_user()`` and so never E2BIG; a short one is zero-filled. The data type
    is the caller's to check (the drivers answer EOPNOTSUPP for a foreign type first)."""
    low = size if min_len is None else min_len
    if not low <= len(data) <= size:
        raise err(errno.EINVAL, f"user data of {len(data)} bytes, want {low}..{size}")
    return bytes(data).ljust(size, b"\0")


@attrs.define
class InvalidateResult:
    """How far a user invalidation array got: ``handled`` entries, then ``error`` (0 = none)."""

    handled: int
    error: int = 0


class Domain:
    """An ``iommu_domain``: what a device (or a PASID of it) translates through.

    ``pgsize_bitmap`` and the aperture constrain the IOAS; ``owner`` is the hardware instance
    whose driver built the domain (calls on the domain are routed to that driver only).
    """

    def __init__(
        self,
        owner: IommuHw,
        type_: DomainType,
        *,
        pgsize_bitmap: int = 0,
        aperture_start: int = 0,
        aperture_end: int = (1 << 64) - 1,
        nest_parent: bool = False,
        dirty_tracking: bool = False,
        pasid_compat: bool = False,
        parent: Domain | None = None,
    ) -> None:
        self.owner = owner
        self.type = type_
        self.pgsize_bitmap = pgsize_bitmap
        self.aperture_start = aperture_start
        self.aperture_end = aperture_end
        self.nest_parent = nest_parent
        self.dirty_tracking = dirty_tracking
        self.dirty_enabled = False
        self.pasid_compat = pasid_compat
        self.parent = parent
        # Set by the core: the iommufd HWPT that wraps this domain (for fault routing).
        self.hwpt: Any = None


class ViommuBase:
    """Driver half of a vIOMMU object: per-VM slice of one IOMMU instance."""

    def __init__(self, owner: IommuHw, parent: Domain, viommu_type: int) -> None:
        self.owner = owner
        self.parent = parent
        self.viommu_type = viommu_type
        # Set by the core: the iommufd object, through which events are reported.
        self.core: Any = None


class VdeviceBase:
    """Driver half of a vDEVICE: a physical device's identity inside one vIOMMU."""

    def __init__(self, viommu: ViommuBase, dev: Any, virt_id: int) -> None:
        self.viommu = viommu
        self.dev = dev
        self.virt_id = virt_id


class HwQueueBase:
    """Driver half of a HW queue: guest queue memory the hardware consumes directly."""

    def __init__(
        self, viommu: ViommuBase, queue_type: int, index: int, base_iova: int, length: int
    ) -> None:
        self.viommu = viommu
        self.queue_type = queue_type
        self.index = index
        self.base_iova = base_iova
        self.length = length
        # Physical frames of the queue memory, pinned by the core for the queue's lifetime.
        self.pfns: list[int] = []
        # Set by the core: the iommufd HW_QUEUE object (dependencies are kept on it).
        self.core: Any = None
        self._depends: list[HwQueueBase] = []

    def depend(self, prev: HwQueueBase) -> None:
        """``iommufd_hw_queue_depend()``: ``prev`` cannot be destroyed (EBUSY) while this
        queue lives; for hardware whose queues must go in reverse order of allocation."""
        if prev.core is None:
            raise err(errno.EINVAL, "the queue depended on is not an iommufd object")
        prev.core.users += 1
        self._depends.append(prev)

    def undepend(self) -> None:
        """Release :meth:`depend` (the core calls this after ``hw_queue_destroy``)."""
        for prev in self._depends:
            prev.core.users -= 1
        self._depends.clear()
