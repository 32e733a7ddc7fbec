"""The 16 KiB and 64 KiB granules and 52-bit addresses: what io-pgtable-arm (Linux 7.2) derives
from the SMMU's page sizes, the tables the radix engine builds with them, and the compiled
walker against its pure source and the engine's reference walk."""

from __future__ import annotations

import contextlib
import errno
import random
from typing import Any

import pytest
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import events as E
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3 import walk as W
from iommufd_arm_smmuv3.cd import TG0_16K, TG0_64K, Cd
from iommufd_arm_smmuv3.domain import SmmuDomain
from iommufd_arm_smmuv3.driver import plugin
from iommufd_arm_smmuv3.guest import IpaFrames
from iommufd_arm_smmuv3.hw import WALKER
from iommufd_arm_smmuv3.pgtable import (
    BLOCK_4T,
    GRANULE_PGSIZES,
    PgtableCfg,
    pgtable_cfg,
    s2_start_level,
)
from iommufd_arm_smmuv3.ste import CFG_S2_TRANS, Ste

from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.bits import get, pack, words
from iommufd_model.hw.compiled import load_pure, load_walker
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.hw.memory import PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable, WalkResult, walk
from iommufd_model.uapi import iommufd as U

from .test_walk import nested

RW = IOMMU_READ | IOMMU_WRITE
compiled = load_walker(WALKER)
pure = load_pure(WALKER)
K4, K16, K64 = 1 << 12, 1 << 14, 1 << 16
ALL = GRANULE_PGSIZES[12] | GRANULE_PGSIZES[14] | GRANULE_PGSIZES[16]
VA52 = {"granules": (16,), "oas": 52, "vax": True, "host_va_bits": 52}


def cfg(sizes: int, ias: int, oas: int, stage: int) -> PgtableCfg:
    got = pgtable_cfg(sizes, ias, oas, stage)
    assert got is not None
    return got


@pytest.mark.parametrize(
    ("sizes", "ias", "oas", "stage", "want"),
    [
        # (granule, ias, oas, levels, concat, pgsize_bitmap)
        (ALL, 48, 48, 1, (12, 48, 48, 4, False, GRANULE_PGSIZES[12])),
        (GRANULE_PGSIZES[14] | GRANULE_PGSIZES[16], 48, 48, 1, (14, 48, 48, 4, False, 0x2004000)),
        (GRANULE_PGSIZES[16], 48, 48, 1, (16, 48, 48, 3, False, 0x20010000)),
        # 52 bits only with 64 KiB; the 4 TiB block only with a 52-bit output size
        (GRANULE_PGSIZES[16] | BLOCK_4T, 52, 52, 1, (16, 52, 52, 3, False, 0x20010000 | BLOCK_4T)),
        (ALL | BLOCK_4T, 52, 52, 1, (12, 48, 48, 4, False, GRANULE_PGSIZES[12])),
        # stage 2: 16 KiB at 48 bits starts at level 1 with two concatenated tables (R_DXBSH)
        (GRANULE_PGSIZES[14], 48, 48, 2, (14, 48, 48, 3, True, 0x2004000)),
        (GRANULE_PGSIZES[12], 40, 40, 2, (12, 40, 40, 3, True, GRANULE_PGSIZES[12])),
        (GRANULE_PGSIZES[12], 48, 48, 2, (12, 48, 48, 4, False, GRANULE_PGSIZES[12])),
        (GRANULE_PGSIZES[16], 48, 48, 2, (16, 48, 48, 3, False, 0x20010000)),
    ],
)
def test_pgtable_cfg_is_io_pgtable_arms_choice(
    sizes: int, ias: int, oas: int, stage: int, want: tuple[int, ...]
) -> None:
    c = cfg(sizes, ias, oas, stage)
    assert (c.granule_shift, c.ias, c.oas, c.levels, c.concat, c.pgsize_bitmap) == want


