"""Event queue records (IHI 0070, 7.3): 32 bytes, four little-endian 64-bit words.

Word 0: EventID [7:0], SSV [11], SubstreamID [31:12], StreamID [63:32].
Word 1: STAG [15:0], Stall [31], PnU [33], InD [34], RnW [35] (1 = read), S2 [39],
CLASS [41:40] (CD, TT, IN), TT_RnW [44]: the fields Linux 7.2's ``arm_smmu_decode_event``
reads (``EVTQ_1_*`` in arm-smmu-v3.h), filled in the translation fault records (F_TRANSLATION,
F_ADDR_SIZE, F_ACCESS, F_PERMISSION, F_WALK_EABT).
Word 2: InputAddr. Word 3: IPA [51:12] for stage-2 faults, or FetchAddr [51:3] for fetch aborts.
"""

from __future__ import annotations

import attrs

from iommufd_model.hw.bits import bit, get, mask, pack, put, words

EVENT_SIZE = 32

F_UUT = 0x01
C_BAD_STREAMID = 0x02
F_STE_FETCH = 0x03
C_BAD_STE = 0x04
F_STREAM_DISABLED = 0x06
C_BAD_SUBSTREAMID = 0x08
F_CD_FETCH = 0x09
C_BAD_CD = 0x0A
F_WALK_EABT = 0x0B
F_TRANSLATION = 0x10
F_ADDR_SIZE = 0x11
F_ACCESS = 0x12
F_PERMISSION = 0x13

NAMES = {
    C_BAD_STREAMID: "C_BAD_STREAMID",
    F_STE_FETCH: "F_STE_FETCH",
    C_BAD_STE: "C_BAD_STE",
    F_STREAM_DISABLED: "F_STREAM_DISABLED",
    C_BAD_SUBSTREAMID: "C_BAD_SUBSTREAMID",
    F_CD_FETCH: "F_CD_FETCH",
    C_BAD_CD: "C_BAD_CD",
    F_WALK_EABT: "F_WALK_EABT",
    F_TRANSLATION: "F_TRANSLATION",
    F_ADDR_SIZE: "F_ADDR_SIZE",
    F_ACCESS: "F_ACCESS",
    F_PERMISSION: "F_PERMISSION",
}

# The events Linux forwards to a vEVENTQ (arm_smmu_handle_event), when not stage-2 faults.
FORWARDED_TO_VIOMMU = frozenset(
    {
        C_BAD_STE,
        F_STREAM_DISABLED,
        C_BAD_SUBSTREAMID,
        C_BAD_CD,
        F_TRANSLATION,
        F_ADDR_SIZE,
        F_ACCESS,
        F_PERMISSION,
    }
)

EVT0_ID = mask(7, 0)
EVT0_SSV = bit(11)
EVT0_SSID = mask(31, 12)
EVT0_SID = mask(63, 32)
EVT1_STALL = bit(31)
EVT1_PNU = bit(33)
EVT1_IND = bit(34)
EVT1_RNW = bit(35)
EVT1_S2 = bit(39)
EVT1_CLASS = mask(41, 40)
EVT1_TT_READ = bit(44)
EVT3_IPA = mask(51, 12)
EVT3_FETCH_ADDR = mask(51, 3)

CLASS_CD = 0
CLASS_TT = 1
CLASS_IN = 2

#: The records that describe the faulting transaction (InputAddr, RnW, PnU, InD, S2, CLASS).
FAULT_RECORDS = frozenset({F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, F_PERMISSION, F_WALK_EABT})


