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

A miss of a known stream is walked here too, by the vendor's walker bound to the stream's
table fields (:class:`Walk`, one binding for every vendor) and cached as a native
:class:`iommufd_model.hw.tlb_entry.TlbEntry` through the compiled IOTLB insert: no Python
frame per miss but the walker's own entry.

Imports nothing but the modules mypyc compiles with it (``setup.py``, one group with
:mod:`iommufd_model.hw.tlb_run` and :mod:`iommufd_model.hw.tlb_entry`), so that their calls
are native; the same source runs uncompiled under ``IOMMUFD_MODEL_PURE=1``. Like every
compiled module here it holds no module-level mutable state and takes no lock: it runs
inside the model's entry points (docs/concurrency.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from iommufd_model.hw.tlb_entry import TlbEntry
from iommufd_model.hw.tlb_run import Fifo, insert_new

Slow = Callable[[Any, int, "int | None", bool], tuple[int, int]]
Pages = dict[int, TlbEntry]
#: a vendor walker's bound entry (a compiled function of its ``walk`` module, or its pure
#: source): ``(iova, write, ctx)`` -> ``(status, value, shift, mem_refs, prot, ...)`` (status 0:
#: ``value`` is the address)
Walker = Callable[[int, bool, Any], tuple[int, ...]]
#: the vendor's translate() from a walk's result on (faults, events, anything unusual)
Post = Callable[[Any, int, "int | None", bool, tuple[int, ...]], tuple[int, int]]
#: a one-level translation table without an IOTLB (the mock's): page number -> address | flags
Table = dict[int, int]


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


class Walk:
    """A vendor walker bound to the table fields of one request stream (DTE; PASID entry;
    STE and CD): ``walker(iova, write, ctx)``, the walker's bound entry (each vendor's
    ``walk`` module has one per walker, with the fields in ``ctx``). One binding for every
    vendor: the front calls :meth:`run` natively on a miss, and that makes one three-argument
    call of the compiled walker; the vendor's own translate() calls the object. The fields
    are read from the vendor's context caches when the stream is learnt; any change to those
    caches makes the front forget the stream, and with it this binding."""

    walker: Any  # ``(iova, write, ctx)`` -> the walker's result (Any: a plain vectorcall)
    ctx: tuple[object, ...]
    #: whether a read's walk may write memory (accessed bits): the vendor knows its walkers
    read_writes: bool

    def __init__(self, walker: Walker, ctx: tuple[object, ...], read_writes: bool = True) -> None:
        self.walker = walker
        self.ctx = ctx
        self.read_writes = read_writes

    def run(self, iova: int, write: bool) -> tuple[int, ...]:
        result: tuple[int, ...] = self.walker(iova, write, self.ctx)
        return result

    def __call__(self, iova: int, write: bool) -> tuple[int, ...]:
        return self.run(iova, write)