def test_tcr_and_vtcr_fields() -> None:
    """TG (0 = 4K, 2 = 16K, 1 = 64K), TxSZ = 64 - ias, IPS / PS, and VTCR.SL0 as
    arm_64_lpae_alloc_pgtable_s2 encodes it (the 4 KiB granule's SL0 is one off)."""
    c4 = cfg(ALL, 48, 48, 2)
    assert (c4.tg, c4.tsz, c4.ips, c4.start_level, c4.sl0) == (0, 16, 5, 0, 2)
    c16 = cfg(GRANULE_PGSIZES[14], 48, 48, 2)
    assert (c16.tg, c16.tsz, c16.start_level, c16.sl0) == (2, 16, 1, 2)
    c64 = cfg(GRANULE_PGSIZES[16] | BLOCK_4T, 52, 52, 2)
    assert (c64.tg, c64.tsz, c64.ips, c64.start_level, c64.sl0) == (1, 12, 6, 1, 2)
    for c in (c4, c16, c64):
        assert s2_start_level(c.sl0, c.granule_shift) == c.start_level
    assert pgtable_cfg(0, 48, 48, 1) is None


def test_64k_descriptors_carry_pa_51_48_in_bits_15_12() -> None:
    mem = PhysicalMemory(1 << 40)
    c = cfg(GRANULE_PGSIZES[16] | BLOCK_4T, 52, 52, 1)
    pt = RadixPageTable(mem, c.format())
    pa = (0xA << 48) | (0x1234 << 16)
    pt.map(0x5_0000, pa, K64, RW)
    leaf = [slot for slot, _iova, _level in pt._leaves(0, K64 * 8)]
    assert len(leaf) == 1
    desc = mem.read_u64(leaf[0])
    assert (desc >> 12) & 0xF == 0xA and desc & (((1 << 48) - 1) & ~0xFFFF) == 0x1234 << 16
    assert pt.iova_to_phys(0x5_0042) == pa + 0x42
    r = flat(compiled, mem, c, pt.root, 0x5_0042)
    assert r[:3] == (W.OK, pa + 0x42, 16)
    # the same descriptor read with a 48-bit output size is an address-size fault
    assert flat(compiled, mem, c, pt.root, 0x5_0042, oa=48)[0] == W.F_ADDR_SIZE


def flat(
    walker: object,
    mem: PhysicalMemory,
    c: PgtableCfg,
    root: int,
    va: int,
    write: bool = False,
    oa: int = 0,
) -> tuple[int, ...]:
    """A stage-1 walk of ``c``'s table (stage 1 alone, or stage 2 alone for a stage-2 cfg)."""
    if c.stage == 2:
        return walker.walk_s2(  # type: ignore[attr-defined,no-any-return]
            mem._pages,
            mem.size,
            root,
            va,
            c.ias,
            c.start_level,
            oa or c.oas,
            write,
            False,
            c.granule_shift,
        )
    no_s2 = (False, 0, 0, 0, 0, False, False)
    return walker.walk_s1(  # type: ignore[attr-defined,no-any-return]
        mem._pages,
        mem.size,
        root,
        va,
        c.ias,
        oa or c.oas,
        write,
        False,
        False,
        *no_s2,
        granule=c.granule_shift,
    )


CONFIGS = [
    (GRANULE_PGSIZES[14], 48, 48, 1),
    (GRANULE_PGSIZES[14], 48, 48, 2),  # concatenated start level
    (GRANULE_PGSIZES[14], 40, 40, 2),
    (GRANULE_PGSIZES[16], 48, 48, 1),
    (GRANULE_PGSIZES[16] | BLOCK_4T, 52, 52, 1),
    (GRANULE_PGSIZES[16] | BLOCK_4T, 52, 52, 2),
    (GRANULE_PGSIZES[12], 40, 40, 2),  # 4 KiB with two concatenated level-1 tables
    (GRANULE_PGSIZES[12], 39, 48, 1),  # a short start table
]


