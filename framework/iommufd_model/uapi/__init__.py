"""The binary uAPI of ``/dev/iommu``: ``from iommufd_model import uapi; uapi.IOMMU_IOAS_MAP``."""

from iommufd_model.uapi.iommufd import *  # noqa: F403
from iommufd_model.uapi.iommufd import __doc__ as _header_doc  # noqa: F401
