"""How Linux 7.2 rewrites a live STE or CD (``arm_smmu_write_entry``), so that the command
stream of an attach is the kernel's: one CFGI (+ CMD_SYNC) per step that changed memory.

The SMMU reads an entry 64 bits at a time, so a change of several "used" qwords cannot be one
store. The writer compares which bits the current and the target entry use:

* no used bit changes: write everything in one step;
* used bits change in one qword only (hitless): first the bits the current entry ignores,
  then that critical qword, then the rest (bits the target ignores are cleared);
* used bits change in two or more qwords (disruptive): V=0 first, then qwords 1..7, then
  qword 0 with V=1.

The used-bit rules are those of ``arm_smmu_get_ste_used`` / ``arm_smmu_get_cd_used`` and the
"safe to change hitlessly" rule of ``arm_smmu_get_ste_update_safe`` (MEV always; EATS_TRANS
unless S1CHK or S2S is involved). Facts from Linux 7.2 arm-smmu-v3.c; the code is the model's.
"""

from __future__ import annotations

from collections.abc import Callable

from iommufd_arm_smmuv3.cd import (
    CD0_EPD0,
    CD0_IR0,
    CD0_OR0,
    CD0_SH0,
    CD0_T0SZ,
    CD0_TG0,
    CD0_V,
    CD1_TTB0,
)
from iommufd_arm_smmuv3.ste import (
    CFG_BYPASS,
    EATS_S1CHK,
    EATS_TRANS,
    S1DSS_BYPASS,
    STE0_CFG,
    STE0_S1CDMAX,
    STE0_S1CTXPTR,
    STE0_S1FMT,
    STE0_V,
    STE1_EATS,
    STE1_MEV,
    STE1_S1CIR,
    STE1_S1COR,
    STE1_S1CSH,
    STE1_S1DSS,
    STE1_S1STALLD,
    STE1_S2FWB,
    STE1_SHCFG,
    STE1_STRW,
    STE2_S2AA64,
    STE2_S2ENDI,
    STE2_S2PTW,
    STE2_S2R,
    STE2_S2S,
    STE2_S2VMID,
    STE2_VTCR,
    STE3_S2TTB,
)
from iommufd_model.hw.bits import get, put

QWORDS = 8
ALL = (1 << 64) - 1

Used = Callable[[list[int]], list[int]]
Safe = Callable[[list[int], list[int]], list[int]]


def ste_used(ent: list[int]) -> list[int]:
    """The STE bits the SMMU reads for this configuration (``arm_smmu_get_ste_used``)."""
    used = [0] * QWORDS
    used[0] = STE0_V
    if not ent[0] & STE0_V:
        return used
    used[0] |= STE0_CFG
    cfg = get(ent[0], 3, 1)
    if cfg & 0b001:  # stage 1 translates
        used[0] |= STE0_S1FMT | STE0_S1CTXPTR | STE0_S1CDMAX
        used[1] |= (
            STE1_S1DSS
            | STE1_S1CIR
            | STE1_S1COR
            | STE1_S1CSH
            | STE1_S1STALLD
            | STE1_STRW
            | STE1_EATS
            | STE1_MEV
        )
        used[2] |= STE2_S2VMID
        if get(ent[1], 1, 0) == S1DSS_BYPASS:
            used[1] |= STE1_SHCFG
    if cfg & 0b010:  # stage 2 translates
        used[1] |= STE1_S2FWB | STE1_EATS | STE1_SHCFG | STE1_MEV
        used[2] |= (
            STE2_S2VMID | STE2_VTCR | STE2_S2AA64 | STE2_S2ENDI | STE2_S2PTW | STE2_S2S | STE2_S2R
        )
        used[3] |= STE3_S2TTB
    if cfg == CFG_BYPASS:
        used[1] |= STE1_SHCFG
    return used


def ste_update_safe(cur: list[int], target: list[int]) -> list[int]:
    """Bits that may change without sequencing (``arm_smmu_get_ste_update_safe``)."""
    safe = [0] * QWORDS
    s1chk = put(EATS_S1CHK, 29, 28)
    if not (cur[1] | target[1]) & s1chk and not (cur[2] | target[2]) & STE2_S2S:
        safe[1] |= put(EATS_TRANS, 29, 28)
    safe[1] |= STE1_MEV
    return safe


def cd_used(ent: list[int]) -> list[int]:
    """The CD bits the SMMU reads (``arm_smmu_get_cd_used``): all of a valid CD but the
    TTB0 walk settings when EPD0 disables TTB0 walks."""
    if not ent[0] & CD0_V:
        return [CD0_V] + [0] * (QWORDS - 1)
    used = [ALL] * QWORDS
    if ent[0] & CD0_EPD0:
        used[0] &= ~(CD0_T0SZ | CD0_TG0 | CD0_IR0 | CD0_OR0 | CD0_SH0)
        used[1] &= ~CD1_TTB0
    return used


def _qword_diff(
    entry: list[int], target: list[int], used: Used, safe_of: Safe | None
) -> tuple[int, list[int]]:
    cur_used = used(entry)
    target_used = used(target)
    safe = safe_of(entry, target) if safe_of is not None else [0] * QWORDS
    unused_update = [0] * QWORDS
    diff = 0
    for i in range(QWORDS):
        s = safe[i] & target_used[i] & cur_used[i]
        cu = cur_used[i] & ~s
        unused_update[i] = (entry[i] & cu) | (target[i] & ~cu)
        if (unused_update[i] & target_used[i]) != target[i]:
            diff |= 1 << i
    return diff, unused_update


def write_entry(
    entry: list[int],
    target: list[int],
    used: Used,
    safe_of: Safe | None,
    store: Callable[[int, int], None],
    sync: Callable[[], None],
) -> None:
    """Turn ``entry`` (the words in memory, updated in place) into ``target``.

    ``store(i, value)`` writes qword ``i`` to memory; ``sync()`` is the CFGI + CMD_SYNC the
    kernel issues after each step that changed a qword.
    """

    def entry_set(words: list[int], start: int, length: int) -> None:
        changed = False
        for i in range(start, start + length):
            if entry[i] != words[i]:
                entry[i] = words[i]
                store(i, words[i])
                changed = True
        if changed:
            sync()

    diff, unused_update = _qword_diff(entry, target, used, safe_of)
    if diff and diff & (diff - 1) == 0:  # one qword: hitless
        critical = diff.bit_length() - 1
        unused_update[critical] = entry[critical]
        entry_set(unused_update, 0, QWORDS)
        entry_set(target, critical, 1)
        entry_set(target, 0, QWORDS)
    elif diff:  # disruptive: V=0, the rest, then qword 0
        unused_update[0] = 0
        entry_set(unused_update, 0, 1)
        entry_set(target, 1, QWORDS - 1)
        entry_set(target, 0, 1)
    else:
        entry_set(target, 0, QWORDS)
