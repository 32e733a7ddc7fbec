"""The VMM's emulated VT-d unit (QEMU intel_iommu with iommufd nesting, "intel_iommu_accel"),
apart from the guest driver that programs it (:mod:`iommufd_intel_vtd.guest`).

Every emulated-register write is an exit. An IQT write is one exit, labelled
``"pasid-cache"`` when the batch carries a context- or PASID-cache invalidation (the VMM
re-reads the guest PASID entries, builds ``IOMMU_HWPT_DATA_VTD_S1`` from them and
allocates/attaches/destroys nested HWPTs over the nest parent) and ``"qi-tail"`` otherwise.
PASID-based IOTLB invalidations become ``IOMMU_HWPT_INVALIDATE`` entries
(``iommu_hwpt_vtd_s1_invalidate``) on the nested HWPTs carrying the guest DID; wait
descriptors are completed by writing their status into guest memory; a descriptor the VMM
cannot decode stops the emulated queue with FSTS.IQE and IQH at the offending descriptor,
exactly as hardware does.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import attrs

from iommufd_intel_vtd import qi as Q
from iommufd_intel_vtd import regs as R
from iommufd_intel_vtd import tables as T
from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.hw.regs import Mmio
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm.guest import GuestDevice

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.vmm.vm import Vm

U64 = (1 << 64) - 1
ADDR_WIDTH = {0: 48, 1: 57}  # FSPM -> iommu_hwpt_vtd_s1.addr_width
PIOTLB_ALL = U64  # iommu_hwpt_vtd_s1_invalidate.npages for "the whole address space"


@attrs.define
class Shadow:
    """What the VMM installed for one guest PASID entry."""

    hwpt_id: int  # nested HWPT (or the nest parent for a pass-through entry)
    did: int  # the guest DID the entry carried
    key: tuple[int, ...]  # the guest fields the HWPT was built from
    owned: bool = True  # False when hwpt_id is the nest parent (never destroyed here)


class VirtualVtd:
    """One emulated VT-d unit of a VM over host unit ``iommu``: its register file, the state
    behind it and the nested HWPTs it installed for the guest's PASID entries."""

    def __init__(self, vm: Vm, iommu: IommuHw) -> None:
        self.vm = vm
        self.iommu = iommu
        host_ecap = int(getattr(iommu, "ecap", 0))
        host_cap = int(getattr(iommu, "cap", 0))
        if not host_ecap & R.ECAP_NEST:
            # QEMU's vtd_check_hiod(): a first-stage (x-flts) vIOMMU needs a nesting host.
            raise err(errno.EOPNOTSUPP, "the host VT-d has no ECAP.NEST: no nested vIOMMU")
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

    # -- what the guest reaches: its registers, and the devices plugged into the VM ----------
    def mmio_write(self, offset: int, value: int, width: int = 8) -> None:
        """A guest write to an emulated register: one exit, handled here."""
        self._exit_kind, self._exit_forwarded = "mmio", 0
        self.regs.write(offset, value, width)
        self.vm.trap(self._exit_kind, self._exit_forwarded)

    def mmio_read(self, offset: int, width: int = 8) -> int:
        self.vm.trap("mmio")
        return self.regs.read(offset, width)

    def plug(self, dev: PciDevice, virt_id: int) -> GuestDevice:
        """Pass ``dev`` through at vRID ``virt_id``: its VFIO cdev bound to the VM's iommufd
        and attached to the nest parent until the guest's entries say otherwise."""
        if not 0 <= virt_id <= 0xFFFF or virt_id in self.devices:
            raise err(errno.EINVAL, f"vRID {virt_id:#x} invalid or already in use")
        vm = self.vm
        dev_id = vm.fd.bind(dev)
        vm.nest_parent(dev_id, self.iommu)
        gdev = GuestDevice(dev, dev_id, virt_id)
        self.devices[virt_id] = gdev
        return gdev

    # -- register handlers ---------------------------------------------------------------------
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
