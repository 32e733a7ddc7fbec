"""IntervalMap / IntervalSet / holes / find_hole against brute force over a small universe."""

from __future__ import annotations

import errno
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iommufd_model.core.intervals import (
    U64_MAX,
    IntervalMap,
    IntervalSet,
    covered_spans,
    find_hole,
    fit_in_range,
    holes,
)
from iommufd_model.testing import assert_errno

UNIVERSE = 96  # addresses 0..95 keep brute force cheap


def _points(first: int, last: int) -> set[int]:
    return set(range(first, last + 1))


def _maximal_runs(points: set[int], lo: int, hi: int, covered: bool) -> list[tuple[int, int]]:
    """Maximal runs in [lo, hi] whose membership in ``points`` equals ``covered``."""
    runs: list[tuple[int, int]] = []
    start = None
    for x in range(lo, hi + 2):
        inside = x <= hi and (x in points) == covered
        if inside and start is None:
            start = x
        elif not inside and start is not None:
            runs.append((start, x - 1))
            start = None
    return runs


intervals_st = st.lists(
    st.tuples(st.integers(0, UNIVERSE - 1), st.integers(0, 12)).map(
        lambda t: (t[0], min(UNIVERSE - 1, t[0] + t[1]))
    ),
    max_size=12,
)


def _disjoint_map(candidates: list[tuple[int, int]]) -> tuple[IntervalMap[int], set[int]]:
    imap: IntervalMap[int] = IntervalMap()
    covered: set[int] = set()
    for n, (first, last) in enumerate(candidates):
        span = _points(first, last)
        if span & covered:
            assert_errno(errno.EEXIST, partial(imap.insert, first, last, n))
            continue
        imap.insert(first, last, n)
        covered |= span
    return imap, covered


class TestIntervalMap:
    def test_basic(self) -> None:
        m: IntervalMap[str] = IntervalMap()
        m.insert(10, 19, "a")
        m.insert(30, 30, "b")
        m.insert(20, 29, "c")
        assert [v for _, _, v in m] == ["a", "c", "b"]
        assert m.get(9) is None and m.get(10) == (10, 19, "a") and m.get(30) == (30, 30, "b")
        assert m.first_overlap(0, 10) == (10, 19, "a")
        assert m.first_overlap(31, 100) is None
        assert [v for _, _, v in m.overlapping(15, 30)] == ["a", "c", "b"]
        assert m.next_after(19) == (20, 29, "c")
        assert m.remove(20) == "c"
        assert not m.overlaps(20, 29)
        with pytest.raises(OSError) as e:
            m.remove(21)
        assert e.value.errno == errno.ENOENT
        with pytest.raises(OSError) as e:
            m.insert(5, 4, "bad")
        assert e.value.errno == errno.EINVAL

    def test_full_u64(self) -> None:
        m: IntervalMap[None] = IntervalMap()
        m.insert(0, U64_MAX, None)
        assert m.get(U64_MAX) == (0, U64_MAX, None)
        assert list(holes(0, U64_MAX, [m])) == []
        with pytest.raises(OSError):
            m.insert(U64_MAX, U64_MAX + 1, None)

    @given(intervals_st, st.integers(0, UNIVERSE - 1), st.integers(0, UNIVERSE - 1))
    def test_against_brute_force(self, candidates: list[tuple[int, int]], a: int, b: int) -> None:
        imap, covered = _disjoint_map(candidates)
        first, last = min(a, b), max(a, b)
        window = _points(first, last)
        got = imap.overlapping(first, last)
        assert all(_points(f, la) & window for f, la, _ in got)
        expect = [(f, la) for f, la, _ in imap if _points(f, la) & window]
        assert [(f, la) for f, la, _ in got] == expect
        assert imap.overlaps(first, last) == bool(covered & window)
        hit = imap.get(a)
        assert (hit is not None) == (a in covered)
        if hit is not None:
            assert hit[0] <= a <= hit[1]
        assert list(holes(first, last, [imap])) == _maximal_runs(covered, first, last, False)
        assert list(covered_spans(imap, first, last)) == _maximal_runs(covered, first, last, True)


