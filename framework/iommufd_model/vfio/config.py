"""The user's view of a function's configuration space, filtered as vfio_pci_config.c does.

drivers/vfio/pci/vfio_pci_config.c (Linux 7.2) keeps a virtual copy of config space
(``vconfig``) and, per byte, two masks: ``virt`` (the bit is read from and written to the
copy) and ``write`` (the user may change the bit). A read returns the hardware's bits where
``virt`` is clear and the copy's where it is set; a write changes the writable virtual bits in
the copy and sends the writable non-virtual bits to the hardware (read-modify-write). Which
region a byte belongs to decides its masks:

- the header (0x00-0x3f): vendor/device, the capability pointer, interrupt line/pin and the six
  BARs and ROM BAR are virtual (BARs read back sized and flagged from the copy); command
  bits go to the hardware except INTx Disable, which is virtual and masks VFIO's INTx;
  cache line size, latency timer and BIST are plain writable; the rest is read-only;
- PM: the next pointer is virtual; PMCSR is writable but for its power-state bits;
- MSI: flags, address and data are virtual (MSI is enabled only through SET_IRQS; a flags
  write keeps Enable only while VFIO's MSI is on and caps the queue size at what SET_IRQS
  allocated, then goes to the hardware); the mask bits go to the hardware;
- MSI-X, the SR-IOV and PASID extended capabilities: read-only pass-through;
- PCIe: Device Control is writable but for Phantom Functions, with Initiate FLR virtual (a
  write of it resets the function when it can FLR); Device Control 2 likewise but for ARI;
- bytes in no capability: raw pass-through both ways.

Model simplifications (labelled): a PM power-state write does not change the power state,
the virtual Max Payload / Max Read Request of Device Control do not reach the hardware.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from iommufd_model.devices import pci_regs as R
from iommufd_model.errors import err

if TYPE_CHECKING:
    from iommufd_model.vfio.pci_core import VfioPciDevice

ALL = 0xFFFFFFFF
PCI_STD_HEADER_SIZEOF = 0x40
PCI_CFG_SPACE_SIZE = 0x100
PCI_CAP_LIST_NEXT = 1
PCI_BIST = 0x0F
PCI_EXP_DEVCTL_PAYLOAD = 0x00E0
PCI_EXP_DEVCTL_PHANTOM = 0x0200
PCI_EXP_DEVCTL_READRQ = 0x7000
PCI_EXP_DEVCTL2_ARI = 0x0020
# region kinds of the per-byte map
BASIC, RAW = "basic", "raw"


class VfioConfig:
    """``vconfig`` and its permission bits for one open of a device (vfio_config_init)."""

    def __init__(self, vdev: VfioPciDevice) -> None:
        self.vdev = vdev
        fn = vdev.fn
        self.size = fn.config_size
        self.vconfig = bytearray(fn.config_read(i, 1) for i in range(self.size))
        self.virt = bytearray(self.size)
        self.write = bytearray(self.size)
        self.map: list[str | int] = [RAW] * self.size
        self.msi_pos = 0
        self.exp_pos = 0
        self.msi_qmax = 0
        self._init_basic()
        self._init_caps()
        self._init_ext_caps()

    # -- permission tables ------------------------------------------------------------
    def _perm(self, pos: int, size: int, virt: int, write: int) -> None:
        self.virt[pos : pos + size] = (virt & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self.write[pos : pos + size] = (write & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _init_basic(self) -> None:
        fn = self.vdev.fn
        for i in range(PCI_STD_HEADER_SIZEOF):
            self.map[i] = BASIC
        self._perm(R.PCI_VENDOR_ID, 2, ALL, 0)
        self._perm(R.PCI_DEVICE_ID, 2, ALL, 0)
        self._perm(R.PCI_COMMAND, 2, R.PCI_COMMAND_INTX_DISABLE, ALL)
        self._perm(R.PCI_STATUS, 2, R.PCI_STATUS_CAP_LIST, 0)
        self._perm(R.PCI_CACHE_LINE_SIZE, 1, 0, ALL)
        self._perm(R.PCI_LATENCY_TIMER, 1, 0, ALL)
        self._perm(PCI_BIST, 1, 0, ALL)
        for i in range(6):
            self._perm(R.PCI_BASE_ADDRESS_0 + 4 * i, 4, ALL, ALL)
        self._perm(R.PCI_ROM_ADDRESS, 4, ALL, ALL)
        self._perm(R.PCI_CAPABILITY_LIST, 1, ALL, 0)
        self._perm(R.PCI_INTERRUPT_LINE, 1, ALL, ALL)
        self._perm(R.PCI_INTERRUPT_PIN, 1, ALL, 0)
        # vfio_config_init(): a VF's ID registers read all ones in hardware; the copy holds
        # the IDs the kernel knows. INTx Disable starts as the hardware has it.
        if fn.is_virtfn:
            self.vconfig[0:2] = fn.vendor_id.to_bytes(2, "little")
            self.vconfig[2:4] = fn.device_id.to_bytes(2, "little")
            # a VF's Memory Space Enable is virtual (the PF's VF MSE governs the hardware)
            self._perm(R.PCI_COMMAND, 2, R.PCI_COMMAND_INTX_DISABLE | R.PCI_COMMAND_MEMORY, ALL)
        for i in range(6):  # vfio_bar_fixup(): the host's resource addresses and flags
            pos = R.PCI_BASE_ADDRESS_0 + 4 * i
            self.vconfig[pos : pos + 4] = self.vdev.bar_register(i).to_bytes(4, "little")
        self.vconfig[R.PCI_ROM_ADDRESS : R.PCI_ROM_ADDRESS + 4] = bytes(4)  # no ROM

    def _init_caps(self) -> None:
        fn = self.vdev.fn
        if not fn.config_read(R.PCI_STATUS, 2) & R.PCI_STATUS_CAP_LIST:
            return
        pos = fn.config_read(R.PCI_CAPABILITY_LIST, 1) & ~3
        seen = 0
        while pos and seen < 48:
            cap = fn.config_read(pos, 1)
            length = self._cap_len(cap, pos)
            for i in range(pos, min(pos + length, PCI_CFG_SPACE_SIZE)):
                self.map[i] = cap
            if cap in (R.PCI_CAP_ID_PM, R.PCI_CAP_ID_MSI, R.PCI_CAP_ID_EXP):
                self._perm(pos + PCI_CAP_LIST_NEXT, 1, ALL, 0)
            if cap == R.PCI_CAP_ID_PM:
                self._perm(pos + R.PCI_PM_CTRL, 4, 0, ~R.PCI_PM_CTRL_STATE_MASK)
            elif cap == R.PCI_CAP_ID_MSI:
                self._init_msi(pos)
            elif cap == R.PCI_CAP_ID_EXP:
                self.exp_pos = pos
                self._perm(
                    pos + R.PCI_EXP_DEVCTL,
                    2,
                    R.PCI_EXP_DEVCTL_BCR_FLR | PCI_EXP_DEVCTL_PAYLOAD | PCI_EXP_DEVCTL_READRQ,
                    ~PCI_EXP_DEVCTL_PHANTOM,
                )
                self._perm(pos + R.PCI_EXP_DEVCTL2, 2, PCI_EXP_DEVCTL2_ARI, ~PCI_EXP_DEVCTL2_ARI)
            pos = fn.config_read(pos + PCI_CAP_LIST_NEXT, 1) & ~3
            seen += 1

    def _cap_len(self, cap: int, pos: int) -> int:
        """``pci_cap_length[]`` / vfio_cap_len() for the capabilities the model's functions
        carry; an unknown one keeps only its header in the map."""
        fn = self.vdev.fn
        if cap == R.PCI_CAP_ID_PM:
            return int(R.PCI_PM_SIZEOF)
        if cap == R.PCI_CAP_ID_MSIX:
            return int(R.PCI_CAP_MSIX_SIZEOF)
        if cap == R.PCI_CAP_ID_MSI:
            flags = fn.config_read(pos + R.PCI_MSI_FLAGS, 2)
            length = 10
            if flags & R.PCI_MSI_FLAGS_64BIT:
                length += 4
            if flags & R.PCI_MSI_FLAGS_MASKBIT:
                length += 10
            return length
        if cap == R.PCI_CAP_ID_EXP:
            return int(R.PCI_CAP_EXP_SIZEOF)
        return 2

    def _init_msi(self, pos: int) -> None:
        """init_pci_cap_msi_perm(): everything virtual but the mask bits."""
        self.msi_pos = pos
        flags = self.vdev.fn.config_read(pos + R.PCI_MSI_FLAGS, 2)
        self._perm(pos + R.PCI_MSI_FLAGS, 2, ALL, ALL)
        self._perm(pos + R.PCI_MSI_ADDRESS_LO, 4, ALL, ALL)
        data = pos + 8
        if flags & R.PCI_MSI_FLAGS_64BIT:
            self._perm(pos + R.PCI_MSI_ADDRESS_HI, 4, ALL, ALL)
            data = pos + R.PCI_MSI_DATA_64
        self._perm(data, 2, ALL, ALL)
        if flags & R.PCI_MSI_FLAGS_MASKBIT:
            self._perm(data + 4, 4, 0, ALL)  # mask bits
            self._perm(data + 8, 4, 0, 0)  # pending bits

    def _init_ext_caps(self) -> None:
        if self.size <= PCI_CFG_SPACE_SIZE:
            return
        fn = self.vdev.fn
        pos = PCI_CFG_SPACE_SIZE
        for _ in range(512):
            header = fn.config_read(pos, 4)
            if not header:
                return
            cap = header & 0xFFFF
            length = {
                R.PCI_EXT_CAP_ID_SRIOV: int(R.PCI_EXT_CAP_SRIOV_SIZEOF),
                R.PCI_EXT_CAP_ID_PASID: int(R.PCI_EXT_CAP_PASID_SIZEOF),
            }.get(cap, 4)
            for i in range(pos, min(pos + length, self.size)):
                self.map[i] = 0x1000 + cap  # read-only pass-through
            pos = header >> 20
            if pos < PCI_CFG_SPACE_SIZE:
                return

    # -- accesses -----------------------------------------------------------------------
    def rw(self, pos: int, data: bytes | None, count: int) -> bytes:
        """vfio_pci_config_rw(): aligned 4/2/1-byte pieces; a read returns the bytes."""
        out = bytearray()
        done = 0
        while done < count:
            at = pos + done
            left = count - done
            size = 4 if left >= 4 and not at % 4 else 2 if left >= 2 and not at % 2 else 1
            if at < 0 or at + size > self.size:
                raise err(errno.EFAULT, f"config access {at:#x}/{size} past {self.size:#x}")
            if data is None:
                out += self._read(at, size).to_bytes(size, "little")
            else:
                self._write(at, size, int.from_bytes(data[done : done + size], "little"))
            done += size
        return bytes(out)

    def _masks(self, pos: int, size: int) -> tuple[int, int]:
        virt = int.from_bytes(self.virt[pos : pos + size], "little")
        write = int.from_bytes(self.write[pos : pos + size], "little")
        if self.map[pos] == RAW:
            return 0, (1 << (8 * size)) - 1
        return virt, write

    def _read(self, pos: int, size: int) -> int:
        virt, _ = self._masks(pos, size)
        full = (1 << (8 * size)) - 1
        value = int.from_bytes(self.vconfig[pos : pos + size], "little") & virt
        if virt != full:
            value |= self.vdev.fn.config_read(pos, size) & ~virt & full
        return value

    def _write(self, pos: int, size: int, value: int) -> None:
        """vfio_default_config_write(), then the region's own write handler."""
        virt, write = self._masks(pos, size)
        if not write:
            return
        full = (1 << (8 * size)) - 1
        if write & virt:
            old = int.from_bytes(self.vconfig[pos : pos + size], "little")
            new = (old & ~(write & virt)) | (value & write & virt)
            self.vconfig[pos : pos + size] = (new & full).to_bytes(size, "little")
        if write & ~virt & full:
            phys = self.vdev.fn.config_read(pos, size)
            phys = (phys & ~(write & ~virt)) | (value & write & ~virt)
            self.vdev.fn.config_write(pos, size, phys & full)
        kind = self.map[pos]
        if kind == BASIC:
            self._basic_written(pos, size)
        elif kind == R.PCI_CAP_ID_MSI:
            self._msi_written(pos, size)
        elif kind == R.PCI_CAP_ID_EXP:
            self._exp_written(pos, size)

    def _touches(self, pos: int, size: int, reg: int) -> bool:
        return pos <= reg < pos + size

    def _basic_written(self, pos: int, size: int) -> None:
        """vfio_basic_config_write(): INTx Disable masks VFIO's INTx; BARs are re-sized."""
        if pos + size > R.PCI_BASE_ADDRESS_0 and pos < R.PCI_ROM_ADDRESS + 4:
            self._bar_fixup()
        if not self._touches(pos, size, R.PCI_COMMAND) and not self._touches(
            pos, size, R.PCI_COMMAND + 1
        ):
            return
        cmd = int.from_bytes(self.vconfig[R.PCI_COMMAND : R.PCI_COMMAND + 2], "little")
        self.vdev.irqs.virq_disable(bool(cmd & R.PCI_COMMAND_INTX_DISABLE))

    def _msi_written(self, pos: int, size: int) -> None:
        """vfio_msi_config_write(): fix up the virtual flags and write them to the hardware."""
        from iommufd_model.uapi.vfio import VFIO_PCI_MSI_IRQ_INDEX

        flags_at = self.msi_pos + R.PCI_MSI_FLAGS
        if not (pos <= flags_at < pos + size or pos <= flags_at + 1 < pos + size):
            return
        flags = int.from_bytes(self.vconfig[flags_at : flags_at + 2], "little")
        if self.vdev.irqs.irq_type != VFIO_PCI_MSI_IRQ_INDEX:
            flags &= ~R.PCI_MSI_FLAGS_ENABLE
        if (flags & R.PCI_MSI_FLAGS_QSIZE) >> 4 > self.msi_qmax:
            flags = (flags & ~R.PCI_MSI_FLAGS_QSIZE) | (self.msi_qmax << 4)
        self.vconfig[flags_at : flags_at + 2] = flags.to_bytes(2, "little")
        self.vdev.fn.config_write(flags_at, 2, flags)

    def _exp_written(self, pos: int, size: int) -> None:
        """vfio_exp_config_write(): a virtual Initiate FLR resets a function that can FLR."""
        devctl = self.exp_pos + R.PCI_EXP_DEVCTL
        if not self._touches(pos, size, devctl + 1):
            return
        ctrl = int.from_bytes(self.vconfig[devctl : devctl + 2], "little")
        if ctrl & R.PCI_EXP_DEVCTL_BCR_FLR:
            ctrl &= ~R.PCI_EXP_DEVCTL_BCR_FLR
            self.vconfig[devctl : devctl + 2] = ctrl.to_bytes(2, "little")
            devcap = self.vdev.fn.config_read(self.exp_pos + R.PCI_EXP_DEVCAP, 4)
            if devcap & R.PCI_EXP_DEVCAP_FLR:
                self.vdev.try_reset_function()

    def _bar_fixup(self) -> None:
        """vfio_bar_fixup(): a BAR reads back its address masked to its size, with its flags
        (so writing all ones sizes it); unimplemented BARs and the absent ROM read zero."""
        bars = self.vdev.fn.bars
        i = 0
        while i < 6:
            pos = R.PCI_BASE_ADDRESS_0 + 4 * i
            bar = bars[i]
            cur = int.from_bytes(self.vconfig[pos : pos + 4], "little")
            if bar is None:
                self.vconfig[pos : pos + 4] = bytes(4)
                i += 1
                continue
            mask = ~(bar.size - 1)
            low = (cur & mask & 0xFFFFFFFF & ~0xF) | bar.type_bits
            if bar.io:
                low = (cur & mask & 0xFFFFFFFC) | bar.type_bits
            self.vconfig[pos : pos + 4] = low.to_bytes(4, "little")
            if bar.mem64 and i < 5:
                hi = int.from_bytes(self.vconfig[pos + 4 : pos + 8], "little")
                self.vconfig[pos + 4 : pos + 8] = (hi & (mask >> 32) & 0xFFFFFFFF).to_bytes(
                    4, "little"
                )
                i += 1
            i += 1
        self.vconfig[R.PCI_ROM_ADDRESS : R.PCI_ROM_ADDRESS + 4] = bytes(4)

    def bar_value(self, index: int) -> int:
        """The BAR register the user reads (vfio_bar_fixup(): sized, flagged)."""
        pos = R.PCI_BASE_ADDRESS_0 + 4 * index
        return self._read(pos, 4)
