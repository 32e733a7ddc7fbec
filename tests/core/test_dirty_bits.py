"""GET_DIRTY_BITMAP's bits built in bulk (core/dirty_bits.py, core/_dirty_bits.c) against the
group-by-group path: the same bitmap bytes, D bits, errnos and user-memory accesses.

Facts from Linux 7.2: drivers/iommu/iommufd/{iova_bitmap.c, io_pagetable.c, hw_pagetable.c}.
"""

from __future__ import annotations

import random
from itertools import pairwise
from typing import Any

import pytest

from helpers import MOCK_APERTURE, PAGE, World, mock_domain
from iommufd_model.core import dirty_bits as D
from iommufd_model.core import hw_pagetable as H
from iommufd_model.uapi import iommufd as U

K2 = 2048
U64 = (1 << 64) - 1


def _literal(
    runs: list[tuple[int, int]], start: int, last: int, shift: int, max_bytes: int
) -> tuple[int, bytes] | None:
    """span_bits() bit by bit, straight from its docstring."""
    if not runs or shift > 63 or last < start:
        return None
    spans = []
    for iova, size in runs:
        end = iova + size - 1
        if size <= 0 or iova < 0 or end > U64 or iova > last or end < start:
            return None
        spans.append(((max(iova, start) - start) >> shift, (min(end, last) - start) >> shift))
    pairs = pairwise(spans)
    if any(b[0] < a[0] or b[1] < a[1] for a, b in pairs):
        return None
    base = spans[0][0] >> 3
    nbytes = (spans[-1][1] >> 3) - base + 1
    if nbytes > max_bytes:
        return None
    out = bytearray(nbytes)
    for first, last_bit in spans:
        for bit in range(first, last_bit + 1):
            out[(bit >> 3) - base] |= 1 << (bit & 7)
    return base, bytes(out)


def _random_runs(rnd: random.Random) -> tuple[list[tuple[int, int]], int, int, int]:
    shift = rnd.choice([0, 3, 11, 12, 13, 21, 63, 64])
    start = rnd.choice([0, MOCK_APERTURE, rnd.randrange(1 << 40) & ~0xFFF, U64 - (1 << 30)])
    last = start + rnd.randrange(1, 1 << rnd.choice([12, 20, 28])) - 1
    runs, at = [], start - rnd.choice([0, 0, K2, PAGE])
    for _ in range(rnd.randrange(0, 40)):
        at += rnd.choice([0, 0, K2, PAGE, rnd.randrange(1 << 20)])
        size = rnd.choice([K2, PAGE, 3 * K2, rnd.randrange(1, 1 << 22)])
        runs.append((at, size))
        at += size
    if runs and rnd.random() < 0.15:
        rnd.shuffle(runs)
    if runs and rnd.random() < 0.1:
        runs[rnd.randrange(len(runs))] = rnd.choice([(-1, K2), (1 << 64, K2), (start, 0)])
    return runs, start, last, shift


def _span_bits_differ(seed: int, impl: Any) -> str | None:
    rnd = random.Random(seed)
    for _ in range(20):
        runs, start, last, shift = _random_runs(rnd)
        max_bytes = rnd.choice([1, 64, 1 << 16])
        if start > U64 or last > U64:
            continue
        want = _literal(runs, start, last, shift, max_bytes)
        got = impl(runs, start, last, shift, max_bytes)
        if got != want:
            return f"{runs} [{start:#x}, {last:#x}] >> {shift}: {got} != {want}"
    return None


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("seed", range(40))
def test_span_bits_equals_the_literal_bits(seed: int, impl: str) -> None:
    if impl == "c" and D._C is None:
        pytest.skip("core/_dirty_bits.c is not built (IOMMUFD_MODEL_PURE=1)")
    fn = D._C.span_bits if impl == "c" and D._C is not None else D._span_bits
    assert _span_bits_differ(seed, fn) is None


def test_the_span_bits_test_catches_a_break() -> None:
    """A deliberate break (each span one bit short at its end) is found."""

    def short(runs: list[tuple[int, int]], *args: Any) -> tuple[int, bytes] | None:
        return D.span_bits([(iova, max(size - 1, 1)) for iova, size in runs], *args)

    assert any(_span_bits_differ(seed, short) for seed in range(40))


