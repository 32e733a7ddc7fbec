"""A VM: VMM process, iommufd, guest RAM mapped at IOVA = GPA in one IOAS, guest IOMMUs."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import attrs

from iommufd_model.errors import err
from iommufd_model.hw.memory import PAGE_SIZE
from iommufd_model.locking import serialized
from iommufd_model.uapi import iommufd as U
from iommufd_model.vmm.guest import GuestIommu
from iommufd_model.vmm.memory import GuestMemory

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw
    from iommufd_model.machine import Machine

MIB = 1 << 20


@attrs.define
class VmmStats:
    """What the VMM had to do for its guest."""

    traps: int = 0  # guest accesses that exited to the VMM
    forwarded: int = 0  # guest commands the VMM re-issued through iommufd
    by_kind: dict[str, int] = attrs.field(factory=dict)


@serialized()
class Vm:
    """One guest. RAM is ``ram_size`` bytes of VMM memory at GPA 0, mapped at IOVA = GPA.

    :meth:`close` (or leaving a ``with Vm(...) as vm:`` block) releases everything the VM
    created, as a VMM's exit does: the guest IOMMUs' own resources, the mappings of the
    iommufd, every file the VMM process holds (the iommufd last, so its objects and bound
    devices go with it) and the guest RAM mapping.

    Attributes:
        machine: the host :class:`~iommufd_model.machine.Machine`.
        vmm: the VMM process; ``fd`` its open iommufd.
        ram_size: guest RAM in bytes; ``ram_va`` where the VMM mapped it.
        ioas_id: the IOAS mapping guest RAM at IOVA = GPA (the nest parents' stage 2).
        memory: guest RAM as guest drivers write it (:class:`GuestMemory`).
        stats: the VMM's costs (:class:`VmmStats`: traps, forwarded commands).
        closed: :meth:`close` ran.
    """

    def __init__(
        self, machine: Machine, ram_size: int = 64 * MIB, *, table_pool: int = 8 * MIB
    ) -> None:
        if ram_size % (2 * MIB) or table_pool >= ram_size:
            raise err(errno.EINVAL, "guest RAM must be 2 MiB multiples, larger than the pool")
        self.machine = machine
        self.vmm = machine.new_process()
        self.fd = self.vmm.open_iommufd()
        self.ram_size = ram_size
        self.ram_va = self.vmm.mmap(ram_size, align=2 * MIB)
        self.ioas_id = self.fd.ioas_alloc()
        self.fd.ioas_map(self.ioas_id, self.ram_va, ram_size, iova=0)
        self.memory = GuestMemory(self.vmm, self.ram_va, ram_size, table_pool)
        self.stats = VmmStats()
        self._parents: dict[int, int] = {}  # IOMMU index -> nest-parent HWPT id
        self._viommus: dict[tuple[int, bool], GuestIommu] = {}
        self._next_buffer = 0
        self.closed = False

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Release everything this VM created (idempotent). The iommufd's release destroys its
        objects leaves first and unbinds the devices, as the kernel does on the last close."""
        if self.closed:
            return
        self.closed = True
        for g in list(self._viommus.values()):
            g.close()
        self._viommus.clear()
        self._parents.clear()
        # Process exit unmaps every mapping of the iommufd first (a live one holds the file).
        for vma in list(self.fd.mmaps.vmas):
            vma.close()
        vmm = self.vmm
        for fd in sorted(vmm.files, key=lambda n: vmm.files[n] is self.fd):
            if fd in vmm.files:
                vmm.close(fd)
        vmm.munmap(self.ram_va, self.ram_size)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- guest memory -----------------------------------------------------------------------
    def alloc_buffer(self, size: int) -> int:
        """A guest-physical DMA buffer from the bottom of RAM (page aligned)."""
        gpa = self._next_buffer
        size = -(-size // PAGE_SIZE) * PAGE_SIZE
        if gpa + size > self.memory.pool_start * PAGE_SIZE:
            raise err(errno.ENOMEM, "guest RAM for buffers exhausted")
        self._next_buffer += size
        return gpa

    def trap(self, kind: str, forwarded: int = 0) -> None:
        """Account one exit to the VMM (and the commands it re-issued for the guest)."""
        self.stats.traps += 1
        self.stats.forwarded += forwarded
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1

    # -- host objects -------------------------------------------------------------------------
    def nest_parent(self, dev_id: int, iommu: IommuHw) -> int:
        """The nest-parent HWPT over guest RAM for ``iommu`` (one per IOMMU instance)."""
        hwpt = self._parents.get(iommu.index)
        if hwpt is None:
            hwpt = self.fd.hwpt_alloc(dev_id, self.ioas_id, flags=U.IOMMU_HWPT_ALLOC_NEST_PARENT)
            self._parents[iommu.index] = hwpt
        return hwpt

    def viommu(self, iommu: IommuHw, *, accelerated: bool = False) -> GuestIommu:
        """The guest IOMMU of ``iommu``'s vendor (EOPNOTSUPP when the driver has none)."""
        key = (iommu.index, accelerated)
        g = self._viommus.get(key)
        if g is None:
            hooks = self.machine.hooks(iommu.driver_name)
            g = hooks.guest_iommu_alloc(vm=self, iommu=iommu, accelerated=accelerated)
            self._viommus[key] = g
        return g
