"""16 KiB and 64 KiB guests end to end: a guest kernel whose PAGE_SIZE is 16 or 64 KiB (probe
option ``guest_page_shift``, the model's knob) on an SMMU whose IDR5 offers that granule
builds its stage-1 tables with it, and its arm-smmu-v3 driver writes the CD as 7.2's
``arm_smmu_make_s1_cd`` does from io-pgtable-arm's configuration (TG0, T0SZ, IPS); the
host's 4 KiB stage 2 sits below. DMA goes through the guest's pages, faults past them and
after the guest's unmap and range TLBI in its granule (TG 2 / 3).

The matrix sweep does not run these guests: the nested scenarios map, fault-check and
invalidate at 4 KiB granularity (a 16 KiB guest maps whole 16 KiB pages), so they would need
the guest's page size; they run 4 KiB guests on every option set."""

from __future__ import annotations

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3.cd import TG0_4K, TG0_16K, TG0_64K, Cd
from iommufd_arm_smmuv3.guest import GuestSmmuv3
from iommufd_arm_smmuv3.hw import Smmuv3

from helpers import narrow
from iommufd_model.api import OptionSet
from iommufd_model.hw.bits import get, words
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.plugins import default_registry
from iommufd_model.scenarios.base import ScenarioContext
from iommufd_model.scenarios.nested import big_pattern, boot

IOVA = 0x4000_0000


@pytest.mark.parametrize(
    ("shift", "granules", "tg0"),
    [(14, (12, 14), TG0_16K), (16, (12, 16), TG0_64K), (16, (12,), TG0_4K)],
)
def test_a_guest_of_a_larger_page_size_uses_its_granule(
    shift: int, granules: tuple[int, ...], tg0: int
) -> None:
    """Without the granule in IDR5 the guest falls back to 4 KiB (the last case)."""
    opts = {"granules": granules, "guest_page_shift": shift}
    ctx = ScenarioContext("arm_smmuv3", default_registry(), OptionSet("g", opts))
    g = boot(ctx)
    gi = g.iommu
    assert isinstance(gi, GuestSmmuv3)
    gran = gi.granule
    assert gran == (1 << shift if tg0 != TG0_4K else 1 << 12)
    dom = g.domain()
    cd = Cd.decode(words(g.vm.memory.read(gi.cd_tables[g.gdev.virt_id], 64)))
    assert (cd.tg0, cd.t0sz, cd.ips, cd.ttb0) == (tg0, 16, 5, dom.vendor.s1.root)
    assert dom.vendor.s1.fmt.granule_shift == gran.bit_length() - 1
    gpa = g.buffer(4 * gran, 41, align=gran)
    gi.map(dom, IOVA, gpa, 4 * gran)
    assert g.dma_read(IOVA, 4 * gran) == big_pattern(41, 4 * gran)
    g.dma_write(IOVA + gran + 100, b"sixteen")
    assert g.ram(gpa + gran + 100, 7) == b"sixteen"
    with pytest.raises(DmaFault):
        g.dma_read(IOVA + 4 * gran, 8)  # past the guest's last page
    hw = narrow(g.machine.iommus[0], Smmuv3)
    start = len(hw.executed)
    gi.unmap(dom, IOVA + gran, gran)
    gi.invalidate(dom, IOVA + gran, gran)
    tlbis = [w for w in hw.executed[start:] if C.op(w[0]) == C.TLBI_NH_VA]
    assert tlbis and all(get(w1, 11, 10) == (gran.bit_length() - 1 - 10) // 2 for _w0, w1 in tlbis)
    with pytest.raises(DmaFault):
        g.dma_read(IOVA + gran + 8, 8)
    assert g.dma_read(IOVA + 2 * gran, 8) == big_pattern(41, 4 * gran)[2 * gran : 2 * gran + 8]
    assert g.dma_read(IOVA, 8) == big_pattern(41, 8)
