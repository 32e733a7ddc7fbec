"""Interval maps over closed ``[first, last]`` ranges of u64 addresses.

The kernel keeps IOVA areas, allowed ranges and reserved ranges in augmented rb-trees
(``interval_tree``). Here each is a sorted array searched with :mod:`bisect`: a point or
overlap lookup is O(log n); insert and remove shift the arrays, which is a ``memmove`` in C
and far cheaper than any pure-Python balanced tree at the sizes an IOAS reaches. The bounds
are unsigned 64-bit machine words (``array('Q')``): 8 bytes an interval end, where a list
would add a 32-byte int object for every address above 2**30 (an IOAS of a million one-page
areas holds four such arrays).

Two containers:

* :class:`IntervalMap` -- disjoint intervals, each carrying a value (areas, allowed ranges);
* :class:`IntervalSet` -- intervals that may overlap, each tagged with an owner (reserved
  ranges: several devices may reserve the same MSI window). Queries go to a merged union
  that is rebuilt when the set changes, which is rare.

:func:`holes` walks the maximal gaps left by several containers at once (the kernel's
``interval_tree_double_span_iter``) and :func:`find_hole` is the first-fit search built on it.
"""

from __future__ import annotations

import bisect
import errno
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from iommufd_model.errors import err

U64_MAX = (1 << 64) - 1

V = TypeVar("V")


def _u64s() -> array[int]:
    """An empty array of u64 interval bounds."""
    return array("Q")


class SortedDisjoint(Protocol):
    """What :func:`holes` needs: disjoint intervals as two parallel sorted sequences."""

    @property
    def firsts(self) -> Sequence[int]: ...

    @property
    def lasts(self) -> Sequence[int]: ...


class _Bounds:
    """Two parallel sorted u64 arrays of interval bounds, the storage both containers keep,
    read through :class:`SortedDisjoint`'s ``firsts`` / ``lasts`` views (read-only by
    convention)."""

    __slots__ = ("_firsts", "_lasts")

    def __init__(self) -> None:
        self._firsts = _u64s()
        self._lasts = _u64s()

    @property
    def firsts(self) -> Sequence[int]:
        return self._firsts

    @property
    def lasts(self) -> Sequence[int]:
        return self._lasts


class Coverage(_Bounds):
    """The union of a set of intervals as maximal runs (adjacent intervals joined).

    Kept up to date incrementally, so a gap search skips a run of a thousand back-to-back
    areas in one step instead of visiting each of them.
    """

    __slots__ = ()

    def runs(self) -> list[tuple[int, int]]:
        return list(zip(self._firsts, self._lasts, strict=True))

    def add(self, first: int, last: int) -> None:
        """Cover ``[first, last]``, which must not be covered yet (EEXIST otherwise)."""
        firsts, lasts = self._firsts, self._lasts
        i = bisect.bisect_right(firsts, first)
        if (i > 0 and lasts[i - 1] >= first) or (i < len(firsts) and firsts[i] <= last):
            raise err(errno.EEXIST, f"[{first:#x}, {last:#x}] already covered")
        join_left = i > 0 and lasts[i - 1] + 1 == first
        join_right = i < len(firsts) and firsts[i] == last + 1
        if join_left and join_right:
            lasts[i - 1] = lasts[i]
            del firsts[i]
            del lasts[i]
        elif join_left:
            lasts[i - 1] = last
        elif join_right:
            firsts[i] = first
        else:
            firsts.insert(i, first)
            lasts.insert(i, last)

    def discard(self, first: int, last: int) -> None:
        """Uncover ``[first, last]`` (whatever part of it is covered)."""
        firsts, lasts = self._firsts, self._lasts
        i = bisect.bisect_right(firsts, first) - 1
        if i < 0 or lasts[i] < first:
            i += 1
        j = bisect.bisect_right(firsts, last)
        if i >= j:
            return
        keep_firsts = _u64s()
        keep_lasts = _u64s()
        if firsts[i] < first:
            keep_firsts.append(firsts[i])
            keep_lasts.append(first - 1)
        if lasts[j - 1] > last:
            keep_firsts.append(last + 1)
            keep_lasts.append(lasts[j - 1])
        firsts[i:j] = keep_firsts
        lasts[i:j] = keep_lasts

    def clear(self) -> None:
        del self._firsts[:]
        del self._lasts[:]