class Miss:
    """How a stream's IOTLB miss is walked and cached, when the vendor offers it: ``walk``
    (its walker bound to the stream's tables), the IOTLB's FIFO and capacity (for
    :func:`iommufd_model.hw.tlb_run.insert`), and the rule that turns a clean walk into an
    entry the way the vendor's translate() does: the walk's ``prot`` masked by ``prot_mask``
    must hold ``need_read``/``need_write``, the entry's perm gains
    ``extra_read``/``extra_write``, a value at or beyond ``mem_end`` is the vendor's, and
    ``clamp`` bounds the run by ``mem_end``. Anything else goes to ``post`` with the walk's
    result (the vendor's own code from there on: faults, events, A/D corner cases)."""

    walk: Walk
    post: Post
    fifo: Fifo  # the IOTLB's FIFO of keys, for tlb_run.insert_new
    capacity: int
    prot_mask: int
    need_read: int
    need_write: int
    extra_read: int
    extra_write: int
    mem_end: int
    clamp: bool

    def __init__(
        self,
        walk: Walk,
        post: Post,
        fifo: Fifo,
        capacity: int,
        prot_mask: int,
        need: tuple[int, int],
        extra: tuple[int, int],
        mem_end: int,
        clamp: bool,
    ) -> None:
        self.walk = walk
        self.post = post
        self.fifo = fifo
        self.capacity = capacity
        self.prot_mask = prot_mask
        self.need_read, self.need_write = need
        self.extra_read, self.extra_write = extra
        self.mem_end = mem_end
        self.clamp = clamp


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
    miss: Miss | None
    #: a stream without an IOTLB (:meth:`Front.learn_table`): the live table it reads
    table: Table | None
    shift: int
    addr_mask: int
    dirty_owner: Any

    def __init__(
        self,
        tables: dict[int, dict[object, Pages]],
        counts: TlbCounts | None,
        tag: object,
        need_read: int,
        need_write: int,
        mem_end: int,
        miss: Miss | None,
        table: Table | None = None,
        shift: int = 0,
        addr_mask: int = 0,
        dirty_owner: Any = None,
    ) -> None:
        self.tables = tables
        self.counts = counts if counts is not None else TlbCounts()
        self.tag = tag
        self.need_read = need_read
        self.need_write = need_write
        self.mem_end = mem_end
        self.miss = miss
        self.table = table
        self.shift = shift
        self.addr_mask = addr_mask
        self.dirty_owner = dirty_owner


def stream_key(rid: int, pasid: int | None) -> int:
    """The records' key of a request stream: requester ID and PASID (none: 0)."""
    if pasid is None:
        return rid
    return rid | (pasid + 1) << 16


