"""Arm SMMUv3 for iommufd-model: the hardware (stream table, CDs, VMSAv8-64 stages, CMDQ,
EVENTQ) and the Linux arm-smmu-v3 driver with its iommufd (vSMMU) side, as a driver plugin."""
