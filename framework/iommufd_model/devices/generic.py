"""The ``generic`` kind: a PCIe endpoint with every standard piece and no engine.

Its identity and layout are the model's choices: Red Hat's vendor ID 0x1b36 with device
0x0005 (the ID QEMU gives its pci-testdev), class 0x00ff00, BAR0 a 64-bit 16 KiB register
window (plain storage) holding the MSI-X table at 0x2000 and PBA at 0x3000, BAR2 a 32-bit
prefetchable 4 KiB window, MSI with 8 vectors and per-vector masking, MSI-X with 16 vectors,
PM, PCIe with FLR and, when ``total_vfs`` is given, SR-IOV with VFs of device 0x0006.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommufd_model.devices.function import Bar, FunctionSpec, MsixLayout, PciFunction

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw

GENERIC_VENDOR = 0x1B36
GENERIC_DEVICE = 0x0005
GENERIC_VF_DEVICE = 0x0006


def generic(
    iommu: IommuHw,
    rid: int,
    *,
    total_vfs: int = 0,
    msi_vectors: int = 8,
    msix_vectors: int = 16,
    pasid: bool = False,
    pasid_bits: int = 20,
    ats: bool = False,
    pri: bool | None = None,
    prg_resp_pasid_required: bool = True,
) -> PciFunction:
    bar0 = Bar(0x4000, mem64=True)
    spec = FunctionSpec(
        vendor_id=GENERIC_VENDOR,
        device_id=GENERIC_DEVICE,
        class_code=0x00FF00,
        revision=1,
        subsystem_vendor_id=GENERIC_VENDOR,
        subsystem_id=0x1100,
        bars=(bar0, None, Bar(0x1000, prefetchable=True), None, None, None),
        msi_vectors=msi_vectors,
        msix=MsixLayout(msix_vectors) if msix_vectors else None,
        pasid=pasid,
        total_vfs=total_vfs,
        vf_device_id=GENERIC_VF_DEVICE,
        vf_bars=(Bar(0x4000, mem64=True), None, None, None, None, None),
    )
    return PciFunction(
        iommu,
        rid,
        spec,
        pasid_bits=pasid_bits,
        ats=ats,
        pri=pri,
        prg_resp_pasid_required=prg_resp_pasid_required,
    )
