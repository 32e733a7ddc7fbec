"""iommufd-model AMD IOMMU driver plugin: the hardware (``hw``) and the Linux driver (``driver``).

Modules: ``regs`` (MMIO), ``dte`` (device table entries), ``pgtable_v1`` (host tables),
``gcr3`` (GCR3 and v2 guest tables), ``commands`` / ``events`` (command buffer and event log
codecs), ``walk`` (the mypyc-compiled walkers), ``hw`` (the IOMMU), ``driver`` (the hooks),
``viommu`` (the vIOMMU object; the HW-vIOMMU builds on it).
"""
