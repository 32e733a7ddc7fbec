"""The DMA engine: bytes through any run layout, runs read as they are translated."""

from __future__ import annotations

import random
from typing import Any

import pytest

from iommufd_model.hw.iommu import DmaFault, IommuHw
from iommufd_model.hw.memory import PAGE_SIZE, PhysicalMemory


class Machine:
    def __init__(self) -> None:
        self.memory = PhysicalMemory(1 << 30)


class ScrambledIommu(IommuHw):
    """IOVA page i maps to frame ``frames[i]``; runs are ``run`` bytes; every translation
    bumps a counter byte in ``marker`` (as a walk's A/D update changes table memory)."""

    def __init__(self, run: int, pages: int, marker: int) -> None:
        super().__init__(Machine(), 0)  # type: ignore[arg-type]
        self.run = run
        self.frames = list(range(16, 16 + pages))
        self.marker = marker
        self.count = 0

    def translate(self, dev: Any, iova: int, pasid: int | None, write: bool) -> tuple[int, int]:
        if iova >= len(self.frames) * PAGE_SIZE:
            raise self.fault(dev, iova, write, pasid, "not mapped")
        self.count += 1
        self.memory.write(self.marker, bytes([self.count & 0xFF]))
        pfn = self.frames[iova // PAGE_SIZE]
        pa = pfn * PAGE_SIZE + iova % PAGE_SIZE
        return pa, self.run - iova % self.run


class Dev:
    name = "dev"


@pytest.mark.parametrize("run", [PAGE_SIZE, 4 * PAGE_SIZE, 64 * PAGE_SIZE])
def test_dma_round_trips_any_offset_and_length(run: int) -> None:
    rng = random.Random(run)
    hw = ScrambledIommu(run, 64, marker=8 * PAGE_SIZE)
    if run == PAGE_SIZE:  # single-frame runs: any frame order
        rng.shuffle(hw.frames)
    shadow = bytearray(64 * PAGE_SIZE)
    for _ in range(40):
        iova = rng.randrange(64 * PAGE_SIZE)
        n = rng.randrange(min(3 * PAGE_SIZE, 64 * PAGE_SIZE - iova) + 1)
        data = rng.randbytes(n)
        hw.dma_write(Dev(), iova, rng.choice([bytes, bytearray, memoryview])(data), None)  # type: ignore[arg-type]
        shadow[iova : iova + n] = data
        first = rng.randrange(64 * PAGE_SIZE)
        m = rng.randrange(64 * PAGE_SIZE - first + 1)
        assert hw.dma_read(Dev(), first, m, None) == shadow[first : first + m]  # type: ignore[arg-type]
    assert hw.dma_read(Dev(), 5, 0, None) == b""  # type: ignore[arg-type]


def test_each_run_is_read_before_the_next_translation() -> None:
    hw = ScrambledIommu(PAGE_SIZE, 4, marker=0)
    hw.frames = [0, 1, 2, 3]  # the marker byte lives in the first page of the buffer
    got = hw.dma_read(Dev(), 0, 4 * PAGE_SIZE, None)  # type: ignore[arg-type]
    assert got[0] == 1  # as read right after the first translation, not after the fourth
    assert hw.memory.read(0, 1) == b"\x04"


def test_a_faulting_write_writes_nothing() -> None:
    hw = ScrambledIommu(PAGE_SIZE, 2, marker=8 * PAGE_SIZE)
    with pytest.raises(DmaFault):
        hw.dma_write(Dev(), PAGE_SIZE, b"x" * (2 * PAGE_SIZE), None)  # type: ignore[arg-type]
    assert hw.memory.read(17 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
