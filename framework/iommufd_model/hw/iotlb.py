"""An IOTLB: translations cached by tag and page, invalidated only by explicit commands.

Entries are keyed by ``(tag, iova >> shift)`` in one dict per page size, so a lookup probes at
most one dict per page size the cache currently holds (a handful). ``tag`` is whatever the
vendor tags translations with (AMD DomainID/PASID, SMMU ASID/VMID, VT-d DID/PASID); a stale
entry stays in use until the driver invalidates it -- exactly the bug class a model must show.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import attrs


@attrs.define(slots=True, frozen=True)
class TlbEntry:
    """One cached translation of a naturally aligned page of ``1 << shift`` bytes."""

    pa: int  # physical base of the page
    shift: int
    perm: int  # vendor-neutral permission bits (IOMMU_READ | IOMMU_WRITE)
    mem_refs: int = 0  # what the walk that filled it cost (for reporting)


class Iotlb:
    """A bounded translation cache with FIFO replacement."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._by_shift: dict[int, dict[tuple[Hashable, int], TlbEntry]] = {}
        self._count = 0
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    def __len__(self) -> int:
        return self._count

    def lookup(self, tag: Hashable, iova: int) -> TlbEntry | None:
        for shift, table in self._by_shift.items():
            entry = table.get((tag, iova >> shift))
            if entry is not None:
                self.hits += 1
                return entry
        self.misses += 1
        return None

    def insert(self, tag: Hashable, iova: int, entry: TlbEntry) -> None:
        table = self._by_shift.get(entry.shift)
        if table is None:
            table = self._by_shift[entry.shift] = {}
        key = (tag, iova >> entry.shift)
        if key not in table:
            if self._count >= self.capacity:
                self._evict_one()
            self._count += 1
        table[key] = entry

    def _evict_one(self) -> None:
        for shift, table in self._by_shift.items():
            if table:
                del table[next(iter(table))]
                self._count -= 1
                if not table:
                    del self._by_shift[shift]
                return

    def _drop(self, keep: Callable[[Hashable, int, int], bool]) -> int:
        """Remove every entry for which ``keep(tag, first_iova, shift)`` is False."""
        dropped = 0
        for shift in list(self._by_shift):
            table = self._by_shift[shift]
            doomed = [k for k in table if not keep(k[0], k[1] << shift, shift)]
            for k in doomed:
                del table[k]
            dropped += len(doomed)
            if not table:
                del self._by_shift[shift]
        self._count -= dropped
        self.invalidations += 1
        return dropped

    def flush_all(self) -> int:
        dropped = self._count
        self._by_shift.clear()
        self._count = 0
        self.invalidations += 1
        return dropped

    def flush_tag(self, match: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose tag satisfies ``match``."""
        return self._drop(lambda tag, _iova, _shift: not match(tag))

    def flush_range(self, match: Callable[[Hashable], bool], first: int, last: int) -> int:
        """Drop entries with a matching tag whose page overlaps ``[first, last]``."""

        def keep(tag: Hashable, start: int, shift: int) -> bool:
            if not match(tag):
                return True
            end = start + (1 << shift) - 1
            return end < first or start > last

        return self._drop(keep)
