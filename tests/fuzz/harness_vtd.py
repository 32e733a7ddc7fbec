"""VT-d harnesses: the guest's root/context and PASID entries and first-stage tables (read by
the VMM's emulation or, through stage 2, by the hardware), guest QI descriptors, the vtd_s1
nested data and its invalidation array, and the host-owned root/context, PASID entries,
first/second-stage tables and invalidation queue."""

from __future__ import annotations

import errno
from typing import Any

from fuzzlib import (
    IOVA,
    PASID,
    VIRT_ID,
    GuestWorld,
    HostWorld,
    guarded,
    harness,
    plant_path,
    u64s,
    walk_path,
)
from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import regs as R
from iommufd_intel_vtd import tables as T
from iommufd_intel_vtd.pgtable import SecondStageFormat
from snapshots import refused_unchanged

from iommufd_model.core.eventq import EventFile
from iommufd_model.hw.x86_64 import X86_64Format
from iommufd_model.uapi import iommufd as U
from iommufd_model.uapi.codec import UStruct

DRIVER = "intel_vtd"
FS = X86_64Format(4)
PT = 0x67


def _fs_seeds() -> list[bytes]:
    w = GuestWorld(DRIVER)
    tables = w.path_tables(w.dom.root_gpa, FS)
    return [b"", u64s(0), u64s(w.spare | PT, w.spare | PT), u64s(tables[0] | PT) * 4,
            u64s(1 << 52 | PT), u64s(*(t | PT for t in tables[1:]), w.buf | 0xE7),
            u64s(0x1234_5000 | 0x80 | PT), u64s(-1)]  # fmt: skip


@harness("intel_vtd", "guest_fs_pt", 32, _fs_seeds)
def guest_fs_pt(data: bytes) -> str:
    """Guest first-stage entries on the walk of IOVA, then a PASID IOTLB flush and DMA."""
    w = GuestWorld(DRIVER)
    with w.isolation():
        plant_path(w.gmem, w.path_tables(w.dom.root_gpa, FS), FS, data, w.spare)
        inv = guarded(lambda: w.g.invalidate(w.dom))
        return f"{inv}|{w.probe()}|{w.events()}"


def _pe_seeds() -> list[bytes]:
    w = GuestWorld(DRIVER)
    slot = w.g._pasid_slot(VIRT_ID, 0)
    good = w.gmem.read(slot, T.PASID_ENTRY_SIZE)
    pe = T.PasidEntry.decode([int.from_bytes(good[i : i + 8], "little") for i in range(0, 64, 8)])
    out = [good, bytes(64), b"\xff" * 64]
    for change in ({"pgtt": T.PGTT_PT}, {"pgtt": T.PGTT_SECOND}, {"fsptptr": 1 << 50},
                   {"fspm": 1}, {"fsptptr": w.spare}, {"did": 0xFFFF}):  # fmt: skip
        q = T.PasidEntry(**{**{f: getattr(pe, f) for f in ("p", "pgtt", "did", "fsptptr")},
                            **change})  # fmt: skip
        out.append(u64s(*q.encode()))
    return out


@harness("intel_vtd", "guest_pasid_entry", 64, _pe_seeds)
def guest_pasid_entry(data: bytes) -> str:
    """The guest's PASID entry for RID_PASID, then a PASID-cache flush: the VMM re-reads it
    and installs (or refuses) a vtd_s1 nested HWPT, then DMA."""
    w = GuestWorld(DRIVER)
    g: Any = w.g
    with w.isolation():
        w.gmem.write(g._pasid_slot(VIRT_ID, 0), data[:64].ljust(64, b"\0"))
        inv = guarded(lambda: g._flush_pasid(w.dom.tag, 0))
        return f"{inv}|{w.probe()}|{w.events()}"


def _pe_pasid_seeds() -> list[bytes]:
    w = GuestWorld(DRIVER, pasid=PASID)
    good = w.gmem.read(w.g._pasid_slot(VIRT_ID, PASID), T.PASID_ENTRY_SIZE)
    rid = w.gmem.read(w.g._pasid_slot(VIRT_ID, 0), T.PASID_ENTRY_SIZE)
    return [good, rid, bytes(64), b"\xff" * 64, good[:16] + u64s(0) + good[24:]]


