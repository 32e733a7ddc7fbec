"""ID allocation as the kernel's IDA does it (``ida_alloc_range()`` / ``ida_free()``).

Drivers number their domains (AMD DomainID, VT-d DID, SMMU ASID/VMID): an ID that is never
freed is a leak the hardware cannot show until the space runs out. An :class:`Ida` built
with ``owner=`` an IOMMU instance is listed in ``owner.id_spaces``, where the conformance kit
checks that every ID taken during a test is back once its objects are destroyed.
"""

from __future__ import annotations

import errno
from collections.abc import Container
from typing import TYPE_CHECKING

from iommufd_model.errors import err

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw


def lowest_free(used: Container[int], first: int) -> int:
    """The lowest number from ``first`` up that ``used`` does not hold: the search the
    kernel's ID allocators make (``ida_alloc``, ``xa_alloc``, the lowest free descriptor of
    ``alloc_fd``), here over whatever the caller keeps its numbers in."""
    n = first
    while n in used:
        n += 1
    return n


class Ida:
    """IDs ``first .. last`` (inclusive); :meth:`alloc` gives the lowest free one, as the
    kernel's IDA does (no cursor: freeing an ID leaves the allocator exactly as it was)."""

    def __init__(self, name: str, first: int, last: int, *, owner: IommuHw | None = None) -> None:
        self.name = name
        self.first = first
        self.last = last
        self.used: set[int] = set()
        self._next = first  # every ID below it is taken (a search starts here)
        if owner is not None:
            owner.id_spaces.append(self)

    def alloc(self) -> int:
        """The lowest free ID; ENOSPC when every ID is taken (``ida_alloc_range()``)."""
        cand = lowest_free(self.used, self._next)
        if cand > self.last:
            raise err(errno.ENOSPC, f"no {self.name} left ({self.first}..{self.last})")
        self.used.add(cand)
        self._next = cand + 1
        return cand

    def free(self, value: int) -> None:
        """Give ``value`` back; freeing an ID not taken is a driver bug (the kernel WARNs)."""
        if value not in self.used:
            raise ValueError(f"{self.name} {value} freed but not allocated")
        self.used.remove(value)
        self._next = min(self._next, value)

    def __len__(self) -> int:
        return len(self.used)

    def __contains__(self, value: object) -> bool:
        return value in self.used
