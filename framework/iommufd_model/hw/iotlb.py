"""An IOTLB: translations cached by tag and page, invalidated only by explicit commands.

Entries live in ``page shift -> tag -> page number -> entry`` dicts, so a lookup probes one
tag per page size the cache currently holds (a handful), and a burst of lookups for one
request stream (:meth:`Iotlb.hit_run`) finds its tag's pages once and then probes plain int
keys. ``tag`` is whatever the vendor tags translations with (AMD DomainID/PASID, SMMU
ASID/VMID, VT-d DID/PASID); a stale entry stays in use until the driver invalidates it --
exactly the bug class a model must show. Replacement is FIFO over all entries.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import cast

from iommufd_model.hw.compiled import load_walker
from iommufd_model.hw.tlb_entry import TlbEntry as TlbEntry  # re-exported: the entry type
from iommufd_model.hw.tlb_entry import new_entry
from iommufd_model.hw.tlb_run import Fifo
from iommufd_model.hw.xlate import TlbCounts

RUN_MODULE = "iommufd_model.hw.tlb_run"
XLATE_MODULE = "iommufd_model.hw.xlate"


Key = tuple[int, Hashable, int]  # (shift, tag, page number)
#: a TlbEntry from its field tuple (compiled: the burst walkers' fill callback)
NEW_ENTRY = new_entry


class Iotlb:
    """A bounded translation cache with FIFO replacement."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        #: the IOTLB operations (:mod:`iommufd_model.hw.tlb_run`: compiled, or its pure source
        #: under ``IOMMUFD_MODEL_PURE=1`` when the IOTLB is built, as the IOMMU's front is),
        #: for the lookups of a burst and native fills
        self.ops = load_walker(RUN_MODULE)
        self._tables: dict[int, dict[Hashable, dict[int, TlbEntry]]] = {}
        # Every entry's key, oldest first: a fill appends, an eviction pops the oldest, with
        # no hashing (a dict's first key after many evictions from its front is found by
        # skipping their dummies, which made a burst beyond the IOTLB's reach quadratic; an
        # OrderedDict hashes every key twice and allocates a node per fill). Whether a key is
        # cached is asked of ``_tables``; an invalidation rebuilds the FIFO (:meth:`_drop`).
        # Always the compiled build's class when there is one (as ``TlbEntry``), so that the
        # compiled and the pure ``tlb_run`` both take it.
        self._fifo = Fifo()
        # Native counters, shared with the compiled translate front (hw/xlate.py), which
        # counts its hits there; the module is chosen as the IOMMU's (when it is built).
        self.counts: TlbCounts = load_walker(XLATE_MODULE).TlbCounts()

    @property
    def hits(self) -> int:
        return self.counts.hits

    @property
    def misses(self) -> int:
        return self.counts.misses

    @property
    def invalidations(self) -> int:
        return self.counts.invalidations

    def __len__(self) -> int:
        return len(self._fifo)

    def entries(self) -> list[tuple[Key, TlbEntry]]:
        """Every entry with its key, oldest first (for tests and state snapshots)."""
        return [(k, self._tables[k[0]][k[1]][k[2]]) for k in self._fifo]

    def lookup(self, tag: Hashable, iova: int) -> TlbEntry | None:
        for shift, tags in self._tables.items():
            pages = tags.get(tag)
            if pages is not None:
                entry = pages.get(iova >> shift)
                if entry is not None:
                    self.counts.hits += 1
                    return entry
        self.counts.misses += 1
        return None

    def hit_run(
        self,
        tag: Hashable,
        iova: int,
        end: int,
        need: int,
        pa_end: int,
        out: list[tuple[int, int]],
    ) -> tuple[int, int]:
        """Consecutive hits from ``iova`` towards ``end`` whose ``perm`` has every bit of
        ``need``, below physical ``pa_end``: ``(pa, length)`` runs appended to ``out``; returns
        ``(hits, stop)`` as :func:`iommufd_model.hw.tlb_run.hit_run` does. Counted as ``hits``
        lookups."""
        hits, stop = cast(
            "tuple[int, int]", self.ops.hit_run(self._tables, tag, iova, end, need, pa_end, out)
        )
        self.counts.hits += hits
        return hits, stop

    def insert(self, tag: Hashable, iova: int, entry: TlbEntry) -> None:
        """Cache ``entry`` for ``iova`` under ``tag``; a full IOTLB evicts its oldest entry
        (in the compiled :mod:`iommufd_model.hw.tlb_run`)."""
        self.ops.insert(self._tables, self._fifo, self.capacity, tag, iova, entry.shift, entry)

    def _drop(self, keep: Callable[[Hashable, int, int], bool]) -> int:
        """Remove every entry for which ``keep(tag, first_iova, shift)`` is False (the FIFO
        keeps the order of the others)."""
        fifo = self._fifo
        kept: list[Key] = []
        doomed: list[Key] = []
        for key in fifo:
            (kept if keep(key[1], key[2] << key[0], key[0]) else doomed).append(key)
        if doomed:
            for key in doomed:
                self.ops.unlink(self._tables, key)
            fifo.clear()
            fifo.extend(kept)
        self.counts.invalidations += 1
        return len(doomed)

    def flush_all(self) -> int:
        dropped = len(self._fifo)
        self._tables.clear()
        self._fifo.clear()
        self.counts.invalidations += 1
        return dropped

    def flush_tag(self, match: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose tag satisfies ``match``."""
        return self._drop(lambda tag, _iova, _shift: not match(tag))

    def flush_range_upto(
        self, match: Callable[[Hashable], bool], first: int, last: int, max_shift: int
    ) -> int:
        """:meth:`flush_range` of the entries no larger than ``1 << max_shift`` bytes (a TLBI
        whose level hint names leaves of that size: a larger entry cannot come from one)."""

        def keep(tag: Hashable, start: int, shift: int) -> bool:
            if shift > max_shift or not match(tag):
                return True
            return start + (1 << shift) - 1 < first or start > last

        return self._drop(keep)

    def flush_range(self, match: Callable[[Hashable], bool], first: int, last: int) -> int:
        """Drop entries with a matching tag whose page overlaps ``[first, last]``."""

        def keep(tag: Hashable, start: int, shift: int) -> bool:
            if not match(tag):
                return True
            end = start + (1 << shift) - 1
            return end < first or start > last

        return self._drop(keep)
