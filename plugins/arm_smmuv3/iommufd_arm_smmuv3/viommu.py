"""The SMMUv3 driver's vIOMMU objects (arm-smmu-v3-iommufd.c, tegra241-cmdqv.c): the vSMMU,
its vDEVICEs, the Tegra241 CMDQV VINTF vSMMU and its guest-owned VCMDQs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from iommufd_arm_smmuv3.cmdqv import VINTF_PAGE_SIZE
from iommufd_model import driver as api
from iommufd_model.core.mmap import MmapOwner, MmioRegion
from iommufd_model.uapi import iommufd as U

if TYPE_CHECKING:
    from iommufd_arm_smmuv3.cmdqv import Vintf
    from iommufd_arm_smmuv3.domain import SmmuDomain
    from iommufd_arm_smmuv3.kernel import Master, SmmuDevice
    from iommufd_model.hw.regs import Mmio


class Vsmmu(api.ViommuBase):
    """``struct arm_vsmmu``: the VM's SMMU, tagged by the nest parent's VMID."""

    def __init__(self, smmu: SmmuDevice, parent: SmmuDomain) -> None:
        super().__init__(smmu.hw, parent, U.IOMMU_VIOMMU_TYPE_ARM_SMMUV3)
        self.smmu = smmu
        self.s2_parent = parent
        self.vmid = parent.vmid
        self.vsids: dict[int, Master] = {}


class Vdevice(api.VdeviceBase):
    """A vDEVICE; on a CMDQV vIOMMU it also holds a SID_MATCH/SID_REPLACE pair."""

    def __init__(self, viommu: api.ViommuBase, dev: Any, virt_id: int, sidx: int = -1) -> None:
        super().__init__(viommu, dev, virt_id)
        self.sidx = sidx


class VintfVsmmu(Vsmmu):
    """``struct tegra241_vintf``: a vSMMU that also owns a guest VINTF of the CMDQV."""

    def __init__(self, smmu: SmmuDevice, parent: SmmuDomain, vintf: Vintf) -> None:
        super().__init__(smmu, parent)
        self.viommu_type = U.IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV
        self.vintf = vintf
        self.vdevs: dict[int, Vdevice] = {}
        self.queues: dict[int, Vcmdq] = {}  # logical VCMDQ index -> its iommufd HW queue
        self.mmap: MmapOwner | None = None
        self.mmap_offset = 0  # where the iommufd's mmap() finds the VINTF page (0: none)

    def expose(self, mmap: MmapOwner) -> None:
        """iommufd_viommu_alloc_mmap() of the VINTF's page 0: the core picks the offset
        (the lowest free one from PAGE_SIZE on), which goes back to the user."""
        self.mmap_offset = mmap.alloc(MmioRegion(self.vintf.window, 0, VINTF_PAGE_SIZE))
        self.mmap = mmap
        self.out_data = U.IommuViommuTegra241Cmdqv(
            out_vintf_mmap_offset=self.mmap_offset, out_vintf_mmap_length=VINTF_PAGE_SIZE
        ).pack()

    @property
    def window(self) -> Mmio:
        """The VINTF page 0 the VMM maps at ``mmap_offset`` of the iommufd for its guest."""
        return self.vintf.window


class Vcmdq(api.HwQueueBase):
    """A guest-owned logical VCMDQ (``struct tegra241_vcmdq``) behind an iommufd HW queue."""

    def __init__(self, viommu: VintfVsmmu, index: int, base_iova: int, length: int) -> None:
        super().__init__(viommu, U.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV, index, base_iova, length)
        self.vintf = viommu.vintf
