"""The command queue's 16-byte commands (IHI 0070, chapter 4): opcodes, fields, encoders.

Commands are two little-endian 64-bit words. The encoders build what a driver puts in the
queue; :func:`tlbi_range` is the range arithmetic a TLBI_NH_VA / TLBI_S2_IPA with TG != 0
describes, and :func:`plan_range` splits an IOVA range into such commands (IDR3.RIL).
"""

from __future__ import annotations

from iommufd_model.hw.bits import bit, get, mask, put

CMD_SIZE = 16

PREFETCH_CONFIG = 0x01
CFGI_STE = 0x03
CFGI_STE_RANGE = 0x04  # CFGI_ALL is CFGI_STE_RANGE with Range = 31
CFGI_CD = 0x05
CFGI_CD_ALL = 0x06
TLBI_NH_ALL = 0x10
TLBI_NH_ASID = 0x11
TLBI_NH_VA = 0x12
TLBI_NH_VAA = 0x13
TLBI_EL2_ALL = 0x20
TLBI_EL2_ASID = 0x21
TLBI_EL2_VA = 0x22
TLBI_S12_VMALL = 0x28
TLBI_S2_IPA = 0x2A
TLBI_NSNH_ALL = 0x30
ATC_INV = 0x40
PRI_RESP = 0x41
RESUME = 0x44
CMD_SYNC = 0x46

NAMES = {
    PREFETCH_CONFIG: "PREFETCH_CONFIG",
    CFGI_STE: "CFGI_STE",
    CFGI_STE_RANGE: "CFGI_STE_RANGE",
    CFGI_CD: "CFGI_CD",
    CFGI_CD_ALL: "CFGI_CD_ALL",
    TLBI_NH_ALL: "TLBI_NH_ALL",
    TLBI_NH_ASID: "TLBI_NH_ASID",
    TLBI_NH_VA: "TLBI_NH_VA",
    TLBI_NH_VAA: "TLBI_NH_VAA",
    TLBI_EL2_ALL: "TLBI_EL2_ALL",
    TLBI_EL2_ASID: "TLBI_EL2_ASID",
    TLBI_EL2_VA: "TLBI_EL2_VA",
    TLBI_S12_VMALL: "TLBI_S12_VMALL",
    TLBI_S2_IPA: "TLBI_S2_IPA",
    TLBI_NSNH_ALL: "TLBI_NSNH_ALL",
    ATC_INV: "ATC_INV",
    PRI_RESP: "PRI_RESP",
    RESUME: "RESUME",
    CMD_SYNC: "CMD_SYNC",
}

# word 0
CMD0_OP = mask(7, 0)
CMD0_SSV = bit(11)  # SubstreamID valid
CMD0_SSID = mask(31, 12)  # CFGI_CD / ATC_INV / PRI_RESP SubstreamID
CMD0_SID = mask(63, 32)  # CFGI_* / ATC_INV / PRI_RESP StreamID
CMD0_TLBI_NUM = mask(16, 12)  # range: NUM + 1 units ...
CMD0_TLBI_SCALE = mask(24, 20)  # ... of 2^SCALE granules
CMD0_TLBI_VMID = mask(47, 32)
CMD0_TLBI_ASID = mask(63, 48)
CMD0_ATC_GLOBAL = bit(9)
CMD0_SYNC_CS = mask(13, 12)  # completion signal
CMD0_SYNC_MSH = mask(23, 22)
CMD0_SYNC_MSIATTR = mask(27, 24)
CMD0_SYNC_MSIDATA = mask(63, 32)
# word 1
CMD1_LEAF = bit(0)  # CFGI_STE / CFGI_CD / TLBI: only leaf entries
CMD1_RANGE = mask(4, 0)  # CFGI_STE_RANGE: 2^(Range + 1) StreamIDs
CMD1_TLBI_TTL = mask(9, 8)  # level hint
CMD1_TLBI_TG = mask(11, 10)  # range granule: 1 = 4 KiB, 2 = 16 KiB, 3 = 64 KiB; 0 = no range
CMD1_TLBI_VA = mask(63, 12)
CMD1_TLBI_IPA = mask(51, 12)
CMD1_ATC_SIZE = mask(5, 0)  # ATC_INV: 2^Size pages
CMD1_ATC_ADDR = mask(63, 12)
CMD1_PRI_GRPID = mask(8, 0)
CMD1_PRI_RESP = mask(13, 12)
CMD1_SYNC_MSIADDR = mask(51, 2)

CS_NONE = 0
CS_IRQ = 1
CS_SEV = 2
CFGI_ALL_RANGE = 31
ATC_INV_SIZE_ALL = 52


def op(w0: int) -> int:
    return w0 & CMD0_OP


# -- encoders ----------------------------------------------------------------------------
def prefetch_cfg(sid: int) -> tuple[int, int]:
    return PREFETCH_CONFIG | put(sid, 63, 32), 0


def cfgi_ste(sid: int, leaf: bool = True) -> tuple[int, int]:
    return CFGI_STE | put(sid, 63, 32), CMD1_LEAF if leaf else 0


def cfgi_ste_range(sid: int, span: int) -> tuple[int, int]:
    return CFGI_STE_RANGE | put(sid, 63, 32), put(span, 4, 0)


def cfgi_all() -> tuple[int, int]:
    return cfgi_ste_range(0, CFGI_ALL_RANGE)


