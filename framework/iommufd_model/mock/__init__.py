"""The mock IOMMU driver, modelled on the kernel's iommufd self-test driver (selftest.c).

It is registered like any vendor, through the ``iommufd_model.drivers`` entry point, so the
core is exercised through exactly the contract a real plugin uses.
"""
