"""Regions of a vfio-pci device: GET_REGION_INFO (with the MSI-X mappable capability), config
space through vfio_pci_config.c's filter, BAR read/write, mmap, reset (vfio_pci_core.c)."""

from __future__ import annotations

import errno
import struct
from typing import Any

from iommufd_model.devices import pci_regs as R
from iommufd_model.testing import assert_errno
from iommufd_model.uapi import vfio as V

from .conftest import VfioSetup, call

CFG = 7 << 40


def _bound(setup: VfioSetup) -> Any:
    df = setup.open_cdev()
    setup.bind(df)
    return df


def _region(df: Any, proc: Any, index: int, argsz: int = V.VfioRegionInfo.SIZE) -> Any:
    buf = bytearray(V.VfioRegionInfo(argsz=argsz, index=index).pack() + bytes(16))
    df.ioctl(V.VFIO_DEVICE_GET_REGION_INFO, buf, proc)
    return V.VfioRegionInfo.unpack(buf), bytes(buf[V.VfioRegionInfo.SIZE :])


def _cfg_read(df: Any, offset: int, size: int) -> int:
    return int.from_bytes(df.read(size, CFG + offset), "little")


def _cfg_write(df: Any, offset: int, size: int, value: int) -> None:
    assert df.write(value.to_bytes(size, "little"), CFG + offset) == size


def test_region_info(setup: VfioSetup) -> None:
    df = _bound(setup)
    rw = V.VFIO_REGION_INFO_FLAG_READ | V.VFIO_REGION_INFO_FLAG_WRITE
    cfg, _ = _region(df, setup.proc, V.VFIO_PCI_CONFIG_REGION_INDEX)
    assert (cfg.flags, cfg.size, cfg.offset) == (rw, 4096, CFG)
    # BAR0 holds the MSI-X table: mmap-able, with the MSIX_MAPPABLE capability, which does
    # not fit a plain struct: argsz grows to hold it, cap_offset stays 0
    bar0, _ = _region(df, setup.proc, 0)
    mm = rw | V.VFIO_REGION_INFO_FLAG_MMAP
    assert bar0.flags == mm | V.VFIO_REGION_INFO_FLAG_CAPS and bar0.size == 0x4000
    assert (bar0.argsz, bar0.cap_offset) == (40, 0)
    bar0, caps = _region(df, setup.proc, 0, argsz=40)
    assert bar0.cap_offset == 32
    assert struct.unpack("<HHI", caps[:8]) == (V.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, 0)
    bar2, _ = _region(df, setup.proc, 2)
    assert (bar2.flags, bar2.size, bar2.offset) == (mm, 0x1000, 2 << 40)
    bar1, _ = _region(df, setup.proc, 1)
    assert (bar1.flags, bar1.size) == (0, 0)
    rom, _ = _region(df, setup.proc, V.VFIO_PCI_ROM_REGION_INDEX)
    assert (rom.flags, rom.size) == (0, 0)
    assert_errno(errno.EINVAL, lambda: _region(df, setup.proc, V.VFIO_PCI_VGA_REGION_INDEX))
    assert_errno(errno.EINVAL, lambda: _region(df, setup.proc, 9))
    assert_errno(errno.EINVAL, lambda: _region(df, setup.proc, 0, argsz=8))


def test_config_space_read_write(setup: VfioSetup) -> None:
    """vfio_pci_device_test's config_space_read_write, plus what the filter hides."""
    df = _bound(setup)
    fn = setup.fn
    assert _cfg_read(df, 0, 2) == fn.vendor_id and _cfg_read(df, 2, 2) == fn.device_id
    command = _cfg_read(df, R.PCI_COMMAND, 2)
    assert not command & R.PCI_COMMAND_MASTER and command & R.PCI_COMMAND_MEMORY
    _cfg_write(df, R.PCI_COMMAND, 2, command | R.PCI_COMMAND_MASTER)
    assert _cfg_read(df, R.PCI_COMMAND, 2) & R.PCI_COMMAND_MASTER and fn.bus_master
    _cfg_write(df, R.PCI_COMMAND, 2, command)
    assert not fn.bus_master
    # vendor / device are read-only
    _cfg_write(df, 0, 4, 0x12345678)
    assert _cfg_read(df, 0, 2) == fn.vendor_id
    # BAR sizing through the virtual BAR: all ones reads back the size mask and flags
    _cfg_write(df, R.PCI_BASE_ADDRESS_0, 4, 0xFFFFFFFF)
    assert _cfg_read(df, R.PCI_BASE_ADDRESS_0, 4) == (~(0x4000 - 1) & 0xFFFFFFFF) | 0x4
    assert fn.config_read(R.PCI_BASE_ADDRESS_0, 4) == 0x4  # the hardware BAR is untouched
    # unaligned multi-byte reads split into aligned pieces; past the end is EFAULT
    whole = df.read(8, CFG)
    assert df.read(3, CFG + 1) == whole[1:4]
    assert_errno(errno.EFAULT, lambda: df.read(4, CFG + 4094))
    # MSI-X flags cannot be written by the user (enabled by SET_IRQS only)
    msix = fn.config.find_cap(R.PCI_CAP_ID_MSIX)
    _cfg_write(df, msix + R.PCI_MSIX_FLAGS, 2, R.PCI_MSIX_FLAGS_ENABLE)
    assert not fn.msix_enabled()


