"""The guest side of SMMUv3: what a guest's arm-smmu-v3 driver writes.

Guest structures live in guest RAM (any :class:`~iommufd_model.hw.memory.FrameMemory`, for a
VM its :class:`~iommufd_model.vmm.GuestMemory`): stage-1 tables built with the framework's
radix engine, CDs, a linear guest stream table of vSTEs and the guest's command queue.

:class:`GuestSmmuv3` is the framework's :class:`~iommufd_model.vmm.GuestIommu` for SMMUv3:
the guest driver, with the VMM's vSMMU it talks to,
:class:`iommufd_arm_smmuv3.vsmmu.VirtualSmmuv3` (``GuestSmmuv3.vmm``), reached only through
its registers: every CMDQ_PROD write traps. With ``accelerated`` the vIOMMU is a Tegra241
CMDQV VINTF: the guest's invalidations go to a VCMDQ in guest RAM that the hardware consumes
directly (only configuration changes still trap).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.cd import CD_SIZE, IRGN_WBWA, Cd
from iommufd_arm_smmuv3.cmdqv import VCMDQ_CONFIG, VCMDQ_EN, VCMDQ_PROD
from iommufd_arm_smmuv3.pgtable import (
    GRANULE_PGSIZES,
    MAIR_VALUE,
    VA_BITS,
    PgtableCfg,
    Stage1Format,
    pgtable_cfg,
)
from iommufd_arm_smmuv3.ste import (
    CFG_ABORT,
    CFG_S1_TRANS,
    S1DSS_SSID0,
    S1DSS_TERMINATE,
    SH_ISH,
    STE_SIZE,
    Ste,
)
from iommufd_arm_smmuv3.vsmmu import GUEST_CMDQ_LOG2, VintfWindow, VirtualSmmuv3
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.errors import err
from iommufd_model.hw.bits import pack
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE, FrameMemory, PhysicalMemory
from iommufd_model.hw.radix import RadixPageTable
from iommufd_model.vmm.guest import GuestDevice, GuestDomain, GuestIommu

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw
    from iommufd_model.hw.pci import PciDevice
    from iommufd_model.vmm.vm import Vm

GUEST_STRTAB_PAGES = 4  # a linear guest stream table for vSIDs 0..255
GUEST_CDMAX = 6  # the guest driver's linear CD table: one page, 64 substreams


def stage1_tables(memory: FrameMemory, cfg: PgtableCfg | None = None) -> RadixPageTable:
    """A guest stage-1 table (48-bit VA; the 4 KiB granule unless ``cfg`` says otherwise) in
    ``memory``; its table pointers are IPAs."""
    return RadixPageTable(memory, Stage1Format(cfg=cfg))


def guest_s1_cfg(idr5: int, page_shift: int) -> PgtableCfg:
    """The stage-1 format a guest kernel of PAGE_SIZE ``1 << page_shift`` builds on a vSMMU
    whose IDR5 offers ``idr5``'s granules: io-pgtable-arm's arm_lpae_restrict_pgsizes()
    takes the granule of PAGE_SIZE when offered, else 4 KiB (the model's guest offers only
    these two choices), with a 48-bit VA and IPA."""
    offered = {g for g, bit in R.IDR5_GRAN.items() if idr5 & bit}
    shift = page_shift if page_shift in offered else 12
    cfg = pgtable_cfg(GRANULE_PGSIZES[shift], VA_BITS, 48, 1)
    if cfg is None or shift not in offered:
        raise err(errno.EOPNOTSUPP, f"the vSMMU offers no {1 << shift >> 10} KiB granule")
    return cfg


def write_cd(
    memory: FrameMemory, cd_ipa: int, asid: int, ttb0_ipa: int, cfg: PgtableCfg | None = None
) -> None:
    """The guest's CD for substream 0, as the guest's arm-smmu-v3 driver fills it
    (arm_smmu_make_s1_cd: TG0, T0SZ and IPS from the io-pgtable configuration)."""
    cd = Cd(v=True, aa64=True, r=True, a=True, epd1=True, asid=asid, ttb0=ttb0_ipa)
    cd.t0sz, cd.ips, cd.sh0, cd.mair = 64 - VA_BITS, 5, SH_ISH, MAIR_VALUE
    if cfg is not None:
        cd.tg0, cd.t0sz, cd.ips = cfg.tg, cfg.tsz, cfg.ips
    cd.ir0 = cd.or0 = IRGN_WBWA
    memory.write(cd_ipa, pack(cd.encode()))


def vste(cd_table_ipa: int) -> bytes:
    """``struct iommu_hwpt_arm_smmuv3`` for a stage-1 vSTE pointing at a linear CD table."""
    return pack(Ste(v=True, config=CFG_S1_TRANS, s1ctxptr=cd_table_ipa).encode()[:2])


class IpaFrames:
    """Guest RAM addressed by IPA through a host stage-2 table, without a VMM process (for
    hardware-level tests and benchmarks). Table frames go upwards from ``first_ipa``."""

    def __init__(self, memory: PhysicalMemory, s2: RadixPageTable, first_ipa: int) -> None:
        self.memory = memory
        self.s2 = s2
        self.next_gfn = first_ipa >> PAGE_SHIFT

    def _pa(self, ipa: int) -> int:
        pa = self.s2.iova_to_phys(ipa)
        if pa < 0:
            raise err(errno.EFAULT, f"IPA {ipa:#x} is not mapped at stage 2")
        return pa

    def alloc_frame(self) -> int:
        gfn = self.next_gfn
        self.next_gfn += 1
        self.memory.write(self._pa(gfn << PAGE_SHIFT), bytes(PAGE_SIZE))
        return gfn

    def alloc_contiguous(self, count: int, align: int = 1) -> int:
        """``count`` zeroed frames at consecutive IPAs aligned to ``align`` frames (the
        tables of a 16 or 64 KiB granule); returns the first guest frame number."""
        gfn = -(-self.next_gfn // align) * align
        self.next_gfn = gfn + count
        for k in range(count):
            self.memory.write(self._pa((gfn + k) << PAGE_SHIFT), bytes(PAGE_SIZE))
        return gfn

    def put_frame(self, pfn: int) -> None:
        """Frames are not recycled."""

    def read_u64(self, pa: int) -> int:
        return self.memory.read_u64(self._pa(pa))

    def write_u64(self, pa: int, value: int) -> None:
        self.memory.write_u64(self._pa(pa), value)

    def read(self, pa: int, n: int) -> bytes:
        return self.memory.read(self._pa(pa), n)

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        self.memory.write(self._pa(pa), data)


class _Context:
    """A guest domain's private state: its stage-1 tables and CD table."""

    def __init__(self, s1: RadixPageTable, cd_table: int) -> None:
        self.s1 = s1
        self.cd_table = cd_table


