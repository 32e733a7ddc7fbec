"""One-page areas kept as rows (io_pagetable.py's packed ints) behave exactly as the
``Area``/``Pages`` objects they stand for: the same sequence of operations, run once with
rows and once with them turned off, gives the same results, errnos, areas, lookups, pins,
accounting and domain contents at every step."""

from __future__ import annotations

import errno
from collections.abc import Callable
from functools import partial

import pytest

from iommufd_model.core.io_pagetable import IoPagetable
from iommufd_model.driver import IOMMU_READ

from .test_io_pagetable import RW, FakeAccess, FakeDomain, World

PAGE = 4096


def observe(w: World) -> tuple[object, ...]:
    """Everything observable about the IOAS, its pages and the process."""
    iopt = w.iopt
    pages_ids: dict[int, int] = {}
    areas = []
    for iova, last, prot, pages, start_byte in iopt.areas():
        key = pages_ids.setdefault(id(pages), len(pages_ids))
        areas.append((iova, last, prot, key, start_byte, pages.refs, pages.npinned))
    lookups = [iopt.lookup(iova) for iova, *_ in areas]
    refs = w.refs(w.buffer, 16 * PAGE)
    maps = [sorted(d.maps) for d in w.domains]
    return tuple(areas), tuple(lookups), tuple(refs), w.proc.locked_pages, repr(maps)


def scenario(w: World, steps: list[tuple[object, object]]) -> None:
    """IOAS_MAP of one-page areas, then everything that turns rows into objects."""
    iopt, va = w.iopt, w.buffer
    base = w.base_iova + (1 << 20)

    def step(fn: Callable[[], object]) -> None:
        try:
            got: object = fn()
        except OSError as e:
            got = ("errno", e.errno)
        steps.append((got, observe(w)))

    for i in range(8):
        step(partial(iopt.map_user, w.proc, va + i * PAGE, PAGE, base + 2 * i * PAGE, RW))
    step(lambda: iopt.map_user(w.proc, va + 9 * PAGE, PAGE, None, IOMMU_READ))
    step(lambda: iopt.map_user(w.proc, va, PAGE, base, RW))  # EEXIST
    step(lambda: iopt.unmap(base, 2 * PAGE))  # the first area only
    step(lambda: iopt.unmap(base + 2 * PAGE, PAGE // 2))  # ENOENT: would split
    dst = IoPagetable(w.memory)
    step(lambda: dst.copy_from(iopt, base + 4 * PAGE, PAGE, 1 << 30, RW))
    access = FakeAccess(iopt)
    step(lambda: iopt.add_access(access))
    step(lambda: access.pin(base + 6 * PAGE, PAGE))
    step(lambda: iopt.access_rw(base + 8 * PAGE, 16, False))
    step(lambda: iopt.access_rw(base + 10 * PAGE, b"rows", True))
    step(lambda: iopt.unmap(base + 6 * PAGE, PAGE))  # the access lets go when told
    domain = FakeDomain(PAGE | (2 << 20), 0, (1 << 48) - 1)
    step(lambda: iopt.add_domain(domain))
    w.domains.append(domain)
    step(lambda: iopt.map_user(w.proc, va + 12 * PAGE, PAGE, base + 24 * PAGE, RW))
    step(lambda: iopt.remove_domain(domain))
    w.domains.remove(domain)
    step(lambda: iopt.map_user(w.proc, va + 13 * PAGE, PAGE, base + 26 * PAGE, RW))
    step(lambda: dst.unmap_all())
    step(lambda: iopt.unmap_all())


@pytest.mark.parametrize("ndomains", [0, 1, 2])
def test_rows_match_objects(ndomains: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rows_seen: list[int] = []
    real_row = IoPagetable._row

    def counting_row(self: IoPagetable, area: object) -> object:
        got = real_row(self, area)  # type: ignore[arg-type]
        rows_seen.append(isinstance(got, int))
        return got

    with_rows: list[tuple[object, object]] = []
    monkeypatch.setattr(IoPagetable, "_row", counting_row)
    scenario(World(ndomains, domain=lambda: FakeDomain(PAGE | (2 << 20))), with_rows)
    assert sum(rows_seen) >= 8  # the one-page maps were rows

    without_rows: list[tuple[object, object]] = []
    monkeypatch.setattr(IoPagetable, "_row", lambda self, area: area)
    scenario(World(ndomains, domain=lambda: FakeDomain(PAGE | (2 << 20))), without_rows)
    assert with_rows == without_rows
    assert ("errno", errno.EEXIST) in [got for got, _ in with_rows]
    assert ("errno", errno.ENOENT) in [got for got, _ in with_rows]