@attrs.define
class Event:
    id: int  # EventID
    sid: int  # StreamID
    ssid: int | None = None  # SubstreamID, with SSV when given
    input_addr: int = 0  # InputAddr: the transaction's address
    read: bool = True  # RnW
    s2: bool = False  # S2: the fault came from stage 2
    cls: int = CLASS_IN  # CLASS: what stage 2 was translating
    ipa: int = 0  # IPA (stage-2 faults)
    fetch_addr: int = 0  # FetchAddr (F_STE_FETCH, F_CD_FETCH, F_WALK_EABT)
    stall: bool = False  # Stall: the transaction is held until CMD_RESUME
    stag: int = 0  # STAG: the stalled transaction's tag, for CMD_RESUME
    priv: bool = False  # PnU: the transaction was privileged
    instr: bool = False  # InD: an instruction fetch
    tt_read: bool = False  # TT_RnW: CLASS TT, the table access was a read (not an HTTU write)

    @property
    def name(self) -> str:
        return NAMES.get(self.id, f"event {self.id:#x}")

    def encode(self) -> bytes:
        w0 = put(self.id, 7, 0) | put(self.sid, 63, 32)
        if self.ssid is not None:
            w0 |= EVT0_SSV | put(self.ssid, 31, 12)
        w1 = 0
        w3 = 0
        if self.id in FAULT_RECORDS:
            w1 = (
                (EVT1_RNW if self.read else 0) | (EVT1_S2 if self.s2 else 0) | put(self.cls, 41, 40)
            )
            w1 |= (EVT1_PNU if self.priv else 0) | (EVT1_IND if self.instr else 0)
            w1 |= EVT1_TT_READ if self.tt_read else 0
        if self.stall:
            w1 |= EVT1_STALL | put(self.stag, 15, 0)
        if self.s2:
            w3 = self.ipa & EVT3_IPA
        if self.id in (F_STE_FETCH, F_CD_FETCH, F_WALK_EABT):
            w3 = self.fetch_addr & EVT3_FETCH_ADDR
        return pack([w0, w1, self.input_addr, w3])

    @classmethod
    def decode(cls, data: bytes) -> Event:
        w = words(data[:EVENT_SIZE])
        s2 = bool(w[1] & EVT1_S2)
        fetch = get(w[0], 7, 0) in (F_STE_FETCH, F_CD_FETCH, F_WALK_EABT)
        return cls(
            id=get(w[0], 7, 0),
            sid=get(w[0], 63, 32),
            ssid=get(w[0], 31, 12) if w[0] & EVT0_SSV else None,
            input_addr=w[2],
            read=bool(w[1] & EVT1_RNW),
            s2=s2,
            cls=get(w[1], 41, 40),
            ipa=w[3] & EVT3_IPA if s2 and not fetch else 0,
            fetch_addr=w[3] & EVT3_FETCH_ADDR if fetch else 0,
            stall=bool(w[1] & EVT1_STALL),
            stag=get(w[1], 15, 0) if w[1] & EVT1_STALL else 0,
            priv=bool(w[1] & EVT1_PNU),
            instr=bool(w[1] & EVT1_IND),
            tt_read=bool(w[1] & EVT1_TT_READ),
        )


PRI_SIZE = 16
PRIQ0_PERM_PRIV = bit(58)
PRIQ0_PERM_EXEC = bit(59)
PRIQ0_SSID_V = bit(63)
PRIQ0_PRG_LAST = bit(62)
PRIQ0_PERM_WRITE = bit(61)
PRIQ0_PERM_READ = bit(60)


@attrs.define
class PageRequest:
    """A PRI queue record (16 bytes): a device's PCIe page request as the SMMU queues it.

    Word 0: StreamID [31:0], SubstreamID [51:32], Priv [58], Exec [59], Read [60],
    Write [61], Last [62], SSV [63]. Word 1: PRG index [8:0], Addr [63:12].
    """

    sid: int
    addr: int
    grpid: int
    last: bool = True
    read: bool = True
    write: bool = False
    ssid: int | None = None
    exe: bool = False
    priv: bool = False

    def encode(self) -> bytes:
        w0 = put(self.sid, 31, 0)
        w0 |= (PRIQ0_PERM_EXEC if self.exe else 0) | (PRIQ0_PERM_PRIV if self.priv else 0)
        if self.ssid is not None:
            w0 |= PRIQ0_SSID_V | put(self.ssid, 51, 32)
        w0 |= (PRIQ0_PRG_LAST if self.last else 0) | (PRIQ0_PERM_READ if self.read else 0)
        w0 |= PRIQ0_PERM_WRITE if self.write else 0
        return pack([w0, put(self.grpid, 8, 0) | (self.addr & mask(63, 12))])

    @classmethod
    def decode(cls, data: bytes) -> PageRequest:
        w0, w1 = words(data[:PRI_SIZE])
        return cls(
            sid=get(w0, 31, 0),
            addr=w1 & mask(63, 12),
            grpid=get(w1, 8, 0),
            last=bool(w0 & PRIQ0_PRG_LAST),
            read=bool(w0 & PRIQ0_PERM_READ),
            write=bool(w0 & PRIQ0_PERM_WRITE),
            ssid=get(w0, 51, 32) if w0 & PRIQ0_SSID_V else None,
            exe=bool(w0 & PRIQ0_PERM_EXEC),
            priv=bool(w0 & PRIQ0_PERM_PRIV),
        )


def replace_sid(data: bytes, sid: int) -> bytes:
    """The record with StreamID replaced (what the vSMMU reports: the guest's vSID)."""
    w0 = int.from_bytes(data[:8], "little")
    w0 = (w0 & ~EVT0_SID) | put(sid, 63, 32)
    return w0.to_bytes(8, "little") + data[8:]