def cfgi_cd(sid: int, ssid: int, leaf: bool = True) -> tuple[int, int]:
    return CFGI_CD | put(ssid, 31, 12) | put(sid, 63, 32), CMD1_LEAF if leaf else 0


def cfgi_cd_all(sid: int) -> tuple[int, int]:
    return CFGI_CD_ALL | put(sid, 63, 32), 0


def tlbi_nh_all(vmid: int) -> tuple[int, int]:
    return TLBI_NH_ALL | put(vmid, 47, 32), 0


def tlbi_nh_asid(vmid: int, asid: int) -> tuple[int, int]:
    return TLBI_NH_ASID | put(vmid, 47, 32) | put(asid, 63, 48), 0


def tlbi_va(
    opcode: int,
    addr: int,
    *,
    vmid: int = 0,
    asid: int = 0,
    num: int = 0,
    scale: int = 0,
    tg: int = 0,
    ttl: int = 0,
    leaf: bool = False,
) -> tuple[int, int]:
    """TLBI_NH_VA / TLBI_NH_VAA / TLBI_EL2_VA / TLBI_S2_IPA of ``addr``, a range when ``tg``
    is non-zero."""
    w0 = opcode | put(num, 16, 12) | put(scale, 24, 20) | put(vmid, 47, 32)
    if opcode in (TLBI_NH_VA, TLBI_EL2_VA):
        w0 |= put(asid, 63, 48)
    addr_mask = CMD1_TLBI_IPA if opcode == TLBI_S2_IPA else CMD1_TLBI_VA
    w1 = (addr & addr_mask) | put(tg, 11, 10) | put(ttl, 9, 8) | (CMD1_LEAF if leaf else 0)
    return w0, w1


def tlbi_s12_vmall(vmid: int) -> tuple[int, int]:
    return TLBI_S12_VMALL | put(vmid, 47, 32), 0


def tlbi_el2_all() -> tuple[int, int]:
    return TLBI_EL2_ALL, 0


def tlbi_nsnh_all() -> tuple[int, int]:
    return TLBI_NSNH_ALL, 0


def atc_inv(sid: int, addr: int, size_log2: int, ssid: int | None = None) -> tuple[int, int]:
    w0 = ATC_INV | put(sid, 63, 32)
    if ssid is not None:
        w0 |= CMD0_SSV | put(ssid, 31, 12)
    return w0, (addr & CMD1_ATC_ADDR) | put(size_log2, 5, 0)


def pri_resp(sid: int, grpid: int, resp: int, ssid: int | None = None) -> tuple[int, int]:
    w0 = PRI_RESP | put(sid, 63, 32)
    if ssid is not None:
        w0 |= CMD0_SSV | put(ssid, 31, 12)
    return w0, put(grpid, 8, 0) | put(resp, 13, 12)


def resume(sid: int, stag: int, resp: int) -> tuple[int, int]:
    """CMD_RESUME: RESP 0 terminate, 1 retry, 2 abort the transaction stalled with STAG."""
    return RESUME | put(resp, 13, 12) | put(sid, 63, 32), put(stag, 15, 0)


def cmd_sync(cs: int = CS_NONE, msi_addr: int = 0, msi_data: int = 0) -> tuple[int, int]:
    # MSH inner shareable, MSIAttr outer/inner write-back: always set (arm_smmu_make_cmd_sync)
    w0 = CMD_SYNC | put(cs, 13, 12) | put(3, 23, 22) | put(0xF, 27, 24) | put(msi_data, 63, 32)
    return w0, msi_addr & CMD1_SYNC_MSIADDR


def encode(cmd: tuple[int, int]) -> bytes:
    return cmd[0].to_bytes(8, "little") + cmd[1].to_bytes(8, "little")


def decode(data: bytes) -> tuple[int, int]:
    return int.from_bytes(data[:8], "little"), int.from_bytes(data[8:16], "little")


# -- range invalidation ------------------------------------------------------------------------
def tg_shift(tg: int) -> int:
    """Granule of a TLBI TG field: 1 -> 12 (4 KiB), 2 -> 14 (16 KiB), 3 -> 16 (64 KiB)."""
    return (0, 12, 14, 16)[tg]


def tlbi_range(w0: int, w1: int, addr_mask: int) -> tuple[int, int]:
    """``(first, last)`` addresses a VA/IPA TLBI covers; a single address without TG."""
    addr = w1 & addr_mask
    tg = get(w1, 11, 10)
    if not tg:
        return addr, addr
    num = get(w0, 16, 12)
    scale = get(w0, 24, 20)
    length = (num + 1) << (scale + tg_shift(tg))
    return addr, addr + length - 1


def plan_range(iova: int, size: int, granule_shift: int = 12) -> list[tuple[int, int, int]]:
    """Split ``[iova, iova+size)`` into range TLBIs: a list of ``(addr, num, scale)``.

    Each command covers ``(num + 1) << scale`` granules starting at ``addr``: the lowest set bit
    of the remaining page count picks the scale, up to 32 units of it go in one command.
    """
    pages = size >> granule_shift
    out: list[tuple[int, int, int]] = []
    addr = iova
    while pages:
        scale = (pages & -pages).bit_length() - 1
        units = (pages >> scale) & 0x1F
        out.append((addr, units - 1, scale))
        pages -= units << scale
        addr += units << (scale + granule_shift)
    return out
