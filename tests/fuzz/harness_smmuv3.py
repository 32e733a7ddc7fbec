"""SMMUv3 harnesses: the vSTE (uAPI and guest stream table), the guest CD and stage-1 tables,
guest command streams (trapped CMDQ and CMDQV VCMDQ), vIOMMU invalidation arrays, and the
host-owned STE, CD, stage-1/stage-2 tables and command queue."""

from __future__ import annotations

from typing import Any

from fuzzlib import (
    IOVA,
    VIRT_ID,
    FuzzBug,
    GuestWorld,
    HostWorld,
    guarded,
    harness,
    plant_path,
    u64s,
    walk_path,
)
from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.cd import CD_SIZE, Cd
from iommufd_arm_smmuv3.cmdqv import VCMDQ_CONS, VCMDQ_GERROR
from iommufd_arm_smmuv3.pgtable import Stage1Format, Stage2Format
from iommufd_arm_smmuv3.ste import CFG_S1_TRANS, L1CD_L2PTR, S1FMT_LINEAR, STE_SIZE, Ste
from snapshots import refused_unchanged

from iommufd_model.hw.bits import pack
from iommufd_model.hw.bits import words as ste_words
from iommufd_model.uapi import iommufd as U

S1 = Stage1Format()
LEAF = 0x403 | 0x40  # valid, page/table, AF, AP[1] (unprivileged)
DRIVER = "arm_smmuv3"
PASID = 5


def _vste(table: int) -> bytes:
    return pack(Ste(v=True, config=CFG_S1_TRANS, s1ctxptr=table).encode()[:2])


def _s1_seeds() -> list[bytes]:
    w = GuestWorld(DRIVER)
    tables = w.path_tables(w.dom.root_gpa, S1)
    return [b"", u64s(0), u64s(w.spare | 3, w.spare | 3), u64s(tables[0] | 3) * 4,
            u64s(1 << 47 | 3), u64s(*(t | 3 for t in tables[1:]), w.buf | LEAF),
            u64s(w.buf | 0x401), u64s(-1), u64s(0x1234_5000 | LEAF | 1 << 50)]  # fmt: skip


@harness("arm_smmuv3", "guest_s1_pt", 32, _s1_seeds)
def guest_s1_pt(data: bytes) -> str:
    """Guest stage-1 descriptors on the walk of IOVA, then TLBI by ASID and DMA."""
    w = GuestWorld(DRIVER)
    with w.isolation():
        plant_path(w.gmem, w.path_tables(w.dom.root_gpa, S1), S1, data, w.spare)
        inv = guarded(lambda: w.g.invalidate(w.dom))
        return f"{inv}|{w.probe()}|{w.events()}"


def _cd_seeds() -> list[bytes]:
    w = GuestWorld(DRIVER)
    good = w.gmem.read(w.dom.vendor.cd_table, CD_SIZE)
    cd = Cd.decode(ste_words(good))
    out = [good, bytes(64), b"\xff" * 64, good[:8] + u64s(w.spare) + good[16:],
           good[:8] + u64s(1 << 47) + good[16:]]  # fmt: skip
    cd.t0sz = 63
    out.append(pack(cd.encode()))
    return out


@harness("arm_smmuv3", "guest_cd", 64, _cd_seeds)
def guest_cd(data: bytes) -> str:
    """The guest's CD (read by the SMMU through stage 2), then CFGI_CD_ALL and DMA."""
    w = GuestWorld(DRIVER)
    with w.isolation():
        w.gmem.write(w.dom.vendor.cd_table, data[:CD_SIZE].ljust(CD_SIZE, b"\0"))
        inv = guarded(lambda: w.g._issue([C.cfgi_cd_all(VIRT_ID), C.tlbi_nh_all(0)]))
        return f"{inv}|{w.probe()}|{w.events()}"


def _ste_seeds() -> list[bytes]:
    w = GuestWorld(DRIVER)
    cd = w.dom.vendor.cd_table
    s = Ste(v=True, config=CFG_S1_TRANS, s1ctxptr=cd)
    out = [
        _vste(cd),
        bytes(16),
        b"\xff" * 16,
        _vste(1 << 47),
        _vste(w.spare),
        pack(Ste(v=True, config=4).encode()[:2]),
        pack(Ste(v=True).encode()[:2]),
    ]
    s.s1cdmax = 3
    out.append(pack(s.encode()[:2]))
    return out


