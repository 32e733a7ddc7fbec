"""The object table of one iommufd: ids, types, users refcounts and destruction rules.

Kernel rules kept here: ids come from an xarray allocator (lowest free id from 1, 31-bit);
a lookup of the wrong type is ENOENT; an object can be destroyed only when the table holds
its only reference (``users == 1``) else EBUSY; objects that hold others take a ``users``
reference on them and drop it when destroyed. A forcibly destroyed vDEVICE leaves a tombstone:
its id stays taken until the fd is closed.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

from iommufd_model.errors import err
from iommufd_model.failnth import failpoint

if TYPE_CHECKING:
    from iommufd_model.core.device import Device
    from iommufd_model.core.eventq import Fault
    from iommufd_model.core.hw_pagetable import HwptNested, HwptPaging
    from iommufd_model.core.ioas import Ioas
    from iommufd_model.core.main import IommuFd
    from iommufd_model.core.viommu import Viommu

ID_LIMIT = (1 << 31) - 1


class ObjType(enum.Enum):
    """``enum iommufd_object_type``."""

    DEVICE = "device"
    HWPT_PAGING = "hwpt_paging"
    HWPT_NESTED = "hwpt_nested"
    IOAS = "ioas"
    ACCESS = "access"
    FAULT = "fault"
    VIOMMU = "viommu"
    VDEVICE = "vdevice"
    VEVENTQ = "veventq"
    HW_QUEUE = "hw_queue"
    SELFTEST = "selftest"


class IommufdObject:
    """Base of every object in the table."""

    TYPE: ObjType

    def __init__(self, ictx: IommuFd) -> None:
        self.ictx = ictx
        self.id = 0
        self.users = 1  # the table's reference
        self.holds: list[IommufdObject] = []  # objects this one took a users reference on

    def hold(self, other: IommufdObject) -> None:
        """Take a long-term reference on ``other`` (released when this object dies)."""
        other.users += 1
        self.holds.append(other)

    def release_holds(self) -> None:
        for other in reversed(self.holds):
            other.users -= 1
        self.holds.clear()

    def destroy(self) -> None:
        """Type-specific teardown; called once the object left the table."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.id} users={self.users}>"


_TOMBSTONE = object()


class ObjectTable:
    """id -> object, with the kernel's allocation and lookup rules."""

    def __init__(self) -> None:
        self._objs: dict[int, object] = {}
        self._free_hint = 1

    def alloc_id(self, obj: IommufdObject) -> int:
        """Install ``obj`` at the lowest free id (xa_alloc with XA_FLAGS_ALLOC1)."""
        failpoint("objects.alloc_id")  # iommufd_object_alloc(): kzalloc + xa_alloc
        objs = self._objs
        i = self._free_hint
        while i in objs:
            i += 1
        if i > ID_LIMIT:
            raise err(errno.EBUSY, "object ids exhausted")
        objs[i] = obj
        obj.id = i
        self._free_hint = i + 1
        return i

    def _release_id(self, id_: int) -> None:
        del self._objs[id_]
        self._free_hint = min(self._free_hint, id_)

    def get(
        self,
        id_: int,
        type_: ObjType | tuple[ObjType, ...] | None = None,
        *,
        held: bool = False,
    ) -> IommufdObject:
        """``iommufd_get_object``: missing, tombstoned or wrong type -> ENOENT.

        ``held``: the caller already holds the object in the kernel (VFIO's device fd holds
        its ``iommufd_device``) and only resolves the model's id: no fault injection there.
        """
        if not held:
            failpoint("objects.get", errno.ENOENT)  # iommufd_should_fail() -> -ENOENT
        obj = self._objs.get(id_)
        if not isinstance(obj, IommufdObject):
            raise err(errno.ENOENT, f"no object {id_}")
        if type_ is not None and obj.TYPE is not type_:
            types = type_ if isinstance(type_, tuple) else (type_,)
            if obj.TYPE not in types:
                raise err(errno.ENOENT, f"object {id_} is a {obj.TYPE.value}")
        return obj

    # -- typed lookups: iommufd_get_device(), iommufd_get_ioas(), iommufd_get_hwpt_paging()...
    # The object's type is checked by its ObjType, as iommufd_get_object() does, so no
    # object module is imported here (they all import this one).
    def get_device(self, id_: int, *, held: bool = False) -> Device:
        return cast("Device", self.get(id_, ObjType.DEVICE, held=held))

    def get_ioas(self, id_: int, *, held: bool = False) -> Ioas:
        return cast("Ioas", self.get(id_, ObjType.IOAS, held=held))

    def get_hwpt_paging(self, id_: int) -> HwptPaging:
        return cast("HwptPaging", self.get(id_, ObjType.HWPT_PAGING))

    def get_hwpt_nested(self, id_: int) -> HwptNested:
        return cast("HwptNested", self.get(id_, ObjType.HWPT_NESTED))

    def get_fault(self, id_: int) -> Fault:
        return cast("Fault", self.get(id_, ObjType.FAULT))

    def get_viommu(self, id_: int) -> Viommu:
        return cast("Viommu", self.get(id_, ObjType.VIOMMU))

    def remove(self, obj: IommufdObject, *, tombstone: bool = False) -> None:
        """Take ``obj`` out (caller checked users); destroy it and drop what it held."""
        if tombstone:
            self._objs[obj.id] = _TOMBSTONE
        else:
            self._release_id(obj.id)
        obj.users -= 1
        obj.destroy()
        obj.release_holds()

    def destroy_by_id(self, id_: int) -> None:
        """IOMMU_DESTROY: ENOENT if absent, EBUSY while anything else references it."""
        obj = self.get(id_)
        if obj.users != 1:
            raise err(errno.EBUSY, f"object {id_} is in use ({obj.users - 1} users)")
        self.remove(obj)

    def __iter__(self) -> Iterator[IommufdObject]:
        return (o for o in list(self._objs.values()) if isinstance(o, IommufdObject))

    def __len__(self) -> int:
        return len(self._objs)

    def ids(self) -> list[int]:
        return sorted(self._objs)

    def clear_tombstones(self) -> None:
        for i in [i for i, o in self._objs.items() if o is _TOMBSTONE]:
            self._release_id(i)