@pytest.mark.parametrize(("sizes", "ias", "oas", "stage"), CONFIGS)
def test_compiled_pure_and_reference_agree(sizes: int, ias: int, oas: int, stage: int) -> None:
    """Pages and every block size of the granule at random, probed everywhere: the compiled
    walk gives its pure source's answer and the radix engine's reference walk's page,
    size and cost; unmapping gives back every table but the root."""
    c = cfg(sizes, ias, oas, stage)
    rng = random.Random(c.granule_shift * 100 + ias + stage)
    mem = PhysicalMemory(1 << 40)
    pt = RadixPageTable(mem, c.format())
    g = 1 << c.granule_shift
    blocks = [s for s in range(c.granule_shift, 64) if c.pgsize_bitmap >> s & 1]
    mapped = []
    for _ in range(40):
        size = 1 << rng.choice(blocks)
        if size > 1 << (ias - 2):
            continue
        va = rng.randrange(0, 1 << ias, size)
        pa = rng.randrange(0, 1 << oas, size)
        with contextlib.suppress(OSError):
            pt.map(va, pa, size * rng.choice([1, 1, 3]) if size == g else size, RW)
            mapped.append(va + rng.randrange(0, min(size, 1 << 22), 8))
    assert mapped
    probes = mapped * 2 + [rng.randrange(0, 1 << ias) for _ in range(200)]
    probes += [(1 << ias) - 1, 1 << ias]
    oks = 0
    for va in probes:
        a = flat(compiled, mem, c, pt.root, va)
        assert a == flat(pure, mem, c, pt.root, va), hex(va)
        ref = walk(mem, pt.fmt, pt.root, va, False)
        assert (a[0] == W.OK) == isinstance(ref, WalkResult), hex(va)
        if isinstance(ref, WalkResult):
            oks += 1
            assert (a[1], a[2], a[3]) == (ref.pa, ref.shift, ref.mem_refs)
    assert oks >= len(mapped)
    pt.unmap(0, 1 << ias)
    assert all(walk(mem, pt.fmt, pt.root, va, False).__class__ is not WalkResult for va in mapped)


@pytest.mark.parametrize(
    ("s1_sizes", "s2_sizes"),
    [
        (GRANULE_PGSIZES[14], GRANULE_PGSIZES[16]),
        (GRANULE_PGSIZES[16], GRANULE_PGSIZES[14]),
        (GRANULE_PGSIZES[12], GRANULE_PGSIZES[16]),
        (GRANULE_PGSIZES[16], GRANULE_PGSIZES[12]),
    ],
)
def test_nested_walks_mix_granules(s1_sizes: int, s2_sizes: int) -> None:
    """A guest stage 1 with one granule over a stage 2 with another: every stage-1 table
    access is translated by stage 2, the output too; compiled = pure = the two reference
    walks composed, the TLB entry being the smaller page."""
    mem = PhysicalMemory(1 << 40)
    c1, c2 = cfg(s1_sizes, 48, 48, 1), cfg(s2_sizes, 48, 48, 2)
    s2pt = RadixPageTable(mem, c2.format())
    guest_ipa, host = 1 << 32, 1 << 36
    s2pt.map(guest_ipa, host, 1 << 25, RW)  # 32 MiB of guest RAM
    s1pt = RadixPageTable(IpaFrames(mem, s2pt, guest_ipa + (16 << 20)), c1.format())
    g1 = 1 << c1.granule_shift
    rng = random.Random(c1.granule_shift + c2.granule_shift)
    vas = []
    for i in range(12):
        va = rng.randrange(0, 1 << 48, g1)
        s1pt.map(va, guest_ipa + i * g1, g1, RW)
        vas.append(va + rng.randrange(0, g1))
    for va in vas + [rng.randrange(0, 1 << 48) for _ in range(50)]:
        results = [
            nested(
                mem,
                s1pt,
                s2pt,
                va,
                True,
                w,
                s2_ia=c2.ias,
                s2_start=c2.start_level,
                granule=c1.granule_shift,
                s2_granule=c2.granule_shift,
            )
            for w in (compiled, pure)
        ]
        assert results[0] == results[1]
        ipa = s1pt.iova_to_phys(va)
        if ipa < 0:
            assert results[0][0] == W.F_TRANSLATION
            continue
        assert results[0][0] == W.OK
        assert results[0][1] == s2pt.iova_to_phys(ipa)
        ref2 = walk(mem, s2pt.fmt, s2pt.root, ipa, True)
        assert isinstance(ref2, WalkResult)
        assert results[0][2] == min(c1.granule_shift, ref2.shift)


