"""enforce_cache_coherency as iommufd applies it at HWPT allocation (ECAP.SC): PGSNP in
first-stage and nested PASID entries, SNP in second-stage leaves (Linux 7.2 iommu.c,
pasid.c, generic_pt vtdss)."""

from __future__ import annotations

from typing import Any

from iommufd_intel_vtd.guest import GuestRam, guest_first_stage
from iommufd_intel_vtd.pgtable import SS_SNP

from iommufd_model import uapi as U

PAGE = 4096
IOVA = 0x40_0000


def test_first_stage_entry_has_pgsnp(world: Any) -> None:
    ioas = world.ioas()
    world.map(ioas, IOVA, PAGE)
    world.fd.attach(world.dev_id, ioas)
    st = world.hw.driver_state
    pe = st.read_pasid_entry(st.devs[world.dev.rid], 0)
    assert pe.pgtt == 1 and pe.pgsnp and pe.pwsnp


def test_second_stage_leaves_have_snp_and_nested_entries_pgsnp(world: Any) -> None:
    ioas = world.ioas()
    gpa, ram_len = 1 << 30, 1 << 22
    world.map(ioas, gpa, ram_len)
    parent = world.hwpt(ioas, U.IOMMU_HWPT_ALLOC_NEST_PARENT)
    dom = world.fd.objects.get(parent).domain
    mem = world.hw.memory
    res = world.hw.walker.walk_ss(mem._pages, mem.size, dom.pt.root, gpa, 4, False, 6, False)
    assert res[0] == 0
    leaf_level = (res[2] - 12) // 9
    table = dom.pt.root
    for level in range(3, leaf_level, -1):
        table = mem.read_u64(table + 8 * ((gpa >> (12 + 9 * level)) & 0x1FF)) & ~0xFFF
        table &= (1 << 52) - 1
    leaf = mem.read_u64(table + 8 * ((gpa >> (12 + 9 * leaf_level)) & 0x1FF))
    assert leaf & SS_SNP
    ram = GuestRam(world.proc, world.va, gpa, ram_len)
    s1 = guest_first_stage(ram, 4)
    data = U.IommuHwptVtdS1(pgtbl_addr=s1.root, addr_width=48).pack()
    child = world.hwpt(parent, data_type=U.IOMMU_HWPT_DATA_VTD_S1, data=data)
    world.fd.attach(world.dev_id, child)
    st = world.hw.driver_state
    pe = st.read_pasid_entry(st.devs[world.dev.rid], 0)
    assert pe.pgtt == 3 and pe.pgsnp
