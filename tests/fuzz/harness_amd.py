"""AMD harnesses: gDTE (uAPI and guest device table), GCR3 entries, v2 (guest) and v1 (host)
page tables, the host DTE, and command streams (host, guest mediated, guest HW-vIOMMU)."""

from __future__ import annotations

from typing import Any

from fuzzlib import (
    IOVA,
    PASID,
    VIRT_ID,
    FuzzBug,
    GuestWorld,
    HostWorld,
    guarded,
    harness,
    plant_path,
    plant_words,
    u64s,
    walk_path,
)
from iommufd_amd import commands as C
from iommufd_amd import regs as R
from iommufd_amd.dte import DTE_SIZE, Dte
from iommufd_amd.gcr3 import GCR3_VALID
from iommufd_amd.hw import AmdIommu
from iommufd_amd.pgtable_v1 import AmdV1Format
from snapshots import refused_unchanged

from iommufd_model.hw.x86_64 import X86_64Format
from iommufd_model.uapi import iommufd as U

V2 = X86_64Format(4)
PT = 0x67  # P, RW, US, A, D: an x86 table/leaf entry


def _gdte(w: GuestWorld) -> bytes:
    d = w.g.devs[VIRT_ID]
    return Dte(v=True, tv=True, gv=True, giov=True, glx=0, gcr3=d.gcr3,
               domain_id=d.gdom).to_bytes()  # fmt: skip


def _guest_seeds() -> list[bytes]:
    w = GuestWorld("amd")
    tables = w.path_tables(w.dom.root_gpa, V2)
    out = [b"", u64s(0), u64s(w.spare | PT, w.spare | PT), u64s(tables[0] | PT) * 4,
           u64s(1 << 52 | PT), u64s(*(t | PT for t in tables[1:]), w.buf | 0xE7),
           u64s(0x1234_5000 | 0x80 | PT), u64s(-1)]  # fmt: skip
    return out


@harness("amd", "guest_v2_pt", 32, _guest_seeds)
def guest_v2_pt(data: bytes) -> str:
    """Guest v2 (x86-64) stage-1 entries on the walk of IOVA, then an invalidation and DMA."""
    w = GuestWorld("amd")
    tables = w.path_tables(w.dom.root_gpa, V2)
    with w.isolation():
        plant_path(w.gmem, tables, V2, data, w.spare)
        inv = guarded(lambda: w.g.invalidate(w.dom))
        return f"{inv}|{w.probe()}|{w.events()}"


def _gcr3_seeds() -> list[bytes]:
    w = GuestWorld("amd")
    root = w.dom.root_gpa
    return [u64s(root | GCR3_VALID), u64s(0), u64s(root), u64s(w.spare | GCR3_VALID, 0),
            u64s(1 << 51 | GCR3_VALID), u64s(-1), u64s(root | GCR3_VALID | 0xFF0)]  # fmt: skip


@harness("amd", "gcr3", 8, _gcr3_seeds)
def gcr3(data: bytes) -> str:
    """The guest's GCR3 table entry for the RID (PASID 0); extra words fill the spare page."""
    w = GuestWorld("amd")
    d = w.g.devs[VIRT_ID]
    with w.isolation():
        plant_words(w.gmem, [d.gcr3], data, w.spare)
        inv = guarded(lambda: w.g.sync([C.inv_iommu_all_pages(d.gdom, pasid=0, gn=True)]))
        return f"{inv}|{w.probe()}|{w.events()}"


def _gcr3_pasid_seeds() -> list[bytes]:
    w = GuestWorld("amd", pasid=PASID)
    root = w.pdom.root_gpa
    return [u64s(root | GCR3_VALID), u64s(0), u64s(w.dom.root_gpa | GCR3_VALID),
            u64s(w.spare | GCR3_VALID, 0), u64s(1 << 51 | GCR3_VALID), u64s(-1)]  # fmt: skip


@harness("amd", "gcr3_pasid", 8, _gcr3_pasid_seeds)
def gcr3_pasid(data: bytes) -> str:
    """The guest's GCR3 entry for PASID 5, then a PASID-tagged invalidation and PASID DMA."""
    w = GuestWorld("amd", pasid=PASID)
    d = w.g.devs[VIRT_ID]
    with w.isolation():
        plant_words(w.gmem, [d.gcr3 + PASID * 8], data, w.spare)
        inv = guarded(lambda: w.g.sync([C.inv_iommu_all_pages(d.gdom, pasid=PASID, gn=True)]))
        return f"{inv}|{w.probe()}|{w.events()}"