@harness("arm_smmuv3", "vste_uapi", 16, _ste_seeds)
def vste_uapi(data: bytes) -> str:
    """IOMMU_HWPT_ALLOC(IOMMU_HWPT_DATA_ARM_SMMUV3) on the vIOMMU with these vSTE bytes; on
    success the device is attached to it and probed."""
    w = GuestWorld(DRIVER)
    fd = w.vm.fd
    hwpt: list[int] = []
    with w.isolation():
        res = refused_unchanged(
            fd,
            lambda: hwpt.append(
                fd.hwpt_alloc(
                    w.gdev.dev_id, w.g.viommu_id, data_type=U.IOMMU_HWPT_DATA_ARM_SMMUV3, data=data
                )
            ),
        )
        if not hwpt:
            return res
        att = guarded(lambda: fd.attach(w.gdev.dev_id, hwpt[0]))
        return f"{res}|{att}|{w.probe()}|{w.events()}"


@harness("arm_smmuv3", "guest_ste", 64, _ste_seeds)
def guest_ste(data: bytes) -> str:
    """The vSTE in the guest stream table, then CFGI_STE: the VMM's emulation builds the
    nested HWPT from it (or refuses), then DMA."""
    w = GuestWorld(DRIVER)
    with w.isolation():
        w.gmem.write(w.g.strtab + VIRT_ID * STE_SIZE, data[:STE_SIZE].ljust(STE_SIZE, b"\0"))
        inv = guarded(lambda: w.g._issue([C.cfgi_ste(VIRT_ID)]))
        return f"{inv}|{w.probe()}|{w.events()}"


def _cmd_seeds() -> list[bytes]:
    cmds = [C.cfgi_ste(VIRT_ID), C.cfgi_ste_range(0, 31), C.cfgi_all(), C.cfgi_cd(VIRT_ID, 0),
            C.cfgi_cd_all(VIRT_ID), C.tlbi_nh_all(0), C.tlbi_nh_asid(0, 1),
            C.tlbi_va(C.TLBI_NH_VA, IOVA, asid=1, num=1, scale=0, tg=1), C.tlbi_s12_vmall(0),
            C.tlbi_nsnh_all(), C.atc_inv(VIRT_ID, IOVA, 12), C.pri_resp(VIRT_ID, 0, 1),
            C.cmd_sync(C.CS_IRQ, 0x10_0000, 1), C.cmd_sync(3)]  # fmt: skip
    return [C.encode(c) for c in cmds] + [bytes(16), b"\xff" * 16]


def _pairs(data: bytes) -> list[tuple[int, int]]:
    return [C.decode(data[i : i + 16].ljust(16, b"\0")) for i in range(0, len(data), 16)][:16]


def _guest_cmd(data: bytes, accelerated: bool) -> str:
    w = GuestWorld(DRIVER, accelerated=accelerated,
                   options={DRIVER: {"cmdqv": True}} if accelerated else None)  # fmt: skip
    g: Any = w.g
    with w.isolation():
        issue = g._issue_vcmdq if accelerated else g._issue
        sub = guarded(lambda: issue(_pairs(data)))
        if accelerated:  # the VCMDQ's own error state (CONS.ERR, GERROR)
            cons, gerr = g.window.read(VCMDQ_CONS, 4), g.window.read(VCMDQ_GERROR, 4)
            sub += f"|c{cons >> 24:x}g{gerr:x}"
        return f"{sub}|{w.probe()}|{w.events()}"


@harness("arm_smmuv3", "guest_cmdq", 32, _cmd_seeds)
def guest_cmdq(data: bytes) -> str:
    """Guest commands in its trapped CMDQ (the VMM emulates or forwards each)."""
    return _guest_cmd(data, False)


@harness("arm_smmuv3", "guest_vcmdq", 32, _cmd_seeds)
def guest_vcmdq(data: bytes) -> str:
    """Guest commands in a CMDQV VCMDQ, consumed by the hardware without a trap."""
    return _guest_cmd(data, True)


@harness("arm_smmuv3", "viommu_inv", 32, _cmd_seeds)
def viommu_inv(data: bytes) -> str:
    """IOMMU_HWPT_INVALIDATE(IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3) on the vIOMMU: the
    input as an array of 16-byte commands (an empty input is a zero-entry array)."""
    w = GuestWorld(DRIVER)
    fd = w.vm.fd
    entries = [data[i : i + 16].ljust(16, b"\0") for i in range(0, len(data), 16)][:16]
    with w.isolation():
        res = refused_unchanged(
            fd,
            lambda: fd.hwpt_invalidate(
                w.g.viommu_id, U.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, entries, entry_len=16
            ),
        )
        return f"{res}|{w.probe()}|{w.events()}"