@harness("intel_vtd", "guest_pasid_entry_pasid", 64, _pe_pasid_seeds)
def guest_pasid_entry_pasid(data: bytes) -> str:
    """The guest's PASID entry for PASID 5, then a PASID-cache flush and PASID DMA."""
    w = GuestWorld(DRIVER, pasid=PASID)
    g: Any = w.g
    with w.isolation():
        w.gmem.write(g._pasid_slot(VIRT_ID, PASID), data[:64].ljust(64, b"\0"))
        inv = guarded(lambda: g._flush_pasid(w.pdom.tag, PASID))
        return f"{inv}|{w.probe()}|{w.events()}"


def _ctx_seeds() -> list[bytes]:
    w = GuestWorld(DRIVER)
    g: Any = w.g
    root = w.gmem.read(g.g_root, 16)
    table = T.RootEntry.decode(*[int.from_bytes(root[i : i + 8], "little") for i in (0, 8)])
    ctx_slot = table.half(VIRT_ID)[1] + (VIRT_ID & 0x7F) * 32
    ctx = w.gmem.read(ctx_slot, 32)
    return [root + ctx, bytes(48), b"\xff" * 48, root + bytes(32), u64s(w.spare | 1, 0) + ctx,
            u64s(1 << 50 | 1, 0) + ctx, root + ctx[:8] + u64s(1 << 50) + ctx[16:]]  # fmt: skip


@harness("intel_vtd", "guest_root_ctx", 48, _ctx_seeds)
def guest_root_ctx(data: bytes) -> str:
    """The guest's root entry for bus 0 (16 bytes) and the device's scalable-mode context
    entry (32 bytes, in the table the new root entry names when it is in guest RAM), then a
    device context-cache flush the VMM traps."""
    w = GuestWorld(DRIVER)
    g: Any = w.g
    data = data[:48].ljust(48, b"\0")
    with w.isolation():
        w.gmem.write(g.g_root, data[:16])
        re = T.RootEntry.decode(*[int.from_bytes(data[i : i + 8], "little") for i in (0, 8)])
        slot = re.half(VIRT_ID)[1] + (VIRT_ID & 0x7F) * 32
        if slot >= 0 and slot + 32 <= w.vm.ram_size:
            w.gmem.write(slot, data[16:])
        inv = guarded(lambda: g.submit(Q.make(Q.CC, g=Q.CC_DEVICE, sid=VIRT_ID, fm=0)))
        return f"{inv}|{w.probe()}|{w.events()}"


def _qi_seeds() -> list[bytes]:
    ds = [Q.make(Q.CC, g=Q.CC_GLOBAL), Q.make(Q.CC, g=Q.CC_DEVICE, sid=VIRT_ID),
          Q.make(Q.PC, g=Q.PC_GLOBAL), Q.make(Q.PC, g=Q.PC_PASID, did=2, pasid=0),
          Q.make(Q.IOTLB, g=Q.IOTLB_GLOBAL, dr=1, dw=1),
          Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=2, pasid=0),
          Q.make(Q.PIOTLB, g=Q.PIOTLB_PAGE, did=2, pasid=0, addr=IOVA >> 12, am=2),
          Q.make(Q.WAIT, sw=1, status_data=5, status_addr=0x10_0000 >> 2),
          Q.make(Q.WAIT, sw=1, status_data=5, status_addr=(1 << 40) >> 2)]  # fmt: skip
    return [d.encode(256) for d in ds] + [bytes(32), b"\xff" * 32]


@harness("intel_vtd", "guest_qi", 64, _qi_seeds)
def guest_qi(data: bytes) -> str:
    """Guest 256-bit descriptors in its invalidation queue, then IQT (the VMM emulates)."""
    w = GuestWorld(DRIVER)
    g: Any = w.g
    raws = [data[i : i + 32].ljust(32, b"\0") for i in range(0, len(data), 32)][:8]
    with w.isolation():
        code: list[int] = []
        res = guarded(lambda: code.append(g.complete(*g.post(raws))))
        if code and code[0]:  # qi_check_fault() recovered from IQE: the submission's -errno
            res = errno.errorcode[code[0]]
        return f"{res}|{w.probe()}|{w.events()}"


