"""The AMD IOMMU configurations ``iommufd-model matrix --sweep`` runs every scenario under.

Each is a set of ``probe`` options (see ``OPTIONS`` in :mod:`iommufd_amd.driver`): the host
page-table depth the hardware allows (EFR.HATS, which bounds how far a v1 table grows) and the
Mode v1 domains start at, the table format of plain paging domains (v1, or v2 as
``amd_iommu=pgtbl_v2`` selects),
the guest (v2) depth (EFR.GATS), the PASID width (EFR.PASMAX) and dirty-bit support (EFR.HD).
"""

from iommufd_model.api import Feature, OptionSet

OPTION_SETS = (
    OptionSet(
        "hats4",
        {"host_levels": 4},
        doc="EFR.HATS allows 4-level host tables: v1 tables grow from Mode 3 to 4 at most "
        "(48-bit aperture)",
    ),
    OptionSet(
        "hats5",
        {"host_levels": 5},
        doc="EFR.HATS allows 5-level host tables: v1 tables grow to Mode 5 (57-bit aperture)",
    ),
    OptionSet(
        "v1-start6",
        {"domain_levels": 6},
        doc="v1 domains start at Mode 6, the deepest HATS allows (the model's knob: 7.2 "
        "starts at Mode 3 and grows)",
    ),
    OptionSet(
        "v2",
        {"pgtable": "v2"},
        doc="plain paging domains use the v2 (x86 long-mode) format, 4 levels",
    ),
    OptionSet(
        "v2-gats5",
        {"pgtable": "v2", "guest_levels": 5},
        doc="EFR.GATS allows 5-level v2 tables: paging domains with 5-level v2 tables",
    ),
    OptionSet("pasid8", {"pasid_bits": 8}, doc="EFR.PASMAX: 8-bit PASIDs"),
    OptionSet(
        "no-hd",
        {"hd": False},
        lacks=frozenset({Feature.DIRTY_TRACKING}),
        doc="no EFR.HD: no hardware dirty bits, so no dirty tracking",
    ),
)