def _dte_seeds() -> list[bytes]:
    w = GuestWorld("amd")
    good = _gdte(w)
    # good + 1..7 bytes: cut back to the struct by gdte_uapi; 40 bytes stay oversize
    return [good, b"", bytes(32), good[:16], good + bytes(8), good + b"\1" * 8, good + b"\1",
            Dte(v=True, tv=True, gv=True, glx=3, gcr3=w.spare).to_bytes(),
            Dte(v=True, tv=True, mode=4, host_root=w.spare, gv=True).to_bytes(),
            Dte(v=True, tv=True, gv=True, gcr3=1 << 51).to_bytes(), b"\xff" * 32]  # fmt: skip


def gdte_uapi_data(data: bytes) -> bytes:
    """What :func:`gdte_uapi` passes as ``struct iommu_hwpt_amd_guest``: an input whose length
    is a multiple of 8 as it is (0..24 bytes short, 40 and more long: the length rule, EINVAL),
    any other length cut or zero-padded to the 32-byte struct, so that inputs a mutation grew
    or cut still reach the gDTE's fields instead of stopping at the length check."""
    return data if len(data) % 8 == 0 else data[:DTE_SIZE].ljust(DTE_SIZE, b"\0")


@harness("amd", "gdte_uapi", 32, _dte_seeds)
def gdte_uapi(data: bytes) -> str:
    """IOMMU_HWPT_ALLOC(IOMMU_HWPT_DATA_AMD_GUEST) on the vIOMMU with these gDTE bytes (see
    :func:`gdte_uapi_data`); on success the device is attached to it and probed."""
    data = gdte_uapi_data(data)
    w = GuestWorld("amd")
    fd, g = w.vm.fd, w.g
    hwpt: list[int] = []
    with w.isolation():
        res = refused_unchanged(
            fd,
            lambda: hwpt.append(
                fd.hwpt_alloc(
                    w.gdev.dev_id, g.viommu_id, data_type=U.IOMMU_HWPT_DATA_AMD_GUEST, data=data
                )
            ),
        )
        if not hwpt:
            return res
        att = guarded(lambda: fd.attach(w.gdev.dev_id, hwpt[0]))
        return f"{res}|{att}|{w.probe()}|{w.events()}"


@harness("amd", "gdte_devtab", 32, _dte_seeds)
def gdte_devtab(data: bytes) -> str:
    """The guest writes the gDTE in its device table and INVALIDATE_DEVTAB_ENTRY: the VMM's
    emulation turns it into a nested HWPT (or refuses), then DMA."""
    w = GuestWorld("amd")
    with w.isolation():
        w.gmem.write(w.g.devtab + VIRT_ID * DTE_SIZE, data[:DTE_SIZE].ljust(DTE_SIZE, b"\0"))
        inv = guarded(lambda: w.g.sync([C.inv_devtab_entry(VIRT_ID)]))
        return f"{inv}|{w.probe()}|{w.events()}"


def _cmd_seeds() -> list[bytes]:
    return [
        C.inv_iommu_all_pages(1, pasid=0, gn=True), C.inv_devtab_entry(VIRT_ID),
        C.completion_wait(0x10_0000, 7), C.completion_wait(1 << 40, 7), C.inv_all(),
        C.inv_iommu_pages(1, IOVA, 0x3000, pasid=0, gn=True),
        C.inv_iotlb_pages(VIRT_ID, IOVA, 0x1000, pasid=0, gn=True),
        C.inv_interrupt_table(VIRT_ID), C.prefetch_iommu_pages(VIRT_ID, IOVA, inval=True),
        C.complete_ppr(VIRT_ID, 0, 0, 1), bytes(16), b"\xff" * 16,
        C.inv_devtab_entry(0xFFFF) + C.inv_devtab_entry(VIRT_ID),
    ]  # fmt: skip


def _cmds(data: bytes) -> list[bytes]:
    return [data[i : i + 16].ljust(16, b"\0") for i in range(0, len(data), 16)][:16]


def _guest_cmd(data: bytes, accelerated: bool) -> str:
    w = GuestWorld("amd", accelerated=accelerated)
    g: Any = w.g
    with w.isolation():
        sub = guarded(lambda: g.submit(_cmds(data)))
        state = "stopped" if g.stopped else "run"
        if g.window is not None:
            state = f"st{g.window.read(R.VF_STATUS) & 0xFF:x}"
        evs = guarded(lambda: g.events())
        return f"{sub}|{state}|{evs}|{w.probe()}|{w.events()}"