def _s1_seeds() -> list[bytes]:
    w = GuestWorld(DRIVER)
    root = w.dom.root_gpa
    good = U.IommuHwptVtdS1(flags=0, pgtbl_addr=root, addr_width=48).pack()
    return [good, b"", bytes(24), b"\xff" * 24, good + bytes(8), good + b"\1" * 8,
            U.IommuHwptVtdS1(flags=7, pgtbl_addr=root, addr_width=57).pack(),
            U.IommuHwptVtdS1(pgtbl_addr=1 << 50, addr_width=48).pack(),
            U.IommuHwptVtdS1(pgtbl_addr=root | 0x800, addr_width=39).pack()]  # fmt: skip


@harness("intel_vtd", "vtd_s1_uapi", 24, _s1_seeds)
def vtd_s1_uapi(data: bytes) -> str:
    """IOMMU_HWPT_ALLOC(IOMMU_HWPT_DATA_VTD_S1) over the nest parent with these bytes; on
    success the device is attached to it and probed."""
    w = GuestWorld(DRIVER)
    fd = w.vm.fd
    parent = w.vm.nest_parent(w.gdev.dev_id, w.hw)
    hwpt: list[int] = []
    with w.isolation():
        res = refused_unchanged(
            fd,
            lambda: hwpt.append(
                fd.hwpt_alloc(w.gdev.dev_id, parent, data_type=U.IOMMU_HWPT_DATA_VTD_S1, data=data)
            ),
        )
        if not hwpt:
            return res
        att = guarded(lambda: fd.attach(w.gdev.dev_id, hwpt[0]))
        return f"{res}|{att}|{w.probe()}|{w.events()}"


def _inv_seeds() -> list[bytes]:
    e = U.IommuHwptVtdS1Invalidate
    return [e(addr=IOVA, npages=1).pack(), e(addr=0, npages=2**64 - 1).pack(),
            e(addr=IOVA | 0x123, npages=1).pack(), e(addr=IOVA, npages=0).pack(),
            e(addr=IOVA, npages=3, flags=1).pack(), e(addr=IOVA, npages=1, flags=2).pack(),
            b"\xff" * 24, bytes(48)]  # fmt: skip


@harness("intel_vtd", "s1_invalidate", 48, _inv_seeds)
def s1_invalidate(data: bytes) -> str:
    """IOMMU_HWPT_INVALIDATE(IOMMU_HWPT_INVALIDATE_DATA_VTD_S1) on the nested HWPT: the
    input as an array of 24-byte entries."""
    w = GuestWorld(DRIVER)
    fd = w.vm.fd
    entries = [data[i : i + 24].ljust(24, b"\0") for i in range(0, len(data), 24)][:8]
    with w.isolation():
        res = refused_unchanged(
            fd,
            lambda: fd.hwpt_invalidate(
                w.dom.hwpt_id, U.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, entries, entry_len=24
            ),
        )
        return f"{res}|{w.probe()}|{w.events()}"


# -- host-owned ---------------------------------------------------------------------------------
def _reset(w: HostWorld) -> None:
    hw: Any = w.hw
    hw.context_cache.clear()
    hw.pasid_cache.clear()
    hw.iotlb.flush_all()


def _q(raw: bytes, n: int) -> list[int]:
    return [int.from_bytes(raw[i : i + 8], "little") for i in range(0, 8 * n, 8)]


def _host_slots(w: HostWorld) -> tuple[int, int, int, int]:
    """Addresses of the device's root entry, context entry, PASID dir entry, PASID entry."""
    hw: Any = w.hw
    mem = hw.memory
    rid = w.dev.rid
    root = hw.root_table + (rid >> 8) * 16
    re = T.RootEntry.decode(*_q(mem.read(root, 16), 2))
    ctx = re.half(rid & 0xFF)[1] + (rid & 0x7F) * 32
    ce = T.ContextEntry.decode(*_q(mem.read(ctx, 32), 4))
    pasid = ce.rid_pasid
    dirent = ce.pasid_dir + T.pasid_dir_index(pasid) * 8
    de = T.PasidDirEntry.decode(mem.read_u64(dirent))
    return root, ctx, dirent, de.table + T.pasid_table_index(pasid) * 64


