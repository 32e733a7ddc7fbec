"""One IOTLB entry as a native record: what a walk cached for a naturally aligned page.

Compiled by mypyc (``setup.py``, in one group with :mod:`iommufd_model.hw.xlate` and
:mod:`iommufd_model.hw.tlb_run`), so the compiled translate front and the burst paths make and
read entries natively: a fill builds one object with four machine-word fields, a hit reads
them without unboxing a tuple. The same source runs uncompiled when mypyc is absent; under
``IOMMUFD_MODEL_PURE=1`` the pure front and burst path still receive this module's class (it
holds no logic beyond equality, so the pure and compiled runs compare equal entries). Free of
framework imports, no module-level mutable state, no lock (docs/concurrency.md).
"""

from __future__ import annotations

from typing import Final


class TlbEntry:
    """One cached translation of a naturally aligned page of ``1 << shift`` bytes."""

    #: physical base of the page
    pa: Final[int]
    shift: Final[int]
    #: vendor-neutral permission bits (IOMMU_READ | IOMMU_WRITE, plus vendor flags)
    perm: Final[int]
    #: what the walk that filled it cost (for reporting)
    mem_refs: Final[int]

    def __init__(self, pa: int, shift: int, perm: int, mem_refs: int = 0) -> None:
        self.pa = pa
        self.shift = shift
        self.perm = perm
        self.mem_refs = mem_refs

    def fields(self) -> tuple[int, int, int, int]:
        """``(pa, shift, perm, mem_refs)``."""
        return (self.pa, self.shift, self.perm, self.mem_refs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TlbEntry):
            return self.fields() == other.fields()
        # An entry of the other build of this module (pure beside compiled) is equal by fields.
        if type(other).__name__ != "TlbEntry":
            return NotImplemented
        fields: tuple[int, int, int, int] = getattr(other, "fields")()  # noqa: B009
        return self.fields() == fields

    def __hash__(self) -> int:
        return hash(self.fields())

    def __repr__(self) -> str:
        return (
            f"TlbEntry(pa={self.pa}, shift={self.shift}, perm={self.perm}, "
            f"mem_refs={self.mem_refs})"
        )


def new_entry(fields: tuple[int, int, int, int]) -> TlbEntry:
    """A TlbEntry from its field tuple (the fill callback of the vendors' burst walkers)."""
    pa, shift, perm, refs = fields
    return TlbEntry(pa, shift, perm, refs)