@harness("amd", "guest_cmd", 32, _cmd_seeds)
def guest_cmd(data: bytes) -> str:
    """Guest commands (16-byte entries) through the VMM-mediated command buffer."""
    return _guest_cmd(data, False)


@harness("amd", "guest_cmd_hw", 32, _cmd_seeds)
def guest_cmd_hw(data: bytes) -> str:
    """Guest commands on the HW-vIOMMU command buffer (the hardware consumes them)."""
    return _guest_cmd(data, True)


# -- host-owned formats (written by the kernel; the fuzz plays a buggy or compromised host) ---
def _amd(w: HostWorld) -> AmdIommu:
    assert isinstance(w.hw, AmdIommu)
    return w.hw


def _host_dte_seeds() -> list[bytes]:
    w = HostWorld("amd")
    good = w.hw.memory.read(_amd(w).devtab_base + w.dev.rid * DTE_SIZE, DTE_SIZE)
    d = Dte.from_bytes(good)
    return [good, bytes(32), b"\xff" * 32,
            Dte(v=True, tv=True, mode=7, host_root=d.host_root, ir=True).to_bytes(),
            Dte(v=True, tv=True, mode=4, host_root=1 << 51, ir=True, iw=True).to_bytes(),
            Dte(v=True, tv=True, mode=0, ir=True).to_bytes(),
            Dte(v=True, tv=True, gv=True, giov=True, glx=2, gcr3=w.spare).to_bytes()]  # fmt: skip


def _host_reset(w: HostWorld) -> None:
    _amd(w).dte_cache.clear()
    _amd(w).iotlb.flush_all()


@harness("amd", "host_dte", 32, _host_dte_seeds)
def host_dte(data: bytes) -> str:
    """The device's DTE in the host device table as the hardware reads it."""
    w = HostWorld("amd")
    w.hw.memory.write(_amd(w).devtab_base + w.dev.rid * DTE_SIZE,
                      data[:DTE_SIZE].ljust(DTE_SIZE, b"\0"))  # fmt: skip
    _host_reset(w)
    with w.isolation():
        return f"{w.probe()}|{w.events()}"


def _v1(w: HostWorld) -> tuple[list[int], AmdV1Format]:
    d = Dte.from_bytes(w.hw.memory.read(_amd(w).devtab_base + w.dev.rid * DTE_SIZE, DTE_SIZE))
    fmt = AmdV1Format(d.mode)
    return walk_path(w.hw.memory, d.host_root, fmt, IOVA), fmt


def _v1_seeds() -> list[bytes]:
    w = HostWorld("amd")
    tables, _ = _v1(w)
    pr = 1 | 3 << 61  # PR, IR, IW
    return [
        b"",
        u64s(0),
        u64s(w.spare | 3 << 9 | pr) * 2,
        u64s(tables[0] | 3 << 9 | pr),
        u64s(*(t | 7 << 9 | pr for t in tables)),
        u64s(1 << 51 | 3 << 9 | pr),
        u64s(*(t | 3 << 9 | pr | 1 << 52 for t in tables)),
        u64s(-1),
        u64s(0x1000 | 1),
    ]


@harness("amd", "host_v1_pt", 32, _v1_seeds)
def host_v1_pt(data: bytes) -> str:
    """Host v1 page-table entries on the walk of IOVA (next-level 7, loops, reserved bits)."""
    w = HostWorld("amd")
    tables, fmt = _v1(w)
    plant_path(w.hw.memory, tables, fmt, data, w.spare)
    _host_reset(w)
    with w.isolation():
        return f"{w.probe()}|{w.events()}"


@harness("amd", "host_cmd", 32, _cmd_seeds)
def host_cmd(data: bytes) -> str:
    """Commands in the host command buffer at the tail, then a CMD_TAIL write."""
    w = HostWorld("amd")
    hw: Any = w.hw
    ring = hw.cmd_ring
    tail = hw.mmio["CMD_TAIL"] // R.ENTRY_SIZE
    cmds = _cmds(data)
    for i, raw in enumerate(cmds):
        ring.write((tail + i) % ring.nentries, raw)
    hw.mmio.write(R.CMD_TAIL, ((tail + len(cmds)) % ring.nentries) * R.ENTRY_SIZE)
    done = (hw.mmio["CMD_HEAD"] // R.ENTRY_SIZE - tail) % ring.nentries
    if done > len(cmds):
        raise FuzzBug(f"the command processor ran {done} commands of {len(cmds)}")
    return f"done{done}|{'run' if hw.cmd_running else 'stop'}|{w.events()}"
