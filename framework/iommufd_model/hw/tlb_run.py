"""Compiled hot path: a burst of IOTLB hits for consecutive addresses of one request stream.

A DMA of many pages asks the IOTLB for each page in turn. Once the vendor's context checks
(DTE, context/PASID entry, STE/CD) have passed for the first page they hold for the rest of
the burst, so the lookups can run here, natively, until the first miss or the first entry
whose permissions do not satisfy the request; the vendor's full ``translate()`` then handles
that page (walk, fault, event) and the burst goes on. Free of framework imports so that mypyc
compiles it alone (``setup.py``); the same source runs uncompiled under
``IOMMUFD_MODEL_PURE=1``.

The IOTLB layout is :class:`iommufd_model.hw.iotlb.Iotlb`'s: page shift -> tag -> page number
-> :class:`iommufd_model.hw.tlb_entry.TlbEntry` (a native record ``pa, shift, perm,
mem_refs``). The burst finds its tag's pages once per page size and then probes int keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, cast

from mypy_extensions import i64  # a native int under mypyc; a subclass of ``int`` otherwise

from iommufd_model.hw.tlb_entry import TlbEntry

Entry = TlbEntry
Pages = dict[int, Entry]
Tables = dict[int, dict[object, Pages]]
Key = tuple[int, object, int]
#: a key as the FIFO holds it: the page number is kept as the object it was filled with, so that
#: an eviction deletes it from its pages without unboxing it and boxing it again
Slot = tuple[int, object, object]
# The same dicts as the IOTLB fills them: an entry is the caller's object (a ``TlbEntry``).
Filled = dict[int, dict[object, dict[Any, object]]]


#: popped keys kept at the FIFO's front before it is compacted (and at most as many as remain)
COMPACT: Final = 64


class Fifo:
    """An IOTLB's keys, oldest first (replacement is FIFO): a list and the index of its
    oldest key. A fill appends, an eviction takes the key at ``head`` and moves on; the
    popped keys are dropped from the list once they are at least ``COMPACT`` and as many as
    the keys left (one pointer moved per eviction, amortised). Native (compiled with this
    module), so that the compiled fill and eviction make no Python method calls; it has the
    ``collections.deque`` methods the IOTLB uses. Whether a key is cached is asked of the
    IOTLB's dicts, never of this FIFO."""

    keys: list[Slot]
    head: int

    def __init__(self) -> None:
        self.keys = []
        self.head = 0

    def __len__(self) -> int:
        return len(self.keys) - self.head

    def __iter__(self) -> Iterator[Key]:
        return iter(cast("list[Key]", self.keys[self.head :]))

    def append(self, key: Slot) -> None:
        self.keys.append(key)

    def extend(self, keys: Iterable[Slot]) -> None:
        self.keys.extend(keys)

    def popleft(self) -> Slot:
        keys = self.keys
        head = self.head
        if head >= len(keys):
            raise IndexError("pop from an empty FIFO")
        key = keys[head]
        head += 1
        if head >= COMPACT and head + head >= len(keys):
            del keys[:head]
            head = 0
        self.head = head
        return key

    def clear(self) -> None:
        self.keys.clear()
        self.head = 0


def insert(
    tables: Filled,
    fifo: Fifo,
    capacity: int,
    tag: object,
    iova: int,
    shift: int,
    entry: object,
) -> None:
    """``Iotlb.insert``: cache ``entry`` (a ``TlbEntry`` of a ``1 << shift`` page) for
    ``iova`` under ``tag``. A new key first evicts the oldest entry when the IOTLB is full and
    joins the FIFO (``fifo``: the IOTLB's keys, oldest first); a key already cached keeps its
    place and only has its entry replaced."""
    page = iova >> shift
    by_tag = tables.get(shift)
    if by_tag is not None:
        pages = by_tag.get(tag)
        if pages is not None and page in pages:
            pages[page] = entry
            return
    if len(fifo) >= capacity:
        # May empty and drop the dicts found above: they are looked up again below.
        unlink(tables, fifo.popleft())
    pages_of(tables, shift, tag)[page] = entry
    fifo.append((shift, tag, page))


def insert_new(
    tables: Filled,
    fifo: Fifo,
    capacity: int,
    tag: object,
    page: object,
    shift: int,
    entry: object,
    held: dict[Any, object] | None,
) -> None:
    """:func:`insert` of a key the IOTLB does not hold (the translate front's miss: its
    lookup found no entry for the address at any page size), ``page`` the page number (boxed
    once: the pages and the FIFO share it).
    ``held``: the pages the lookup found for ``tag`` at ``shift``, or None (not found, or not
    looked for). When the oldest key evicted is of the same page size and an equal tag, its
    pages dict is the one the new key goes into: the entry goes and comes without the dict
    being dropped and made again, and the tag is not hashed (``held``) or hashed once."""
    pages = held
    if len(fifo) >= capacity:
        old = fifo.popleft()
        old_shift, old_tag, old_page = old
        if old_shift == shift and (old_tag is tag or old_tag == tag):
            if pages is None:
                pages = tables[shift][tag]
            del pages[old_page]
        else:
            # Another size or tag: may empty and drop its dicts, never those of ``tag``.
            unlink(tables, old)
    if pages is None:
        pages = pages_of(tables, shift, tag)
    pages[page] = entry
    fifo.append((shift, tag, page))


