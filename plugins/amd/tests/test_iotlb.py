"""IOTLB coherence: a missing invalidation leaves DMA on the old page, as on silicon."""

from __future__ import annotations

from typing import Any

from iommufd_amd import commands as C
from iommufd_amd.pgtable_v1 import PTE_ADDR

PAGE = 4096
IOVA = 1 << 32


class Rig:
    """``n`` single-page mappings at IOVA: old pages filled 0xA0+i, spare pages 0xB0+i."""

    def __init__(self, w: Any, n: int) -> None:
        self.w = w
        self.ioas = w.ioas()
        self.new_pa = []
        for i in range(n):
            w.map(self.ioas, w.buffer(PAGE, fill=0xA0 + i), PAGE, IOVA + i * PAGE)
            spare = w.buffer(PAGE, fill=0xB0 + i)
            self.new_pa.append(w.proc.translate(spare) << 12)
        w.fd.attach(w.dev_id, self.ioas)
        self.dom = w.fd.device(w.dev_id).hwpt.domain
        self.n = n

    def read_all(self) -> list[int]:
        return [self.w.dev.dma_read(IOVA + i * PAGE, 1)[0] for i in range(self.n)]

    def repoint_without_flush(self) -> None:
        """A buggy driver: rewrite every PTE to the spare page and invalidate nothing."""
        mem = self.w.mem
        for i in range(self.n):
            ((slot, _iova, level),) = self.dom.pt._leaves(IOVA + i * PAGE, IOVA + i * PAGE)
            assert level == 0
            entry = mem.read_u64(slot)
            mem.write_u64(slot, (entry & ~PTE_ADDR) | self.new_pa[i])

    def invalidate(self, cmd: bytes) -> None:
        self.w.kernel.queue(cmd)
        self.w.kernel.completion_wait()


def test_stale_until_a_single_page_invalidation(world: Any) -> None:
    rig = Rig(world, 2)
    assert rig.read_all() == [0xA0, 0xA1]
    hits = world.hw.stats.iotlb_hits
    rig.repoint_without_flush()
    assert rig.read_all() == [0xA0, 0xA1]  # stale translations still in use
    assert world.hw.stats.iotlb_hits == hits + 2
    rig.invalidate(C.inv_iommu_pages(rig.dom.id, IOVA + PAGE, PAGE))
    assert rig.read_all() == [0xA0, 0xB1]  # only the invalidated page is fresh
    # A wrong DomainID invalidates nothing.
    rig.invalidate(C.inv_iommu_pages(rig.dom.id + 1, IOVA, PAGE))
    assert rig.read_all() == [0xA0, 0xB1]
    # A guest (GN=1) invalidation leaves host translations alone.
    rig.invalidate(C.inv_iommu_pages(rig.dom.id, IOVA, PAGE, pasid=0, gn=True))
    assert rig.read_all() == [0xA0, 0xB1]


def test_range_size_encoding_invalidates_exactly_the_aligned_block(world: Any) -> None:
    rig = Rig(world, 6)
    assert rig.read_all() == [0xA0 + i for i in range(6)]
    rig.repoint_without_flush()
    # Pages 1..2 cross no 16 KiB boundary: the encoding covers IOVA .. IOVA+16K.
    rig.invalidate(C.inv_iommu_pages(rig.dom.id, IOVA + PAGE, 2 * PAGE))
    assert C.decode_range(C.inv_address(IOVA + PAGE, 2 * PAGE) & ~0xFFF, True) == (
        IOVA,
        IOVA + 4 * PAGE - 1,
    )
    assert rig.read_all() == [0xB0, 0xB1, 0xB2, 0xB3, 0xA4, 0xA5]


def test_all_pages_encoding_and_invalidate_all(world: Any) -> None:
    rig = Rig(world, 3)
    rig.read_all()
    rig.repoint_without_flush()
    rig.invalidate(C.inv_iommu_all_pages(rig.dom.id))
    assert rig.read_all() == [0xB0, 0xB1, 0xB2]
    # INVALIDATE_IOMMU_ALL also drops every cached translation.
    mem = world.mem
    for i in range(3):
        ((slot, _iova, _level),) = rig.dom.pt._leaves(IOVA + i * PAGE, IOVA + i * PAGE)
        mem.write_u64(
            slot,
            (mem.read_u64(slot) & ~PTE_ADDR)
            | world.proc.translate(world.buffer(PAGE, fill=0xC0 + i)) << 12,
        )
    assert rig.read_all() == [0xB0, 0xB1, 0xB2]
    rig.invalidate(C.inv_all())
    assert rig.read_all() == [0xC0, 0xC1, 0xC2]


def test_the_driver_flushes_on_unmap(world: Any) -> None:
    rig = Rig(world, 2)
    rig.read_all()
    world.events()
    world.unmap(rig.ioas, IOVA, PAGE)
    try:
        world.dev.dma_read(IOVA, 1)
    except Exception as exc:
        assert "not-present" in str(exc)
    else:
        raise AssertionError("DMA after unmap hit a stale IOTLB entry")
    (ev,) = world.events()
    assert ev.name == "IO_PAGE_FAULT" and ev.address == IOVA and ev.tag == rig.dom.id
    assert world.dev.dma_read(IOVA + PAGE, 1) == b"\xa1"