class IntervalMap(_Bounds, Generic[V]):
    """Disjoint closed intervals ``[first, last]`` mapped to values, sorted by ``first``.

    With ``track_coverage`` the map also keeps a :class:`Coverage` of itself for fast gap
    searches (used for IOVA areas, which automatic placement packs back to back).
    """

    __slots__ = ("_coverage", "_values")

    def __init__(self, *, track_coverage: bool = False) -> None:
        super().__init__()
        self._values: list[V] = []
        self._coverage = Coverage() if track_coverage else None

    @property
    def coverage(self) -> SortedDisjoint:
        """Maximal covered runs (the map itself when coverage is not tracked)."""
        return self if self._coverage is None else self._coverage

    def __len__(self) -> int:
        return len(self._firsts)

    def __bool__(self) -> bool:
        return bool(self._firsts)

    def __iter__(self) -> Iterator[tuple[int, int, V]]:
        return iter(list(zip(self._firsts, self._lasts, self._values, strict=True)))

    def values(self) -> list[V]:
        return list(self._values)

    # -- lookup ---------------------------------------------------------------------
    def _first_overlap_index(self, first: int, last: int) -> int:
        """Index of the lowest interval that intersects ``[first, last]``, or -1."""
        firsts = self._firsts
        i = bisect.bisect_right(firsts, first) - 1
        if i < 0 or self._lasts[i] < first:
            i += 1
        if i < len(firsts) and firsts[i] <= last:
            return i
        return -1

    def get(self, point: int) -> tuple[int, int, V] | None:
        """The interval containing ``point``."""
        i = bisect.bisect_right(self._firsts, point) - 1
        if i >= 0 and self._lasts[i] >= point:
            return self._firsts[i], self._lasts[i], self._values[i]
        return None

    def first_overlap(self, first: int, last: int) -> tuple[int, int, V] | None:
        """The lowest interval intersecting ``[first, last]`` (``interval_tree_iter_first``)."""
        i = self._first_overlap_index(first, last)
        if i < 0:
            return None
        return self._firsts[i], self._lasts[i], self._values[i]

    def overlaps(self, first: int, last: int) -> bool:
        return self._first_overlap_index(first, last) >= 0

    def overlapping(self, first: int, last: int) -> list[tuple[int, int, V]]:
        """Every interval intersecting ``[first, last]``, in address order (a snapshot)."""
        i = self._first_overlap_index(first, last)
        if i < 0:
            return []
        j = bisect.bisect_right(self._firsts, last, lo=i)
        return list(zip(self._firsts[i:j], self._lasts[i:j], self._values[i:j], strict=True))

    def next_after(self, point: int) -> tuple[int, int, V] | None:
        """The lowest interval starting strictly after ``point``."""
        i = bisect.bisect_right(self._firsts, point)
        if i < len(self._firsts):
            return self._firsts[i], self._lasts[i], self._values[i]
        return None

    # -- mutation -------------------------------------------------------------------
    def insert(self, first: int, last: int, value: V) -> None:
        """Add ``[first, last]``; EINVAL if malformed, EEXIST if it overlaps an interval."""
        if not 0 <= first <= last <= U64_MAX:
            raise err(errno.EINVAL, f"bad interval [{first:#x}, {last:#x}]")
        i = bisect.bisect_right(self._firsts, first)
        if (i > 0 and self._lasts[i - 1] >= first) or (
            i < len(self._firsts) and self._firsts[i] <= last
        ):
            raise err(errno.EEXIST, f"interval [{first:#x}, {last:#x}] overlaps")
        self._firsts.insert(i, first)
        self._lasts.insert(i, last)
        self._values.insert(i, value)
        if self._coverage is not None:
            self._coverage.add(first, last)

    def remove(self, first: int) -> V:
        """Remove the interval that starts exactly at ``first``; ENOENT if there is none."""
        i = bisect.bisect_left(self._firsts, first)
        if i == len(self._firsts) or self._firsts[i] != first:
            raise err(errno.ENOENT, f"no interval starts at {first:#x}")
        del self._firsts[i]
        last = self._lasts.pop(i)
        if self._coverage is not None:
            self._coverage.discard(first, last)
        return self._values.pop(i)

    def replace(self, first: int, value: V) -> None:
        """Give the interval that starts exactly at ``first`` a new value (ENOENT if none)."""
        i = bisect.bisect_left(self._firsts, first)
        if i == len(self._firsts) or self._firsts[i] != first:
            raise err(errno.ENOENT, f"no interval starts at {first:#x}")
        self._values[i] = value

    def remove_overlapping(self, first: int, last: int) -> list[tuple[int, int, V]]:
        """Remove and return every interval intersecting ``[first, last]`` in one step."""
        i = self._first_overlap_index(first, last)
        if i < 0:
            return []
        j = bisect.bisect_right(self._firsts, last, lo=i)
        gone = list(zip(self._firsts[i:j], self._lasts[i:j], self._values[i:j], strict=True))
        del self._firsts[i:j]
        del self._lasts[i:j]
        del self._values[i:j]
        if self._coverage is not None:
            self._coverage.discard(gone[0][0], gone[-1][1])
        return gone

    def clear(self) -> None:
        del self._firsts[:]
        del self._lasts[:]
        self._values.clear()
        if self._coverage is not None:
            self._coverage.clear()


