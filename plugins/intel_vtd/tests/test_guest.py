"""The VT-d guest model: guest structures in guest RAM, the VMM's traps and forwarding."""

from __future__ import annotations

import errno

import pytest
from iommufd_intel_vtd import faults as F
from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import regs as R
from iommufd_intel_vtd import tables as T
from iommufd_intel_vtd.domain import VtdNested
from iommufd_intel_vtd.guest import RID_PASID, GuestVtd, psi_aligned
from iommufd_intel_vtd.hw import IntelVtd

import iommufd_model as im
from iommufd_model.hw.x86_64 import X86_P, X86_RW
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm import GuestDevice, GuestDomain, Vm

PAGE = 4096
MIB = 1 << 20
IOVA = 0x20_0000_0000
VRID = 0x18


class Box:
    """One VM on one VT-d unit with one device passed through."""

    def __init__(self) -> None:
        self.machine = im.Machine.build(iommus=["intel_vtd"])
        hw = self.machine.iommus[0]
        assert isinstance(hw, IntelVtd)
        self.hw = hw
        self.vm = Vm(self.machine, 8 * MIB, table_pool=2 * MIB)
        g = self.vm.viommu(hw)
        assert isinstance(g, GuestVtd)
        self.g = g
        self.dev = self.machine.add_pci_device(iommu=0)
        self.gdev: GuestDevice = g.add_device(self.dev, VRID)

    def buffer(self, n: int, fill: bytes) -> int:
        gpa = self.vm.alloc_buffer(n)
        self.vm.memory.write(gpa, fill * (n // len(fill)))
        return gpa

    def traps(self, kind: str | None = None) -> int:
        return self.vm.stats.traps if kind is None else self.vm.stats.by_kind.get(kind, 0)

    def faults(self, fn: object) -> int:
        """Run a DMA that must fault; returns the VT-d fault reason recorded."""
        n = len(self.hw.records)
        with pytest.raises(im.DmaFault):
            fn()  # type: ignore[operator]
        assert len(self.hw.records) == n + 1
        return self.hw.records[-1].reason


@pytest.fixture
def box() -> Box:
    return Box()


def test_accelerated_is_refused() -> None:
    b = Box()
    with pytest.raises(OSError) as exc:
        b.vm.viommu(b.hw, accelerated=True)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_boot_programs_the_emulated_registers(box: Box) -> None:
    g = box.g
    assert g.vmm.regs.read(R.GSTS, 4) & (R.GSTS_TES | R.GSTS_QIES | R.GSTS_RTPS) == (
        R.GSTS_TES | R.GSTS_QIES | R.GSTS_RTPS
    )
    assert g.vmm.v_root == g.g_root and g.vmm.v_iq == g.g_iq and g.vmm.v_iq_width == 256
    assert g.vmm.regs.read(R.CAP) & R.CAP_CM  # caching mode: new entries are flushed too
    assert g.vmm.regs.read(R.ECAP) & R.ECAP_FLTS and not g.vmm.regs.read(R.ECAP) & R.ECAP_NEST
    # boot: 5 register writes + IQT = 0, then context-, PASID- and IOTLB-global flushes;
    # adding the device: one device-selective context-cache flush
    assert box.vm.stats.by_kind == {"mmio": 5, "qi-tail": 2, "pasid-cache": 3}
    # guest structures are in guest RAM: the context entry for the vRID
    ce = g.vmm._guest_context(VRID)
    assert ce is not None and ce.paside and ce.pasid_dir == g.g_pasid_dir[VRID]
    assert g.g_root < box.vm.ram_size and ce.pasid_dir < box.vm.ram_size


def test_attach_builds_the_nested_hwpt_from_the_guest_pasid_entry(box: Box) -> None:
    g = box.g
    before = box.traps()
    dom = g.attach(box.gdev)
    assert box.traps() - before == 2  # PASID-cache flush (trapped) + PIOTLB flush
    assert box.traps("pasid-cache") == 4
    pe = g.read_pasid_entry(VRID, RID_PASID)
    assert pe.p and pe.pgtt == T.PGTT_FIRST and pe.did == dom.tag and pe.fsptptr == dom.root_gpa
    hwpt = box.vm.fd.objects.get(dom.hwpt_id)
    nested = hwpt.domain  # type: ignore[attr-defined]
    assert isinstance(nested, VtdNested)
    assert nested.cfg.pgtbl_addr == dom.root_gpa and nested.cfg.addr_width == 48
    assert nested.did is not None  # the host allocated its own DID at attach
    assert box.vm.fd.device(box.gdev.dev_id).hwpt is hwpt
    # the host PASID entry nests the guest's table (a GPA) over the nest parent
    host = box.hw.driver_state
    hpe = host.read_pasid_entry(host.devs[box.dev.rid], 0)
    assert hpe.pgtt == T.PGTT_NESTED and hpe.fsptptr == dom.root_gpa and hpe.did == nested.did


def test_one_trap_per_tail_write(box: Box) -> None:
    g = box.g
    dom = g.attach(box.gdev)
    gpa = box.buffer(PAGE, b"a")
    t, w = box.traps(), g.vmm.regs.writes
    g.map(dom, IOVA, gpa, PAGE)
    g.unmap(dom, IOVA, PAGE)
    g.map(dom, IOVA, gpa, PAGE)
    assert box.traps() == t and g.vmm.regs.writes == w  # the guest's tables: no exit
    for n, (iova, size) in enumerate([(IOVA, PAGE), (IOVA, 3 * PAGE), (None, 0)], 1):
        fwd = box.vm.stats.forwarded
        g.invalidate(dom, iova, size)
        assert box.traps() == t + n and box.traps("qi-tail") == 2 + 1 + n
        assert g.vmm.regs.writes == w + n  # exactly one register write (IQT) per flush
        assert box.vm.stats.forwarded == fwd + 1
    # several descriptors behind one tail write: still one exit, every one forwarded
    t, fwd = box.traps(), box.vm.stats.forwarded
    descs = [
        Q.make(Q.PIOTLB, g=Q.PIOTLB_PAGE, did=dom.tag, addr=(IOVA >> 12) + i) for i in range(5)
    ]
    g.submit(*descs)
    assert box.traps() == t + 1 and box.vm.stats.forwarded == fwd + 5


def test_forwarded_entries_carry_the_guest_range(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    g = box.g
    dom = g.attach(box.gdev)
    seen: list[tuple[int, list[U.IommuHwptVtdS1Invalidate]]] = []
    real = box.vm.fd.hwpt_invalidate

    def spy(hwpt: int, data_type: int, entries: list[bytes], **kw: object) -> int:
        assert data_type == U.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1
        seen.append((hwpt, [U.IommuHwptVtdS1Invalidate.unpack(e) for e in entries]))
        return real(hwpt, data_type, entries)

    monkeypatch.setattr(box.vm.fd, "hwpt_invalidate", spy)
    g.invalidate(dom, IOVA + 5 * PAGE, 2 * PAGE)  # pages 5, 6: a 4-page aligned block
    g.invalidate(dom)
    (h1, [e1]), (h2, [e2]) = seen
    assert h1 == h2 == dom.hwpt_id
    assert (e1.addr, e1.npages, e1.flags) == (IOVA + 4 * PAGE, 4, 0)
    assert (e2.addr, e2.npages) == (0, (1 << 64) - 1)
    # device-TLB and interrupt-entry descriptors complete without reaching iommufd
    seen.clear()
    g.submit(Q.make(Q.PDEV_TLB, sid=VRID, pasid=0, size=1), Q.make(Q.IEC, g=0))
    assert seen == []
    # a flush for a DID the guest does not use reaches nothing
    g.submit(Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=dom.tag + 7))
    assert seen == []


def test_wait_status_lands_in_guest_memory(box: Box) -> None:
    g = box.g
    status = box.buffer(PAGE, b"\0")
    wait = Q.make(Q.WAIT, sw=1, iflag=1, status_data=0xC0FFEE, status_addr=(status + 8) >> 2)
    first, wait_index, seq = g.post([wait.encode(256)])
    assert box.vm.memory.read(status + 8, 4) == (0xC0FFEE).to_bytes(4, "little")
    assert box.vm.memory.read(status, 8) == bytes(8)
    assert g.vmm.regs.read(R.ICS, 4) & R.ICS_IWC
    assert g.complete(first, wait_index, seq) == 0  # and the guest's own wait completed
    g._mmio_write(R.ICS, R.ICS_IWC, 4)  # RW1C
    assert not g.vmm.regs.read(R.ICS, 4) & R.ICS_IWC
    assert g.vmm.regs.read(R.IQH) == g.vmm.regs.read(R.IQT)


@pytest.mark.parametrize(
    "bad",
    [
        (0xF).to_bytes(16, "little"),  # unknown type
        (Q.PIOTLB | 0 << 4).to_bytes(16, "little"),  # reserved granularity
        (Q.IOTLB | 1 << 4 | 1 << 40).to_bytes(16, "little"),  # reserved bit
        Q.make(Q.WAIT, sw=1).encode() + b"\x01" + bytes(15),  # upper 128 bits set
    ],
)
def test_bad_descriptor_gets_iqe(box: Box, bad: bytes) -> None:
    g = box.g
    dom = g.attach(box.gdev)
    good = Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=dom.tag, pasid=0).encode(256)
    fwd = box.vm.stats.forwarded
    first, wait_index, seq = g.post([good, bad, good])
    # The emulated queue stopped at the bad descriptor: IQE, IQH on it, no completion.
    assert g.vmm.regs.read(R.FSTS, 4) & R.FSTS_IQE
    assert g.vmm.regs.read(R.IQH) == (first + 1) * 32
    assert int.from_bytes(box.vm.memory.read(g.g_status, 4), "little") != seq
    assert box.vm.stats.forwarded == fwd + 1  # what came before it was done
    # Further tail writes fetch nothing while IQE is set.
    g._mmio_write(R.IQT, g.g_tail * 32)
    assert g.vmm.regs.read(R.IQH) == (first + 1) * 32
    # The guest recovers as qi_check_fault(): overwrite with its wait, clear IQE.
    t = box.traps()
    assert g.complete(first, wait_index, seq) == errno.EINVAL
    assert box.traps() - t == 3  # FSTS read, IQH read, FSTS write
    assert not g.vmm.regs.read(R.FSTS, 4) & R.FSTS_IQE
    assert box.vm.stats.forwarded == fwd + 2 and g.vmm.regs.read(R.IQH) == g.vmm.regs.read(R.IQT)
    # The queue works again; a bad descriptor through submit() is an EINVAL to the guest.
    g.invalidate(dom)
    with pytest.raises(OSError) as exc:
        g.submit(Q.Descriptor(0xF))
    assert exc.value.errno == errno.EINVAL


def test_dma_through_guest_stage_one(box: Box) -> None:
    g = box.g
    dom = g.attach(box.gdev)
    gpa = box.buffer(2 * PAGE, b"guest!")
    g.map(dom, IOVA, gpa, 2 * PAGE)
    assert box.dev.dma_read(IOVA + PAGE, 6) == box.vm.memory.read(gpa + PAGE, 6)
    box.dev.dma_write(IOVA + 10, b"device")
    assert box.vm.memory.read(gpa + 10, 6) == b"device"
    assert box.faults(lambda: box.dev.dma_read(IOVA + 2 * PAGE, 4)) == F.FR_FS_NOT_PRESENT


def test_hostile_guest_cannot_leave_guest_ram(box: Box) -> None:
    """Stage-1 leaves, stage-1 tables and the stage-1 root beyond guest RAM all fault at
    stage 2: the nest parent maps guest RAM and nothing else."""
    g, vm = box.g, box.vm
    dom = g.attach(box.gdev)
    beyond = vm.ram_size + 64 * MIB
    g.map(dom, IOVA, beyond, PAGE)
    assert box.faults(lambda: box.dev.dma_read(IOVA, 8)) == F.FR_SS_NOT_PRESENT
    assert box.faults(lambda: box.dev.dma_write(IOVA, b"x")) == F.FR_SS_NOT_PRESENT
    g.map(dom, IOVA + PAGE, vm.ram_size - PAGE, PAGE)  # the last guest page is fine
    assert len(box.dev.dma_read(IOVA + PAGE, 8)) == 8
    # a table pointer beyond RAM: the guest writes a raw PDE into its own PML4
    pml4 = dom.root_gpa
    vm.memory.write_u64(pml4 + 8 * 5, beyond | X86_P | X86_RW)
    assert box.faults(lambda: box.dev.dma_read(5 << 39, 8)) == F.FR_SS_NOT_PRESENT
    # a PASID entry whose first-stage root is beyond RAM: the VMM passes the GPA on as is
    pe = g.read_pasid_entry(VRID, RID_PASID)
    g.write_pasid_entry(VRID, RID_PASID, T.PasidEntry(
        p=True, pgtt=T.PGTT_FIRST, did=pe.did, pwsnp=True, fsptptr=beyond,
    ))  # fmt: skip
    g.submit(Q.make(Q.PC, g=Q.PC_PASID, did=pe.did, pasid=RID_PASID))
    assert box.faults(lambda: box.dev.dma_read(IOVA + PAGE, 8)) == F.FR_SS_NOT_PRESENT
    assert all(r.reason != F.FR_FS_NOT_PRESENT for r in box.hw.records)


def test_replace_and_detach_follow_the_guest_entry(box: Box) -> None:
    g, fd = box.g, box.vm.fd
    a, b = box.buffer(PAGE, b"A"), box.buffer(PAGE, b"B")
    d1 = g.attach(box.gdev)
    g.map(d1, IOVA, a, PAGE)
    assert box.dev.dma_read(IOVA, 1) == b"A"
    d2 = g.attach(box.gdev)  # replace over the present entry: old DID flushed
    g.map(d2, IOVA, b, PAGE)
    assert d2.hwpt_id != d1.hwpt_id and d2.tag != d1.tag
    with pytest.raises(OSError):
        fd.objects.get(d1.hwpt_id)  # the VMM destroyed the old nested HWPT
    assert box.dev.dma_read(IOVA, 1) == b"B"
    frames = box.vm.memory.frames_in_use
    g.detach(d2)
    assert box.vm.memory.frames_in_use < frames  # the guest freed its tables
    assert g.vmm.shadows == {}
    assert fd.device(box.gdev.dev_id).hwpt is None
    assert box.faults(lambda: box.dev.dma_read(IOVA, 1)) == F.FR_PASID_NOT_PRESENT


def test_pasid_domain_and_pass_through_entry(box: Box) -> None:
    g = box.g
    a, b = box.buffer(PAGE, b"R"), box.buffer(PAGE, b"P")
    rid = g.attach(box.gdev)
    pas = g.attach(box.gdev, pasid=9)
    g.map(rid, IOVA, a, PAGE)
    g.map(pas, IOVA, b, PAGE)
    assert box.dev.dma_read(IOVA, 1) == b"R" and box.dev.dma_read(IOVA, 1, pasid=9) == b"P"
    assert box.vm.fd.device(box.gdev.dev_id).pasid_hwpts[9].id == pas.hwpt_id
    with pytest.raises(OSError) as exc:
        g.attach(box.gdev, pasid=1 << 20)
    assert exc.value.errno == errno.EINVAL
    # a pass-through RID entry: the VMM attaches the nest parent, IOVA = GPA
    g.detach(pas)
    g.write_pasid_entry(VRID, RID_PASID, T.PasidEntry(p=True, pgtt=T.PGTT_PT, did=1))
    g.submit(Q.make(Q.PC, g=Q.PC_GLOBAL))
    parent = box.vm.nest_parent(box.gdev.dev_id, box.hw)
    assert box.vm.fd.device(box.gdev.dev_id).hwpt.id == parent  # type: ignore[union-attr]
    assert box.dev.dma_read(a, 1) == b"R"


def test_guest_detach_after_the_vmm_unplugged(box: Box) -> None:
    g = box.g
    dom: GuestDomain = g.attach(box.gdev)
    box.vm.fd.unbind(box.gdev.dev_id)
    g.detach(dom)  # the guest's flushes reach a VMM that has no device any more
    assert g.vmm.shadows == {}
    with pytest.raises(OSError):
        box.vm.fd.objects.get(dom.hwpt_id)


def test_psi_aligned() -> None:
    assert psi_aligned(0x5000, 0x6FFF, 18) == (0x4000, 2)
    assert psi_aligned(0x1000, 0x1FFF, 18) == (0x1000, 0)
    assert psi_aligned(0, (1 << 40) - 1, 18) is None  # beyond MAMV: PASID-selective


def test_register_based_context_invalidation_is_a_pasid_cache_trap(box: Box) -> None:
    """A guest that programs a PASID entry and flushes through CCMD (no QI descriptor)."""
    g = box.g
    s1 = g.attach(box.gdev)
    gpa = box.buffer(PAGE, b"C")
    g.map(s1, IOVA, gpa, PAGE)
    pe = g.read_pasid_entry(VRID, RID_PASID)
    g.write_pasid_entry(VRID, RID_PASID, T.PasidEntry())  # cleared, no QI flush
    assert box.dev.dma_read(IOVA, 1) == b"C"  # the VMM has not seen it: still installed
    t, kind = box.traps(), box.traps("pasid-cache")
    g._mmio_write(R.CCMD, R.CCMD_ICC | Q.CC_GLOBAL << R.CCMD_CIRG_SHIFT)
    assert box.traps() == t + 1 and box.traps("pasid-cache") == kind + 1
    assert not g.vmm.regs.read(R.CCMD) & R.CCMD_ICC and g.vmm.shadows == {}
    assert box.faults(lambda: box.dev.dma_read(IOVA, 1)) == F.FR_PASID_NOT_PRESENT
    g.write_pasid_entry(VRID, RID_PASID, pe)
    g._mmio_write(R.CCMD, R.CCMD_ICC | Q.CC_GLOBAL << R.CCMD_CIRG_SHIFT)
    assert box.dev.dma_read(IOVA, 1) == b"C"
