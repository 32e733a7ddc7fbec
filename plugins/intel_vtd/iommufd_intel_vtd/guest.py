"""The guest side of VT-d: what a guest's intel-iommu driver writes, and the VMM's vIOMMU.

Guest structures live in guest RAM at guest-physical addresses (IOVA = GPA in the VM's
nest-parent IOAS): the scalable-mode root table, context tables, a one-page PASID directory
per device, PASID tables, first-stage (x86-64) tables built with the framework's
``RadixPageTable`` + ``X86_64Format``, and a 256-bit-descriptor invalidation queue.

:class:`GuestVtd` plays both parts of :class:`~iommufd_model.vmm.GuestIommu`:

* **the guest driver** (Linux intel-iommu in the guest) programs the emulated registers
  (RTADDR/SRTP, IQA/QIE, TE), writes PASID entries with PGTT = first stage and flushes the way
  Linux does on a vIOMMU with CAP.CM = 1 (one ``qi_submit_sync`` -- descriptors, a wait
  descriptor, one IQT write -- per flush);
* **the VMM's emulation** (QEMU intel_iommu with iommufd nesting, "intel_iommu_accel"): every
  emulated-register write is an exit. An IQT write is one exit, labelled ``"pasid-cache"``
  when the batch carries a context- or PASID-cache invalidation (the VMM re-reads the guest
  PASID entries, builds ``IOMMU_HWPT_DATA_VTD_S1`` from them and allocates/attaches/destroys
  nested HWPTs over the nest parent) and ``"qi-tail"`` otherwise. PASID-based IOTLB
  invalidations become ``IOMMU_HWPT_INVALIDATE`` entries (``iommu_hwpt_vtd_s1_invalidate``)
  on the nested HWPTs carrying the guest DID; wait descriptors are completed by writing their
  status into guest memory; a descriptor the VMM cannot decode stops the emulated queue with
  FSTS.IQE and IQH at the offending descriptor, exactly as hardware does.

VT-d has no hardware-consumed guest queue, so ``accelerated`` is refused with EOPNOTSUPP.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import attrs

from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import regs as R
from iommufd_intel_vtd import tables as T
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.regs import Mmio
from iommufd_model.hw.x86_64 import X86_64Format
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm.guest import GuestDevice, GuestDomain, GuestIommu

if TYPE_CHECKING:
    from iommufd_model.core.process import Process
    from iommufd_model.hw.iommu import IommuHw
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.vmm.vm import Vm

U64 = (1 << 64) - 1
DESC_BYTES = 32  # scalable mode: 256-bit descriptors (IQA.DW = 1)
IQ_ENTRIES = PAGE_SIZE // DESC_BYTES
GUEST_PDTS = 2  # the guest's PASID directory: one page, 2^(2+7) = 512 entries
GUEST_MAX_PASID = (1 << (GUEST_PDTS + 7)) * T.PASIDS_PER_TABLE
RID_PASID = 0  # IOMMU_NO_PASID: what the guest puts in the context entry's RID_PASID
FIRST_GUEST_DID = 2  # as Linux: 0 reserved, 1 is FLPT_DEFAULT_DID in scalable mode
ADDR_WIDTH = {0: 48, 1: 57}  # FSPM -> iommu_hwpt_vtd_s1.addr_width
PIOTLB_ALL = U64  # iommu_hwpt_vtd_s1_invalidate.npages for "the whole address space"


# -- standalone guest RAM (hardware-level tests without a VM) ----------------------------------
class GuestRam:
    """``size`` bytes of guest RAM at GPA ``gpa_base``, backed by VMM memory at ``va``."""

    def __init__(self, proc: Process, va: int, gpa_base: int, size: int) -> None:
        self.proc = proc
        self.va = va
        self.gpa_base = gpa_base
        self.size = size
        self._next = gpa_base  # bump allocator for table pages (the guest's page allocator)

    def _va(self, gpa: int, n: int) -> int:
        if not (self.gpa_base <= gpa and gpa + n <= self.gpa_base + self.size):
            raise err(errno.EFAULT, f"GPA {gpa:#x} outside guest RAM")
        return self.va + gpa - self.gpa_base

    # -- the FrameMemory subset RadixPageTable uses -----------------------------------------
    def alloc_frame(self) -> int:
        gpa = self._next
        if gpa + PAGE_SIZE > self.gpa_base + self.size:
            raise err(errno.ENOMEM, "guest RAM exhausted")
        self._next += PAGE_SIZE
        self.proc.write(self._va(gpa, PAGE_SIZE), bytes(PAGE_SIZE))
        return gpa >> PAGE_SHIFT

    def put_frame(self, pfn: int) -> None:
        """The guest never returns table pages in this model."""

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.proc.read(self._va(gpa, 8), 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.proc.write(self._va(gpa, 8), value.to_bytes(8, "little"))

    def read(self, gpa: int, n: int) -> bytes:
        return self.proc.read(self._va(gpa, n), n)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.proc.write(self._va(gpa, len(data)), data)

    def reserve(self, size: int) -> int:
        """Take ``size`` bytes (page multiple) of guest RAM for data; returns its GPA."""
        gpa = self._next
        self._next += -(-size // PAGE_SIZE) * PAGE_SIZE
        if self._next > self.gpa_base + self.size:
            raise err(errno.ENOMEM, "guest RAM exhausted")
        return gpa


def guest_first_stage(ram: object, levels: int = 4) -> RadixPageTable:
    """A guest stage-1 table (x86-64 format) whose root and tables live in guest RAM."""
    return RadixPageTable(cast(PhysicalMemory, ram), X86_64Format(levels))


def psi_aligned(start: int, end: int, mamv: int) -> tuple[int, int] | None:
    """calculate_psi_aligned_address() as the guest driver uses it: ``(addr, am)`` of the
    naturally aligned block covering ``[start, end]``, or None when only a PASID-selective
    flush covers it (AM beyond CAP.MAMV)."""
    addr, am = Q.psi_aligned(start, end)
    return None if am > mamv else (addr, am)


# -- records ------------------------------------------------------------------------------------
@attrs.define
class GuestVtdDomain:
    """The guest driver's ``dmar_domain``: a first-stage table and where it is installed."""

    s1: RadixPageTable
    did: int
    pasid: int  # PASID-table index: RID_PASID for the RID domain


