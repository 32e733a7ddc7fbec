"""Device DMA under a run sees the program's memory (run/process.py ``DmaCoherence``): the
frames a DMA read covers are refreshed from the program first, a DMA write reaches the
program at once, and the core's CPU copies (``memory.write``) are not written back twice.

The program's memory here is a memfd of the test's own (a shared mapping's file, as the
preload makes one of every shared anonymous mapping)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from iommufd_model.run.process import DmaCoherence, Mirrors, RealMemFile


@pytest.fixture
def setup() -> Iterator[tuple[PhysicalMemory, RealMemFile, DmaCoherence]]:
    memory = PhysicalMemory(1 << 30)
    mirrors = Mirrors(memory)
    fd = os.memfd_create("dma-test")
    os.ftruncate(fd, 4 * PAGE_SIZE)
    file = RealMemFile(memory, fd, mirrors)
    dma = DmaCoherence(memory, mirrors)
    yield memory, file, dma
    dma.close()
    file.close()


def test_dma_reads_and_writes_follow_the_program(
    setup: tuple[PhysicalMemory, RealMemFile, DmaCoherence],
) -> None:
    memory, file, _ = setup
    pfns = [file.mapped_pfn(i) for i in range(2)]
    assert pfns[1] == pfns[0] + 1  # a run of contiguous frames
    # the program writes after its pages got frames: a DMA read sees the bytes now
    os.pwrite(file.fd, b"descriptor", PAGE_SIZE - 4)
    assert memory.read_runs([((pfns[0] << PAGE_SHIFT) + PAGE_SIZE - 4, 10)]) == b"descriptor"
    # a DMA write (the engine's write_from) lands in the program at once
    memory.write_from((pfns[1] << PAGE_SHIFT) + 8, b"xxcompletionxx", 2, 10)
    assert os.pread(file.fd, 10, PAGE_SIZE + 8) == b"completion"


def test_cpu_writes_are_not_pushed_and_close_unwraps(
    setup: tuple[PhysicalMemory, RealMemFile, DmaCoherence],
) -> None:
    memory, file, dma = setup
    pfn = file.mapped_pfn(0)
    memory.write(pfn << PAGE_SHIFT, b"cpu")  # the core syncs its own CPU copies
    assert os.pread(file.fd, 3, 0) == b"\0\0\0"
    dma.close()
    assert "read_runs" not in vars(memory) and "write_from" not in vars(memory)
    memory.write_from(pfn << PAGE_SHIFT, b"dma", 0, 3)
    assert os.pread(file.fd, 3, 0) == b"\0\0\0"
