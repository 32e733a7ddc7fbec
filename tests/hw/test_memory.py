"""PhysicalMemory: byte-exact reads and writes over ``vec[i64]`` frames, whichever way whole
frames are written, and a walker index that always names the frame the dict holds."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iommufd_model.hw import memory
from iommufd_model.hw.memory import (
    PAGE_SIZE,
    WORDS_PER_FRAME,
    Frame,
    Frames,
    PhysicalMemory,
    new_frame,
)

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
        st.tuples(  # a DMA read's runs
            st.just("R"),
            st.just(0),
            st.lists(
                st.tuples(st.integers(0, SIZE - 1), st.integers(0, 2 * PAGE_SIZE)), max_size=4
            ),
        ),
    ),
    max_size=30,
)


@pytest.fixture(params=[True, False], ids=["in-place", "rebuilt"])
def fill_mode(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Whole-frame writes and DMA reads both ways: filled in place and copied out
    (hw/frame_copy.c, when built), and rebuilt from the source and gathered (the pure
    build's paths)."""
    in_place = bool(request.param)
    if in_place and memory._COPY is None:
        pytest.skip("frame_copy is not built in this build")
    saved = memory._IN_PLACE, memory._COPY_OUT
    memory._IN_PLACE = memory._COPY_OUT = in_place
    yield in_place
    memory._IN_PLACE, memory._COPY_OUT = saved


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops)
def test_memory_equals_a_flat_bytearray(
    fill_mode: bool, program: list[tuple[str, int, object]]
) -> None:
    mem = PhysicalMemory(SIZE)
    ref = FlatMemory()
    for op, where, arg in program:
        if op == "w":
            assert isinstance(arg, bytes)
            data = arg[: SIZE - where]
            view = random.Random(where).choice([bytes, bytearray, memoryview])(data)
            mem.write(where, view)
            ref.write(where, data)
        elif op == "q":
            assert isinstance(arg, int)
            mem.write_u64(where * 8, arg)
            ref.write(where * 8, arg.to_bytes(8, "little"))
        elif op == "u":
            assert mem.read_u64(where * 8) == int.from_bytes(ref.read(where * 8, 8), "little")
        elif op == "R":
            assert isinstance(arg, list)
            runs = [(pa, min(n, SIZE - pa)) for pa, n in arg]
            reads = mem.reads
            assert mem.read_runs(runs) == b"".join(ref.read(pa, n) for pa, n in runs)
            assert mem.reads == reads + len(runs)
        else:
            assert isinstance(arg, int)
            n = min(arg, SIZE - where)
            assert mem.read(where, n) == ref.read(where, n)
    assert mem.read(0, SIZE) == bytes(ref.data)
    for pfn, page in mem._pages.items():  # only written frames are materialised
        assert bytes(page) == ref.data[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]
        assert _aliases(mem._pages.indexed(pfn), page)


def _aliases(indexed: Frame | None, frame: Frame) -> bool:
    """Whether the index's entry is ``frame``'s word buffer (a vec loses its identity when it
    is stored in a nested vec): a store through one shows in the other."""
    if indexed is None or indexed is frame:
        return indexed is frame
    old = frame[0]
    frame[0] = ~old
    seen = indexed[0]
    frame[0] = old
    return seen == ~old and list(indexed) == list(frame)


def test_frames_are_word_arrays_indexed_beside_the_dict() -> None:
    mem = PhysicalMemory(SIZE)
    pfn = mem.alloc_frame()
    pa = pfn * PAGE_SIZE
    mem.write_u64(pa + 16, 0x8000_0000_0000_0001)  # bit 63 set: a negative signed word
    pages = mem._pages
    assert isinstance(pages, Frames) and isinstance(pages, dict)
    frame = pages[pfn]
    assert type(frame) is Frame and len(frame) == WORDS_PER_FRAME
    assert frame[2] == -(1 << 63) + 1 and _aliases(pages.indexed(pfn), frame)
    frame[2] = 5  # a store behind the memory's back (a walker setting A/D bits)
    assert mem.read_u64(pa + 16) == 5 and mem.read(pa + 16, 8) == (5).to_bytes(8, "little")
    mem.write(pa + 17, b"\x01")  # a short write stores into the same frame
    assert pages[pfn] is frame and frame[2] == 0x105
    mem.write(pa + 100, b"\x07" * 2000)  # a long one: in place (frame_copy) or rebuilt
    assert (pages[pfn] is frame) == memory._IN_PLACE
    assert _aliases(pages.indexed(pfn), pages[pfn])  # the index follows either way
    assert mem.read_u64(pa + 16) == 0x105 and mem.read(pa + 100, 2000) == b"\x07" * 2000
    mem.put_frame(pfn)  # freed: frame and index entry are gone together
    assert pfn not in pages and pages.indexed(pfn) is None and len(pages.words[pfn]) == 0
    assert mem.read_u64(pa + 16) == 0
    pages[pfn] = new_frame()
    del pages[pfn]
    assert pages.pop(pfn, None) is None and pages.indexed(pfn) is None
    pages.put_run(4094, [new_frame() for _ in range(4)])  # the index grows to hold them
    assert all(_aliases(pages.indexed(p), pages[p]) for p in range(4094, 4098))
    pages.clear()
    assert not pages.words and pages.indexed(4094) is None


