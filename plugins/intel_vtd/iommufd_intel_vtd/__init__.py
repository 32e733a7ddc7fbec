"""Intel VT-d (scalable mode) for iommufd-model: the hardware and the Linux intel driver."""
