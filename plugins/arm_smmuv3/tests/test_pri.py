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
