"""Property tests: arbitrary bytes and plausible-looking structs into every command.

Only ``OSError`` may leave an ioctl (conftest runs the model in strict mode, so any internal
exception fails the test), the object graph and frame refcounts stay consistent after every
call, a refused call changes nothing, and closing the fd afterwards releases every pin.
"""

from __future__ import annotations

import errno
from typing import Any, cast

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    MOCK_APERTURE,
    PAGE,
    RW,
    U32_MAX,
    U64_MAX,
    Scenario,
    check_invariants,
    expected_frame_refs,
    run,
    snapshot,
)
from iommufd_model import uapi as U
from iommufd_model.core.main import registered_ops

CMDS = sorted(c for c in registered_ops() if (c & 0xFF) <= 0x94)
ALL_CMDS = [*CMDS, (0x3B << 8) | 0x95, (0x3B << 8) | 0x7F]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _after_call(
    sc: Scenario, before: dict[str, Any], rc: int, cmd: int = 0, buf: bytearray | None = None
) -> None:
    check_invariants(sc.fd)
    if not rc:
        return
    gone = _unmapped_before_refusal(before, rc, cmd, buf)
    if not gone:
        assert snapshot(sc.fd) == before, f"refused call (errno {rc}) changed the model"
        return
    # IOAS_UNMAP as Linux 7.2: the fully covered areas before the refused one are gone, a
    # prefix (in IOVA order) of those the range covers.
    ioas_id, covered = gone
    had = before["objects"][ioas_id]["areas"]
    after = snapshot(sc.fd)["objects"][ioas_id]["areas"]
    removed = [a[0] for a in had if a not in after]
    assert removed == covered[: len(removed)], "refused IOAS_UNMAP removed more than a prefix"
    assert after == [a for a in had if a[0] not in removed]


def _unmapped_before_refusal(
    before: dict[str, Any], rc: int, cmd: int, buf: bytearray | None
) -> tuple[int, list[int]] | None:
    """For a refused IOAS_UNMAP: (ioas id, IOVAs of the covered areas 7.2 may remove first)."""
    if cmd != U.IOMMU_IOAS_UNMAP or rc not in (errno.ENOENT, errno.EBUSY) or buf is None:
        return None
    if len(buf) < U.IommuIoasUnmap.SIZE:
        return None
    st = U.IommuIoasUnmap.unpack(bytes(buf[: U.IommuIoasUnmap.SIZE]))
    obj = before["objects"].get(st.ioas_id)
    if obj is None or "areas" not in obj or not st.length:
        return None
    if st.iova == 0 and st.length == U64_MAX:
        start, last = 0, U64_MAX
    else:
        start, last = st.iova, st.iova + st.length - 1
    covered: list[int] = []
    for first, area_last, *_ in obj["areas"]:
        if area_last < start or first > last:
            continue
        if first < start or area_last > last:
            break
        covered.append(first)
    return (st.ioas_id, covered) if covered else None


def _close_releases_everything(sc: Scenario) -> None:
    """Close the iommufd first, then any FAULT/vEVENTQ fds (which keep the context alive)."""
    from iommufd_model.core.eventq import EventFile

    sc.fd.close()
    for num, f in sorted(sc.proc.files.items()):
        if isinstance(f, EventFile):
            assert not sc.fd.closed
            sc.proc.close(num)
    assert sc.fd.closed
    assert list(sc.fd.objects) == []
    assert sc.proc.locked_pages == 0
    assert dict(sc.machine.memory._refs) == dict(expected_frame_refs(sc.machine))


# -- (a) raw bytes ------------------------------------------------------------------------
@st.composite
def raw_calls(draw: st.DrawFn) -> tuple[int, bytearray]:
    cmd = draw(st.sampled_from(ALL_CMDS))
    body = draw(st.binary(min_size=0, max_size=72))
    size_kind = draw(st.sampled_from(["len", "random", "struct", "asis"]))
    buf = bytearray(body)
    if len(buf) >= 4 and size_kind != "asis":
        op = registered_ops().get(cmd)
        if size_kind == "len":
            size = len(buf)
        elif size_kind == "struct" and op is not None:
            size = op.struct.SIZE
            buf = buf[:size].ljust(size, b"\0")
        else:
            size = draw(st.integers(0, U32_MAX))
        buf[0:4] = size.to_bytes(4, "little")
    return cmd, buf


@SETTINGS
@given(calls=st.lists(raw_calls(), min_size=1, max_size=4))
def test_random_bytes(calls: list[tuple[int, bytearray]]) -> None:
    sc = Scenario()
    for cmd, buf in calls:
        before = snapshot(sc.fd)
        rc = run(sc.fd, cmd, buf)
        _after_call(sc, before, rc, cmd, buf)
    _close_releases_everything(sc)


