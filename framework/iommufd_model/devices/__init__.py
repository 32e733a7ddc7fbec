"""PCI device models for the VFIO layer: functions with config space, BARs, MSI/MSI-X, FLR and
SR-IOV, and register-level DMA engines (Intel IOAT, DSA) doing DMA through the IOMMU.

``KINDS`` maps a kind name (``Machine.add_pci_function(kind, ...)``, ``run --device
KIND@IOMMU``) to a factory ``(iommu, rid, **opts) -> PciFunction``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from iommufd_model.devices.dsa import DsaFunction, dsa
from iommufd_model.devices.function import (
    Bar,
    DmaBlocked,
    FunctionSpec,
    MsixLayout,
    PciFunction,
)
from iommufd_model.devices.generic import generic
from iommufd_model.devices.ioat import IoatFunction, ioat

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw

Factory = Callable[..., PciFunction]

KINDS: dict[str, Factory] = {"generic": generic, "ioat": ioat, "dsa": dsa}


def register_kind(name: str, factory: Factory) -> None:
    """Make ``name`` pluggable by :meth:`Machine.add_pci_function`."""
    KINDS[name] = factory


def create(kind: str, iommu: IommuHw, rid: int, **opts: Any) -> PciFunction:
    """A new function of ``kind`` (not yet plugged); ValueError for an unknown kind."""
    factory = KINDS.get(kind)
    if factory is None:
        raise ValueError(f"unknown PCI function kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    return factory(iommu, rid, **opts)


__all__ = [
    "KINDS",
    "Bar",
    "DmaBlocked",
    "DsaFunction",
    "FunctionSpec",
    "IoatFunction",
    "MsixLayout",
    "PciFunction",
    "create",
    "register_kind",
]
