"""Translate DeviceIDs (AMD's tree ``trans_devid.c``): the DeviceID whose DTE the HW-vIOMMU uses
to translate a guest's buffer addresses (GPAs) through the nest parent's stage 2.

The ID must be one no real function uses. AMD's driver keeps one pool per PCI segment: an ID
is free, *reserved* (a function attached to a domain, or one of its aliases, uses it) or
*allocated* to a vIOMMU. Allocation takes the highest free ID counting down from 0xFFFF
(functions are enumerated from the bottom of the bus range); a reservation of an ID that a
vIOMMU holds -- a function hot-plugged at that BDF -- moves the vIOMMU to a new ID first; no
free ID left is ENOSPC. Reservations are never given back (a function may come back).

The model has one PCI segment per AMD IOMMU and no DMA aliases (its PCI functions have none
and there is no IVRS alias table), so a function reserves exactly its RID.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from iommufd_model.errors import err

MAX_ID = 0xFFFF
RESERVED = object()  # the state of an ID a PCI function uses


class TransDevIdPool:
    """``pci_seg->trans_devid_xa``: ID -> ``RESERVED`` or the owning vIOMMU."""

    def __init__(self) -> None:
        self.ids: dict[int, object] = {}

    def _find_free(self) -> int:
        for cand in range(MAX_ID, -1, -1):
            if cand not in self.ids:
                return cand
        raise err(errno.ENOSPC, "no free translate DeviceID in this PCI segment")

    def alloc(self, owner: object) -> int:
        """``amd_iommu_trans_devid_alloc()``: the highest free ID, now owned by ``owner``."""
        cand = self._find_free()
        self.ids[cand] = owner
        return cand

    def free(self, devid: int, owner: object) -> None:
        """``amd_iommu_trans_devid_free()``."""
        if self.ids.get(devid) is owner:
            del self.ids[devid]

    def reserve(self, devid: int, relocate: Callable[[object, int, int], None]) -> None:
        """``amd_iommu_trans_devid_reserve()``: keep ``devid`` from ever being allocated. When
        a vIOMMU holds it, ``relocate(owner, old, new)`` moves that vIOMMU to a new ID first
        (its translate DTE and VFCTRL); ENOSPC when there is none, and nothing changes."""
        state = self.ids.get(devid)
        if state is RESERVED:
            return
        if state is not None:
            new = self._find_free()
            self.ids[new] = state
            self.ids[devid] = RESERVED
            try:
                relocate(state, devid, new)
            except OSError:
                del self.ids[new]
                self.ids[devid] = state
                raise
            return
        self.ids[devid] = RESERVED
