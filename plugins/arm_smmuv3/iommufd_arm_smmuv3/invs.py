"""A domain's invalidation array (Linux 7.2 ``struct arm_smmu_invs``) and the commands an
IOTLB flush of a range turns into (``__arm_smmu_domain_inv_range``).

Each attached master adds its entries to the domain's array: the IOTLB tag (stage-1 ASID or
stage-2 VMID), for a nest parent also "clear the nested stage-1 entries of the VMID", and
with ATS one ATC entry per StreamID. Entries are reference-counted (two masters on one domain
share the tag) and kept sorted by (type, id, ssid), which is the order the commands go out in.
A domain nobody is attached to has an empty array: its unmaps issue no command at all.

Batching follows the kernel: one batch per array walk, submitted with a CMD_SYNC before the
stage-2 VMID's NH_ALL (stage 2 must be clean before the nested stage 1 is), before the first
ATC_INV (the ATC is only invalidated after the IOTLB), and at the end.

Facts from Linux 7.2 arm-smmu-v3.c / arm-smmu-v3.h; the code is the model's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from iommufd_arm_smmuv3 import commands as C
from iommufd_model.hw.bits import put

if TYPE_CHECKING:
    from iommufd_arm_smmuv3.kernel import SmmuDevice

INV_S1_ASID = 0
INV_S2_VMID = 1
INV_S2_VMID_S1_CLEAR = 2
INV_ATS = 3
INV_ATS_FULL = 4
IOMMU_NO_PASID = 0
ATC_GRAIN_SHIFT = 12  # ATC invalidations are always in 4 KiB pages
U64 = (1 << 64) - 1

#: (size_opcode, nsize_opcode): the ranged command and the whole-tag one (``nsize``)
OPCODES = {
    INV_S1_ASID: (C.TLBI_NH_VA, C.TLBI_NH_ASID),
    INV_S2_VMID: (C.TLBI_S2_IPA, C.TLBI_S12_VMALL),
    INV_S2_VMID_S1_CLEAR: (C.TLBI_NH_ALL, C.TLBI_NH_ALL),
    INV_ATS: (C.ATC_INV, C.ATC_INV),
    INV_ATS_FULL: (C.ATC_INV, C.ATC_INV),
}


def opcodes(smmu: SmmuDevice, inv_type: int) -> tuple[int, int]:
    """The inv's opcodes: stage-1 ASIDs use the EL2 TLBIs on an E2H SMMU
    (``arm_smmu_master_build_inv``: TLBI_EL2_VA / TLBI_EL2_ASID with ARM_SMMU_FEAT_E2H)."""
    if inv_type == INV_S1_ASID and smmu.feat_e2h:
        return C.TLBI_EL2_VA, C.TLBI_EL2_ASID
    return OPCODES[inv_type]


@attrs.define
class Inv:
    """One ``struct arm_smmu_inv``: what to invalidate for one tag or one StreamID's ATC."""

    type: int
    id: int  # ASID, VMID or StreamID
    ssid: int = IOMMU_NO_PASID  # ATS entries only
    pgsize: int = 0  # log2 of the leaf page size with range invalidation, else 0
    users: int = 0

    @property
    def is_ats(self) -> bool:
        return self.type in (INV_ATS, INV_ATS_FULL)

    @property
    def key(self) -> tuple[int, int, int]:
        """``arm_smmu_inv_cmp()``: by type, id, and for ATS the SSID."""
        return self.type, self.id, self.ssid if self.is_ats else 0


