"""The VT-d configurations ``iommufd-model matrix --sweep`` runs every scenario under.

Each is a set of ``probe`` options (see ``OPTIONS`` in :mod:`iommufd_intel_vtd.driver`): the
address width (CAP.SAGAW/MGAW: 48-bit 4-level or 57-bit 5-level second stage, and the
first-stage depth Linux picks with CAP.FL5LP), the translation modes (ECAP.FLTS, SLTS, NEST,
SLADS), the PASID width (ECAP.PSS) and the large pages (CAP.FL1GP, CAP.SLLPS).
"""

from iommufd_model.api import Feature, OptionSet

NESTING = frozenset({Feature.NEST_PARENT, Feature.NESTED, Feature.HWPT_INVALIDATE})

OPTION_SETS = (
    OptionSet("aw57-ss5", {"levels": 5}, doc="57-bit address width: 5-level second-stage tables"),
    OptionSet(
        "aw57-fs5",
        {"levels": 5, "fs_levels": 5},
        doc="57-bit address width, 5-level first-stage tables too (CAP.FL5LP)",
    ),
    OptionSet(
        "no-first-stage",
        {"first_stage": False, "nest": False},
        lacks=NESTING,
        doc="no ECAP.FLTS (so no ECAP.NEST): every paging domain is a second-stage one",
    ),
    OptionSet(
        "first-stage-only",
        {"second_stage": False, "nest": False},
        lacks=NESTING | {Feature.DIRTY_TRACKING},
        doc="no ECAP.SLTS (so no ECAP.NEST): first-stage domains only, no dirty tracking",
    ),
    OptionSet(
        "no-nest",
        {"nest": False},
        lacks=NESTING,
        doc="no ECAP.NEST: no nested translation",
    ),
    OptionSet(
        "no-pasid",
        {"pasid_bits": 0},
        lacks=frozenset({Feature.PASID}),
        doc="no ECAP.PASID: requests without PASID only",
    ),
    OptionSet("pasid8", {"pasid_bits": 8}, doc="ECAP.PSS: 8-bit PASIDs"),
    OptionSet(
        "no-slads",
        {"dirty": False},
        lacks=frozenset({Feature.DIRTY_TRACKING}),
        doc="no ECAP.SLADS: no second-stage dirty bits, so no dirty tracking",
    ),
    OptionSet(
        "4k-only",
        {"fl1gp": False, "sllps": 0},
        doc="no CAP.FL1GP and no CAP.SLLPS: no 2 MiB or 1 GiB pages in either stage",
    ),
)