def _get_trace(seed: int, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """A random dirty-tracking session on the mock; everything a GET_DIRTY_BITMAP shows:
    its errno, the bitmap's bytes, the table's entries and dirty index, and every user read
    and write (address and length) the core made, in order."""
    rnd = random.Random(seed)
    w = World(buf_len=8 << 20)
    ioas = w.fd.ioas_alloc()
    at = 0
    while at < 6 << 20:
        size = rnd.choice([PAGE, 16 * PAGE, 1 << 20, 2 << 20])
        if rnd.random() < 0.8 and at + size <= w.buf_len:
            w.fd.ioas_map(ioas, w.va + at, size, iova=MOCK_APERTURE + at)
        at += size
    hwpt = w.fd.hwpt_alloc(w.dev_id, ioas, flags=U.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    w.fd.attach(w.dev_id, hwpt)
    w.fd.hwpt_set_dirty_tracking(hwpt, True)
    pt = mock_domain(w.fd, hwpt).pt
    bitmap_va = w.proc.mmap(4 * PAGE)
    if rnd.random() < 0.3:
        w.proc.munmap(bitmap_va + rnd.randrange(4) * PAGE, PAGE)  # bits there are dropped
    log: list[Any] = []
    real_read, real_write = w.proc.read, w.proc.write

    def read(va: int, n: int, **kw: Any) -> bytes:
        log.append(("read", va, n))
        return real_read(va, n, **kw)

    def write(va: int, data: Any, **kw: Any) -> None:
        log.append(("write", va, len(data)))
        real_write(va, data, **kw)

    monkeypatch.setattr(w.proc, "read", read)
    monkeypatch.setattr(w.proc, "write", write)
    for _ in range(6):
        page_size = rnd.choice([K2, PAGE, 4 * PAGE, 1 << 20])
        pattern = bytes(rnd.choice([0, 0x55, 0xFF, 1, rnd.randrange(256)]) for _ in range(512))
        pt.set_dirty_bits(MOCK_APERTURE, rnd.choice([K2, PAGE, 8 * PAGE]), pattern, 4096)
        first = rnd.randrange(0, 6 << 20) // page_size * page_size
        length = max(page_size, rnd.randrange(0, (6 << 20) - first) // page_size * page_size)
        data = bitmap_va + rnd.choice([0, 8, 0xFF1, PAGE - 3, 2 * PAGE + 5])
        st = U.IommuHwptGetDirtyBitmap(
            size=U.IommuHwptGetDirtyBitmap.SIZE,
            hwpt_id=hwpt,
            flags=rnd.choice([0, U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR]),
            iova=MOCK_APERTURE + first,
            length=length,
            page_size=page_size,
            data=data,
        )
        log.append(("get", first, length, page_size, st.flags, data - bitmap_va))
        try:
            w.fd.ioctl(U.IOMMU_HWPT_GET_DIRTY_BITMAP, bytearray(st.pack()))
            log.append(("ok",))
        except OSError as exc:
            log.append(("errno", exc.errno))
        log.append(
            [
                w.proc.is_mapped(bitmap_va + p * PAGE, PAGE)
                and real_read(bitmap_va + p * PAGE, PAGE)
                for p in range(4)
            ]
        )
        log.append((dict(pt.entries), set(pt.dirty)))
    return log


def _bulk_differs(seed: int, monkeypatch: pytest.MonkeyPatch) -> bool:
    with monkeypatch.context() as m:
        bulk = _get_trace(seed, m)
    with monkeypatch.context() as m:
        m.setattr(H, "span_bits", lambda *args: None)  # group by group, as before
        grouped = _get_trace(seed, m)
    return bulk != grouped


@pytest.mark.parametrize("seed", range(12))
def test_bulk_bits_do_what_group_by_group_does(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _bulk_differs(seed, monkeypatch)


def test_the_bulk_test_catches_a_break(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deliberate break of the bulk bits (the last byte's bits dropped) is found."""
    real = D.span_bits

    def broken(*args: Any) -> tuple[int, bytes] | None:
        got = real(*args)
        return None if got is None else (got[0], got[1][:-1] + b"\0")

    monkeypatch.setattr(H, "span_bits", broken)
    found = False
    for seed in range(12):
        with monkeypatch.context() as m:
            bulk = _get_trace(seed, m)
        with monkeypatch.context() as m:
            m.setattr(H, "span_bits", lambda *args: None)
            grouped = _get_trace(seed, m)
        found = found or bulk != grouped
    assert found