@pytest.mark.parametrize("granule", [14, 16])
def test_blocks_only_where_the_granule_has_them(granule: int) -> None:
    """16 KiB: blocks at level 2 only; 64 KiB: level 2, and level 1 only with a 52-bit output
    size (FEAT_LPA); a block descriptor anywhere else is a translation fault."""
    mem = PhysicalMemory(1 << 40)
    root = mem.alloc_contiguous(16, 16) << 12
    l1_shift = granule + 2 * (granule - 3)  # what a level-1 entry covers
    block = 1 | W.DESC_AF | W.S1_AP_UNPRIV
    mem.write_u64(root, block)  # a level-1 block at VA 0 (start level 1 with 48 bits on 64K)
    args = (False, False, False, False, 0, 0, 0, 0, False, False)
    start_ia = 48 if granule == 16 else 47  # both start at level 1
    for oa, want in ((48, W.F_TRANSLATION), (52, W.OK if granule == 16 else W.F_TRANSLATION)):
        r = compiled.walk_s1(
            mem._pages, mem.size, root, 0x1234, start_ia, oa, *args[:3], *args[3:], granule=granule
        )
        assert r[0] == want and r[5] == 1, (oa, r)
        if want == W.OK:
            assert r[2] == l1_shift


# -- the driver and the hardware with IDR5's granules -----------------------------------------


def test_a_4k_host_uses_the_4k_granule_whenever_idr5_offers_it(smmu_machine: Any) -> None:
    """arm_lpae_restrict_pgsizes() prefers PAGE_SIZE: with GRAN4K every domain is 4 KiB and
    48 bits, even on a 52-bit OAS with VAX and a 52-bit VA host (4 KiB caps sizes at 48)."""
    _m, hw, smmu = smmu_machine(granules=(12, 14, 16), oas=52, vax=True, host_va_bits=52)
    idr5 = hw.mmio.read(R.IDR5, 4)
    assert idr5 & 0x7 == R.IDR5_OAS_52 and (idr5 >> 4) & 7 == 7 and (idr5 >> 10) & 3 == 1
    assert smmu.pgsize_bitmap == ALL | BLOCK_4T and smmu.feat_vax and smmu.oas == 52
    for flags in (0, U.IOMMU_HWPT_ALLOC_NEST_PARENT):
        d = domain_of(hw, smmu_machine_dev(hw), flags)
        assert (d.cfg.granule_shift, d.cfg.ias, d.cfg.oas) == (12, 48, 48)
        assert d.pgsize_bitmap == GRANULE_PGSIZES[12] and d.aperture_end == (1 << 48) - 1


def smmu_machine_dev(hw: Any) -> Any:
    return hw.machine.add_pci_device(iommu=0)


def domain_of(hw: Any, dev: Any, flags: int = 0) -> SmmuDomain:
    d = plugin.domain_alloc_user(
        iommu=hw, dev=dev, flags=flags, parent=None, viommu=None, user_data=None
    )
    assert isinstance(d, SmmuDomain)
    return d