def pages_of(tables: Filled, shift: int, tag: object) -> dict[Any, object]:
    """The pages cached for ``tag`` with pages of ``1 << shift`` bytes (created empty)."""
    by_tag = tables.get(shift)
    if by_tag is None:
        by_tag = tables[shift] = {}
    pages = by_tag.get(tag)
    if pages is None:
        pages = by_tag[tag] = {}
    return pages


def fill(
    tables: Filled,
    fifo: Fifo,
    capacity: int,
    keys: list[Key],
    entries: list[object],
) -> None:
    """``insert`` of every ``entries[i]`` under ``keys[i]``, in order, for keys the IOTLB does
    not hold (a burst's walks: distinct pages, none cached). Filled all at once, then the
    oldest keys beyond ``capacity`` evicted: the same entries and FIFO as one insert after the
    other (each insert evicts the oldest key when full, and the oldest are evicted first
    either way, whether they were there before or came with ``keys``)."""
    last_shift = -1
    last_tag: object = None
    pages: dict[Any, object] = {}
    for (shift, tag, page), entry in zip(keys, entries, strict=True):
        if shift != last_shift or tag is not last_tag:
            pages = pages_of(tables, shift, tag)
            last_shift = shift
            last_tag = tag
        pages[page] = entry
    fifo.extend(keys)
    evict(tables, fifo, len(fifo) - capacity)


def evict(tables: Filled, fifo: Fifo, n: int) -> None:
    """Drop the ``n`` oldest keys of ``fifo`` and their entries, as ``n`` times :func:`unlink`
    of ``fifo.popleft()``. Consecutive keys of one burst share their page size and tag object:
    their pages dict is found once (an identical tag is not hashed and compared again)."""
    last_shift = -1
    last_tag: object = None
    tags: dict[object, dict[Any, object]] = {}
    pages: dict[Any, object] = {}
    for _ in range(n):
        shift, tag, page = fifo.popleft()
        if shift != last_shift or tag is not last_tag:
            tags = tables[shift]
            pages = tags[tag]
            last_shift = shift
            last_tag = tag
        del pages[page]
        if not pages:  # no other key of this tag and size is left: its dicts go
            del tags[tag]
            if not tags:
                del tables[shift]
            last_shift = -1


def unlink(tables: Filled, key: Slot) -> None:
    """Drop the entry of ``key`` (``(shift, tag, page)``) from ``tables``, and the dicts it
    leaves empty (the caller takes the key out of the FIFO)."""
    shift, tag, page = key
    tags = tables[shift]
    pages = tags[tag]
    del pages[page]
    if not pages:
        del tags[tag]
        if not tags:
            del tables[shift]


#: the largest address :func:`hit_run` translates (its loop is in native 64-bit integers);
#: pages at or above it are left to the vendor's ``translate()``
HIT_LIMIT: Final = (1 << 63) - 1


def hit_run(
    tables: Tables,
    tag: object,
    iova: int,
    end: int,
    need: int,
    pa_end: int,
    out: list[tuple[int, int]],
) -> tuple[int, int]:
    """Translate ``[iova, end)`` through IOTLB hits whose ``perm`` holds every bit of ``need``.

    Appends ``(pa, length)`` runs to ``out`` (a run continues the previous one when the
    physical address does) and returns ``(hits, stop)``: how many entries were used and the
    first address not translated (``end`` when all were). Runs stop at physical address
    ``pa_end`` (the end of memory): a page cached whole may reach past it, and what lies
    there is for the vendor's ``translate()`` to refuse. Stops at ``HIT_LIMIT`` too: the loop
    counts in native 64-bit integers (compiled: no boxed arithmetic a page; an entry's
    physical address and page size are far below it), the few pages above are
    ``translate()``'s.
    """
    if end > HIT_LIMIT:
        end = HIT_LIMIT
    if pa_end > HIT_LIMIT:
        pa_end = HIT_LIMIT
    if iova >= end:
        return 0, iova
    at: i64 = iova
    stop: i64 = end
    limit: i64 = pa_end
    hits: i64 = 0
    last: i64 = -1  # the page size that hit last: consecutive pages mostly share it
    last_pages: Pages = {}
    run_pa: i64 = -1
    run_len: i64 = 0
    while at < stop:
        entry = last_pages.get(at >> last) if last >= 0 else None
        if entry is None:
            for shift_of, tags in tables.items():
                if shift_of != last:
                    pages = tags.get(tag)
                    if pages is not None:
                        entry = pages.get(at >> shift_of)
                        if entry is not None:
                            last = shift_of
                            last_pages = pages
                            break
        if entry is None:
            break
        if entry.perm & need != need:
            break
        pa: i64 = entry.pa
        shift: i64 = entry.shift
        size: i64 = 1 << shift
        off = at & (size - 1)
        if pa + off >= limit:
            break
        chunk = size - off
        if chunk > stop - at:
            chunk = stop - at
        if chunk > limit - pa - off:
            chunk = limit - pa - off
        hits += 1
        if run_len and run_pa + run_len == pa + off:
            run_len += chunk
        else:
            if run_len:
                out.append((run_pa, run_len))
            run_pa = pa + off
            run_len = chunk
        at += chunk
    if run_len:
        out.append((run_pa, run_len))
    return hits, at