def _host_ctx_seeds() -> list[bytes]:
    w = HostWorld(DRIVER)
    root, ctx, _, _ = _host_slots(w)
    mem = w.hw.memory
    good = mem.read(root, 16) + mem.read(ctx, 32)
    return [
        good,
        bytes(48),
        b"\xff" * 48,
        u64s(1 << 50 | 1, 0) + good[16:],
        good[:16] + good[16:24] + u64s(1 << 50) + good[32:],
        u64s(w.spare | 1, 0),
    ]


@harness("intel_vtd", "host_root_ctx", 48, _host_ctx_seeds)
def host_root_ctx(data: bytes) -> str:
    """The host root entry (16 bytes) and the device's context entry (32 bytes)."""
    w = HostWorld(DRIVER)
    root, ctx, _, _ = _host_slots(w)
    data = data[:48].ljust(48, b"\0")
    w.hw.memory.write(root, data[:16])
    w.hw.memory.write(ctx, data[16:])
    _reset(w)
    return f"{w.probe()}|{w.events()}"


def _host_pe_seeds() -> list[bytes]:
    w = HostWorld(DRIVER)
    _, _, dirent, pe = _host_slots(w)
    mem = w.hw.memory
    good = mem.read(dirent, 8) + mem.read(pe, 64)
    return [good, bytes(72), b"\xff" * 72, u64s(1 << 50 | 1) + good[8:],
            good[:8] + u64s(0x41) + good[16:], good[:8] + good[8:16] + u64s(1 << 50),
            u64s(w.spare | 1)]  # fmt: skip


@harness("intel_vtd", "host_pasid", 72, _host_pe_seeds)
def host_pasid(data: bytes) -> str:
    """The host PASID directory entry (8 bytes) and the RID_PASID entry (64 bytes)."""
    w = HostWorld(DRIVER)
    _, _, dirent, pe = _host_slots(w)
    data = data[:72].ljust(72, b"\0")
    w.hw.memory.write(dirent, data[:8])
    w.hw.memory.write(pe, data[8:])
    _reset(w)
    return f"{w.probe()}|{w.events()}"


def _host_tables(w: HostWorld) -> tuple[list[int], Any]:
    _, _, _, slot = _host_slots(w)
    pe = T.PasidEntry.decode(_q(w.hw.memory.read(slot, 64), 8))
    if pe.pgtt == T.PGTT_FIRST:
        fmt: Any = X86_64Format(pe.fs_levels)
        root = pe.fsptptr
    else:
        fmt = SecondStageFormat(T.aw_levels(pe.aw))
        root = pe.slptptr
    return walk_path(w.hw.memory, root, fmt, IOVA), fmt


def _pt_seeds(nest_parent: bool) -> list[bytes]:
    w = HostWorld(DRIVER, nest_parent=nest_parent)
    tables, _ = _host_tables(w)
    return [b"", u64s(0), u64s(w.spare | PT) * 2, u64s(tables[0] | PT),
            u64s(*(t | PT for t in tables)), u64s(1 << 52 | PT), u64s(0x1000 | 0x83), u64s(-1),
            u64s(*(t | PT | 1 << 60 for t in tables))]  # fmt: skip


def _host_pt(data: bytes, nest_parent: bool) -> str:
    w = HostWorld(DRIVER, nest_parent=nest_parent)
    tables, fmt = _host_tables(w)
    plant_path(w.hw.memory, tables, fmt, data, w.spare)
    _reset(w)
    return f"{w.probe()}|{w.events()}"


@harness("intel_vtd", "host_fs_pt", 32, lambda: _pt_seeds(False))
def host_fs_pt(data: bytes) -> str:
    """Host page-table entries of a paging domain on the walk of IOVA."""
    return _host_pt(data, False)


@harness("intel_vtd", "host_ss_pt", 32, lambda: _pt_seeds(True))
def host_ss_pt(data: bytes) -> str:
    """Host second-stage entries (a nest-parent domain) on the walk of IOVA."""
    return _host_pt(data, True)