@attrs.define
class Shadow:
    """What the VMM installed for one guest PASID entry."""

    hwpt_id: int  # nested HWPT (or the nest parent for a pass-through entry)
    did: int  # the guest DID the entry carried
    key: tuple[int, ...]  # the guest fields the HWPT was built from
    owned: bool = True  # False when hwpt_id is the nest parent (never destroyed here)


class GuestVtd(GuestIommu):
    """One emulated VT-d unit of a VM (the VMM side) with the guest's intel-iommu using it."""

    def __init__(self, vm: Vm, iommu: IommuHw, *, accelerated: bool) -> None:
        if accelerated:
            raise err(errno.EOPNOTSUPP, "VT-d has no hardware-consumed guest invalidation queue")
        super().__init__(vm, iommu, accelerated=accelerated)
        host_ecap = int(getattr(iommu, "ecap", 0))
        host_cap = int(getattr(iommu, "cap", 0))
        pasid_bits = R.field(host_ecap, R.ECAP_PSS_SHIFT, 5) + 1 if host_ecap & R.ECAP_PASID else 0
        # What QEMU's intel-iommu exposes with x-scalable-mode, x-flts and caching-mode on:
        # first stage only (the host second stage is the VMM's), CM = 1 so every new entry is
        # followed by an invalidation the VMM can trap.
        self.vcap = R.make_cap(
            sagaw=0b0100, mgaw=48, nfr=1, sllps=0, fl1gp=bool(host_cap & R.CAP_FL1GP),
            fl5lp=False,
        ) | R.CAP_CM  # fmt: skip
        self.vecap = R.make_ecap(
            first_stage=True, second_stage=False, nest=False, ssads=False,
            pasid_bits=min(pasid_bits, 20), srs=False, eafs=False, prs=False,
        )  # fmt: skip
        self.mamv = R.field(self.vcap, R.CAP_MAMV_SHIFT, 6)
        # -- the VMM's emulated register file and state behind it
        self.regs = Mmio(f"vvtd{iommu.index}")
        R.define_registers(
            self.regs, cap=self.vcap, ecap=self.vecap, on_gcmd=self._v_gcmd,
            on_ccmd=self._v_ccmd, on_iqt=self._v_iqt, on_fsts=self._v_fsts,
            on_ics=self._v_ics, on_prs=self._v_ignore, on_frcd_hi=lambda i: self._v_ignore,
            gsts=lambda: self.v_gsts, fsts=lambda: self.v_fsts,
        )  # fmt: skip
        self.v_gsts = 0
        self.v_fsts = 0
        self.v_root = 0  # latched guest root table (SRTP)
        self.v_iq = 0  # guest-physical queue base (QIE)
        self.v_iq_entries = 0
        self.v_iq_width = 256
        self.v_head = 0  # descriptor index
        self.devices: dict[int, GuestDevice] = {}  # vRID -> passed-through device
        self.shadows: dict[tuple[int, int], Shadow] = {}  # (vRID, PASID) -> installed
        self._exit_kind = "mmio"
        self._exit_forwarded = 0
        # -- the guest driver's state
        mem = vm.memory
        self.g_root = mem.alloc_frame() << PAGE_SHIFT
        self.g_iq = mem.alloc_frame() << PAGE_SHIFT
        self.g_status = mem.alloc_frame() << PAGE_SHIFT
        self.g_tail = 0
        self.g_seq = 0
        self.g_gcmd = 0
        self.g_context: dict[tuple[int, int], int] = {}  # (bus, half) -> context table GPA
        self.g_pasid_dir: dict[int, int] = {}  # vRID -> PASID directory GPA
        self.g_pasid_tables: dict[tuple[int, int], int] = {}  # (vRID, dir index) -> table GPA
        self.g_dids: set[int] = set()
        self._boot()

    # ================================================================================ guest
    def _mmio_write(self, offset: int, value: int, width: int = 8) -> None:
        """A guest write to an emulated register: one exit, handled by the VMM."""
        self._exit_kind, self._exit_forwarded = "mmio", 0
        self.regs.write(offset, value, width)
        self.vm.trap(self._exit_kind, self._exit_forwarded)

    def _mmio_read(self, offset: int, width: int = 8) -> int:
        self.vm.trap("mmio")
        return self.regs.read(offset, width)

    def _boot(self) -> None:
        """intel-iommu init in the guest: QI first, then the root table, flushes, TE."""
        self._mmio_write(R.IQT, 0)
        self._mmio_write(R.IQA, self.g_iq | R.IQA_DW)  # one page of 256-bit descriptors
        self.g_gcmd |= R.GCMD_QIE
        self._mmio_write(R.GCMD, self.g_gcmd, 4)
        self._mmio_write(R.RTADDR, self.g_root | R.TTM_SCALABLE << R.RTADDR_TTM_SHIFT)
        self._mmio_write(R.GCMD, self.g_gcmd | R.GCMD_SRTP, 4)
        self.submit(Q.make(Q.CC, g=Q.CC_GLOBAL))
        self.submit(Q.make(Q.PC, g=Q.PC_GLOBAL))
        self.submit(Q.make(Q.IOTLB, g=Q.IOTLB_GLOBAL, dr=1, dw=1))
        self.g_gcmd |= R.GCMD_TE
        self._mmio_write(R.GCMD, self.g_gcmd, 4)

    # -- queued invalidation (qi_submit_sync) ------------------------------------------------
    def post(self, raws: Sequence[bytes]) -> tuple[int, int, int]:
        """Queue raw descriptors plus a status-writing wait descriptor and write IQT once.

        Returns ``(first index, wait index, sequence)`` for :meth:`complete`."""
        self.g_seq = (self.g_seq + 1) & 0xFFFF_FFFF
        wait = Q.make(Q.WAIT, sw=1, fn=1, status_data=self.g_seq, status_addr=self.g_status >> 2)
        first = self.g_tail
        wait_index = first
        for raw in [*raws, wait.encode(256)]:
            wait_index = self.g_tail
            self.vm.memory.write(self.g_iq + self.g_tail * DESC_BYTES, raw.ljust(DESC_BYTES, b"\0"))
            self.g_tail = (self.g_tail + 1) % IQ_ENTRIES
        self._mmio_write(R.IQT, self.g_tail * DESC_BYTES)
        return first, wait_index, self.g_seq

    def complete(self, first: int, wait_index: int, seq: int) -> int:
        """Wait for the status write; on IQE recover as qi_check_fault() does. 0 or EINVAL."""
        mem = self.vm.memory
        while int.from_bytes(mem.read(self.g_status, 4), "little") != seq:
            fsts = self._mmio_read(R.FSTS, 4)
            if not fsts & R.FSTS_IQE:
                raise err(errno.EIO, "guest invalidation queue stalled without an error")
            head = self._mmio_read(R.IQH) // DESC_BYTES
            span = (wait_index - first) % IQ_ENTRIES
            if (head - first) % IQ_ENTRIES > span:
                raise err(errno.EIO, "IQE on a descriptor this submission did not write")
            # Overwrite the bad descriptor with our wait descriptor and clear IQE: the queue
            # resumes from IQH and completes the wait; the submission reports -EINVAL.
            mem.write(
                self.g_iq + head * DESC_BYTES,
                mem.read(self.g_iq + wait_index * DESC_BYTES, DESC_BYTES),
            )
            self._mmio_write(R.FSTS, R.FSTS_IQE, 4)
            if int.from_bytes(mem.read(self.g_status, 4), "little") != seq:
                raise err(errno.EIO, "wait descriptor not completed after IQE recovery")
            return errno.EINVAL
        return 0

    def submit(self, *descs: Q.Descriptor) -> None:
        """One ``qi_submit_sync()``: the descriptors, a wait, one IQT write (one exit)."""
        code = self.complete(*self.post([d.encode(256) for d in descs]))
        if code:
            raise err(code, "the vIOMMU refused an invalidation descriptor")

    # -- context / PASID tables ----------------------------------------------------------------
    def _pasid_slot(self, vrid: int, pasid: int) -> int:
        index = T.pasid_dir_index(pasid)
        table = self.g_pasid_tables.get((vrid, index))
        if table is None:
            mem = self.vm.memory
            table = mem.alloc_frame() << PAGE_SHIFT
            self.g_pasid_tables[(vrid, index)] = table
            de = T.PasidDirEntry(p=True, table=table)
            mem.write_u64(self.g_pasid_dir[vrid] + index * T.PASID_DIR_ENTRY_SIZE, de.encode())
        return table + T.pasid_table_index(pasid) * T.PASID_ENTRY_SIZE

    def read_pasid_entry(self, vrid: int, pasid: int) -> T.PasidEntry:
        slot = self._pasid_slot(vrid, pasid)
        return T.PasidEntry.decode([self.vm.memory.read_u64(slot + 8 * i) for i in range(8)])

    def write_pasid_entry(self, vrid: int, pasid: int, pe: T.PasidEntry) -> None:
        slot = self._pasid_slot(vrid, pasid)
        for i, q in enumerate(pe.encode()):
            self.vm.memory.write_u64(slot + 8 * i, q)

    def _setup_context(self, vrid: int) -> None:
        """intel_pasid_alloc_table() + the scalable-mode context entry, then (CM = 1) a
        device-selective context-cache flush the VMM traps."""
        mem = self.vm.memory
        bus, devfn = vrid >> 8, vrid & 0xFF
        half = int(devfn >= 128)
        table = self.g_context.get((bus, half))
        if table is None:
            table = self.g_context[(bus, half)] = mem.alloc_frame() << PAGE_SHIFT
            slot = self.g_root + bus * T.ROOT_ENTRY_SIZE
            re = T.RootEntry.decode(mem.read_u64(slot), mem.read_u64(slot + 8))
            re = T.RootEntry(
                lp=re.lp or not half, lctp=table if not half else re.lctp,
                up=re.up or bool(half), uctp=table if half else re.uctp,
            )  # fmt: skip
            lo, hi = re.encode()
            mem.write_u64(slot, lo)
            mem.write_u64(slot + 8, hi)
        pasid_dir = mem.alloc_frame() << PAGE_SHIFT
        self.g_pasid_dir[vrid] = pasid_dir
        ce = T.ContextEntry(
            p=True, paside=bool(self.vecap & R.ECAP_PASID), pdts=GUEST_PDTS,
            pasid_dir=pasid_dir, rid_pasid=RID_PASID,
        )  # fmt: skip
        slot = table + (devfn & 0x7F) * T.SM_CONTEXT_ENTRY_SIZE
        for i, q in enumerate(ce.encode()):
            mem.write_u64(slot + 8 * i, q)
        self.submit(Q.make(Q.CC, g=Q.CC_DEVICE, sid=vrid, fm=0))

    def _alloc_did(self) -> int:
        did = FIRST_GUEST_DID
        while did in self.g_dids:
            did += 1
        self.g_dids.add(did)
        return did

    def _flush_pasid(self, did: int, pasid: int) -> None:
        """pasid_flush_caches() / intel_pasid_flush_present(): two synchronous submissions."""
        self.submit(Q.make(Q.PC, g=Q.PC_PASID, did=did, pasid=pasid))
        self.submit(Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=did, pasid=pasid))

    # -- the GuestIommu API --------------------------------------------------------------------
    def add_device(self, dev: PciDevice, virt_id: int) -> GuestDevice:
        if not 0 <= virt_id <= 0xFFFF or virt_id in self.devices:
            raise err(errno.EINVAL, f"vRID {virt_id:#x} invalid or already in use")
        vm = self.vm
        dev_id = vm.fd.bind(dev)  # VMM: VFIO cdev bound to its iommufd
        vm.nest_parent(dev_id, self.iommu)
        gdev = GuestDevice(dev, dev_id, virt_id)
        self.devices[virt_id] = gdev
        self._setup_context(virt_id)  # guest: intel_iommu_probe_device()
        return gdev

    def attach(self, gdev: GuestDevice, *, pasid: int | None = None) -> GuestDomain:
        index = RID_PASID if pasid is None else pasid
        if pasid is not None:
            if not self.vecap & R.ECAP_PASID or not gdev.dev.pasid_bits:
                raise err(errno.EOPNOTSUPP, "no PASID support on this vIOMMU or device")
            if not 0 < pasid < min(GUEST_MAX_PASID, 1 << gdev.dev.pasid_bits):
                raise err(errno.EINVAL, f"PASID {pasid} out of range")
        s1 = RadixPageTable(self.vm.memory, X86_64Format(4))
        did = self._alloc_did()
        vrid = gdev.virt_id
        old = self.read_pasid_entry(vrid, index)
        # intel_pasid_setup_first_level() (or _replace_first_level() over a present entry)
        pe = T.PasidEntry(p=True, pgtt=T.PGTT_FIRST, did=did, pwsnp=True, fsptptr=s1.root)
        self.write_pasid_entry(vrid, index, pe)
        self._flush_pasid(old.did if old.p else did, index)
        shadow = self.shadows.get((vrid, index))
        return GuestDomain(
            gdev, pasid, shadow.hwpt_id if shadow else 0, s1.root, did,
            GuestVtdDomain(s1, did, index),
        )  # fmt: skip

    def map(self, dom: GuestDomain, iova: int, gpa: int, size: int, *, write: bool = True) -> None:
        prot = IOMMU_READ | (IOMMU_WRITE if write else 0)
        _vendor(dom).s1.map(iova, gpa, size, prot)

    def unmap(self, dom: GuestDomain, iova: int, size: int) -> None:
        _vendor(dom).s1.unmap(iova, size)

    def invalidate(self, dom: GuestDomain, iova: int | None = None, size: int = 0) -> None:
        g = _vendor(dom)
        psi = None if iova is None else psi_aligned(iova, iova + max(size, 1) - 1, self.mamv)
        if psi is None:
            self.submit(Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=g.did, pasid=g.pasid))
        else:
            addr, am = psi
            self.submit(
                Q.make(Q.PIOTLB, g=Q.PIOTLB_PAGE, did=g.did, pasid=g.pasid, addr=addr >> 12, am=am)
            )

    def detach(self, dom: GuestDomain) -> None:
        """intel_pasid_tear_down_entry(): clear the entry, flush, then free the domain."""
        g = _vendor(dom)
        vrid = dom.dev.virt_id
        if self.read_pasid_entry(vrid, g.pasid).did == g.did:
            self.write_pasid_entry(vrid, g.pasid, T.PasidEntry())
            self._flush_pasid(g.did, g.pasid)
        g.s1.free()
        self.g_dids.discard(g.did)

    # ================================================================================= VMM
    def _v_ignore(self, old: int, new: int) -> None:
        """Fault recording registers: the emulation never records guest faults."""

    def _v_gcmd(self, old: int, new: int) -> None:
        if new & R.GCMD_SRTP:
            rtaddr = self.regs["RTADDR"]
            self.v_root = rtaddr & R.RTADDR_RTA_MASK
            self.v_gsts |= R.GSTS_RTPS
        if new & R.GCMD_QIE and not self.v_gsts & R.GSTS_QIES:
            iqa = self.regs["IQA"]
            self.v_iq = iqa & R.IQA_ADDR_MASK
            self.v_iq_width = 256 if iqa & R.IQA_DW else 128
            self.v_iq_entries = (PAGE_SIZE << (iqa & R.IQA_QS_MASK)) // (self.v_iq_width // 8)
            self.v_head = 0
            self.regs.set("IQH", 0)
            self.v_gsts |= R.GSTS_QIES
        elif not new & R.GCMD_QIE:
            self.v_gsts &= ~R.GSTS_QIES
        self.v_gsts = (self.v_gsts | R.GSTS_TES) if new & R.GCMD_TE else self.v_gsts & ~R.GSTS_TES
        self.regs.set("GCMD", new & R.GCMD_PERSISTENT)

    def _v_ccmd(self, old: int, new: int) -> None:
        """Register-based context-cache invalidation: re-read the guest's entries."""
        if new & R.CCMD_ICC:
            self._exit_kind = "pasid-cache"
            self._rescan(None, None)
            self.regs.set("CCMD", new & ~R.CCMD_ICC)

    def _v_fsts(self, old: int, new: int) -> None:
        had_iqe = self.v_fsts & R.FSTS_IQE
        self.v_fsts &= ~(new & R.FSTS_RW1C)
        if had_iqe and not self.v_fsts & R.FSTS_IQE:
            self._v_run_queue()  # the emulated queue fetches again from IQH

    def _v_ics(self, old: int, new: int) -> None:
        self.regs.set("ICS", old & ~(new & R.ICS_IWC))

    def _v_iqt(self, old: int, new: int) -> None:
        self._exit_kind = "qi-tail"
        self._v_run_queue()

    def _v_run_queue(self) -> None:
        """Process the guest's descriptors from IQH to IQT, as the hardware would."""
        if not self.v_gsts & R.GSTS_QIES or self.v_fsts & R.FSTS_IQE:
            return
        entry = self.v_iq_width // 8
        tail = (self.regs["IQT"] & R.IQ_OFFSET_MASK) // entry
        pending: dict[int, list[bytes]] = {}
        while self.v_head != tail % self.v_iq_entries:
            try:
                raw = self.vm.memory.read(self.v_iq + self.v_head * entry, entry)
                d = Q.decode(raw)
                if d.type == Q.WAIT:
                    self._forward(pending)  # everything before the wait is done first
                self._v_execute(d, pending)
            except (Q.InvalidDescriptor, OSError):
                self.v_fsts |= R.FSTS_IQE  # IQH stays at the offending descriptor
                break
            self.v_head = (self.v_head + 1) % self.v_iq_entries
            self.regs.set("IQH", self.v_head * entry)
        try:
            self._forward(pending)
        except OSError:
            self.v_fsts |= R.FSTS_IQE
        self.regs.set("IQH", self.v_head * entry)

    def _v_execute(self, d: Q.Descriptor, pending: dict[int, list[bytes]]) -> None:
        t = d.type
        if t == Q.CC:
            self._exit_kind = "pasid-cache"
            sid = d["sid"] if d["g"] == Q.CC_DEVICE else None
            self._rescan(sid, None, fm=d["fm"])
        elif t == Q.PC:
            self._exit_kind = "pasid-cache"
            self._rescan(None, d["pasid"] if d["g"] == Q.PC_PASID else None)
        elif t == Q.PIOTLB:
            page = d["g"] == Q.PIOTLB_PAGE
            self._queue_inv(pending, d["did"], d["pasid"], page, d["addr"] << 12, d["am"], d["ih"])
        elif t == Q.IOTLB:
            if d["g"] == Q.IOTLB_GLOBAL:
                for shadow in list(self.shadows.values()):
                    self._queue_inv(pending, shadow.did, None, False, 0, 0, 0)
            else:
                page = d["g"] == Q.IOTLB_PAGE
                self._queue_inv(pending, d["did"], None, page, d["addr"] << 12, d["am"], d["ih"])
        elif t == Q.WAIT:
            if d["sw"]:
                self.vm.memory.write(d["status_addr"] << 2, d["status_data"].to_bytes(4, "little"))
            if d["iflag"]:
                self.regs.set("ICS", self.regs["ICS"] | R.ICS_IWC)
        # DEV_TLB / PDEV_TLB: the host kernel flushes device TLBs with the nested HWPT's
        # invalidation; IEC: no interrupt remapping is emulated. Both complete as no-ops.

    def _queue_inv(
        self, pending: dict[int, list[bytes]], did: int, pasid: int | None, page: bool,
        addr: int, am: int, ih: int,
    ) -> None:  # fmt: skip
        """One iommu_hwpt_vtd_s1_invalidate entry for every nested HWPT of guest ``did``."""
        if page:
            inv = U.IommuHwptVtdS1Invalidate(
                addr=addr, npages=1 << am, flags=U.IOMMU_VTD_INV_FLAGS_LEAF if ih else 0
            )
        else:
            inv = U.IommuHwptVtdS1Invalidate(addr=0, npages=PIOTLB_ALL)
        raw = inv.pack()
        seen: set[int] = set()
        for (_vrid, index), shadow in self.shadows.items():
            if shadow.did != did or not shadow.owned or shadow.hwpt_id in seen:
                continue
            if pasid is not None and index != pasid:
                continue
            seen.add(shadow.hwpt_id)
            pending.setdefault(shadow.hwpt_id, []).append(raw)

    def _forward(self, pending: dict[int, list[bytes]]) -> None:
        fd = self.vm.fd
        while pending:
            hwpt, entries = pending.popitem()
            fd.hwpt_invalidate(hwpt, U.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, entries)
            self._exit_forwarded += len(entries)

    # -- reading the guest's structures (vtd_dev_get_pe_from_pasid in QEMU) ---------------------
    def _guest_context(self, vrid: int) -> T.ContextEntry | None:
        mem = self.vm.memory
        bus, devfn = vrid >> 8, vrid & 0xFF
        try:
            slot = self.v_root + bus * T.ROOT_ENTRY_SIZE
            re = T.RootEntry.decode(mem.read_u64(slot), mem.read_u64(slot + 8))
            present, table = re.half(devfn)
            if not present or re.rsvd:
                return None
            slot = table + (devfn & 0x7F) * T.SM_CONTEXT_ENTRY_SIZE
            ce = T.ContextEntry.decode(*(mem.read_u64(slot + 8 * i) for i in range(4)))
        except OSError:
            return None
        return ce if ce.p and not ce.rsvd else None

    def _guest_pasid_entry(self, ce: T.ContextEntry, pasid: int) -> T.PasidEntry | None:
        mem = self.vm.memory
        index = T.pasid_dir_index(pasid)
        if index >= ce.dir_entries:
            return None
        try:
            de = T.PasidDirEntry.decode(mem.read_u64(ce.pasid_dir + index * 8))
            if not de.p:
                return None
            slot = de.table + T.pasid_table_index(pasid) * T.PASID_ENTRY_SIZE
            pe = T.PasidEntry.decode([mem.read_u64(slot + 8 * i) for i in range(8)])
        except OSError:
            return None
        return pe if pe.p and not pe.check(0b0100, False) else None

    def _guest_pasids(self, ce: T.ContextEntry) -> set[int]:
        """Every PASID with a present guest PASID entry (walks the directory in one read)."""
        mem = self.vm.memory
        out: set[int] = set()
        try:
            raw = mem.read(ce.pasid_dir, ce.dir_entries * 8)
        except OSError:
            return out
        for index in range(ce.dir_entries):
            de = T.PasidDirEntry.decode(int.from_bytes(raw[index * 8 : index * 8 + 8], "little"))
            if not de.p:
                continue
            try:
                table = mem.read(de.table, PAGE_SIZE)
            except OSError:
                continue
            for i in range(T.PASIDS_PER_TABLE):
                if table[i * T.PASID_ENTRY_SIZE] & 1:
                    out.add(index * T.PASIDS_PER_TABLE + i)
        return out

    def _rescan(self, sid: int | None, pasid: int | None, *, fm: int = 0) -> None:
        """vtd_pasid_cache_sync(): bring the host's nested HWPTs in line with guest entries."""
        keep = ~((1 << fm) - 1) if fm else -1
        for vrid in list(self.devices):
            if sid is not None and (vrid & keep) != (sid & keep):
                continue
            ce = self._guest_context(vrid)
            if pasid is not None:
                pasids = {pasid}
            else:
                pasids = {p for v, p in self.shadows if v == vrid}
                if ce is not None:
                    pasids |= self._guest_pasids(ce)
            for p in sorted(pasids):
                pe = self._guest_pasid_entry(ce, p) if ce is not None else None
                if ce is not None and p == ce.rid_pasid:
                    self._sync(vrid, p, None, pe)
                elif ce is not None and ce.paside:
                    self._sync(vrid, p, p, pe)
                else:
                    self._sync(vrid, p, p, None)

    def _sync(self, vrid: int, index: int, pasid: int | None, pe: T.PasidEntry | None) -> None:
        gdev = self.devices[vrid]
        vm = self.vm
        cur = self.shadows.get((vrid, index))
        if pe is not None and pe.pgtt == T.PGTT_FIRST:
            key: tuple[int, ...] = (pe.did, pe.fsptptr, pe.fspm, pe.sre, pe.wpe, pe.eafe)
        elif pe is not None and pe.pgtt == T.PGTT_PT and pasid is None:
            key = (pe.did, -1)
        else:
            key = ()  # not present, or a type this vIOMMU does not expose: block DMA
        if cur is not None and cur.key == key:
            return
        try:
            if not key:
                if cur is not None:
                    vm.fd.detach(gdev.dev_id, pasid=pasid)
                    self._drop(vrid, index)
                return
            parent = vm.nest_parent(gdev.dev_id, self.iommu)
            assert pe is not None
            if key[1] == -1:
                hwpt, owned = parent, False
            else:
                data = U.IommuHwptVtdS1(
                    flags=(U.IOMMU_VTD_S1_SRE if pe.sre else 0)
                    | (U.IOMMU_VTD_S1_WPE if pe.wpe else 0)
                    | (U.IOMMU_VTD_S1_EAFE if pe.eafe else 0),
                    pgtbl_addr=pe.fsptptr, addr_width=ADDR_WIDTH[pe.fspm],
                ).pack()  # fmt: skip
                flags = U.IOMMU_HWPT_ALLOC_PASID if gdev.dev.pasid_bits else 0
                hwpt = vm.fd.hwpt_alloc(
                    gdev.dev_id, parent, flags=flags, data_type=U.IOMMU_HWPT_DATA_VTD_S1,
                    data=data,
                )  # fmt: skip
                owned = True
            try:
                vm.fd.attach(gdev.dev_id, hwpt, pasid=pasid)  # replace: no blocked window
            except OSError:
                if owned:
                    vm.fd.destroy(hwpt)
                raise
            self._drop(vrid, index)
            self.shadows[(vrid, index)] = Shadow(hwpt, pe.did, key, owned)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the VMM unplugged the device already
                raise
            self._drop(vrid, index)

    def _drop(self, vrid: int, index: int) -> None:
        old = self.shadows.pop((vrid, index), None)
        if old is not None and old.owned:
            try:
                self.vm.fd.destroy(old.hwpt_id)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise


def _vendor(dom: GuestDomain) -> GuestVtdDomain:
    if not isinstance(dom.vendor, GuestVtdDomain):
        raise err(errno.EINVAL, "not a VT-d guest domain")
    return dom.vendor