def test_virtual_intx_disable_and_flr(setup: VfioSetup) -> None:
    df = _bound(setup)
    fn = setup.fn
    command = _cfg_read(df, R.PCI_COMMAND, 2)
    _cfg_write(df, R.PCI_COMMAND, 2, command | R.PCI_COMMAND_INTX_DISABLE)
    assert _cfg_read(df, R.PCI_COMMAND, 2) & R.PCI_COMMAND_INTX_DISABLE
    resets = fn.resets
    exp = fn.config.find_cap(R.PCI_CAP_ID_EXP)
    _cfg_write(df, exp + R.PCI_EXP_DEVCTL, 2, R.PCI_EXP_DEVCTL_BCR_FLR)
    assert fn.resets == resets + 1
    assert not _cfg_read(df, exp + R.PCI_EXP_DEVCTL, 2) & R.PCI_EXP_DEVCTL_BCR_FLR


def test_bar_rw_and_mmap(setup: VfioSetup) -> None:
    df = _bound(setup)
    fn = setup.fn
    assert df.write(b"\x11\x22\x33\x44\x55\x66\x77\x88", (2 << 40) + 8) == 8
    assert fn.mmio_read(2, 8, 8) == 0x8877665544332211
    assert df.read(3, (2 << 40) + 9) == b"\x22\x33\x44"
    # the MSI-X table is not reachable by read/write: ones, writes dropped
    assert df.read(4, 0x2000) == b"\xff" * 4
    df.write(b"\0" * 4, 0x200C)
    assert fn.msix_table[12] == 1
    assert_errno(errno.EINVAL, lambda: df.read(4, (2 << 40) + 0x1000))
    assert_errno(errno.EINVAL, lambda: df.read(4, 1 << 40))  # BAR1 is not implemented
    assert df.mmap_region(2 << 40, 0x1000) == (2, 0)
    assert df.mmap_region(0x1000, 0x3000) == (0, 0x1000)
    assert_errno(errno.EINVAL, lambda: df.mmap_region(2 << 40, 0x2000))
    assert_errno(errno.EINVAL, lambda: df.mmap_region(CFG, 0x1000))
    assert_errno(errno.EINVAL, lambda: df.mmap_region(0, 0x1000, flags=0x02))  # MAP_PRIVATE
    # Memory Space off: BAR accesses through the fd are EIO
    command = _cfg_read(df, R.PCI_COMMAND, 2)
    _cfg_write(df, R.PCI_COMMAND, 2, command & ~R.PCI_COMMAND_MEMORY)
    assert_errno(errno.EIO, lambda: df.read(4, 2 << 40))


def test_reset_restores_config_state(setup: VfioSetup) -> None:
    df = _bound(setup)
    fn = setup.fn
    info = call(df, V.VFIO_DEVICE_GET_INFO, V.VfioDeviceInfo(argsz=24), setup.proc)
    assert info.flags & V.VFIO_DEVICE_FLAGS_RESET
    command = _cfg_read(df, R.PCI_COMMAND, 2)
    _cfg_write(df, R.PCI_COMMAND, 2, command | R.PCI_COMMAND_MASTER)
    fn.mmio_write(2, 0, 4, 0xDEADBEEF)
    resets = fn.resets
    df.ioctl(V.VFIO_DEVICE_RESET, bytearray(), setup.proc)
    assert fn.resets == resets + 1
    assert fn.bus_master  # pci_try_reset_function() restores the saved config state
    assert fn.mmio_read(2, 0, 4) == 0  # the device's registers are at power-on


def test_hot_reset_info_and_features(setup: VfioSetup) -> None:
    df = _bound(setup)
    hdr = V.VfioPciHotResetInfo(argsz=12)
    assert_errno(
        errno.ENODEV, lambda: call(df, V.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, hdr, setup.proc)
    )
    feat = V.VfioDeviceFeature(
        argsz=24, flags=V.VFIO_DEVICE_FEATURE_SET | V.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN
    )
    # not an SR-IOV PF: no VF token feature
    assert_errno(errno.ENOTTY, lambda: call(df, V.VFIO_DEVICE_FEATURE, feat, setup.proc, bytes(16)))
    both = V.VfioDeviceFeature(argsz=8, flags=V.VFIO_DEVICE_FEATURE_SET | V.VFIO_DEVICE_FEATURE_GET)
    assert_errno(errno.EINVAL, lambda: call(df, V.VFIO_DEVICE_FEATURE, both, setup.proc))
    bad = V.VfioDeviceFeature(argsz=8, flags=1 << 20)
    assert_errno(errno.EINVAL, lambda: call(df, V.VFIO_DEVICE_FEATURE, bad, setup.proc))
    assert_errno(
        errno.ENOTTY,
        lambda: call(df, V.VFIO_DEVICE_FEATURE, V.VfioDeviceFeature(argsz=8, flags=1), setup.proc),
    )
