"""Root conftest: every test -- the framework's and each plugin's -- runs in strict mode, so a
model bug raises instead of being reported to the caller as EIO."""

import os

os.environ["IOMMUFD_MODEL_STRICT"] = "1"
