"""One PCI function bound to vfio-pci (``struct vfio_pci_core_device``): open/close, reset,
regions, the VF token; the interrupt state is :mod:`iommufd_model.vfio.irqs`, the config space
filter :mod:`iommufd_model.vfio.config`.

Facts from drivers/vfio/pci/vfio_pci_core.c and vfio_pci_rdwr.c (Linux 7.2):

- the first open enables the function (vfio_pci_core_enable: a reset when it can reset,
  Memory Space on, INTx unmasked, the virtual config space built) and the last close disables
  it (vfio_pci_core_disable: interrupts off, Bus Master off, a reset, the state saved at
  enable restored);
- VFIO_DEVICE_RESET and a virtual FLR are ``pci_try_reset_function()``: the config state is
  saved, the function reset, the state restored (so Bus Master and MSI-X come back as they
  were) while the device's own registers are at their power-on values;
- regions: BAR *n* at offset n << 40, the ROM (index 6) and config space (index 7); memory
  BARs are mmap-able, the MSI-X BAR says so with VFIO_REGION_INFO_CAP_MSIX_MAPPABLE; no VGA;
- the VF token of an SR-IOV PF (vfio_pci_core_match_token_uuid): a VF may be opened only
  with the PF's token; the PF itself needs it only while one of its VFs is open.

The model's own choices: every function is reset-capable if it has PCIe FLR; BAR resources
are placed by a bump allocator of the registry (the BAR values the user reads); dynamic
MSI-X is available (x86 with interrupt remapping).
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Any

from iommufd_model.devices import pci_regs as R
from iommufd_model.errors import err
from iommufd_model.uapi import vfio as V
from iommufd_model.vfio.irqs import VfioIrqs

if TYPE_CHECKING:
    from iommufd_model.core.main import IommuFd
    from iommufd_model.devices import PciFunction
    from iommufd_model.vfio.config import VfioConfig
    from iommufd_model.vfio.group import VfioGroup
    from iommufd_model.vfio.registry import VfioRegistry

PAGE_SIZE = 4096


class VfToken:
    """``struct vfio_pci_vf_token``: the PF's UUID and how many of its VFs are open."""

    def __init__(self) -> None:
        self.uuid = bytes(16)
        self.users = 0


