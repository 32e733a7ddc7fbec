"""The VMM's vSMMU (QEMU's arm-smmuv3 with iommufd nesting, or a Tegra241 CMDQV VINTF),
apart from the guest driver that programs it (:mod:`iommufd_arm_smmuv3.guest`).

The guest reaches it only through its registers. Every write of the emulated CMDQ_PROD is a
counted trap (:meth:`Vm.trap`): the VMM reads the new commands from the guest's command
queue; CFGI_STE becomes a nested HWPT built from the guest's vSTE and an attach in place of
the old one; invalidations are forwarded with IOMMU_HWPT_INVALIDATE on the vIOMMU; CMD_SYNC
completes in the emulation. With ``accelerated`` the vIOMMU is a Tegra241 CMDQV VINTF: the
VMM mmaps the VINTF page for the guest and hands the guest's VCMDQ to the hardware
(IOMMU_HW_QUEUE_ALLOC), which then consumes the guest's invalidations with no exit.

The guest's stream table and command queue bases (STRTAB_BASE, CMDQ_BASE) and its VCMDQ
base are given to the VMM without a counted trap: boot-time configuration stores the model
does not count (the model's choice).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3.ste import STE_SIZE
from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.locking import SerializedSubclasses
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm.guest import GuestDevice

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw
    from iommufd_model.vmm.vm import Vm

GUEST_CMDQ_LOG2 = 8  # 256 commands in one page
VCMDQ_BYTES = PAGE_SIZE


class VintfWindow:
    """The guest's view of the mmapped VINTF page: 32-bit register accesses by offset."""

    def __init__(self, vma: Any) -> None:
        self.vma = vma

    def read(self, off: int, width: int = 4) -> int:
        return int.from_bytes(self.vma.read(off, width), "little")

    def write(self, off: int, value: int, width: int = 4) -> None:
        self.vma.write(off, value.to_bytes(width, "little"))


class VirtualSmmuv3(SerializedSubclasses):
    """One emulated SMMUv3 of a VM over host SMMU ``iommu``: the iommufd vIOMMU behind it and
    the nested HWPTs it installed for the guest's vSTEs. Its public methods hold the model
    lock, as the guest's do."""

    def __init__(
        self, vm: Vm, iommu: IommuHw, *, accelerated: bool, strtab: int, cmdq: int
    ) -> None:
        self.vm = vm
        self.iommu = iommu
        self.accelerated = accelerated
        self.strtab = strtab  # the guest stream table's IPA (its STRTAB_BASE)
        self.cmdq = cmdq  # the guest command queue's IPA (its CMDQ_BASE)
        self.cmdq_prod = 0  # CMDQ_PROD as last written
        self.viommu_id = 0
        self.window: VintfWindow | None = None  # the VINTF page mapped into the guest
        self.devices: dict[int, GuestDevice] = {}  # vSID -> passed-through device
        self.hwpts: dict[int, int] = {}  # vSID -> nested HWPT installed for its vSTE

    # -- what the VMM sets up -------------------------------------------------------------------
    def create_viommu(self, dev_id: int) -> int:
        """IOMMU_VIOMMU_ALLOC over the nest parent of ``dev_id``: an ARM_SMMUV3 vIOMMU, or
        with ``accelerated`` a TEGRA241_CMDQV one whose VINTF page the VMM mmaps."""
        vm = self.vm
        parent = vm.nest_parent(dev_id, self.iommu)
        if not self.accelerated:
            self.viommu_id = vm.fd.viommu_alloc(dev_id, parent, U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3)
            return self.viommu_id
        data = bytes(U.IommuViommuTegra241Cmdqv.SIZE)
        self.viommu_id, out = vm.fd.viommu_alloc_data(
            dev_id, parent, U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV, data
        )
        # The VMM mmaps the VINTF page at the offset the kernel returned and hands it to the
        # guest; the guest's accesses to it go to the VINTF's registers without a trap.
        info = U.IommuViommuTegra241Cmdqv.unpack(out)
        self.window = VintfWindow(
            vm.fd.mmap(info.out_vintf_mmap_offset, info.out_vintf_mmap_length)
        )
        return self.viommu_id

    def vcmdq_base_write(self, ipa: int) -> None:
        """The guest gave its VCMDQ the page at ``ipa``: the VMM hands it to the hardware."""
        if not self.accelerated:
            raise err(errno.EOPNOTSUPP, "an emulated vSMMU has no VCMDQ")
        self.vm.fd.hw_queue_alloc(
            self.viommu_id, U.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV, 0, ipa, VCMDQ_BYTES
        )

    def plug(self, gdev: GuestDevice) -> None:
        """``gdev`` (bound, with its vDEVICE) is the guest's stream ``gdev.virt_id``."""
        self.devices[gdev.virt_id] = gdev

    # -- guest stores that exit ---------------------------------------------------------------
    def cmdq_prod_write(self, prod: int) -> None:
        """The guest wrote the emulated CMDQ_PROD: emulate the commands up to ``prod``."""
        vm = self.vm
        first, self.cmdq_prod = self.cmdq_prod, prod
        forward: list[bytes] = []
        for index in range(first, prod):
            raw = vm.memory.read(self.cmdq + (index % (1 << GUEST_CMDQ_LOG2)) * C.CMD_SIZE, 16)
            w0, _w1 = C.decode(raw)
            opcode = C.op(w0)
            if opcode == C.CFGI_STE:
                self._install_vste(w0 >> 32)
            elif opcode in (C.CFGI_CD, C.CFGI_CD_ALL, C.ATC_INV) and not self._plugged(w0 >> 32):
                continue  # the VMM has unplugged that device: nothing of it to invalidate
            elif opcode != C.CMD_SYNC:
                forward.append(raw)
        if forward:
            vm.fd.hwpt_invalidate(
                self.viommu_id, U.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, forward
            )
        vm.trap("CMDQ_PROD", forwarded=len(forward))

    # -- the emulation ------------------------------------------------------------------------
    def _plugged(self, vsid: int) -> bool:
        gdev = self.devices.get(vsid)
        return gdev is not None and gdev.dev.bound_to is not None

    def _install_vste(self, vsid: int) -> None:
        """CFGI_STE: a nested HWPT from the guest's vSTE, attached in place of the old one.

        A vSID with no passed-through device behind it (any 32-bit value a guest writes in
        its command) has no host configuration: the command completes as a no-op, as on
        QEMU's vSMMU."""
        gdev = self.devices.get(vsid)
        if gdev is None:
            return
        vm = self.vm
        data = vm.memory.read(self.strtab + vsid * STE_SIZE, 16)
        try:
            hwpt = vm.fd.hwpt_alloc(
                gdev.dev_id, self.viommu_id, data_type=U.IOMMU_HWPT_DATA_ARM_SMMUV3, data=data
            )
            try:
                vm.fd.attach(gdev.dev_id, hwpt)  # replace: no window without translation
            except OSError:
                vm.fd.destroy(hwpt)
                raise
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the VMM unplugged the device already
                raise
            self._drop_shadow(vsid)
            return
        old = self.hwpts.get(vsid)
        self.hwpts[vsid] = hwpt
        if old is not None:
            vm.fd.destroy(old)

    def _drop_shadow(self, vsid: int) -> None:
        """The device is gone from the VMM: forget (and free, if still there) its HWPT."""
        old = self.hwpts.pop(vsid, None)
        if old is not None:
            try:
                self.vm.fd.destroy(old)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