# -- host-owned ---------------------------------------------------------------------------------
def _ste_addr(w: HostWorld) -> int:
    hw: Any = w.hw
    base = hw.mmio["STRTAB_BASE"] & R.STRTAB_BASE_ADDR
    cfg = hw.mmio["STRTAB_BASE_CFG"]
    sid = w.dev.rid
    if (cfg >> 16) & 3 == 1:  # two-level
        split = (cfg >> 6) & 0x1F
        l1 = hw.memory.read_u64(base + (sid >> split) * 8)
        return int((l1 & ((1 << 52) - 1) & ~0x3F) + (sid & ((1 << split) - 1)) * STE_SIZE)
    return int(base + sid * STE_SIZE)


def _host_reset(w: HostWorld) -> None:
    hw: Any = w.hw
    hw.ste_cache.clear()
    hw.cd_cache.clear()
    hw.tlb.flush_all()


def _host_ste(w: HostWorld) -> Ste:
    return Ste.decode(ste_words(w.hw.memory.read(_ste_addr(w), STE_SIZE)))


def _host_ste_seeds() -> list[bytes]:
    w = HostWorld(DRIVER)
    good = w.hw.memory.read(_ste_addr(w), STE_SIZE)
    w2 = HostWorld(DRIVER, nest_parent=True)
    s2 = w2.hw.memory.read(_ste_addr(w2), STE_SIZE)
    return [good, s2, bytes(64), b"\xff" * 64, good[:8] + u64s(1 << 47) + good[16:],
            s2[:24] + u64s(1 << 47) + s2[32:], s2[:16] + u64s(0) + s2[24:]]  # fmt: skip


@harness("arm_smmuv3", "host_ste", 64, _host_ste_seeds)
def host_ste(data: bytes) -> str:
    """The device's STE in the host stream table as the SMMU fetches it."""
    w = HostWorld(DRIVER)
    w.hw.memory.write(_ste_addr(w), data[:STE_SIZE].ljust(STE_SIZE, b"\0"))
    _host_reset(w)
    with w.isolation():
        return f"{w.probe()}|{w.events()}"


def _host_cd0(w: HostWorld) -> int:
    """Where CD 0 is: the table itself when linear, else through level-1 descriptor 0."""
    ste = _host_ste(w)
    if not ste.s1_enabled:
        raise FuzzBug("the host paging domain is not stage 1: no CD to fuzz")
    if ste.s1fmt == S1FMT_LINEAR:
        return ste.s1ctxptr
    return int(w.hw.memory.read_u64(ste.s1ctxptr) & L1CD_L2PTR)


def _host_cd_seeds() -> list[bytes]:
    w = HostWorld(DRIVER)
    good = w.hw.memory.read(_host_cd0(w), CD_SIZE)
    return [good, bytes(64), b"\xff" * 64, good[:8] + u64s(1 << 47) + good[16:]]


@harness("arm_smmuv3", "host_cd", 64, _host_cd_seeds)
def host_cd(data: bytes) -> str:
    """The host CD of the paging (stage-1) domain as the SMMU fetches it."""
    w = HostWorld(DRIVER)
    w.hw.memory.write(_host_cd0(w), data[:CD_SIZE].ljust(CD_SIZE, b"\0"))
    _host_reset(w)
    with w.isolation():
        return f"{w.probe()}|{w.events()}"


def _host_l1cd_seeds() -> list[bytes]:
    w = HostWorld(DRIVER)
    good = w.hw.memory.read(_host_ste(w).s1ctxptr, 8)
    return [good, bytes(8), b"\xff" * 8, u64s(w.spare | 1), u64s(1 << 47 | 1),
            u64s(int.from_bytes(good, "little") & ~1)]  # fmt: skip


@harness("arm_smmuv3", "host_l1cd", 8, _host_l1cd_seeds)
def host_l1cd(data: bytes) -> str:
    """Level-1 descriptor 0 of the host's 2-level CD table (V, L2Ptr) as the SMMU reads it
    on the way to CD 0."""
    w = HostWorld(DRIVER)
    ste = _host_ste(w)
    if ste.s1fmt == S1FMT_LINEAR:
        raise FuzzBug("the host CD table is linear: no level-1 descriptor to fuzz")
    w.hw.memory.write(ste.s1ctxptr, data[:8].ljust(8, b"\0"))
    _host_reset(w)
    with w.isolation():
        return f"{w.probe()}|{w.events()}"


