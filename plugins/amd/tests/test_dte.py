"""The 256-bit DTE: codec round trip, field positions, and the hardware's legality checks."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from iommufd_amd import commands as C
from iommufd_amd import dte as D
from iommufd_amd import events as E
from iommufd_amd.dte import Dte

U64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=300, deadline=None)
@given(st.tuples(U64, U64, U64, U64))
def test_decode_encode_round_trips_every_bit(words: tuple[int, int, int, int]) -> None:
    dte = Dte.decode(words)
    assert dte.encode() == words
    assert Dte.from_bytes(dte.to_bytes()) == dte


def test_field_positions_match_the_kernel() -> None:
    gcr3 = 0x000F_EDCB_A987_6000
    d = Dte(
        v=True,
        tv=True,
        had=3,
        mode=4,
        host_root=0x1234_5000,
        ppr=True,
        giov=True,
        gv=True,
        glx=1,
        gcr3=gcr3,
        ir=True,
        iw=True,
        domain_id=0xBEEF,
        i=True,
        sysmgt=2,
        gpt_level=1,
        iv=True,
        int_root=0xABC0,
    )
    w0, w1, w2, _ = d.encode()
    assert w0 & 3 == 3 and (w0 >> 7) & 3 == 3 and (w0 >> 9) & 7 == 4
    assert w0 & D.DTE_HOST_TRP == 0x1234_5000
    assert w0 & (1 << 52) and w0 & (1 << 54) and w0 & (1 << 55) and w0 & (3 << 61) == 3 << 61
    assert (w0 >> 56) & 3 == 1
    # GCR3 root split: [14:12] at data[0] 60:58, [30:15] at data[1] 31:16, [51:31] at 63:43
    assert (w0 >> 58) & 7 == (gcr3 >> 12) & 7
    assert (w1 >> 16) & 0xFFFF == (gcr3 >> 15) & 0xFFFF
    assert w1 >> 43 == gcr3 >> 31
    assert w1 & 0xFFFF == 0xBEEF and w1 & (1 << 32) and (w1 >> 40) & 3 == 2
    assert (w2 >> 54) & 3 == 1 and w2 & 1 and w2 & D.DTE_IRQ_ROOT == 0xABC0
    assert Dte.decode(d.encode()).gcr3 == gcr3


def _check(d: Dte) -> str:
    return D.check(d, max_mode=6, gt_enabled=True, max_glx=1, gpt5=False)


def test_hardware_legality_rules() -> None:
    ok = Dte(v=True, tv=True, mode=3, host_root=0x1000, ir=True, iw=True, domain_id=1)
    assert _check(ok) == ""
    assert _check(Dte(v=True)) == ""  # TV=0: translation fields unused
    assert "Mode 7" in _check(Dte(v=True, tv=True, mode=7, host_root=0x1000))
    assert "reserved" in _check(Dte(v=True, tv=True, rsvd=(1 << 3, 0, 0, 0)))
    assert "reserved" in _check(Dte(v=True, tv=True, rsvd=(0, 1 << 42, 0, 0)))
    assert "GLX" in _check(Dte(v=True, tv=True, gv=True, glx=3))
    assert "GuestPagingMode" in _check(Dte(v=True, tv=True, gv=True, gpt_level=1))
    assert "GTEn" in D.check(
        Dte(v=True, tv=True, gv=True), max_mode=6, gt_enabled=False, max_glx=1, gpt5=False
    )
    assert "HATS" in D.check(
        Dte(v=True, tv=True, mode=6, host_root=0x1000),
        max_mode=4,
        gt_enabled=True,
        max_glx=1,
        gpt5=False,
    )


def test_illegal_dte_logs_the_event_and_blocks(world: Any) -> None:
    w = world
    ioas = w.ioas()
    va = w.buffer(1 << 16, fill=0xAB)
    w.map(ioas, va, 1 << 16, 1 << 20)
    w.fd.attach(w.dev_id, ioas)
    assert w.dev.dma_read(1 << 20, 4) == b"\xab" * 4
    w.events()
    # Corrupt the DTE in memory: set Mode 7 (reserved). The cached copy still rules ...
    addr = w.kernel.dte_addr(w.dev.rid)
    w0 = w.mem.read_u64(addr)
    w.mem.write_u64(addr, w0 | (7 << 9))
    assert w.dev.dma_read(1 << 20, 4) == b"\xab" * 4
    # ... until INVALIDATE_DEVTAB_ENTRY drops it; then the hardware refuses the entry.
    w.kernel.queue(C.inv_devtab_entry(w.dev.rid))
    w.kernel.completion_wait()
    try:
        w.dev.dma_read(1 << 20, 4)
    except Exception as exc:
        assert "illegal DTE" in str(exc)
    else:
        raise AssertionError("DMA through an illegal DTE succeeded")
    (ev,) = w.events()
    assert ev.code == E.ILLEGAL_DEV_TABLE_ENTRY and ev.devid == w.dev.rid
    assert ev.address == 1 << 20 and not ev.write


def test_device_table_outside_memory_is_a_hardware_error(world: Any) -> None:
    from iommufd_amd import regs as R

    w = world
    hw = w.hw
    hw.mmio.write(R.DEV_TABLE_BASE, R.dev_table_base_value(w.mem.size - 4096, 512))
    hw.dte_cache.clear()
    try:
        w.dev.dma_read(0, 4)
    except Exception as exc:
        assert "device table" in str(exc)
    (ev,) = w.events()
    assert ev.code == E.DEV_TAB_HARDWARE_ERROR
    assert ev.address == w.mem.size - 4096 + w.dev.rid * 32
