"""Issue 15's report, as a test: four threads map, DMA-read and unmap their own disjoint
256 KiB ranges of one IOAS through one iommufd. Before the model lock every driver failed
(EEXIST/ENOENT on mock, Completion-Wait and CMD_SYNC timeouts, QI errors, DmaFaults on mapped
pages, a RuntimeError escaping an ioctl)."""

from __future__ import annotations

import pytest

import iommufd_model as im

from .threads import DRIVERS, check_all, run_threads

RANGE = 256 << 10
ROUNDS = 40


@pytest.mark.parametrize("driver", DRIVERS)
def test_disjoint_map_dma_unmap(driver: str) -> None:
    machine = im.Machine.build(iommus=[driver])
    dev = machine.add_pci_device(iommu=0)
    proc = machine.new_process()
    fd = proc.open_iommufd()
    dev_id = fd.bind(dev)
    ioas = fd.ioas_alloc()
    fd.attach(dev_id, ioas)

    def worker(i: int) -> None:
        va = proc.mmap(RANGE)
        data = bytes([i + 1]) * RANGE
        proc.write(va, data)
        iova = (1 << 24) + i * (1 << 20)
        for _ in range(ROUNDS):
            assert fd.ioas_map(ioas, va, RANGE, iova=iova) == iova
            assert dev.dma_read(iova, RANGE) == data
            dev.dma_write(iova + 4096 * i, bytes([i + 1]) * 64)
            assert fd.ioas_unmap(ioas, iova, RANGE) == RANGE

    run_threads(lambda i=i: worker(i) for i in range(4))  # type: ignore[misc]
    check_all([fd])