class TestCoverage:
    @given(intervals_st, st.lists(st.tuples(st.integers(0, UNIVERSE - 1), st.integers(0, 20))))
    def test_tracks_union_through_inserts_and_removes(
        self, candidates: list[tuple[int, int]], removals: list[tuple[int, int]]
    ) -> None:
        imap, covered = _disjoint_map(candidates)
        tracked: IntervalMap[int] = IntervalMap(track_coverage=True)
        for first, last, v in imap:
            tracked.insert(first, last, v)
        assert list(zip(tracked.coverage.firsts, tracked.coverage.lasts, strict=True)) == (
            _maximal_runs(covered, 0, UNIVERSE - 1, True)
        )
        for at, span in removals:
            got = tracked.first_overlap(at, at + span)
            if got is None:
                continue
            if span % 2:
                gone = tracked.remove_overlapping(at, at + span)
            else:
                gone = [(got[0], got[1], tracked.remove(got[0]))]
            for first, last, _ in gone:
                covered -= _points(first, last)
            runs = list(zip(tracked.coverage.firsts, tracked.coverage.lasts, strict=True))
            assert runs == _maximal_runs(covered, 0, UNIVERSE - 1, True)
        assert list(holes(0, UNIVERSE - 1, [tracked.coverage])) == list(
            holes(0, UNIVERSE - 1, [tracked])
        )


class TestIntervalSet:
    def test_overlapping_owners(self) -> None:
        s = IntervalSet()
        a, b = object(), object()
        s.add(10, 20, a)
        s.add(15, 30, b)
        s.add(31, 40, a)
        assert s.union() == [(10, 40)]
        assert s.remove_owner(a) == 2
        assert s.union() == [(15, 30)]
        assert not s.overlaps(31, 40) and s.overlaps(0, 15)
        assert s.remove_owner(a) == 0

    @given(intervals_st, st.lists(st.booleans(), max_size=12))
    def test_union_matches_brute_force(
        self, candidates: list[tuple[int, int]], drop: list[bool]
    ) -> None:
        owners = [object() for _ in candidates]
        s = IntervalSet()
        for (first, last), owner in zip(candidates, owners, strict=True):
            s.add(first, last, owner)
        kept: set[int] = set()
        drops = drop + [False] * len(candidates)
        for (first, last), owner, gone in zip(candidates, owners, drops, strict=False):
            if gone:
                s.remove_owner(owner)
            else:
                kept |= _points(first, last)
        assert s.union() == _maximal_runs(kept, 0, UNIVERSE - 1, True)
        for x in range(UNIVERSE):
            assert s.overlaps(x, x) == (x in kept)


def _brute_find(
    first: int, last: int, length: int, alignment: int, offset: int, covered: set[int]
) -> int | None:
    """The kernel's algorithm restated over a set of covered addresses."""

    def fit(start: int, end: int) -> int | None:
        aligned = (-(-start // alignment) * alignment) | offset
        if aligned >= end or end - aligned < length - 1:
            return None
        return aligned

    start = fit(first, last)
    if start is None:
        return None
    for hole_first, hole_last in _maximal_runs(covered, start, last, False):
        found = fit(hole_first, hole_last)
        if found is not None:
            return found
    return None


class TestFindHole:
    @settings(max_examples=300)
    @given(
        intervals_st,
        intervals_st,
        st.integers(0, UNIVERSE - 1),
        st.integers(0, UNIVERSE - 1),
        st.integers(1, 20),
        st.sampled_from([1, 2, 4, 8, 16]),
        st.sampled_from([0, 0, 0, 1, 3]),
    )
    def test_against_brute_force(
        self,
        c1: list[tuple[int, int]],
        c2: list[tuple[int, int]],
        a: int,
        b: int,
        length: int,
        alignment: int,
        offset: int,
    ) -> None:
        m1, cov1 = _disjoint_map(c1)
        s2 = IntervalSet()
        cov2: set[int] = set()
        for first, last in c2:
            s2.add(first, last, None)
            cov2 |= _points(first, last)
        first, last = min(a, b), max(a, b)
        got = find_hole(first, last, length, alignment, offset, [m1, s2])
        assert got == _brute_find(first, last, length, alignment, offset, cov1 | cov2)
        if got is not None and got + length - 1 <= last:
            assert not (_points(got, got + length - 1) & (cov1 | cov2))
            assert got >= first

    def test_alignment_and_offset(self) -> None:
        m: IntervalMap[None] = IntervalMap()
        m.insert(0x1000, 0x1FFF, None)
        # Skips the used page and keeps the 0x10 sub-page offset of the source address.
        assert find_hole(0x1000, 0xFFFF, 0x100, 0x10, 0x10, [m]) == 0x2010
        # Kernel arithmetic: the window start is aligned and OR-ed, then the first hole is
        # aligned again, so offset bits above the alignment push the start one step on.
        assert find_hole(0x1000, 0xFFFF, 0x100, 0x2000, 0x10, [m]) == 0x4010
        # The kernel refuses a hole whose aligned start equals its last byte.
        assert fit_in_range(5, 5, 1, 1, 0) is None
        assert fit_in_range(U64_MAX - 1, U64_MAX, 1, 1 << 20, 0) is None