@pytest.mark.parametrize(
    ("options", "stage", "want"),
    [
        # (granule, TG, TxSZ, IPS/PS, S2SL0, TLBI TG, a block size)
        ({"granules": (14, 16)}, 1, (14, 2, 16, 5, None, 2, 1 << 25)),
        ({"granules": (14, 16)}, 2, (14, 2, 16, 5, 2, 2, 1 << 25)),
        ({"granules": (16,)}, 1, (16, 1, 16, 5, None, 3, 1 << 29)),
        ({"granules": (16,)}, 2, (16, 1, 16, 5, 2, 3, 1 << 29)),
        (
            {"granules": (16,), "oas": 52, "vax": True, "host_va_bits": 52},
            1,
            (16, 1, 12, 6, None, 3, 1 << 29),
        ),
        (
            {"granules": (16,), "oas": 52, "vax": True, "host_va_bits": 52},
            2,
            (16, 1, 12, 6, 2, 3, 1 << 29),
        ),
    ],
)
def test_16k_and_64k_domains_end_to_end(
    smmu_machine: Any, options: dict[str, Any], stage: int, want: tuple[Any, ...]
) -> None:
    """Without GRAN4K the driver builds 16 / 64 KiB domains (the kernel's own DMA API users
    would: iommufd refuses them, below): the CD's TG0/T0SZ/IPS or the STE's S2TG/S2T0SZ/S2SL0/
    S2PS as io-pgtable-arm computes them, the SMMU walks those tables, and an unmap's range
    TLBI carries the granule's TG and the leaf's TTL and removes exactly those pages."""
    granule, tg, tsz, ips, sl0, tlbi_tg, block = want
    m, hw, smmu = smmu_machine(**options)
    dev = m.add_pci_device(iommu=0)
    flags = U.IOMMU_HWPT_ALLOC_NEST_PARENT if stage == 2 else 0
    d = domain_of(hw, dev, flags)
    plugin.attach(iommu=hw, dev=dev, domain=d)
    g = 1 << granule
    assert d.cfg.granule_shift == granule and d.pgsize_bitmap & -d.pgsize_bitmap == g
    ste = Ste.decode(words(m.memory.read(smmu.ste_addr(dev.rid), 64)))
    if stage == 1:
        cd = hw.fetch_cd(ste, dev.rid, 0, None)
        assert (cd.tg0, cd.t0sz, cd.ips, cd.granule) == (tg, tsz, ips, granule)
    else:
        assert (ste.s2tg, ste.s2t0sz, ste.s2sl0, ste.s2ps) == (tg, tsz, sl0, ips)
        assert ste.s2_start == d.cfg.start_level
    pa = m.memory.alloc_contiguous(64, 16) << 12  # 256 KiB, 64 KiB aligned
    iova = 1 << 40
    plugin.domain_map_pages(domain=d, iova=iova, pa=pa, pgsize=g, pgcount=4, prot=RW)
    plugin.domain_map_pages(domain=d, iova=iova + block, pa=0, pgsize=block, pgcount=1, prot=RW)
    for k in range(4):
        assert hw.translate(dev, iova + k * g + 0x18, None, True)[0] == pa + k * g + 0x18
    assert hw.translate(dev, iova + block + 0x1234, None, False)[0] == 0x1234
    assert {e.shift for _key, e in hw.tlb.entries()} >= {granule, block.bit_length() - 1}
    start = len(hw.executed)
    assert plugin.domain_unmap(domain=d, iova=iova + g, size=2 * g) == 2 * g
    tlbis = [(w0, w1) for w0, w1 in hw.executed[start:] if C.op(w0) != C.CMD_SYNC]
    # stage 2 (a nest parent): the S2_IPA range, then NH_ALL of the VMID after its own SYNC
    assert [C.op(w0) for w0, _w1 in tlbis] == (
        [C.TLBI_NH_VA] if stage == 1 else [C.TLBI_S2_IPA, C.TLBI_NH_ALL]
    )
    w0, w1 = tlbis[0]
    assert (get(w1, 11, 10), get(w1, 9, 8)) == (tlbi_tg, 3)  # TG, TTL: level 3 pages
    assert (get(w0, 16, 12), get(w0, 24, 20)) == (0, 1)  # NUM + 1 = 1 unit of 2^1 granules
    addr_mask = C.CMD1_TLBI_VA if stage == 1 else C.CMD1_TLBI_IPA
    assert C.tlbi_range(w0, w1, addr_mask) == (iova + g, iova + 3 * g - 1)
    hits = hw.stats.iotlb_hits
    assert hw.translate(dev, iova + 0x18, None, True)[0] == pa + 0x18  # still cached
    assert hw.translate(dev, iova + 3 * g, None, True)[0] == pa + 3 * g
    assert hw.stats.iotlb_hits == hits + 2
    with pytest.raises(DmaFault):
        hw.translate(dev, iova + g, None, False)  # gone from the table and the TLB