# -- (b) plausible structs ----------------------------------------------------------------
def _interesting(sc: Scenario) -> list[int]:
    ids = list(range(0, 9))
    addrs = [
        PAGE,
        0x1001,
        1 << 16,
        MOCK_APERTURE,
        MOCK_APERTURE + (1 << 16),
        MOCK_APERTURE + 0x800,
        MOCK_APERTURE + 1,
        sc.va,
        sc.va + 1,
        sc.va + (1 << 16),
        sc.scratch,
        sc.scratch + 3,
        (1 << 31) - PAGE,
        U32_MAX,
        U64_MAX,
        U64_MAX - PAGE + 1,
        1 << 63,
    ]
    return ids + addrs + [sc.memfd]


@st.composite
def struct_calls(draw: st.DrawFn, sc: Scenario) -> tuple[int, bytearray]:
    cmd = draw(st.sampled_from(CMDS))
    cls = registered_ops()[cmd].struct
    values = _interesting(sc)
    kwargs: dict[str, Any] = {}
    for f in attrs.fields(cast("type[attrs.AttrsInstance]", cls)):  # each one is @ustruct
        ctype = f.metadata["ctype"]
        if f.name == "size":
            kwargs["size"] = cls.SIZE
        elif ctype.endswith("s"):  # raw reserved bytes
            n = int(ctype[:-1])
            kwargs[f.name] = draw(st.sampled_from([bytes(n), b"\1" + bytes(n - 1)]))
        elif f.name in ("flags", "op", "option_id", "data_type", "type"):
            kwargs[f.name] = draw(st.integers(0, 15))
        elif f.name.startswith("reserved"):
            kwargs[f.name] = draw(st.sampled_from([0, 0, 0, 1]))
        else:
            v = draw(st.sampled_from(values))
            bits = {"u8": 8, "u16": 16, "u32": 32, "s32": 32, "u64": 64}[ctype]
            v &= (1 << bits) - 1
            if ctype == "s32" and v >= 1 << 31:
                v -= 1 << 32
            kwargs[f.name] = v
    return cmd, bytearray(cls(**kwargs).pack())


@SETTINGS
@given(data=st.data())
def test_plausible_structs(data: st.DataObject) -> None:
    sc = Scenario()
    n = data.draw(st.integers(1, 6))
    for _ in range(n):
        cmd, buf = data.draw(struct_calls(sc))
        before = snapshot(sc.fd)
        rc = run(sc.fd, cmd, buf)
        _after_call(sc, before, rc, cmd, buf)
    # Whatever happened, devices still DMA consistently with the IOAS, and close cleans up.
    _close_releases_everything(sc)


@SETTINGS
@given(data=st.data())
def test_map_unmap_sequences_keep_dma_coherent(data: st.DataObject) -> None:
    """Random fixed-IOVA maps/unmaps/copies of page runs: DMA always matches the IOAS."""
    sc = Scenario()
    io = sc.fd.objects.get_ioas(sc.ioas).iopt
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["map", "unmap", "copy"]))
        pg = data.draw(st.integers(0, 31))
        npg = data.draw(st.integers(1, 8))
        iova = MOCK_APERTURE + (1 << 17) + pg * PAGE
        if kind == "map":
            st_: Any = U.IommuIoasMap(
                size=40,
                flags=RW | U.IOMMU_IOAS_MAP_FIXED_IOVA,
                ioas_id=sc.ioas,
                user_va=sc.va + data.draw(st.integers(0, 15)) * PAGE,
                length=npg * PAGE,
                iova=iova,
            )
            cmd = U.IOMMU_IOAS_MAP
        elif kind == "unmap":
            st_ = U.IommuIoasUnmap(size=24, ioas_id=sc.ioas, iova=iova, length=npg * PAGE)
            cmd = U.IOMMU_IOAS_UNMAP
        else:
            st_ = U.IommuIoasCopy(
                size=40,
                flags=RW | U.IOMMU_IOAS_MAP_FIXED_IOVA,
                dst_ioas_id=sc.ioas,
                src_ioas_id=sc.ioas,
                length=npg * PAGE,
                dst_iova=iova,
                src_iova=sc.iova + data.draw(st.integers(0, 8)) * PAGE,
            )
            cmd = U.IOMMU_IOAS_COPY
        buf = bytearray(st_.pack())
        before = snapshot(sc.fd)
        rc = run(sc.fd, cmd, buf)
        _after_call(sc, before, rc, cmd, buf)
        # Every mapped page reads through the device as the frame the IOAS says it is.
        for a_iova, last, _prot, _pages, start_byte in io.areas():
            for off in range(0, last - a_iova + 1, PAGE):
                got = io.lookup(a_iova + off)
                assert got is not None
                pa = (got[0] << 12) | ((start_byte + off) & (PAGE - 1))
                assert sc.dev.dma_read(a_iova + off, 8) == sc.machine.memory.read(pa, 8)
    _close_releases_everything(sc)