class IntervalSet:
    """Possibly overlapping closed intervals, each tagged with an owner object.

    Queries see the union (adjacent or overlapping intervals merged); membership is kept per
    ``(first, last, owner)`` entry so that removing one owner leaves the others' coverage.
    """

    __slots__ = ("_entries", "_union")

    def __init__(self) -> None:
        self._entries: list[tuple[int, int, object]] = []
        self._union: IntervalMap[None] = IntervalMap()

    @property
    def firsts(self) -> Sequence[int]:
        return self._union.firsts

    @property
    def lasts(self) -> Sequence[int]:
        return self._union.lasts

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def entries(self) -> list[tuple[int, int, object]]:
        """All entries, sorted by start."""
        return sorted(self._entries, key=lambda e: (e[0], e[1]))

    def union(self) -> list[tuple[int, int]]:
        """The merged coverage as maximal disjoint intervals."""
        return list(zip(self._union.firsts, self._union.lasts, strict=True))

    def _rebuild(self) -> None:
        union: IntervalMap[None] = IntervalMap()
        cur_first = cur_last = -2
        for first, last, _ in sorted(self._entries, key=lambda e: e[0]):
            if first <= cur_last + 1:
                cur_last = max(cur_last, last)
                continue
            if cur_first >= 0:
                union.insert(cur_first, cur_last, None)
            cur_first, cur_last = first, last
        if cur_first >= 0:
            union.insert(cur_first, cur_last, None)
        self._union = union

    def add(self, first: int, last: int, owner: object) -> None:
        if not 0 <= first <= last <= U64_MAX:
            raise err(errno.EINVAL, f"bad interval [{first:#x}, {last:#x}]")
        self._entries.append((first, last, owner))
        self._rebuild()

    def remove_owner(self, owner: object) -> int:
        """Drop every entry tagged ``owner`` (identity); return how many went."""
        keep = [e for e in self._entries if e[2] is not owner]
        gone = len(self._entries) - len(keep)
        if gone:
            self._entries = keep
            self._rebuild()
        return gone

    def overlaps(self, first: int, last: int) -> bool:
        return self._union.overlaps(first, last)

    def clear(self) -> None:
        self._entries.clear()
        self._union.clear()


def covered_spans(container: SortedDisjoint, first: int, last: int) -> Iterator[tuple[int, int]]:
    """Maximal covered runs of ``container`` inside ``[first, last]`` (clipped).

    Adjacent intervals form one run, as with the kernel's ``interval_tree_span_iter``.
    """
    firsts, lasts = container.firsts, container.lasts
    n = len(firsts)
    i = bisect.bisect_right(firsts, first) - 1
    if i < 0 or lasts[i] < first:
        i += 1
    while i < n and firsts[i] <= last:
        start = max(firsts[i], first)
        end = lasts[i]
        while i + 1 < n and firsts[i + 1] == end + 1:
            i += 1
            end = lasts[i]
        yield start, min(end, last)
        i += 1


def _skip_covered(container: SortedDisjoint, pos: int) -> int:
    """First address >= ``pos`` not covered by ``container`` (may be ``U64_MAX + 1``)."""
    firsts, lasts = container.firsts, container.lasts
    i = bisect.bisect_right(firsts, pos) - 1
    if i < 0 or lasts[i] < pos:
        return pos
    n = len(firsts)
    end = lasts[i]
    while i + 1 < n and firsts[i + 1] == end + 1:
        i += 1
        end = lasts[i]
    return end + 1


def holes(first: int, last: int, containers: Iterable[SortedDisjoint]) -> Iterator[tuple[int, int]]:
    """Maximal ranges inside ``[first, last]`` covered by none of ``containers``, ascending."""
    conts = list(containers)
    pos = first
    while pos <= last:
        moved = True
        while moved:
            moved = False
            for c in conts:
                nxt = _skip_covered(c, pos)
                if nxt != pos:
                    pos = nxt
                    moved = True
            if pos > last:
                return
        end = last
        for c in conts:
            firsts = c.firsts
            i = bisect.bisect_right(firsts, pos)
            if i < len(firsts) and firsts[i] - 1 < end:
                end = firsts[i] - 1
        yield pos, end
        pos = end + 1


def fit_in_range(start: int, last: int, length: int, alignment: int, offset: int) -> int | None:
    """Place ``length`` bytes in ``[start, last]``: aligned start, or None if it does not fit.

    Kernel arithmetic (``__alloc_iova_check_range``): round ``start`` up to ``alignment``
    (failing on u64 overflow), then OR in ``offset``; refuse if that is not below ``last`` or
    leaves fewer than ``length`` bytes.
    """
    if start + alignment - 1 > U64_MAX:
        return None
    aligned = ((start + alignment - 1) & ~(alignment - 1)) | offset
    if aligned >= last or last - aligned < length - 1:
        return None
    return aligned


def find_hole(
    first: int,
    last: int,
    length: int,
    alignment: int,
    offset: int,
    avoid: Iterable[SortedDisjoint],
) -> int | None:
    """First fit for ``length`` bytes in ``[first, last]`` outside every ``avoid`` container.

    ``alignment`` must be a power of two; ``offset`` is OR-ed into the aligned start (the
    sub-page offset the kernel keeps for THP-friendly IOVAs). The window itself is fitted
    first and the gaps are searched from its aligned start, as ``iopt_alloc_iova`` does.
    """
    start = fit_in_range(first, last, length, alignment, offset)
    if start is None:
        return None
    for hole_first, hole_last in holes(start, last, avoid):
        found = fit_in_range(hole_first, hole_last, length, alignment, offset)
        if found is not None:
            return found
    return None