def test_iommufd_refuses_a_domain_that_cannot_map_page_size(vmm: Any) -> None:
    """Linux 7.2 iommufd/io_pagetable.c iopt_table_add_domain(): a domain's smallest page
    must not exceed PAGE_SIZE, so on a 4 KiB host an SMMU without GRAN4K gives EINVAL."""
    r = vmm(granules=(16,))
    ioas = r.ioas_alloc()
    with pytest.raises(OSError) as exc:
        r.hwpt_alloc(ioas)
    assert exc.value.errno == errno.EINVAL


def s2ste(s2tg: int, s2t0sz: int, s2sl0: int) -> Ste:
    return Ste(v=True, config=CFG_S2_TRANS, s2aa64=True, s2tg=s2tg, s2t0sz=s2t0sz, s2sl0=s2sl0)


def test_cd_and_ste_granule_checks() -> None:
    """C_BAD_CD / C_BAD_STE for a granule IDR5 does not offer or a reserved TG; T0SZ 12..15
    only with VAX and 64 KiB; S2SL0 must fit S2T0SZ with the stage-2 granule."""
    only4k, every = frozenset({12}), frozenset({12, 14, 16})
    cd = Cd(v=True, aa64=True, t0sz=16, tg0=TG0_16K)
    assert "only the 4 KiB granule" in cd.illegal(only4k) and cd.illegal(every) == ""
    cd.tg0 = 3
    assert "granule not implemented" in cd.illegal(every)
    cd.tg0, cd.t0sz = TG0_64K, 12
    assert "outside 16..39" in cd.illegal(every) and cd.illegal(every, vax=True) == ""
    cd.tg0 = TG0_16K
    assert "outside 16..39" in cd.illegal(every, vax=True)
    # 16 KiB, 48-bit IPA: level 1 with two concatenated tables (SL0 2), not level 2 (SL0 1)
    assert s2ste(s2tg=TG0_16K, s2t0sz=16, s2sl0=2).illegal(0, 48, granules=every) == ""
    assert "inconsistent" in s2ste(s2tg=TG0_16K, s2t0sz=16, s2sl0=1).illegal(0, 48, granules=every)
    assert "only the 4 KiB" in s2ste(s2tg=TG0_16K, s2t0sz=16, s2sl0=2).illegal(0, 48)
    # 64 KiB, 52-bit IPA from level 1 (1024 entries) only with a 52-bit OAS
    ok52 = s2ste(s2tg=TG0_64K, s2t0sz=12, s2sl0=2)
    assert ok52.illegal(0, 52, granules=every) == "" and ok52.illegal(0, 48, granules=every)
    assert "reserved S2SL0" in s2ste(s2tg=TG0_64K, s2t0sz=16, s2sl0=3).illegal(
        0, 48, granules=every
    )


def test_a_guest_cd_with_a_granule_idr5_lacks_is_c_bad_cd(smmu_machine: Any) -> None:
    """The hardware checks the CD it fetches: TG0 = 16 KiB on a 4 KiB-only SMMU is C_BAD_CD
    (an event, a fault); with GRAN16K the same CD translates through 16 KiB tables."""
    for granules, ok in (((12,), False), ((12, 14), True)):
        m, hw, smmu = smmu_machine(granules=granules)
        dev = m.add_pci_device(iommu=0)
        d = domain_of(hw, dev)
        plugin.attach(iommu=hw, dev=dev, domain=d)
        pt = RadixPageTable(m.memory, cfg(GRANULE_PGSIZES[14], 48, 48, 1).format())
        pt.map(0x4000, 0x8000, K16, RW)
        cd = hw.fetch_cd(
            Ste.decode(words(m.memory.read(smmu.ste_addr(dev.rid), 64))), dev.rid, 0, None
        )
        cd.tg0, cd.ttb0 = TG0_16K, pt.root
        m.memory.write(smmu.cd_addr(smmu.masters[dev.rid], 0), pack(cd.encode()))
        hw.execute(*C.cfgi_cd(dev.rid, 0))
        hw.tlb.flush_all()
        if ok:
            assert hw.translate(dev, 0x4010, None, False)[0] == 0x8010
        else:
            events = len(hw.events)
            with pytest.raises(DmaFault):
                hw.translate(dev, 0x4010, None, False)
            assert hw.events[events].id == E.C_BAD_CD
