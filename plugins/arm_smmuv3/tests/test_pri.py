"""PCIe page requests (PRI) as Linux 7.2's SMMUv3 treats them: the PRI queue is enabled when
IDR0.PRI says so, and every request is logged and its group denied (arm_smmu_handle_ppr)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from iommufd_arm_smmuv3 import commands as C
from iommufd_arm_smmuv3 import regs as R
from iommufd_arm_smmuv3.kernel import PRI_RESP_DENY

from .test_cmd_stream import Rig


def test_page_requests_are_denied(smmu_machine: Callable[..., Any]) -> None:
    r = Rig(smmu_machine, pri=True, ats=True)
    assert r.hw.mmio.read(R.CR0, 4) & R.CR0_PRIQEN
    assert r.hw.mmio.read(R.IRQ_CTRL, 4) & R.IRQ_CTRL_PRIQ_IRQEN
    r.mark()
    assert r.m_dev.page_request(0x10_0000, grpid=7, last=False, read=False, write=True)
    assert r.stream() == []  # not the last request of its group: no response
    assert r.m_dev.page_request(0x10_1000, grpid=7, last=True, pasid=3)
    assert r.stream() == [C.pri_resp(r.sid, 7, PRI_RESP_DENY, 3)]  # no CMD_SYNC
    assert r.hw.pri_responses[-1] == (r.sid, 3, 7, PRI_RESP_DENY)
    reqs = r.smmu.page_requests
    assert [(q.addr, q.grpid, q.last, q.write, q.ssid) for q in reqs] == [
        (0x10_0000, 7, False, True, None),
        (0x10_1000, 7, True, False, 3),
    ]


def test_without_idr0_pri_there_is_no_pri_queue(smmu_machine: Callable[..., Any]) -> None:
    r = Rig(smmu_machine)
    assert not r.hw.mmio.read(R.CR0, 4) & R.CR0_PRIQEN
    assert not r.m_dev.page_request(0x10_0000, grpid=1)
    assert r.hw.page_requests_lost == 1 and r.smmu.page_requests == []


def test_pri_resp_ssv_follows_the_request_not_the_pri_capability(
    smmu_machine: Callable[..., Any],
) -> None:
    """arm_smmu_handle_ppr(): PRI_RESP's SSV and SubstreamID are the request's (PRIQ_0_SSID_V),
    whatever the device's "PRG Response PASID Required" bit says; 7.2's SMMUv3 driver never
    reads or enables the device's PRI capability (no pci_enable_pri in arm-smmu-v3.c)."""
    from iommufd_model.devices import pci_regs as P

    r = Rig(smmu_machine, pri=True, ats=True)
    for required in (True, False):
        dev = r.m.add_pci_device(iommu=0, ats=True, prg_resp_pasid_required=required)
        pos = dev.config.find_ext_cap(P.PCI_EXT_CAP_ID_PRI)
        assert pos is not None
        status = dev.config_read(pos + P.PCI_PRI_STATUS, 2)
        assert bool(status & P.PCI_PRI_STATUS_PASID) == required
        r.mark()
        assert dev.page_request(0x10_0000, grpid=5, pasid=9)
        assert dev.page_request(0x10_0000, grpid=6)
        assert r.stream() == [
            C.pri_resp(dev.rid, 5, PRI_RESP_DENY, 9),
            C.pri_resp(dev.rid, 6, PRI_RESP_DENY, None),
        ]
        assert dev.config_read(pos + P.PCI_PRI_CTRL, 2) == 0
