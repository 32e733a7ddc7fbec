"""The guest side of VT-d: what a guest's intel-iommu driver writes.

Guest structures live in guest RAM at guest-physical addresses (IOVA = GPA in the VM's
nest-parent IOAS): the scalable-mode root table, context tables, a one-page PASID directory
per device, PASID tables, first-stage (x86-64) tables built with the framework's
``RadixPageTable`` + ``X86_64Format``, and a 256-bit-descriptor invalidation queue.

:class:`GuestVtd` is the guest driver (Linux intel-iommu in the guest) of
:class:`~iommufd_model.vmm.GuestIommu`: it programs the emulated registers (RTADDR/SRTP,
IQA/QIE, TE), writes PASID entries with PGTT = first stage and flushes the way Linux does on a
vIOMMU with CAP.CM = 1 (one ``qi_submit_sync`` -- descriptors, a wait descriptor, one IQT
write -- per flush). The VMM's emulation it talks to is
:class:`iommufd_intel_vtd.vvtd.VirtualVtd` (``GuestVtd.vmm``), reached only through its
registers.

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
from iommufd_intel_vtd.vvtd import VirtualVtd
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.hw.x86_64 import X86_64Format
from iommufd_model.ida import lowest_free
from iommufd_model.vmm.guest import GuestDevice, GuestDomain, GuestIommu

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.process import Process
    from iommufd_model.vmm.vm import Vm

DESC_BYTES = 32  # scalable mode: 256-bit descriptors (IQA.DW = 1)
IQ_ENTRIES = PAGE_SIZE // DESC_BYTES
GUEST_PDTS = 2  # the guest's PASID directory: one page, 2^(2+7) = 512 entries
GUEST_MAX_PASID = (1 << (GUEST_PDTS + 7)) * T.PASIDS_PER_TABLE
RID_PASID = 0  # IOMMU_NO_PASID: what the guest puts in the context entry's RID_PASID
FIRST_GUEST_DID = 2  # as Linux: 0 reserved, 1 is FLPT_DEFAULT_DID in scalable mode


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


class GuestVtd(GuestIommu):
    """One emulated VT-d unit of a VM (the VMM side) with the guest's intel-iommu using it."""

    def __init__(self, vm: Vm, iommu: IommuHw, *, accelerated: bool) -> None:
        if accelerated:
            raise err(errno.EOPNOTSUPP, "VT-d has no hardware-consumed guest invalidation queue")
        super().__init__(vm, iommu, accelerated=accelerated)
        #: the VMM's emulated unit; the guest reaches it only through its registers (and
        #: reads the capabilities it advertises)
        self.vmm = VirtualVtd(vm, iommu)
        self.vcap, self.vecap = self.vmm.vcap, self.vmm.vecap
        self.mamv = R.field(self.vcap, R.CAP_MAMV_SHIFT, 6)
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

    def _mmio_write(self, offset: int, value: int, width: int = 8) -> None:
        """A guest write to an emulated register: one exit, handled by the VMM."""
        self.vmm.mmio_write(offset, value, width)

    def _mmio_read(self, offset: int, width: int = 8) -> int:
        return self.vmm.mmio_read(offset, width)

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
        did = lowest_free(self.g_dids, FIRST_GUEST_DID)
        self.g_dids.add(did)
        return did

    def _flush_pasid(self, did: int, pasid: int) -> None:
        """pasid_flush_caches() / intel_pasid_flush_present(): two synchronous submissions."""
        self.submit(Q.make(Q.PC, g=Q.PC_PASID, did=did, pasid=pasid))
        self.submit(Q.make(Q.PIOTLB, g=Q.PIOTLB_PASID, did=did, pasid=pasid))

    # -- the GuestIommu API --------------------------------------------------------------------
    def add_device(self, dev: PciDevice, virt_id: int) -> GuestDevice:
        gdev = self.vmm.plug(dev, virt_id)
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
        shadow = self.vmm.shadows.get((vrid, index))
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


def _vendor(dom: GuestDomain) -> GuestVtdDomain:
    if not isinstance(dom.vendor, GuestVtdDomain):
        raise err(errno.EINVAL, "not a VT-d guest domain")
    return dom.vendor
