"""A toy IOMMU driver plugin for iommufd-model: the smallest real driver (paging only)."""