class Invs:
    """The live entries of one domain, kept sorted as the kernel keeps its array."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int, int], Inv] = {}

    def live(self) -> list[Inv]:
        return [self.entries[k] for k in sorted(self.entries)]

    def merge(self, build: list[Inv]) -> None:
        """``arm_smmu_invs_merge()``: one more user of each built entry."""
        for inv in build:
            have = self.entries.setdefault(inv.key, attrs.evolve(inv, users=0))
            have.users += 1

    def unref(self, build: list[Inv]) -> None:
        """``arm_smmu_invs_unref()`` + ``_purge()``: one user less; each built entry learns
        how many users remain (the caller flushes a tag that has none left)."""
        for inv in build:
            have = self.entries.get(inv.key)
            if have is None:
                inv.users = 0
                continue
            have.users -= 1
            inv.users = have.users
            if not have.users:
                del self.entries[inv.key]


class Batch:
    """``struct arm_smmu_cmdq_batch``: up to 64 commands, issued without a sync when full."""

    ENTRIES = 64  # CMDQ_BATCH_ENTRIES

    def __init__(self, smmu: SmmuDevice) -> None:
        self.smmu = smmu
        self.cmds: list[tuple[int, int]] = []

    def add(self, cmd: tuple[int, int]) -> None:
        if len(self.cmds) == self.ENTRIES:
            self.smmu.issue(self.cmds, sync=False)
            self.cmds = []
        self.cmds.append(cmd)

    def submit(self) -> None:
        cmds, self.cmds = self.cmds, []
        self.smmu.issue(cmds, sync=True)


def tlbi(opcode: int, asid: int, vmid: int) -> tuple[int, int]:
    """``arm_smmu_make_cmd_tlbi()``: opcode, ASID and VMID; the range fields come later."""
    return opcode | put(vmid, 47, 32) | put(asid, 63, 48), 0


def size_too_big(ril: bool, size: int, granule: int) -> bool:
    """``arm_smmu_inv_size_too_big()``: flush the whole tag for size 0 / SIZE_MAX, and
    without range invalidation from MAX_TLBI_OPS (granule / 8) commands on."""
    if not size or size == U64:
        return True
    if ril:
        return False
    max_ops = 1 << (granule.bit_length() - 1 - 3)
    return size >= max_ops * granule


def add_range(
    smmu: SmmuDevice,
    batch: Batch,
    cmd: tuple[int, int],
    leaf: bool,
    iova: int,
    size: int,
    granule: int,
    pgsize: int,
) -> None:
    """``arm_smmu_cmdq_batch_add_range()``: range TLBIs (NUM/SCALE/TG, TTL for leaves) with
    IDR3.RIL, else one command per granule."""
    end = iova + size
    w0 = cmd[0]
    num_pages = ttl = tg_enc = 0
    inv_range = granule
    ril = smmu.feat_ril
    if ril:
        tg = pgsize
        num_pages = size >> tg
        tg_enc = (tg - 10) // 2
        if leaf:
            ttl = 4 - ((granule.bit_length() - 1 - 3) // (tg - 3))
        elif num_pages & 0x1F == 1:
            num_pages += 1  # never NUM = SCALE = 0 for a non-leaf range
    while iova < end:
        if ril:
            scale = (num_pages & -num_pages).bit_length() - 1
            num = (num_pages >> scale) & 0x1F
            w0 = cmd[0] | put(num - 1, 16, 12) | put(scale, 24, 20)
            inv_range = num << (scale + pgsize)
            num_pages -= num << scale
        w1 = (C.CMD1_LEAF if leaf else 0) | put(ttl, 9, 8) | put(tg_enc, 11, 10)
        batch.add((w0, w1 | (iova & ~0xFFF & U64)))
        iova += inv_range


def atc_inv_range(sid: int, ssid: int, iova: int, size: int) -> tuple[int, int]:
    """``arm_smmu_atc_inv_to_cmd()``: the smallest aligned power-of-two span of 4 KiB pages
    that covers the range (over-invalidating rather than splitting)."""
    start = iova >> ATC_GRAIN_SHIFT
    last = ((iova + size - 1) & U64) >> ATC_GRAIN_SHIFT
    log2_span = (start ^ last).bit_length()
    start &= ~((1 << log2_span) - 1)
    return C.atc_inv(sid, start << ATC_GRAIN_SHIFT, log2_span, None if ssid == 0 else ssid)


def _ends_batch(cur: Inv, nxt: Inv) -> bool:
    if cur.type != INV_S2_VMID_S1_CLEAR and nxt.type == INV_S2_VMID_S1_CLEAR:
        return True
    return not cur.is_ats and nxt.is_ats


def inv_range(smmu: SmmuDevice, invs: Invs, iova: int, size: int, granule: int, leaf: bool) -> None:
    """``arm_smmu_domain_inv_range()``: invalidate ``[iova, iova + size)`` (size 0: all)."""
    live = invs.live()
    batch = Batch(smmu)
    ril = smmu.feat_ril
    for idx, cur in enumerate(live):
        size_op, nsize_op = opcodes(smmu, cur.type)
        if cur.type in (INV_S1_ASID, INV_S2_VMID):
            asid, vmid = (cur.id, 0) if cur.type == INV_S1_ASID else (0, cur.id)
            cmd = tlbi(size_op, asid, vmid)
            if size_too_big(ril, size, granule):
                batch.add(tlbi(nsize_op, asid, vmid))
            else:
                add_range(smmu, batch, cmd, leaf, iova, size, granule, cur.pgsize)
        elif cur.type == INV_S2_VMID_S1_CLEAR:
            if not size_too_big(ril, size, granule):  # else S12_VMALL has done it
                batch.add(tlbi(size_op, 0, cur.id))
        elif cur.type == INV_ATS:
            batch.add(atc_inv_range(cur.id, cur.ssid, iova, size))
        else:
            batch.add(C.atc_inv(cur.id, 0, C.ATC_INV_SIZE_ALL))
        nxt = live[idx + 1] if idx + 1 < len(live) else None
        if batch.cmds and (nxt is None or _ends_batch(cur, nxt)):
            batch.submit()


def flush_tag(smmu: SmmuDevice, inv: Inv) -> None:
    """``arm_smmu_inv_flush_iotlb_tag()``: a tag that lost its last user is flushed now."""
    if inv.type == INV_S1_ASID:
        smmu.issue([tlbi(opcodes(smmu, INV_S1_ASID)[1], inv.id, 0)])
    elif inv.type == INV_S2_VMID:
        smmu.issue([tlbi(C.TLBI_S12_VMALL, 0, inv.id)])