class VfioPciDevice:
    """A function as vfio-pci holds it, shared by every file that opens it."""

    def __init__(self, reg: VfioRegistry, fn: PciFunction, index: int, group: VfioGroup) -> None:
        self.registry = reg
        self.fn = fn
        self.index = index  # vfioN
        self.group = group
        self.open_count = 0
        self.cdev_opened = False
        self.unregistered = False
        self.vconfig: VfioConfig | None = None
        self.irqs = VfioIrqs(self)
        self.has_dyn_msix = True
        self.vf_token = VfToken() if fn.spec.total_vfs and not fn.is_virtfn else None
        self.resources = reg.place_bars(fn)  # BAR index -> host address (model)
        self._saved: tuple[bytes, bytes] | None = None
        self.iommufd: IommuFd | None = None  # bound while open
        self.devid = 0
        fn.irq_sink = self.irqs.deliver

    @property
    def name(self) -> str:
        return f"vfio{self.index}"

    @property
    def reset_works(self) -> bool:
        """pci_probe_reset_function(): the model's functions reset by PCIe FLR only."""
        exp = self.fn.config.find_cap(R.PCI_CAP_ID_EXP)
        if exp is None:
            return False
        return bool(self.fn.config_read(exp + R.PCI_EXP_DEVCAP, 4) & R.PCI_EXP_DEVCAP_FLR)

    def bar_register(self, index: int) -> int:
        """The BAR register a kernel that placed the BARs would show (address | flags)."""
        bars = self.fn.bars
        if index > 0 and bars[index - 1] is not None and bars[index - 1].mem64:  # type: ignore[union-attr]
            return (self.resources.get(index - 1, 0) >> 32) & 0xFFFFFFFF
        bar = bars[index]
        if bar is None:
            return 0
        return (self.resources.get(index, 0) & 0xFFFFFFFF & ~(bar.size - 1)) | bar.type_bits

    # -- config state save / restore (pci_save_state / pci_restore_state) -----------------
    def _save_state(self) -> tuple[bytes, bytes]:
        fn = self.fn
        return bytes(fn.config.data), bytes(fn.msix_table)

    def _restore_state(self, state: tuple[bytes, bytes]) -> None:
        """Write the saved registers back (command, BARs, MSI/MSI-X, PCIe control...)."""
        config, table = state
        fn = self.fn
        fn.config.data[:] = config
        fn.msix_table[: len(table)] = table

    def try_reset_function(self) -> None:
        """pci_try_reset_function(): save, disable, reset, restore."""
        if not self.reset_works:
            raise err(errno.ENOTTY, f"{self.fn.bdf} cannot be reset")
        state = self._save_state()
        self.fn.reset()
        self._restore_state(state)

    # -- open / close -------------------------------------------------------------------
    def open_device(self) -> None:
        """vfio_pci_core_enable() + vfio_pci_core_finish_enable()."""
        from iommufd_model.vfio.config import VfioConfig

        fn = self.fn
        if self.reset_works:
            fn.reset()
        self._saved = self._save_state()
        cmd = fn.config_read(R.PCI_COMMAND, 2)
        if not fn.is_virtfn:
            cmd |= R.PCI_COMMAND_MEMORY  # pci_enable_device()
        cmd &= ~R.PCI_COMMAND_INTX_DISABLE  # INTx unmasked for a PCI 2.3 function
        fn.config_write(R.PCI_COMMAND, 2, cmd)
        self.vconfig = VfioConfig(self)
        if fn.is_virtfn:
            pf = self.pf_device()
            if pf is not None and pf.vf_token is not None:
                pf.vf_token.users += 1

    def close_device(self) -> None:
        """vfio_pci_core_close_device(): interrupts off, Bus Master off, reset, restore."""
        fn = self.fn
        self.irqs.disable_all()
        cmd = fn.config_read(R.PCI_COMMAND, 2)
        fn.config_write(R.PCI_COMMAND, 2, cmd & ~R.PCI_COMMAND_MASTER)
        if self.reset_works:
            fn.reset()
        if self._saved is not None:
            self._restore_state(self._saved)
            cmd = fn.config_read(R.PCI_COMMAND, 2)
            fn.config_write(R.PCI_COMMAND, 2, cmd & ~R.PCI_COMMAND_MASTER)
        self._saved = None
        self.vconfig = None
        if fn.is_virtfn:
            pf = self.pf_device()
            if pf is not None and pf.vf_token is not None:
                pf.vf_token.users -= 1

    def pf_device(self) -> VfioPciDevice | None:
        """``vdev->sriov_pf_core_dev``: the PF, bound to vfio-pci as every function is."""
        if self.fn.physfn is None:
            return None
        return self.registry.by_function(self.fn.physfn)

    # -- the VF token (vfio_pci_core_match_token_uuid) ------------------------------------
    def match_token(self, uuid: bytes | None) -> None:
        if self.fn.is_virtfn:
            pf = self.pf_device()
            if pf is None or pf.vf_token is None:
                if uuid is None:
                    return
                raise err(errno.EINVAL, "VF token given but the PF is not vfio-pci")
            if uuid is None:
                raise err(errno.EACCES, "VF token required to access device")
            if uuid != pf.vf_token.uuid:
                raise err(errno.EACCES, "Incorrect VF token provided for device")
        elif self.vf_token is not None:
            if self.vf_token.users:
                if uuid is None:
                    raise err(errno.EACCES, "VF token required to access device")
                if uuid != self.vf_token.uuid:
                    raise err(errno.EACCES, "Incorrect VF token provided for device")
            elif uuid is not None:
                self.vf_token.uuid = uuid
        elif uuid is not None:
            raise err(errno.EINVAL, "VF token incorrectly provided, not a PF or VF")

    def match_name(self, buf: str) -> bool:
        """vfio_pci_core_match(): ``"<bdf>"`` or ``"<bdf> vf_token=<uuid>"``."""
        import uuid as uuidlib

        name = self.fn.bdf
        if not buf.startswith(name):
            return False
        token: bytes | None = None
        rest = buf[len(name) :]
        if rest:
            if rest[0] != " ":
                return False
            pos = 0
            while pos < len(rest):
                if rest[pos] == " ":
                    pos += 1
                    continue
                if token is None and rest.startswith("vf_token=", pos):
                    pos += len("vf_token=")
                    text = rest[pos : pos + 36]
                    if len(text) < 36:
                        raise err(errno.EINVAL, "vf_token too short")
                    try:
                        token = uuidlib.UUID(text).bytes
                    except ValueError:
                        raise err(errno.EINVAL, "vf_token is not a UUID") from None
                    pos += 36
                else:
                    raise err(errno.EINVAL, "unknown or duplicate option")
        self.match_token(token)
        return True

    def feature_token(self, flags: int, data: Any, argsz: int) -> int:
        """vfio_pci_core_feature_token(): SET only (the UUID is never read back)."""
        from iommufd_model.vfio.uarg import copy_from

        if self.vf_token is None:
            raise err(errno.ENOTTY, "not an SR-IOV PF")
        if check_feature(flags, argsz, V.VFIO_DEVICE_FEATURE_SET, 16) != 1:
            return 0
        self.vf_token.uuid = copy_from(data, V.VfioDeviceFeature.SIZE + 16)[-16:]
        return 0

    # -- regions (vfio_pci_ioctl_get_region_info, vfio_pci_rw, vfio_pci_core_mmap) -------
    def region_info(self, arg: Any) -> int:
        from iommufd_model.vfio.uarg import copy_to, struct_from, struct_to

        minsz = V.VfioRegionInfo.offsetofend("offset")
        info = struct_from(arg, V.VfioRegionInfo, minsz)
        if info.argsz < minsz:
            raise err(errno.EINVAL, "argsz below the minimum")
        caps = b""
        index = info.index
        info.offset = V.vfio_pci_index_to_offset(index)
        if index == V.VFIO_PCI_CONFIG_REGION_INDEX:
            info.size = self.fn.config_size
            info.flags = V.VFIO_REGION_INFO_FLAG_READ | V.VFIO_REGION_INFO_FLAG_WRITE
        elif index <= V.VFIO_PCI_BAR5_REGION_INDEX:
            bar = self.fn.bars[index]
            info.size = bar.size if bar is not None else 0
            info.flags = 0
            if bar is not None:
                info.flags = V.VFIO_REGION_INFO_FLAG_READ | V.VFIO_REGION_INFO_FLAG_WRITE
                if self.mmap_supported(index):
                    info.flags |= V.VFIO_REGION_INFO_FLAG_MMAP
                    msix = self.fn.spec.msix
                    if msix is not None and msix.bar == index:
                        caps = struct.pack("<HHI", V.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, 0)
        elif index == V.VFIO_PCI_ROM_REGION_INDEX:
            info.flags = 0
            info.size = 0  # the model's functions have no option ROM
        else:  # no VGA, no device-specific regions
            raise err(errno.EINVAL, f"no region {index}")
        info.cap_offset = 0
        if caps:
            info.flags |= V.VFIO_REGION_INFO_FLAG_CAPS
            if info.argsz < V.VfioRegionInfo.SIZE + len(caps):
                info.argsz = V.VfioRegionInfo.SIZE + len(caps)
            else:
                copy_to(arg, V.VfioRegionInfo.SIZE, caps)
                info.cap_offset = V.VfioRegionInfo.SIZE
        struct_to(arg, info, minsz)
        return 0

    def mmap_supported(self, index: int) -> bool:
        """vfio_pci_probe_mmaps(): memory BARs (the model's are page-aligned in the host)."""
        bar = self.fn.bars[index]
        return bar is not None and not bar.io

    def rw(self, offset: int, data: bytes | None, count: int) -> bytes | int:
        """vfio_pci_rw(): a read returns the bytes, a write the count written."""
        index = V.vfio_pci_offset_to_index(offset)
        pos = offset & V.VFIO_PCI_OFFSET_MASK
        if index >= V.VFIO_PCI_NUM_REGIONS:
            raise err(errno.EINVAL, f"no region {index}")
        if index == V.VFIO_PCI_CONFIG_REGION_INDEX:
            assert self.vconfig is not None
            out = self.vconfig.rw(pos, data, count)
            return out if data is None else count
        if index == V.VFIO_PCI_ROM_REGION_INDEX:
            if data is not None:
                raise err(errno.EINVAL, "the ROM is read-only")
            raise err(errno.EINVAL, "no ROM")
        if index <= V.VFIO_PCI_BAR5_REGION_INDEX:
            return self._bar_rw(index, pos, data, count)
        raise err(errno.EINVAL, "no VGA region")

    def _bar_rw(self, index: int, pos: int, data: bytes | None, count: int) -> bytes | int:
        """vfio_pci_bar_rw() / vfio_pci_core_do_io_rw(): aligned 8/4/2/1-byte accesses; the
        MSI-X table reads as ones and drops writes; Memory Space off is EIO."""
        fn = self.fn
        bar = fn.bars[index]
        if bar is None or bar.io:
            raise err(errno.EINVAL, f"BAR{index} is not a memory BAR")
        if pos >= bar.size:
            raise err(errno.EINVAL, "past the end of the BAR")
        count = min(count, bar.size - pos)
        if not fn.memory_enabled:
            raise err(errno.EIO, "memory decode is off")
        msix = fn.spec.msix
        x_start = x_end = 0
        if msix is not None and msix.bar == index:
            x_start = msix.table_offset
            x_end = x_start + msix.vectors * R.PCI_MSIX_ENTRY_SIZE
        out = bytearray()
        done = 0
        while done < count:
            at = pos + done
            left = count - done
            size = next(s for s in (8, 4, 2, 1) if left >= s and not at % s)
            if x_start <= at < x_end:
                if data is None:
                    out += b"\xff" * size
            elif data is None:
                out += fn.mmio_read(index, at, size).to_bytes(size, "little")
            else:
                fn.mmio_write(index, at, size, int.from_bytes(data[done : done + size], "little"))
            done += size
        return bytes(out) if data is None else count

    def mmap_region(self, offset: int, length: int, shared: bool) -> tuple[int, int]:
        """vfio_pci_core_mmap(): which BAR and where in it a mapping of the fd lands."""
        index = V.vfio_pci_offset_to_index(offset)
        if index >= V.VFIO_PCI_NUM_REGIONS or length < 0:
            raise err(errno.EINVAL, f"no region {index}")
        if not shared:
            raise err(errno.EINVAL, "BAR mappings must be MAP_SHARED")
        if index >= V.VFIO_PCI_ROM_REGION_INDEX or not self.mmap_supported(index):
            raise err(errno.EINVAL, f"region {index} cannot be mmapped")
        bar = self.fn.bars[index]
        assert bar is not None
        phys_len = (bar.size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        start = offset & V.VFIO_PCI_OFFSET_MASK & ~(PAGE_SIZE - 1)
        if start + length > phys_len:
            raise err(errno.EINVAL, "mapping past the end of the BAR")
        return index, start


def check_feature(flags: int, argsz: int, supported: int, minsz: int) -> int:
    """vfio_check_feature(): 0 for a PROBE that passed, 1 to go on, OSError otherwise."""
    if flags & (V.VFIO_DEVICE_FEATURE_GET | V.VFIO_DEVICE_FEATURE_SET) & ~supported:
        raise err(errno.EINVAL, "feature operation not supported")
    if flags & V.VFIO_DEVICE_FEATURE_PROBE:
        return 0
    if not flags & (V.VFIO_DEVICE_FEATURE_GET | V.VFIO_DEVICE_FEATURE_SET):
        raise err(errno.EINVAL, "GET or SET needed")
    if argsz < minsz:
        raise err(errno.EINVAL, "feature data too short")
    return 1
