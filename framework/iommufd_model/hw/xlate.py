"""Compiled front of ``IommuHw.translate``: one request stream's IOTLB hits without Python.

A vendor's ``translate()`` checks its context (DTE; context and PASID entries; STE and CD),
names the IOTLB tag of the request and looks the page up. For a given device and PASID the
checks and the tag stay the same until the vendor's context caches or its enable registers
change, so once a full translation has passed them the vendor records the stream's tag here
(:meth:`Front.learn`) and the next requests of the stream look the IOTLB up natively
(:meth:`Front.translate`), with the statistics a full translation counts. Anything else -- no
record, a miss, an entry without the permissions the request needs, an address the vendor
refuses -- goes to the vendor's own ``translate`` untouched: the front changes nothing before it
knows it answers, so the slow path sees exactly the state it would have seen alone.

The vendor drops every record (:meth:`Front.forget`) whenever anything the checks read
changes: its context caches do it themselves (:class:`iommufd_model.hw.iommu.CacheDict`), its
register handlers do it for enables. This is the model's own structure (the hardware has
no such thing; its caches are the DTE/STE/context caches and the IOTLB, which behave as
before).

Free of framework imports so that mypyc compiles it alone (``setup.py``, in one group with
:mod:`iommufd_model.hw.tlb_run`); the same source runs uncompiled under
``IOMMUFD_MODEL_PURE=1``. Like every compiled module here it holds no module-level mutable
state and takes no lock: it runs inside the model's entry points (docs/concurrency.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Slow = Callable[[Any, int, "int | None", bool], tuple[int, int]]
Pages = dict[int, tuple[int, int, int, int]]


class HwStats:
    """Costs the hardware paid; the matrix reports them per scenario. Native fields: the
    compiled front counts its hits without a Python attribute write."""

    translations: int
    walk_mem_refs: int
    iotlb_hits: int
    iotlb_misses: int
    commands: int
    faults: int

    def __init__(self) -> None:
        self.translations = 0
        self.walk_mem_refs = 0
        self.iotlb_hits = 0
        self.iotlb_misses = 0
        self.commands = 0
        self.faults = 0

    def snapshot(self) -> dict[str, int]:
        return {
            "translations": self.translations,
            "walk_mem_refs": self.walk_mem_refs,
            "iotlb_hits": self.iotlb_hits,
            "iotlb_misses": self.iotlb_misses,
            "commands": self.commands,
            "faults": self.faults,
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HwStats) and self.snapshot() == other.snapshot()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.snapshot().items())
        return f"HwStats({fields})"


class TlbCounts:
    """An IOTLB's own lookup counters (``Iotlb.hits``/``misses``/``invalidations``)."""

    hits: int
    misses: int
    invalidations: int

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.invalidations = 0


class Stream:
    """What a full translation established for one device and PASID: the IOTLB (its tables
    and counters) and tag its requests use, the permission bits a hit needs for a read and
    for a write, and whether the answer is bounded by the end of memory (``mem_end`` > 0: a
    page at or beyond it goes to the slow path, a run stops there)."""

    tables: dict[int, dict[object, Pages]]
    counts: TlbCounts
    tag: object
    need_read: int
    need_write: int
    mem_end: int

    def __init__(
        self,
        tables: dict[int, dict[object, Pages]],
        counts: TlbCounts,
        tag: object,
        need_read: int,
        need_write: int,
        mem_end: int,
    ) -> None:
        self.tables = tables
        self.counts = counts
        self.tag = tag
        self.need_read = need_read
        self.need_write = need_write
        self.mem_end = mem_end


def stream_key(rid: int, pasid: int | None) -> int:
    """The records' key of a request stream: requester ID and PASID (none: 0)."""
    if pasid is None:
        return rid
    return rid | (pasid + 1) << 16


class Front:
    """The per-IOMMU table of known request streams and the compiled ``translate``."""

    stats: HwStats
    slow: Slow
    streams: dict[int, Stream]

    def __init__(self, stats: HwStats, slow: Slow) -> None:
        self.stats = stats
        self.slow = slow
        self.streams = {}

    def learn(
        self,
        rid: int,
        pasid: int | None,
        tables: Any,  # ``Iotlb._tables`` (checked to be a dict here)
        counts: TlbCounts,
        tag: object,
        need_read: int,
        need_write: int,
        mem_end: int,
    ) -> None:
        """Record a stream whose context checks just passed (called by the vendor's
        ``translate`` after a hit or a fill under ``tag``)."""
        self.streams[stream_key(rid, pasid)] = Stream(
            tables, counts, tag, need_read, need_write, mem_end
        )

    def forget(self) -> None:
        """Drop every stream (a context cache or an enable register changed)."""
        self.streams.clear()

    def translate(self, dev: Any, iova: int, pasid: int | None, write: bool) -> tuple[int, int]:
        """``IommuHw.translate``: an IOTLB hit of a known stream here, anything else in the
        vendor's ``translate`` (``slow``)."""
        streams = self.streams
        if not streams:  # nothing learnt (or a vendor that never learns): no ``dev.rid``
            return self.slow(dev, iova, pasid, write)
        rid: int = dev.rid
        stream = streams.get(rid if pasid is None else rid | (pasid + 1) << 16)
        if stream is not None:
            tag = stream.tag
            # Iotlb.lookup's order: the first page size whose pages hold the address.
            for shift, tags in stream.tables.items():
                pages = tags.get(tag)
                if pages is None:
                    continue
                entry = pages.get(iova >> shift)
                if entry is None:
                    continue
                pa, eshift, perm, _refs = entry
                need = stream.need_write if write else stream.need_read
                if perm & need != need:
                    break
                size = 1 << eshift
                off = iova & (size - 1)
                pa += off
                run = size - off
                end = stream.mem_end
                if end:
                    if pa >= end:
                        break
                    if run > end - pa:
                        run = end - pa
                stats = self.stats
                stats.translations += 1
                stats.iotlb_hits += 1
                stream.counts.hits += 1
                return pa, run
        return self.slow(dev, iova, pasid, write)
