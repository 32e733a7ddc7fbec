"""``iommufd-model run``: unmodified programs with ``/dev/iommu`` served by the model.

``launch.run_program`` starts the model server (server.py) and the program with the
preload library (preload.c, compiled at install time) that routes ``/dev/iommu`` and the
files it hands out to the server; process.py is the real program's memory behind the
core's Process interface. docs/running-programs.md says how it works and its limits.
"""