#: walk_run fills the IOTLB after this many walks at the latest: the entries it holds back are
#: new objects the cyclic GC counts, and its evictions free as many (a whole burst held back
#: made the collector run dozens of times per burst)
FILL_BATCH: Final = 128


def walk_run(
    tables: Filled,
    fifo: Fifo,
    capacity: int,
    tag: object,
    walk: Callable[[int, bool], tuple[int, ...]],
    new_entry: Callable[[tuple[int, int, int, int]], object],
    rule: tuple[int, int, int, int, int, int, bool],
    iova: int,
    end: int,
    write: bool,
    runs: list[tuple[int, int]],
) -> tuple[int, int, int]:
    """The IOTLB misses of a burst from ``iova`` towards ``end``, walked by ``walk`` (a
    stream's bound walker: ``walk(iova, write)`` -> ``(status, value, shift, refs, prot,
    ...)``) and cached under ``tag`` as the compiled translate front caches one miss
    (``iommufd_model.hw.xlate.Front``), page after page. ``rule`` is the stream's ``Miss``:
    ``(prot_mask, need_read, need_write, extra_read, extra_write, mem_end, clamp)``, i.e. a
    walk is clean when its status is 0, its value is below ``mem_end`` and its ``prot`` masked
    by ``prot_mask`` holds the need; the entry's perm gains the extra; ``clamp`` bounds the
    run by ``mem_end``.

    Stops before a page that has any IOTLB entry under ``tag`` or whose walk is not clean, so
    that ``translate()`` handles it (it walks again: a walk's accessed/dirty updates are the
    same the second time, and a walk that stops the burst is neither counted nor cached
    here). The entries (``new_entry((pa, shift, perm, refs))``) and their keys ``(shift, tag,
    page)`` are filled with :func:`fill` in batches, in order: pending fills change nothing a
    walk reads, but a page found cached may be one they will evict, so they run first and the
    page is looked up again. Appends ``(pa, length)`` runs to ``runs`` (continuing the last
    one when the physical address does); returns ``(walks, refs, stop)``."""
    prot_mask, need_read, need_write, extra_read, extra_write, mem_end, clamp = rule
    need = need_write if write else need_read
    extra = extra_write if write else extra_read
    walks = 0
    refs_all = 0
    keys: list[Key] = []
    entries: list[object] = []
    run_pa = -1
    run_len = 0
    if runs:
        run_pa, run_len = runs.pop()
    cached = [(shift, by_tag[tag]) for shift, by_tag in tables.items() if tag in by_tag]
    while iova < end:
        hit = False
        for shift, held in cached:
            if (iova >> shift) in held:
                hit = True
                break
        if hit:
            if not keys:
                break  # translate() finds it: not a plain miss
            fill(tables, fifo, capacity, keys, entries)  # may have evicted this page's entry
            keys.clear()
            entries.clear()
            cached = [(shift, by_tag[tag]) for shift, by_tag in tables.items() if tag in by_tag]
            continue
        res = walk(iova, write)
        status: int = res[0]
        value: int = res[1]
        if status != 0 or value >= mem_end:
            break
        prot: int = res[4] & prot_mask
        if prot & need != need:
            break
        shift = res[2]
        refs: int = res[3]
        mask = (1 << shift) - 1
        keys.append((shift, tag, iova >> shift))
        entries.append(new_entry((value & ~mask, shift, prot | extra, refs)))
        if len(keys) == FILL_BATCH:
            fill(tables, fifo, capacity, keys, entries)
            keys.clear()
            entries.clear()
            cached = [(shift, by_tag[tag]) for shift, by_tag in tables.items() if tag in by_tag]
        walks += 1
        refs_all += refs
        run = mask + 1 - (value & mask)
        if clamp and run > mem_end - value:
            run = mem_end - value
        if run > end - iova:
            run = end - iova
        if run_len and run_pa + run_len == value:  # physically contiguous: one run
            run_len += run
        else:
            if run_len:
                runs.append((run_pa, run_len))
            run_pa = value
            run_len = run
        iova += run
    if keys:
        fill(tables, fifo, capacity, keys, entries)
    if run_len:
        runs.append((run_pa, run_len))
    return walks, refs_all, iova