@harness("intel_vtd", "host_qi", 64, _qi_seeds)
def host_qi(data: bytes) -> str:
    """Descriptors in the host invalidation queue at the tail, then an IQT write."""
    w = HostWorld(DRIVER)
    hw: Any = w.hw
    iq = hw.iq
    width = hw.iq_width // 8
    shift = 5 if width == 32 else 4
    tail = (hw.mmio["IQT"] & R.IQ_OFFSET_MASK) >> shift
    raws = [data[i : i + width].ljust(width, b"\0") for i in range(0, len(data), width)][:8]
    for i, raw in enumerate(raws):
        iq.write((tail + i) % iq.nentries, raw)
    before = hw.descriptors_done
    hw.mmio.write(R.IQT, ((tail + len(raws)) % iq.nentries) << shift)
    iqe = bool(hw.fsts & R.FSTS_IQE)
    return f"done{hw.descriptors_done - before}|iqe{int(iqe)}|{w.events()}"


class PrqWorld(HostWorld):
    """HostWorld plus an ATS/PRI device attached to a HWPT with a fault queue."""

    def __init__(self) -> None:
        super().__init__(DRIVER)
        self.pdev = self.machine.add_pci_device(iommu=0, ats=True)
        self.pdev_id = self.fd.bind(self.pdev)
        out = U.IommuFaultAlloc.unpack(
            self._ioctl(U.IOMMU_FAULT_QUEUE_ALLOC, U.IommuFaultAlloc(size=U.IommuFaultAlloc.SIZE))
        )
        self.fault_fd = out.out_fault_fd
        cmd = U.IommuHwptAlloc(
            size=U.IommuHwptAlloc.SIZE,
            flags=U.IOMMU_HWPT_FAULT_ID_VALID | U.IOMMU_HWPT_ALLOC_PASID,
            dev_id=self.pdev_id,
            pt_id=self.ioas,
            fault_id=out.out_fault_id,
        )
        hwpt = U.IommuHwptAlloc.unpack(self._ioctl(U.IOMMU_HWPT_ALLOC, cmd)).out_hwpt_id
        self.fd.attach(self.pdev_id, hwpt)
        self.fd.attach(self.pdev_id, hwpt, pasid=PASID)

    def _ioctl(self, cmd: int, st: UStruct) -> bytes:
        buf = bytearray(st.pack())
        self.fd.ioctl(cmd, buf)
        return bytes(buf)


def _prq_seeds() -> list[bytes]:
    from iommufd_intel_vtd.prq import PageRequest as Pr

    return [
        b"",
        Pr(0, IOVA).encode(),
        Pr(0, IOVA, PASID, write=True, lpig=False, prgi=5).encode()
        + Pr(0, IOVA, PASID, prgi=5).encode(),
        Pr(0, 1 << 50, read=False, exe=True, priv=True).encode(),
        Pr(0, IOVA, 7, read=False, write=False).encode(),  # stop marker, unattached PASID
        b"\xff" * 32,
    ]


@harness("intel_vtd", "host_prq", 128, _prq_seeds)
def host_prq(data: bytes) -> str:
    """Page requests a PRI device sends (up to 4 descriptors' fields; the RID is the bus's):
    the page request queue, the kernel's thread, the fault queue, the user's responses."""
    from iommufd_intel_vtd.prq import PageRequest

    w = PrqWorld()
    hw: Any = w.hw
    for i in range(0, min(len(data), 128), 32):
        r = PageRequest.decode(data[i : i + 32].ljust(32, b"\0"))
        # the bus gives the RID; private data is not modelled
        w.pdev.page_request(
            r.addr,
            pasid=r.pasid,
            read=r.read,
            write=r.write,
            exe=r.exe,
            priv=r.priv,
            grpid=r.prgi,
            last=r.lpig,
        )
    fault_file = w.proc.files[w.fault_fd]
    assert isinstance(fault_file, EventFile)
    raw = fault_file.read(16 * U.IommuHwptPgfault.SIZE)
    size = U.IommuHwptPgfault.SIZE
    faults = [U.IommuHwptPgfault.unpack(raw[i : i + size]) for i in range(0, len(raw), size)]
    for cookie in sorted({f.cookie for f in faults}):
        fault_file.write(U.IommuHwptPageResponse(cookie=cookie, code=0).pack())
    got = ",".join(f"{f.flags:x}/{f.perm:x}" for f in faults)
    resp = ",".join(f"{r.code:x}{'h' if r.by_hardware else ''}" for r in hw.prg_responses)
    return f"f[{got}]|r[{resp}]|{w.events()}"