def test_frames_far_above_the_index_live_in_the_dict_alone() -> None:
    mem = PhysicalMemory(1 << 44)
    pa = (1 << 43) + 0x1238
    mem.write_u64(pa & ~7, 0x1122334455667788)
    assert mem.read_u64(pa & ~7) == 0x1122334455667788
    mem.write(pa - 0x1238, b"\x01" * 3 * PAGE_SIZE)
    assert mem.read(pa - 0x1238, 3 * PAGE_SIZE) == b"\x01" * 3 * PAGE_SIZE
    assert len(mem._pages) == 3 and len(mem._pages.words) == 0


def test_zero_length_and_out_of_range_accesses() -> None:
    mem = PhysicalMemory(SIZE)
    mem.write(SIZE, b"")  # nothing to write, nothing materialised
    assert mem.read(SIZE, 0) == b"" and not mem._pages
    for bad in (
        lambda: mem.read(SIZE - 4, 8),
        lambda: mem.write(SIZE - 4, b"x" * 8),
        lambda: mem.read_u64(SIZE),
        lambda: mem.write_u64(4, 1),
        lambda: mem.read_u64(-8),
    ):
        with pytest.raises(OSError):
            bad()
    mem.write_u64(8, -1)  # values are taken modulo 2**64, as before
    assert mem.read_u64(8) == (1 << 64) - 1


def test_long_writes_cross_the_frame_batches(fill_mode: bool) -> None:
    mem = PhysicalMemory(1 << 24)
    data = random.Random(7).randbytes(600 * PAGE_SIZE + 100)
    mem.write(PAGE_SIZE - 50, data)  # a head, 600 whole frames in three batches, a tail
    assert mem.read(PAGE_SIZE - 50, len(data)) == data
    assert len(mem._pages) == 602


def test_frame_copy_writes_spans_into_the_frames_in_place() -> None:
    """hw/frame_copy.c's write_span writes what item stores would, into the frames themselves
    (a store shows through every reference to the frame, the walkers' index included), makes
    the frames a span reaches first through ``materialise``, and refuses a span beyond its
    source and frames that are not 4 KiB."""
    if memory._COPY is None:
        pytest.skip("frame_copy is not built in this build")
    copy = memory._COPY
    mem = PhysicalMemory(SIZE)
    src = random.Random(3).randbytes(5 * PAGE_SIZE + 24)
    mem.write(PAGE_SIZE, bytes(PAGE_SIZE) + b"\x05" * PAGE_SIZE)  # frames 1 and 2 exist
    frames = [mem._pages[1], mem._pages[2]]
    made: list[int] = []

    def materialise(pfn: int) -> Frame:
        made.append(pfn)
        return mem._materialise(pfn)

    copy.write_span(mem._pages, PAGE_SIZE + 100, src, 24, 3 * PAGE_SIZE, materialise)
    assert made == [3, 4]
    assert mem.read(PAGE_SIZE + 100, 3 * PAGE_SIZE) == src[24 : 24 + 3 * PAGE_SIZE]
    assert mem.read(PAGE_SIZE, 100) == bytes(100)  # the head's frame keeps what lies before
    assert mem.read(4 * PAGE_SIZE + 100, 16) == bytes(16)  # ... the tail's what lies after
    assert frames == [mem._pages[1], mem._pages[2]]  # the same frames, written in place
    assert bytes(frames[1]) == src[24 + PAGE_SIZE - 100 : 24 + 2 * PAGE_SIZE - 100]
    assert all(_aliases(mem._pages.indexed(p), mem._pages[p]) for p in range(1, 5))
    with pytest.raises(ValueError):
        copy.write_span(mem._pages, 0, src, 25, len(src) - 24, materialise)  # one byte short
    with pytest.raises(ValueError):
        copy.write_span({0: Frame([1, 2])}, 0, src, 0, 8, materialise)
    with pytest.raises(TypeError):
        copy.write_span(list(mem._pages.items()), 0, src, 0, 8, materialise)
    with pytest.raises(ZeroDivisionError):
        copy.write_span(mem._pages, 40 * PAGE_SIZE, src, 0, 8, lambda pfn: 1 // 0)
    assert made == [3, 4] and 40 not in mem._pages


def test_frame_copy_reads_runs_out_of_the_frames() -> None:
    """hw/frame_copy.c's read_runs: the runs' bytes in order, zeros where no frame was
    written, nothing for no runs; it refuses what is not a list of (pa, length) tuples of
    ints, and the memory refuses a run beyond its end (EFAULT) before any copy."""
    if memory._COPY is None:
        pytest.skip("frame_copy is not built in this build")
    mem = PhysicalMemory(SIZE)
    data = random.Random(4).randbytes(3 * PAGE_SIZE)
    mem.write(PAGE_SIZE + 8, data)
    runs = [(PAGE_SIZE * 3 + 5, PAGE_SIZE + 9), (0, 20), (PAGE_SIZE, 3 * PAGE_SIZE)]
    expect = b"".join(mem.read(pa, n) for pa, n in runs)
    assert mem.read_runs(runs) == expect and expect[PAGE_SIZE + 9 :][:20] == bytes(20)
    assert mem.read_runs([]) == b""
    copy = memory._COPY
    for bad, error in (
        ([(0, 1, 2)], TypeError),
        ([(0.0, 1)], TypeError),
        ([[0, 1]], TypeError),
        ([(-1, 1)], ValueError),
        ([(0, -1)], ValueError),
    ):
        with pytest.raises(error):
            copy.read_runs(mem._pages, bad)
    with pytest.raises(TypeError):
        copy.read_runs(mem._pages, tuple(runs))
    with pytest.raises(OSError):
        mem.read_runs([(0, 8), (SIZE - 4, 8)])
