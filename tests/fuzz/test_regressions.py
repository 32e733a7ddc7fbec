"""Named regressions for the bugs the byte-level fuzz found (their corpus inputs pin the same
outcomes; these say what each one was)."""

from __future__ import annotations

import harness_amd as A
import harness_smmuv3 as S
import harness_vtd as V
import pytest
from fuzzlib import IOVA, FuzzBug, GuestWorld, HostWorld, plant_path, u64s
from iommufd_arm_smmuv3 import commands as C

from iommufd_model.hw.iommu import DmaFault
from iommufd_model.hw.memory import PAGE_SHIFT

BEYOND = 1 << 40  # inside every address width, far beyond the machine's memory


def test_smmuv3_guest_cfgi_ste_of_unknown_vsid_is_a_no_op() -> None:
    """The VMM's CMDQ emulation raised KeyError for a CFGI_STE naming a vSID without a
    passed-through device (vsmmu.py _install_vste)."""
    w = GuestWorld("arm_smmuv3")
    w.g._issue([C.cfgi_ste(0x2961_0C9F), C.cfgi_ste(0)])
    assert w.dev.dma_read(IOVA, 8) == bytes(8)


@pytest.mark.parametrize("vendor", ["amd", "intel_vtd"])
def test_leaf_beyond_memory_is_a_dma_fault(vendor: str) -> None:
    """A host leaf pointing past the end of memory made the DMA engine leak OSError(EFAULT)
    (AMD and VT-d translate returned the address; SMMUv3 already aborted)."""
    w = HostWorld(vendor)
    if vendor == "amd":
        tables, fmt = A._v1(w)
        ws = [tables[1] | 3 << 9 | 1 | 3 << 61, BEYOND | 1 | 3 << 61]
    else:
        tables, fmt = V._host_tables(w)
        ws = [tables[1] | 0x67, BEYOND | 0xE7]
    plant_path(w.hw.memory, tables, fmt, u64s(*ws), w.spare)
    (A._host_reset if vendor == "amd" else V._reset)(w)
    for _ in range(2):  # nothing is cached for it either
        with pytest.raises(DmaFault, match="master abort"):
            w.dev.dma_write(IOVA, b"x")
        with pytest.raises(DmaFault, match="master abort"):
            w.dev.dma_read(IOVA, 8)


def test_smmuv3_leaf_beyond_memory_aborts() -> None:
    w = HostWorld("arm_smmuv3")
    tables, fmt = S._host_tables(w, False)
    plant_path(w.hw.memory, tables, fmt, u64s(tables[1] | 3, BEYOND | 0x441), w.spare)
    S._host_reset(w)
    with pytest.raises(DmaFault, match="external abort"):
        w.dev.dma_read(IOVA, 8)


# -- the checks themselves catch what they claim ---------------------------------------------------
def test_isolation_catches_a_write_to_the_bystander() -> None:
    w = GuestWorld("amd")
    pfn = next(iter(w.victim))
    with pytest.raises(FuzzBug, match="bystander"), w.isolation():
        w.machine.memory.write(pfn << PAGE_SHIFT, b"escape")


def test_isolation_catches_a_write_to_a_free_frame() -> None:
    w = GuestWorld("intel_vtd")
    mem = w.machine.memory
    free = mem.alloc_frame()
    mem.put_frame(free)
    with pytest.raises(FuzzBug, match="free frame"), w.isolation():
        mem.write(free << PAGE_SHIFT, b"escape")


def test_probe_catches_a_translation_outside_the_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    w = GuestWorld("arm_smmuv3")
    pfn = next(iter(w.victim))
    monkeypatch.setattr(w.hw, "translate", lambda *a: (pfn << PAGE_SHIFT, 64))
    with pytest.raises(FuzzBug, match="not the VM's"):
        w.probe()


def test_amd_gdte_uapi_fuzzes_the_fields_of_inputs_of_any_length() -> None:
    """Every input longer than the 32-byte gDTE stopped at the length check (EINVAL), so
    mutations that grew an input never reached a field: now only lengths that are multiples
    of 8 go as they are, others are cut or padded to the struct."""
    good = A._gdte(GuestWorld("amd"))
    assert A.gdte_uapi(good + bytes(8)) == A.gdte_uapi(good[:16]) == "EINVAL"
    reached = A.gdte_uapi(good + b"\xff")
    assert reached.startswith("ok|") and reached == A.gdte_uapi(good)
    bad_glx = bytearray(good + b"\x01\x02")
    bad_glx[7] |= 0x03  # GLX [57:56] = 3 (reserved): a field inside the struct decides
    assert A.gdte_uapi(bytes(bad_glx)) != reached
