"""PhysicalMemory: byte-exact reads and writes, and word views that never go stale."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iommufd_model.hw.memory import PAGE_SIZE, Frames, PhysicalMemory

SIZE = 64 * PAGE_SIZE


class FlatMemory:
    """The obvious reference: one bytearray."""

    def __init__(self) -> None:
        self.data = bytearray(SIZE)

    def write(self, pa: int, data: bytes) -> None:
        self.data[pa : pa + len(data)] = data

    def read(self, pa: int, n: int) -> bytes:
        return bytes(self.data[pa : pa + n])


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("w"), st.integers(0, SIZE - 1), st.binary(min_size=0, max_size=3 * PAGE_SIZE)
        ),
        st.tuples(st.just("q"), st.integers(0, SIZE // 8 - 1), st.integers(0, (1 << 64) - 1)),
        st.tuples(st.just("r"), st.integers(0, SIZE - 1), st.integers(0, 3 * PAGE_SIZE)),
        st.tuples(st.just("u"), st.integers(0, SIZE // 8 - 1), st.just(0)),
        st.tuples(
            st.just("s"), st.integers(0, SIZE - 1), st.binary(min_size=0, max_size=3 * PAGE_SIZE)
        ),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_memory_equals_a_flat_bytearray(program: list[tuple[str, int, object]]) -> None:
    mem = PhysicalMemory(SIZE)
    ref = FlatMemory()
    for op, where, arg in program:
        if op == "w":
            assert isinstance(arg, bytes)
            data = arg[: SIZE - where]
            view = random.Random(where).choice([bytes, bytearray, memoryview])(data)
            mem.write(where, view)
            ref.write(where, data)
        elif op == "s":  # the DMA engine's form: the next n bytes of a shared stream
            assert isinstance(arg, bytes)
            data = arg[: SIZE - where]
            src = io.BytesIO(b"head" + data + b"tail")
            src.seek(4)
            mem.write_stream(where, len(data), src)
            assert src.tell() == 4 + len(data)
            ref.write(where, data)
        elif op == "q":
            assert isinstance(arg, int)
            mem.write_u64(where * 8, arg)
            ref.write(where * 8, arg.to_bytes(8, "little"))
        elif op == "u":
            assert mem.read_u64(where * 8) == int.from_bytes(ref.read(where * 8, 8), "little")
        else:
            assert isinstance(arg, int)
            n = min(arg, SIZE - where)
            assert mem.read(where, n) == ref.read(where, n)
    assert mem.read(0, SIZE) == bytes(ref.data)
    for pfn, page in mem._pages.items():  # only written frames are materialised
        assert page == ref.data[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]


def test_word_views_alias_their_frame_and_go_with_it() -> None:
    mem = PhysicalMemory(SIZE)
    pfn = mem.alloc_frame()
    pa = pfn * PAGE_SIZE
    mem.write_u64(pa + 16, 0x8000_0000_0000_0001)  # bit 63 set: a negative signed word
    pages = mem._pages
    assert isinstance(pages, Frames) and isinstance(pages, dict)
    view = pages.view(pfn)
    assert view is not None and pages.has_view(pfn)
    assert view.obj is pages[pfn] and view[2] == -(1 << 63) + 1
    pages[pfn][16:24] = (5).to_bytes(8, "little")  # a write behind the memory's back (AF bits)
    assert view[2] == 5 and mem.read_u64(pa + 16) == 5
    mem.put_frame(pfn)  # freed: frame and view are gone together
    assert pfn not in pages and not pages.has_view(pfn)
    assert mem.read_u64(pa + 16) == 0 and not pages.has_view(pfn)
    again = mem.alloc_frame()
    assert again == pfn
    mem.write(pa, b"\xff" * 8)  # a fresh frame: a fresh view over it
    assert mem.read_u64(pa) == (1 << 64) - 1 and pages.view(pfn).obj is pages[pfn]  # type: ignore[union-attr]
    pages[pfn] = bytearray(PAGE_SIZE)  # replacing a frame drops its view
    assert not pages.has_view(pfn) and mem.read_u64(pa) == 0
    del pages[pfn]
    assert pages.pop(pfn, None) is None
    pages.clear()
    assert not pages.words


def test_frames_far_above_the_view_table_get_views_per_use() -> None:
    mem = PhysicalMemory(1 << 44)
    pa = (1 << 43) + 0x1238
    mem.write_u64(pa & ~7, 0x1122334455667788)
    assert mem.read_u64(pa & ~7) == 0x1122334455667788
    assert not mem._pages.has_view(pa >> 12) and len(mem._pages.words) == 0


def test_zero_length_and_out_of_range_accesses() -> None:
    mem = PhysicalMemory(SIZE)
    mem.write(SIZE, b"")  # nothing to write, nothing materialised
    assert mem.read(SIZE, 0) == b"" and not mem._pages
    for bad in (lambda: mem.read(SIZE - 4, 8), lambda: mem.write(SIZE - 4, b"x" * 8),
                lambda: mem.read_u64(SIZE), lambda: mem.write_u64(4, 1),
                lambda: mem.read_u64(-8)):
        with pytest.raises(OSError):
            bad()
    mem.write_u64(8, -1)  # values are taken modulo 2**64, as before
    assert mem.read_u64(8) == (1 << 64) - 1