def _pasid_cd_seeds() -> list[bytes]:
    w = GuestWorld(DRIVER, pasid=PASID)
    good = w.gmem.read(w.pdom.vendor.cd_table + PASID * CD_SIZE, CD_SIZE)
    return [good, bytes(64), b"\xff" * 64, good[:8] + u64s(w.spare) + good[16:]]


@harness("arm_smmuv3", "guest_cd_pasid", 64, _pasid_cd_seeds)
def guest_cd_pasid(data: bytes) -> str:
    """The guest's CD of a substream (S1CDMax > 0 in its vSTE), read through stage 2 by the
    SMMU for PASID-tagged DMA, after the guest's CFGI_CD (forwarded with the vSID)."""
    w = GuestWorld(DRIVER, pasid=PASID)
    with w.isolation():
        slot = w.pdom.vendor.cd_table + PASID * CD_SIZE
        w.gmem.write(slot, data[:CD_SIZE].ljust(CD_SIZE, b"\0"))
        inv = guarded(lambda: w.g._issue([C.cfgi_cd(VIRT_ID, PASID)]))
        return f"{inv}|{w.probe()}|{w.events()}"


def _host_tables(w: HostWorld, stage2: bool) -> tuple[list[int], Any]:
    ste = _host_ste(w)
    if stage2:
        fmt: Any = Stage2Format()
        root = ste.s2ttb
    else:
        fmt = S1
        root = Cd.decode(ste_words(w.hw.memory.read(_host_cd0(w), CD_SIZE))).ttb0
    return walk_path(w.hw.memory, root, fmt, IOVA), fmt


def _pt_seeds(stage2: bool) -> list[bytes]:
    w = HostWorld(DRIVER, nest_parent=stage2)
    tables, _ = _host_tables(w, stage2)
    leaf = 0x4C3 if stage2 else LEAF
    return [b"", u64s(0), u64s(w.spare | 3) * 2, u64s(tables[0] | 3),
            u64s(*(t | 3 for t in tables)), u64s(1 << 47 | 3), u64s(0x1000 | leaf), u64s(-1),
            u64s(*(t | 3 for t in tables[:-2]), 0x20_0000 | leaf & ~2)]  # fmt: skip


def _host_pt(data: bytes, stage2: bool) -> str:
    w = HostWorld(DRIVER, nest_parent=stage2)
    tables, fmt = _host_tables(w, stage2)
    plant_path(w.hw.memory, tables, fmt, data, w.spare)
    _host_reset(w)
    with w.isolation():
        return f"{w.probe()}|{w.events()}"


@harness("arm_smmuv3", "host_s1_pt", 32, lambda: _pt_seeds(False))
def host_s1_pt(data: bytes) -> str:
    """Host stage-1 descriptors (a paging domain) on the walk of IOVA."""
    return _host_pt(data, False)


@harness("arm_smmuv3", "host_s2_pt", 32, lambda: _pt_seeds(True))
def host_s2_pt(data: bytes) -> str:
    """Host stage-2 descriptors (a nest-parent domain) on the walk of IOVA."""
    return _host_pt(data, True)


@harness("arm_smmuv3", "host_cmdq", 32, _cmd_seeds)
def host_cmdq(data: bytes) -> str:
    """Commands in the host CMDQ at CMDQ_PROD, then a CMDQ_PROD write."""
    w = HostWorld(DRIVER)
    hw: Any = w.hw
    ring = hw._cmdq
    log2 = hw._cmdq_log2
    wrap = (1 << (log2 + 1)) - 1
    prod = hw.mmio["CMDQ_PROD"] & wrap
    cmds = _pairs(data)
    for i, cmd in enumerate(cmds):
        ring.write((prod + i) & ((1 << log2) - 1), C.encode(cmd))
    before = len(hw.executed)
    with w.isolation():
        hw.mmio.write(R.CMDQ_PROD, (prod + len(cmds)) & wrap, 4)
    done = len(hw.executed) - before
    err = (hw.mmio["CMDQ_CONS"] >> R.CMDQ_CONS_ERR_SHIFT) & 0x7F
    gerr = hw.mmio["GERROR"] ^ hw.mmio["GERRORN"]
    return f"done{done}|cerr{err:x}|gerr{gerr:x}|{w.events()}"