class Front:
    """The per-IOMMU table of known request streams and the compiled ``translate``.

    ``streams`` holds the streams by requester ID and PASID as the vendor learns them;
    ``by_device`` is the same streams without a PASID keyed by the device object, filled on
    first use, so that a request without PASID finds its stream by one pointer-hashed probe
    instead of reading the device's ``rid`` attribute (a Python attribute lookup). Both are
    cleared together (:meth:`forget`)."""

    stats: HwStats
    slow: Slow
    streams: dict[int, Stream]
    by_device: dict[object, Stream]

    def __init__(self, stats: HwStats, slow: Slow) -> None:
        self.stats = stats
        self.slow = slow
        self.streams = {}
        self.by_device = {}

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
        miss: Miss | None = None,
    ) -> None:
        """Record a stream whose context checks just passed (called by the vendor's
        ``translate`` after a hit or a fill under ``tag``); ``miss``: how its misses are
        walked here (None: by the vendor's translate)."""
        self.streams[stream_key(rid, pasid)] = Stream(
            tables, counts, tag, need_read, need_write, mem_end, miss
        )
        if pasid is None:
            # The device object of this RID finds the new stream through ``streams`` again.
            self.by_device.clear()

    def learn_table(
        self,
        rid: int,
        pasid: int | None,
        table: Any,  # ``dict[int, int]`` (checked to be a dict here)
        shift: int,
        addr_mask: int,
        need: tuple[int, int],
        dirty_owner: Any,
    ) -> None:
        """Record a stream of an IOMMU without an IOTLB whose context checks just passed:
        it translates through ``table`` (page number of ``1 << shift`` bytes -> an entry whose
        ``addr_mask`` bits are the address), a read needing an entry with any bit of
        ``need[0]``, a write any of ``need[1]``; a write while ``dirty_owner.dirty_enabled`` is
        the vendor's (it sets the dirty bit). Each answer counts one translation and one
        memory reference; anything else goes to the vendor."""
        self.streams[stream_key(rid, pasid)] = Stream(
            {}, None, None, need[0], need[1], 0, None, table, shift, addr_mask, dirty_owner
        )
        if pasid is None:
            self.by_device.clear()

    def forget(self) -> None:
        """Drop every stream (a context cache or an enable register changed)."""
        self.streams.clear()
        self.by_device.clear()

    def translate(self, dev: Any, iova: int, pasid: int | None, write: bool) -> tuple[int, int]:
        """``IommuHw.translate``: an IOTLB hit of a known stream here, anything else in the
        vendor's ``translate`` (``slow``)."""
        streams = self.streams
        if not streams:  # nothing learnt (or a vendor that never learns): no ``dev.rid``
            return self.slow(dev, iova, pasid, write)
        stream: Stream | None
        if pasid is None:
            stream = self.by_device.get(dev)
            if stream is None:
                stream = streams.get(dev.rid)
                if stream is not None:
                    self.by_device[dev] = stream
        else:
            rid: int = dev.rid
            stream = streams.get(rid | (pasid + 1) << 16)
        if stream is not None:
            table = stream.table
            if table is not None:
                return self._table(stream, table, dev, iova, pasid, write)
            tag = stream.tag
            found = False
            # Iotlb.lookup's order: the first page size whose pages hold the address.
            for shift, tags in stream.tables.items():
                pages = tags.get(tag)
                if pages is None:
                    continue
                entry = pages.get(iova >> shift)
                if entry is None:
                    continue
                found = True
                need = stream.need_write if write else stream.need_read
                if entry.perm & need != need:
                    break
                mask = (1 << entry.shift) - 1
                off = iova & mask
                pa = entry.pa + off
                run = mask + 1 - off
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
            miss = stream.miss
            if not found and miss is not None:
                return self._walk(stream, miss, dev, iova, pasid, write)
        return self.slow(dev, iova, pasid, write)

    def _walk(
        self,
        stream: Stream,
        miss: Miss,
        dev: Any,
        iova: int,
        pasid: int | None,
        write: bool,
    ) -> tuple[int, int]:
        """An IOTLB miss of a known stream: counted as the vendor counts it, walked by the
        bound walker, cached (a native :class:`TlbEntry`) and answered here when the walk is
        clean, else handed to the vendor's ``post`` with the walk's result."""
        stats = self.stats
        stream.counts.misses += 1
        stats.translations += 1
        stats.iotlb_misses += 1
        res = miss.walk.run(iova, write)
        status: int = res[0]
        value: int = res[1]
        end = miss.mem_end
        if status == 0 and value < end:
            prot: int = res[4] & miss.prot_mask
            need = miss.need_write if write else miss.need_read
            if prot & need == need:
                shift: int = res[2]
                refs: int = res[3]
                stats.walk_mem_refs += refs
                perm = prot | (miss.extra_write if write else miss.extra_read)
                mask = (1 << shift) - 1
                entry = TlbEntry(value & ~mask, shift, perm, refs)
                tables: Any = stream.tables  # the IOTLB's dicts, as tlb_run types them
                insert_new(
                    tables, miss.fifo, miss.capacity, stream.tag, iova >> shift, shift, entry, None
                )
                run = mask + 1 - (value & mask)
                if miss.clamp and run > end - value:
                    run = end - value
                return value, run
        return miss.post(dev, iova, pasid, write, res)

    def _table(
        self, stream: Stream, table: Table, dev: Any, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        """A request of a known stream without an IOTLB: one table lookup (the vendor's own
        translate() when the entry is missing or lacks the permission, or for a write while
        dirty tracking is on)."""
        entry = table.get(iova >> stream.shift)
        if entry is not None:
            if write:
                if entry & stream.need_write and not stream.dirty_owner.dirty_enabled:
                    return self._table_hit(stream, entry, iova)
            elif entry & stream.need_read:
                return self._table_hit(stream, entry, iova)
        return self.slow(dev, iova, pasid, write)

    def _table_hit(self, stream: Stream, entry: int, iova: int) -> tuple[int, int]:
        size = 1 << stream.shift
        off = iova & (size - 1)
        stats = self.stats
        stats.translations += 1
        stats.walk_mem_refs += 1
        return (entry & stream.addr_mask) + off, size - off
