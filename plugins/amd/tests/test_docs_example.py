"""docs/amd-hw-viommu.md's VMM example, executed as written, and the page's bad-guest-state
table checked against the model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from iommufd_amd import events as E
from iommufd_amd.dte import DTE_SIZE, Dte
from iommufd_amd.guest import GuestAmd

import iommufd_model as im
from iommufd_model.vmm import Vm

DOC = Path(__file__).resolve().parents[3] / "docs" / "amd-hw-viommu.md"
MIB = 1 << 20
IOVA = 0x40_0000


def example() -> str:
    text = DOC.read_text()
    m = re.search(r"<!-- example -->\n```python\n(.*?)```\n<!-- /example -->", text, re.S)
    assert m, "the example block is missing from docs/amd-hw-viommu.md"
    return m.group(1)


def test_the_documented_example_runs() -> None:
    code = example()
    assert len(code.splitlines()) <= 30
    exec(compile(code, str(DOC), "exec"), {})


def booted() -> tuple[Any, Vm, GuestAmd, Any, Any]:
    m = im.Machine.build(iommus=["amd"])
    vm = Vm(m, 16 * MIB, table_pool=4 * MIB)
    dev = m.add_pci_device(iommu=0)
    g = vm.viommu(m.iommus[0], accelerated=True)
    assert isinstance(g, GuestAmd)
    gdev = g.add_device(dev, 0x21)
    dom = g.attach(gdev)
    g.map(dom, IOVA, vm.alloc_buffer(4096), 4096)
    g.invalidate(dom)
    dev.dma_read(IOVA, 8)
    return m, vm, g, dev, dom


def test_gdte_without_gv_blocks_the_device() -> None:
    _m, vm, g, dev, _dom = booted()
    d = g.devs[0x21]
    d.slots.clear()  # the guest turns guest translation off: its next gDTE has GV=0
    g._write_gdte(d)
    with pytest.raises(im.DmaFault):
        dev.dma_read(IOVA, 8)
    vm.close()


def test_gcr3_outside_guest_ram_faults_into_the_guests_log() -> None:
    _m, vm, g, dev, dom = booted()
    raw = vm.memory.read(g.devtab + 0x21 * DTE_SIZE, DTE_SIZE)
    gd = Dte.from_bytes(raw)
    gd.gcr3 = 1 << 40  # beyond guest RAM
    vm.memory.write(g.devtab + 0x21 * DTE_SIZE, gd.to_bytes())
    vm.trap("gDTE")
    g.vmm._install_gdte(0x21)
    g.invalidate(dom)  # the guest flushes its gDomID after changing the gDTE
    with pytest.raises(im.DmaFault):
        dev.dma_read(IOVA, 8)
    evs = g.events()
    assert [(e.code, e.devid) for e in evs] == [(E.IO_PAGE_FAULT, 0x21)]
    vm.close()