class GuestSmmuv3(GuestIommu):
    """One vSMMU of a VM (the VMM side, :attr:`vmm`) with the guest's driver using it."""

    def __init__(
        self,
        vm: Vm,
        iommu: IommuHw,
        *,
        accelerated: bool,
        idr5: int = R.IDR5_GRAN4K,
        page_shift: int = PAGE_SHIFT,
    ) -> None:
        super().__init__(vm, iommu, accelerated=accelerated)
        mem = vm.memory
        # The guest's stage-1 format from the IDR5 the VMM passes on (IOMMU_GET_HW_INFO
        # reports the host's IDR5 as it is) and its kernel's PAGE_SIZE.
        self.s1_cfg = guest_s1_cfg(idr5, page_shift)
        self.granule = 1 << self.s1_cfg.granule_shift
        first = mem.alloc_frame()
        for i in range(1, GUEST_STRTAB_PAGES):  # contiguous from the pool's bump allocator
            if mem.alloc_frame() != first + i:
                raise err(errno.ENOMEM, "guest stream table pages are not contiguous")
        self.strtab = first << PAGE_SHIFT
        self.cmdq = mem.alloc_frame() << PAGE_SHIFT
        #: the VMM's emulated SMMU behind the guest's registers
        self.vmm = VirtualSmmuv3(
            vm, iommu, accelerated=accelerated, strtab=self.strtab, cmdq=self.cmdq
        )
        self.cmdq_prod = 0
        self.next_asid = 1
        self.cd_tables: dict[int, int] = {}  # vSID -> the guest CD table of that device
        self.pasids: dict[int, set[int]] = {}  # vSID -> substreams with a valid CD
        self.rid_attached: set[int] = set()  # vSIDs whose CD 0 is in use
        self.vcmdq = 0  # guest-physical VCMDQ (accelerated)
        self.vcmdq_prod = 0
        self.window: VintfWindow | None = None  # the VINTF page the VMM mapped for the guest

    # -- the VMM side of the GuestIommu API -----------------------------------------------------
    def add_device(self, dev: PciDevice, virt_id: int) -> GuestDevice:
        if virt_id >= GUEST_STRTAB_PAGES * PAGE_SIZE // STE_SIZE:
            raise err(errno.EINVAL, f"vSID {virt_id:#x} beyond the guest stream table")
        gdev = self.bind_vdevice(dev, virt_id)
        self.vmm.plug(gdev)
        return gdev

    def create_viommu(self, dev_id: int) -> int:
        """The VMM creates the vIOMMU; with ``accelerated`` the guest then gives its VCMDQ a
        page of its RAM (the VMM hands it to the hardware) and enables it through the VINTF
        page, with no trap."""
        self.viommu_id = self.vmm.create_viommu(dev_id)
        if self.accelerated:
            self.window = self.vmm.window
            assert self.window is not None
            self.vcmdq = self.vm.memory.alloc_frame() << PAGE_SHIFT
            self.vmm.vcmdq_base_write(self.vcmdq)
            self.window.write(VCMDQ_CONFIG, VCMDQ_EN, 4)
        return self.viommu_id

    # -- the guest driver -----------------------------------------------------------------------
    def _issue(self, cmds: list[tuple[int, int]]) -> None:
        """The guest queues commands and a CMD_SYNC in its CMDQ and writes CMDQ_PROD (trap)."""
        for cmd in [*cmds, C.cmd_sync()]:
            slot = self.cmdq + (self.cmdq_prod % (1 << GUEST_CMDQ_LOG2)) * C.CMD_SIZE
            self.vm.memory.write(slot, C.encode(cmd))
            self.cmdq_prod += 1
        self.vmm.cmdq_prod_write(self.cmdq_prod)

    def _issue_vcmdq(self, cmds: list[tuple[int, int]]) -> None:
        """The guest queues commands in its VCMDQ and writes VCMDQ_PROD: the SMMU consumes."""
        mask = (1 << 9) - 1  # 256 entries and the wrap bit
        for cmd in [*cmds, C.cmd_sync()]:
            slot = self.vcmdq + (self.vcmdq_prod & 0xFF) * C.CMD_SIZE
            self.vm.memory.write(slot, C.encode(cmd))
            self.vcmdq_prod = (self.vcmdq_prod + 1) & mask
        assert self.window is not None
        self.window.write(VCMDQ_PROD, self.vcmdq_prod, 4)

    def _write_vste(self, vsid: int, ste: Ste) -> None:
        self.vm.memory.write(self.strtab + vsid * STE_SIZE, pack(ste.encode()))
        self._issue([C.cfgi_ste(vsid)])

    def _cd_table_vste(self, vsid: int, s1dss: int) -> Ste:
        """A vSTE over the device's guest CD table (S1CDMax > 0: the guest's substreams)."""
        return Ste(
            v=True,
            config=CFG_S1_TRANS,
            s1ctxptr=self.cd_tables[vsid],
            s1cdmax=GUEST_CDMAX,
            s1dss=s1dss,
        )

    def attach(self, gdev: GuestDevice, *, pasid: int | None = None) -> GuestDomain:
        """The guest driver's attach: CD ``pasid`` (0 for the RID) in the device's own CD
        table, then the vSTE (trapped CFGI_STE) or, for a PASID under an installed CD-table
        vSTE, a CFGI_CD that the VMM forwards with the vSID."""
        if pasid is not None and not 0 < pasid < 1 << GUEST_CDMAX:
            raise err(errno.EOPNOTSUPP, f"the guest's CD table has no substream {pasid}")
        mem = self.vm.memory
        vsid = gdev.virt_id
        if vsid not in self.cd_tables:
            self.cd_tables[vsid] = mem.alloc_frame() << PAGE_SHIFT
        cd_table = self.cd_tables[vsid]
        s1 = stage1_tables(mem, self.s1_cfg)
        asid = self.next_asid
        self.next_asid += 1
        write_cd(mem, cd_table + (pasid or 0) * CD_SIZE, asid, s1.root, self.s1_cfg)
        pasids = self.pasids.setdefault(vsid, set())
        if pasid is None:
            self.rid_attached.add(vsid)
            self._write_vste(vsid, self._cd_table_vste(vsid, S1DSS_SSID0))
        else:
            pasids.add(pasid)
            if vsid in self.rid_attached or len(pasids) > 1:
                self._issue([C.cfgi_cd(vsid, pasid)])
            else:  # a blocked RID: the vSTE now points at the CD table, RID traffic ends
                self._write_vste(vsid, self._cd_table_vste(vsid, S1DSS_TERMINATE))
        hwpt = self.vmm.hwpts[vsid]
        return GuestDomain(gdev, pasid, hwpt, s1.root, asid, _Context(s1, cd_table))

    def _pages(self, iova: int, size: int) -> tuple[int, int]:
        """``[iova, iova + size)`` widened to whole guest pages (a 16 or 64 KiB guest maps
        and invalidates its own pages, whatever part of one a caller names)."""
        mask = self.granule - 1
        first = iova & ~mask
        return first, ((iova + max(size, 1) + mask) & ~mask) - first

    def map(self, dom: GuestDomain, iova: int, gpa: int, size: int, *, write: bool = True) -> None:
        prot = IOMMU_READ | (IOMMU_WRITE if write else 0)
        first, length = self._pages(iova, size)
        if (iova - gpa) & (self.granule - 1):
            raise err(errno.EINVAL, "IOVA and GPA differ within a guest page")
        dom.vendor.s1.map(first, gpa - (iova - first), length, prot)

    def unmap(self, dom: GuestDomain, iova: int, size: int) -> None:
        dom.vendor.s1.unmap(*self._pages(iova, size))

    def invalidate(self, dom: GuestDomain, iova: int | None = None, size: int = 0) -> None:
        """TLBI_NH_ASID, or range TLBI_NH_VAs in units of the guest's granule (TG)."""
        if iova is None:
            cmds = [C.tlbi_nh_asid(0, dom.tag)]
        else:
            first, length = self._pages(iova, size)
            shift = self.s1_cfg.granule_shift
            tg = (shift - 10) // 2
            cmds = [
                C.tlbi_va(C.TLBI_NH_VA, addr, asid=dom.tag, num=num, scale=scale, tg=tg)
                for addr, num, scale in C.plan_range(first, length, shift)
            ]
        if self.accelerated:
            self._issue_vcmdq(cmds)
        else:
            self._issue(cmds)

    def detach(self, dom: GuestDomain) -> None:
        """The CD cleared (CFGI_CD) for a PASID; for the RID an abort vSTE, or while
        substreams remain a CD-table vSTE that terminates RID traffic, then CD 0 cleared."""
        vsid = dom.dev.virt_id
        mem = self.vm.memory
        pasids = self.pasids.setdefault(vsid, set())
        if dom.pasid is not None:
            mem.write(self.cd_tables[vsid] + dom.pasid * CD_SIZE, bytes(CD_SIZE))
            pasids.discard(dom.pasid)
            self._issue([C.cfgi_cd(vsid, dom.pasid)])
            if not pasids and vsid not in self.rid_attached:
                self._write_vste(vsid, Ste(v=True, config=CFG_ABORT))
            return
        self.rid_attached.discard(vsid)
        if pasids:
            self._write_vste(vsid, self._cd_table_vste(vsid, S1DSS_TERMINATE))
            mem.write(self.cd_tables[vsid], bytes(CD_SIZE))
            self._issue([C.cfgi_cd(vsid, 0)])
        else:
            self._write_vste(vsid, Ste(v=True, config=CFG_ABORT))
