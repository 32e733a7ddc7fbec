"""A PCI function with a real configuration space, BARs, MSI/MSI-X, FLR and bus mastering.

:class:`PciFunction` is the :class:`~iommufd_model.hw.pci.PciDevice` the VFIO layer exposes:
config reads and writes obey the RO/RW/RW1C attributes of each bit (devices/config.py), BAR
sizing works as the PCI spec describes (write all-ones, read back the size mask), the MSI-X
table and PBA live in a BAR, and a write of Initiate FLR resets the function. Engines built on
it (IOAT, DSA) override :meth:`bar_read` / :meth:`bar_write` for their registers and do DMA
with :meth:`dma_read` / :meth:`dma_write` through the IOMMU the function sits behind.

Model rules (the model's own choices where the specs leave room; docs/devices.md lists them):

- DMA needs Bus Master Enable (PCI spec: a function with it clear issues no requests); the
  model raises :class:`DmaBlocked` and logs nothing at the IOMMU, since no request reached it.
- MMIO with Memory Space Enable clear is not claimed: reads return all ones, writes drop.
- Interrupts are delivered synchronously to :attr:`irq_sink`; MSI and MSI-X need Bus Master
  (they are memory writes); a masked vector sets its pending bit and fires when unmasked.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from iommufd_model.devices import pci_regs as R
from iommufd_model.devices.config import PCI_CONFIG_SIZE, PCIE_CONFIG_SIZE, ConfigSpace
from iommufd_model.devices.pri import pri_control_written
from iommufd_model.errors import err
from iommufd_model.hw.iommu import DmaFault
from iommufd_model.hw.pci import PciDevice
from iommufd_model.locking import serialized

if TYPE_CHECKING:
    from iommufd_model.hw.iommu import IommuHw

IrqSink = Callable[[str, int], None]

# Where this model places the capabilities (its own layout; software walks the list).
PM_CAP = 0x40
MSI_CAP = 0x50
MSIX_CAP = 0x70
EXP_CAP = 0x80
SRIOV_EXT_CAP = 0x100
PASID_EXT_CAP = SRIOV_EXT_CAP + 0x40  # R.PCI_EXT_CAP_SRIOV_SIZEOF
PRI_AFTER_PASID = 0x10  # the PRI capability's distance from the PASID one (model layout)


class DmaBlocked(Exception):
    """A DMA the function could not issue: Bus Master Enable is clear (no request left it)."""

    def __init__(self, dev: PciFunction, iova: int, write: bool) -> None:
        kind = "write" if write else "read"
        super().__init__(f"DMA {kind} at {iova:#x} from {dev.bdf}: bus master disabled")
        self.iova = iova
        self.write = write


@attrs.frozen
class Bar:
    """One Base Address Register's resource: its size (a power of two) and type bits."""

    size: int
    mem64: bool = False
    prefetchable: bool = False
    io: bool = False

    def __attrs_post_init__(self) -> None:
        if self.size < (4 if self.io else 16) or self.size & (self.size - 1):
            raise ValueError(f"BAR size {self.size:#x} is not a power of two >= 16")

    @property
    def type_bits(self) -> int:
        """The low, read-only bits of the BAR register."""
        if self.io:
            return R.PCI_BASE_ADDRESS_SPACE_IO
        return (R.PCI_BASE_ADDRESS_MEM_TYPE_64 if self.mem64 else 0) | (
            R.PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0
        )


@attrs.frozen
class MsixLayout:
    """MSI-X: ``vectors`` table entries; the table and PBA at offsets in BAR ``bar``."""

    vectors: int
    bar: int = 0
    table_offset: int = 0x2000
    pba_offset: int = 0x3000


@attrs.frozen
class FunctionSpec:
    """What a function is at power-on: identity, BARs, interrupt and SR-IOV capabilities."""

    vendor_id: int
    device_id: int
    class_code: int  # 24 bits: base class, sub-class, programming interface
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    bars: tuple[Bar | None, ...] = (None,) * 6
    msi_vectors: int = 0  # 0: no MSI capability; else 1, 2, 4, ... 32
    msix: MsixLayout | None = None
    pcie: bool = True
    rc_integrated: bool = False  # Device/Port Type RCiEP instead of Endpoint
    flr: bool = True
    pasid: bool = False  # a PASID extended capability
    total_vfs: int = 0  # SR-IOV: 0 = not a PF
    vf_device_id: int = 0
    vf_offset: int = 1
    vf_stride: int = 1
    vf_bars: tuple[Bar | None, ...] = (None,) * 6

    @classmethod
    def intel_dma_engine(
        cls,
        device_id: int,
        revision: int,
        bars: tuple[Bar | None, ...],
        msix_vectors: int,
        *,
        msi_vectors: int = 0,
        pasid: bool = False,
    ) -> FunctionSpec:
        """The spec of an Intel root-complex integrated DMA engine (the ``ioat`` CBDMA channel,
        the ``dsa`` accelerator): Intel's vendor and subsystem vendor, an RCiEP, the class the
        model gives them (base system peripheral, other: the model's choice) and MSI-X with its
        table and PBA in BAR 0. Both kinds are built the same way; only what differs is passed."""
        return cls(
            vendor_id=R.PCI_VENDOR_ID_INTEL,
            device_id=device_id,
            class_code=0x088000,
            revision=revision,
            subsystem_vendor_id=R.PCI_VENDOR_ID_INTEL,
            bars=bars,
            msi_vectors=msi_vectors,
            msix=MsixLayout(msix_vectors, bar=0, table_offset=0x2000, pba_offset=0x3000),
            rc_integrated=True,
            pasid=pasid,
        )


def _bar_registers(bars: tuple[Bar | None, ...]) -> list[tuple[int, int]]:
    """``(value, rw mask)`` of the six BAR registers (a 64-bit BAR takes two)."""
    regs = [(0, 0)] * 6
    i = 0
    while i < 6:
        bar = bars[i] if i < len(bars) else None
        if bar is None:
            i += 1
            continue
        low_mask = ~(bar.size - 1) & 0xFFFFFFFF
        if bar.io:
            regs[i] = (bar.type_bits, low_mask & ~0x3)
        else:
            regs[i] = (bar.type_bits, low_mask & ~0xF)
        if bar.mem64:
            if i == 5:
                raise ValueError("a 64-bit BAR cannot start at BAR5")
            regs[i + 1] = (0, (~(bar.size - 1) >> 32) & 0xFFFFFFFF)
            i += 2
        else:
            i += 1
    return regs


@serialized(unlocked=("dma_read", "dma_write"))
class PciFunction(PciDevice):
    """A PCI function (type 0 header) behind one IOMMU instance.

    ``physfn``/``vf_index`` are set on an SR-IOV virtual function. The VFIO layer sets
    :attr:`irq_sink`; the device calls ``irq_sink(kind, vector)`` with kind ``"msix"``,
    ``"msi"`` or ``"intx"``. ``kind`` names the ``devices.KINDS`` entry that builds the
    class; ``resets`` counts Function Level Resets.
    """

    kind = "generic"

    def __init__(
        self,
        iommu: IommuHw,
        rid: int,
        spec: FunctionSpec,
        *,
        pasid_bits: int = 20,
        ats: bool = False,
        pri: bool | None = None,
        prg_resp_pasid_required: bool = True,
        physfn: PciFunction | None = None,
        vf_index: int | None = None,
    ) -> None:
        super().__init__(
            iommu,
            rid,
            pasid_bits=pasid_bits,
            ats=ats,
            pri=pri,
            prg_resp_pasid_required=prg_resp_pasid_required,
        )
        self.spec = spec
        self._bars = tuple(spec.bars[i] if i < len(spec.bars) else None for i in range(6))
        self.physfn = physfn
        self.vf_index = vf_index
        self.irq_sink: IrqSink | None = None
        self.sriov_vfs: list[PciFunction] = []
        self.resets = 0
        self.config = self._build_config()
        self.msix_table = bytearray()
        self.msix_pba = bytearray()
        self._backing: dict[int, bytearray] = {}
        self._power_on_bars()
        self.reset_device()

    # -- identity ---------------------------------------------------------------------
    @property
    def bdf(self) -> str:
        """``0000:BB:DD.F`` (segment 0)."""
        bus, devfn = self.rid >> 8, self.rid & 0xFF
        return f"0000:{bus:02x}:{devfn >> 3:02x}.{devfn & 7}"

    @property
    def vendor_id(self) -> int:
        """The Vendor ID the kernel reports (a VF's config register reads 0xFFFF; SR-IOV
        §3.4.1.1: the kernel takes the PF's)."""
        return self.spec.vendor_id

    @property
    def device_id(self) -> int:
        """The Device ID the kernel reports (a VF's from the PF's VF Device ID field)."""
        return self.spec.device_id

    @property
    def config_size(self) -> int:
        return self.config.size

    @property
    def bars(self) -> tuple[Bar | None, ...]:
        """The six BAR resources (a 64-bit BAR's upper half is None)."""
        return self._bars

    @property
    def is_virtfn(self) -> bool:
        return self.physfn is not None

    def physical_function(self) -> PciDevice:
        """``pci_physfn()``: a VF's PF, else the function itself."""
        return self.physfn if self.physfn is not None else self

    # -- power-on state -------------------------------------------------------------------
    def _build_config(self) -> ConfigSpace:
        spec = self.spec
        cfg = ConfigSpace(PCIE_CONFIG_SIZE if spec.pcie else PCI_CONFIG_SIZE)
        vf = self.physfn is not None
        # A VF's Vendor/Device ID registers read all ones (SR-IOV spec §3.4.1.1, §3.4.1.2).
        cfg.set(R.PCI_VENDOR_ID, 2, 0xFFFF if vf else spec.vendor_id)
        cfg.set(R.PCI_DEVICE_ID, 2, 0xFFFF if vf else spec.device_id)
        # Command: a VF's Memory Space Enable is RO zero (the PF's VF MSE governs it).
        rw = R.PCI_COMMAND_MASTER | R.PCI_COMMAND_INTX_DISABLE | R.PCI_COMMAND_SERR
        rw |= R.PCI_COMMAND_PARITY
        if not vf:
            rw |= R.PCI_COMMAND_MEMORY
        if any(b is not None and b.io for b in self.bars):
            rw |= R.PCI_COMMAND_IO
        cfg.set(R.PCI_COMMAND, 2, 0, rw=rw)
        cfg.set(R.PCI_STATUS, 2, 0, w1c=R.PCI_STATUS_RW1C)
        cfg.set(R.PCI_REVISION_ID, 1, spec.revision)
        cfg.set(R.PCI_CLASS_PROG, 3, spec.class_code)
        cfg.set(R.PCI_CACHE_LINE_SIZE, 1, 0, rw=0xFF)
        cfg.set(R.PCI_HEADER_TYPE, 1, 0)  # type 0, single function
        if not vf:  # a VF's BARs are RO zero; the PF's SR-IOV capability sizes them
            for i, (value, rw_mask) in enumerate(_bar_registers(self.bars)):
                cfg.set(R.PCI_BASE_ADDRESS_0 + 4 * i, 4, value, rw=rw_mask)
        cfg.set(R.PCI_SUBSYSTEM_VENDOR_ID, 2, spec.subsystem_vendor_id)
        cfg.set(R.PCI_SUBSYSTEM_ID, 2, spec.subsystem_id)
        cfg.set(R.PCI_INTERRUPT_LINE, 1, 0, rw=0xFF)
        cfg.set(R.PCI_INTERRUPT_PIN, 1, 0 if vf else 1)  # INTA; VFs have no INTx
        self._build_caps(cfg)
        return cfg

    def _build_caps(self, cfg: ConfigSpace) -> None:
        spec = self.spec
        if not self.is_virtfn:
            cfg.add_cap(PM_CAP, R.PCI_CAP_ID_PM, R.PCI_PM_SIZEOF)
            cfg.set(PM_CAP + R.PCI_PM_PMC, 2, 0x0003)  # PM spec version 1.2
            cfg.set(
                PM_CAP + R.PCI_PM_CTRL,
                2,
                R.PCI_PM_CTRL_NO_SOFT_RESET,
                rw=R.PCI_PM_CTRL_STATE_MASK,
            )
        if spec.msi_vectors:
            mmc = spec.msi_vectors.bit_length() - 1
            if 1 << mmc != spec.msi_vectors or mmc > 5:
                raise ValueError("MSI vectors must be a power of two up to 32")
            cfg.add_cap(MSI_CAP, R.PCI_CAP_ID_MSI, R.PCI_MSI_SIZEOF_64_MASK)
            flags = R.PCI_MSI_FLAGS_64BIT | R.PCI_MSI_FLAGS_MASKBIT | (mmc << 1)
            cfg.set(
                MSI_CAP + R.PCI_MSI_FLAGS,
                2,
                flags,
                rw=R.PCI_MSI_FLAGS_ENABLE | R.PCI_MSI_FLAGS_QSIZE,
            )
            cfg.set(MSI_CAP + R.PCI_MSI_ADDRESS_LO, 4, 0, rw=0xFFFFFFFC)
            cfg.set(MSI_CAP + R.PCI_MSI_ADDRESS_HI, 4, 0, rw=0xFFFFFFFF)
            cfg.set(MSI_CAP + R.PCI_MSI_DATA_64, 2, 0, rw=0xFFFF)
            cfg.set(MSI_CAP + R.PCI_MSI_MASK_64, 4, 0, rw=(1 << spec.msi_vectors) - 1)
            cfg.set(MSI_CAP + R.PCI_MSI_PENDING_64, 4, 0)
        if spec.msix is not None:
            m = spec.msix
            if not 1 <= m.vectors <= 2048:
                raise ValueError("MSI-X table size must be 1..2048")
            cfg.add_cap(MSIX_CAP, R.PCI_CAP_ID_MSIX, R.PCI_CAP_MSIX_SIZEOF)
            cfg.set(
                MSIX_CAP + R.PCI_MSIX_FLAGS,
                2,
                m.vectors - 1,
                rw=R.PCI_MSIX_FLAGS_ENABLE | R.PCI_MSIX_FLAGS_MASKALL,
            )
            cfg.set(MSIX_CAP + R.PCI_MSIX_TABLE, 4, m.table_offset | m.bar)
            cfg.set(MSIX_CAP + R.PCI_MSIX_PBA, 4, m.pba_offset | m.bar)
        if spec.pcie:
            cfg.add_cap(EXP_CAP, R.PCI_CAP_ID_EXP, R.PCI_CAP_EXP_SIZEOF)
            port = R.PCI_EXP_TYPE_RC_END if spec.rc_integrated else R.PCI_EXP_TYPE_ENDPOINT
            cfg.set(EXP_CAP + R.PCI_EXP_FLAGS, 2, 0x2 | (port << 4))  # capability version 2
            devcap = 0x1 | (R.PCI_EXP_DEVCAP_FLR if spec.flr else 0)  # 256-byte max payload
            cfg.set(EXP_CAP + R.PCI_EXP_DEVCAP, 4, devcap)
            # DevCtl: error reporting, relaxed ordering, payload, ext tag, no snoop, read req
            # are RW; Initiate FLR (bit 15) always reads zero.
            cfg.set(EXP_CAP + R.PCI_EXP_DEVCTL, 2, 0x2810, rw=0x7FFF)
            cfg.set(EXP_CAP + R.PCI_EXP_DEVSTA, 2, 0, w1c=R.PCI_EXP_DEVSTA_RW1C)
        if spec.total_vfs and not self.is_virtfn:
            self._build_sriov(cfg)
        if spec.pasid:
            self._build_pasid(cfg)
        if self.pri and spec.pcie and not self.is_virtfn:  # VFs share the PF's (SR-IOV)
            self.add_pri_cap(cfg, self._pri_pos())

    def _build_sriov(self, cfg: ConfigSpace) -> None:
        spec = self.spec
        if not spec.pcie:
            raise ValueError("SR-IOV needs PCI Express")
        pos = cfg.add_ext_cap(SRIOV_EXT_CAP, R.PCI_EXT_CAP_ID_SRIOV, 1)
        cfg.set(pos + R.PCI_SRIOV_CAP, 4, 0)
        cfg.set(
            pos + R.PCI_SRIOV_CTRL,
            2,
            0,
            rw=R.PCI_SRIOV_CTRL_VFE | R.PCI_SRIOV_CTRL_MSE | R.PCI_SRIOV_CTRL_ARI,
        )
        cfg.set(pos + R.PCI_SRIOV_INITIAL_VF, 2, spec.total_vfs)
        cfg.set(pos + R.PCI_SRIOV_TOTAL_VF, 2, spec.total_vfs)
        cfg.set(pos + R.PCI_SRIOV_NUM_VF, 2, 0, rw=0xFFFF)
        cfg.set(pos + R.PCI_SRIOV_VF_OFFSET, 2, spec.vf_offset)
        cfg.set(pos + R.PCI_SRIOV_VF_STRIDE, 2, spec.vf_stride)
        cfg.set(pos + R.PCI_SRIOV_VF_DID, 2, spec.vf_device_id)
        cfg.set(pos + R.PCI_SRIOV_SUP_PGSIZE, 4, 0x553)  # 4K, 8K, 64K, 256K, 1M, 4M
        cfg.set(pos + R.PCI_SRIOV_SYS_PGSIZE, 4, 0x1, rw=0x553)
        for i, (value, rw_mask) in enumerate(_bar_registers(spec.vf_bars)):
            cfg.set(pos + R.PCI_SRIOV_BAR + 4 * i, 4, value, rw=rw_mask)

    def _build_pasid(self, cfg: ConfigSpace) -> None:
        # After SR-IOV when there is one (model layout).
        pos = PASID_EXT_CAP if self._sriov_pos() else SRIOV_EXT_CAP
        cfg.add_ext_cap(pos, R.PCI_EXT_CAP_ID_PASID, 1)
        cfg.set(pos + R.PCI_PASID_CAP, 2, (self.pasid_bits & 0x1F) << 8)
        cfg.set(pos + R.PCI_PASID_CTRL, 2, 0, rw=R.PCI_PASID_CTRL_ENABLE)

    def _pri_pos(self) -> int:
        """After SR-IOV and PASID when there are (model layout)."""
        pos = PASID_EXT_CAP if self._sriov_pos() else SRIOV_EXT_CAP
        return pos + PRI_AFTER_PASID if self.spec.pasid else pos

    def _power_on_bars(self) -> None:
        m = self.spec.msix
        if m is not None:
            self.msix_table = bytearray(m.vectors * R.PCI_MSIX_ENTRY_SIZE)
            for v in range(m.vectors):  # every vector masked at reset (PCI spec 6.8.2.9)
                self.msix_table[v * 16 + R.PCI_MSIX_ENTRY_VECTOR_CTRL] = 1
            self.msix_pba = bytearray(((m.vectors + 63) // 64) * 8)
        self._backing = {}

    # -- configuration space --------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        """A configuration read of ``size`` (1, 2, 4) bytes; EINVAL outside the space."""
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A configuration write: masks per bit, then the write's side effects."""
        self.config.check(offset, size)
        raw = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        before = self._control_state()
        self.config.write(offset, size, value)
        if self.spec.pcie and self.spec.flr:
            flr_byte = EXP_CAP + R.PCI_EXP_DEVCTL + 1
            if offset <= flr_byte < offset + size and raw[flr_byte - offset] & 0x80:
                self.reset()
                return
        pri_control_written(self.config)
        after = self._control_state()
        if after != before:
            self._controls_changed(before, after)

    def _control_state(self) -> tuple[int, int, int, int]:
        """The registers whose changes have side effects."""
        cfg = self.config
        msix = cfg.read(MSIX_CAP + R.PCI_MSIX_FLAGS, 2) if self.spec.msix else 0
        msi_mask = cfg.read(MSI_CAP + R.PCI_MSI_MASK_64, 4) if self.spec.msi_vectors else 0
        sriov = self._sriov_pos()
        ctrl = cfg.read(sriov + R.PCI_SRIOV_CTRL, 2) if sriov else 0
        return (cfg.read(R.PCI_COMMAND, 2), msix, msi_mask, ctrl)

    def _controls_changed(
        self, before: tuple[int, int, int, int], after: tuple[int, int, int, int]
    ) -> None:
        if before[3] != after[3]:
            self._sriov_ctrl_changed(before[3], after[3])
        if before[1:3] != after[1:3] or (after[0] & ~before[0]) & R.PCI_COMMAND_MASTER:
            self._deliver_pending()

    # -- state the engines consult -----------------------------------------------------
    @property
    def bus_master(self) -> bool:
        return bool(self.config.read(R.PCI_COMMAND, 2) & R.PCI_COMMAND_MASTER)

    @property
    def memory_enabled(self) -> bool:
        if self.physfn is not None:
            pf = self.physfn
            pos = pf._sriov_pos()
            return bool(pos and pf.config.read(pos + R.PCI_SRIOV_CTRL, 2) & R.PCI_SRIOV_CTRL_MSE)
        return bool(self.config.read(R.PCI_COMMAND, 2) & R.PCI_COMMAND_MEMORY)

    def dma_read(self, iova: int, n: int, pasid: int | None = None) -> bytes:
        """A DMA read through the IOMMU; :class:`DmaBlocked` without Bus Master Enable."""
        if not self.bus_master:
            raise DmaBlocked(self, iova, False)
        return self.iommu.dma_read(self, iova, n, pasid)

    def dma_write(
        self, iova: int, data: bytes | bytearray | memoryview, pasid: int | None = None
    ) -> None:
        """A DMA write through the IOMMU; :class:`DmaBlocked` without Bus Master Enable."""
        if not self.bus_master:
            raise DmaBlocked(self, iova, True)
        self.iommu.dma_write(self, iova, data, pasid)

    def posted_write(
        self, iova: int, data: bytes | bytearray | memoryview, pasid: int | None = None
    ) -> bool:
        """A DMA write as the engine sees it: PCIe memory writes are posted (no completion
        comes back, PCIe Base spec §2.2.9), so one the IOMMU refuses (and logs) or Bus Master
        blocks is lost without the engine knowing; returns whether it landed."""
        try:
            self.dma_write(iova, data, pasid)
        except (DmaFault, DmaBlocked):
            return False
        return True

    # -- MMIO ---------------------------------------------------------------------------
    def _check_mmio(self, bar: int, offset: int, size: int) -> Bar:
        b = self.bars[bar] if 0 <= bar < 6 else None
        if b is None or b.io:
            raise err(errno.EINVAL, f"{self.bdf}: no memory BAR{bar}")
        if size not in (1, 2, 4, 8, 64) or offset % size or offset < 0 or offset + size > b.size:
            raise err(errno.EINVAL, f"{self.bdf}: bad MMIO access BAR{bar}+{offset:#x}/{size}")
        return b

    def _msix_region(self, bar: int, offset: int) -> str | None:
        m = self.spec.msix
        if m is None or bar != m.bar:
            return None
        if m.table_offset <= offset < m.table_offset + len(self.msix_table):
            return "table"
        if m.pba_offset <= offset < m.pba_offset + len(self.msix_pba):
            return "pba"
        return None

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        """A memory read of ``size`` (1, 2, 4, 8) bytes at ``offset`` in BAR ``bar``."""
        self._check_mmio(bar, offset, size)
        if not self.memory_enabled:
            return (1 << (8 * size)) - 1  # not claimed: master abort reads all ones
        region = self._msix_region(bar, offset)
        if region is not None:
            m = self.spec.msix
            assert m is not None
            store, at = (
                (self.msix_table, offset - m.table_offset)
                if region == "table"
                else (self.msix_pba, offset - m.pba_offset)
            )
            return int.from_bytes(store[at : at + size], "little")
        return self.bar_read(bar, offset, size)

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        """A memory write; its side effect has happened when this returns."""
        self._check_mmio(bar, offset, size)
        if not self.memory_enabled:
            return
        value &= (1 << (8 * size)) - 1
        region = self._msix_region(bar, offset)
        if region == "pba":
            return  # the PBA is read-only
        if region == "table":
            m = self.spec.msix
            assert m is not None
            at = offset - m.table_offset
            self.msix_table[at : at + size] = value.to_bytes(size, "little")
            self._deliver_pending()
            return
        self.bar_write(bar, offset, size, value)

    def mmio_write64b(self, bar: int, offset: int, data: bytes) -> None:
        """A 64-byte atomic write (MOVDIR64B/ENQCMD): one submission to a portal."""
        if len(data) != 64:
            raise err(errno.EINVAL, f"{self.bdf}: a 64-byte write carries 64 bytes")
        self._check_mmio(bar, offset, 64)
        if not self.memory_enabled:
            return
        self.bar_write64b(bar, offset, bytes(data))

    # Device-specific registers: the generic function's BARs are plain storage (model).
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        store = self._backing.get(bar)
        if store is None:
            return 0
        return int.from_bytes(store[offset : offset + size], "little")

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        b = self.bars[bar]
        assert b is not None
        store = self._backing.setdefault(bar, bytearray(b.size))
        store[offset : offset + size] = value.to_bytes(size, "little")

    def bar_write64b(self, bar: int, offset: int, data: bytes) -> None:
        for i in range(0, 64, 8):
            self.bar_write(bar, offset + i, 8, int.from_bytes(data[i : i + 8], "little"))

    # -- interrupts -------------------------------------------------------------------
    def msix_enabled(self) -> bool:
        if self.spec.msix is None:
            return False
        flags = self.config.read(MSIX_CAP + R.PCI_MSIX_FLAGS, 2)
        return bool(flags & R.PCI_MSIX_FLAGS_ENABLE)

    def msi_enabled(self) -> bool:
        if not self.spec.msi_vectors:
            return False
        return bool(self.config.read(MSI_CAP + R.PCI_MSI_FLAGS, 2) & R.PCI_MSI_FLAGS_ENABLE)

    def _msix_masked(self, vector: int) -> bool:
        flags = self.config.read(MSIX_CAP + R.PCI_MSIX_FLAGS, 2)
        ctrl = self.msix_table[vector * 16 + R.PCI_MSIX_ENTRY_VECTOR_CTRL]
        return bool(flags & R.PCI_MSIX_FLAGS_MASKALL or ctrl & R.PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def signal(self, vector: int = 0) -> bool:
        """The function raises interrupt ``vector``; True if a message left the function.

        MSI-X wins over MSI, MSI over INTx (PCI spec 6.8: enabling MSI or MSI-X disables
        INTx). Masked vectors latch their pending bit instead."""
        if self.msix_enabled():
            if not 0 <= vector < len(self.msix_table) // 16:
                return False
            if self._msix_masked(vector) or not self.bus_master:
                self.msix_pba[vector // 8] |= 1 << (vector % 8)
                return False
            return self._fire("msix", vector)
        if self.msi_enabled():
            flags = self.config.read(MSI_CAP + R.PCI_MSI_FLAGS, 2)
            enabled = 1 << ((flags & R.PCI_MSI_FLAGS_QSIZE) >> 4)
            if not 0 <= vector < enabled:
                return False
            mask = self.config.read(MSI_CAP + R.PCI_MSI_MASK_64, 4)
            if mask >> vector & 1 or not self.bus_master:
                pending = self.config.read(MSI_CAP + R.PCI_MSI_PENDING_64, 4)
                self.config.poke(MSI_CAP + R.PCI_MSI_PENDING_64, 4, pending | 1 << vector)
                return False
            return self._fire("msi", vector)
        if self.is_virtfn:
            return False  # VFs have no INTx (SR-IOV spec §3.5.4)
        status = self.config.read(R.PCI_STATUS, 2)
        self.config.poke(R.PCI_STATUS, 2, status | R.PCI_STATUS_INTERRUPT)
        if self.config.read(R.PCI_COMMAND, 2) & R.PCI_COMMAND_INTX_DISABLE:
            return False
        return self._fire("intx", 0)

    def intx_deassert(self) -> None:
        """The device drops its INTx line (its interrupt cause was serviced)."""
        status = self.config.read(R.PCI_STATUS, 2)
        self.config.poke(R.PCI_STATUS, 2, status & ~R.PCI_STATUS_INTERRUPT)

    def _fire(self, kind: str, vector: int) -> bool:
        sink = self.irq_sink
        if sink is None:
            return False
        sink(kind, vector)
        return True

    def _deliver_pending(self) -> None:
        """Send the messages whose vector became unmasked (PCI spec 6.8.2.9 / 6.8.1.7)."""
        if not self.bus_master:
            return
        if self.msix_enabled():
            for byte_index, byte in enumerate(self.msix_pba):
                for b in range(8):
                    vector = byte_index * 8 + b
                    if byte >> b & 1 and not self._msix_masked(vector):
                        self.msix_pba[byte_index] &= ~(1 << b) & 0xFF
                        self._fire("msix", vector)
        elif self.msi_enabled():
            pending = self.config.read(MSI_CAP + R.PCI_MSI_PENDING_64, 4)
            mask = self.config.read(MSI_CAP + R.PCI_MSI_MASK_64, 4)
            ready = pending & ~mask
            if ready:
                self.config.poke(MSI_CAP + R.PCI_MSI_PENDING_64, 4, pending & mask)
                for vector in range(32):
                    if ready >> vector & 1:
                        self._fire("msi", vector)

    def irq_setup(self, kind: str, count: int) -> None:
        """What the host PCI core does for a driver asking for ``count`` vectors
        (pci_alloc_irq_vectors): enable MSI-X with those table entries unmasked, or MSI with
        Multiple Message Enable covering ``count``; ``"intx"`` clears INTx Disable."""
        cfg = self.config
        if kind == "msix":
            m = self.spec.msix
            if m is None or not 0 < count <= m.vectors:
                raise err(errno.EINVAL, f"{self.bdf}: {count} MSI-X vectors")
            self.irq_teardown("msi")
            flags = cfg.read(MSIX_CAP + R.PCI_MSIX_FLAGS, 2)
            cfg.poke(MSIX_CAP + R.PCI_MSIX_FLAGS, 2, flags | R.PCI_MSIX_FLAGS_ENABLE)
            for v in range(m.vectors):
                self.msix_table[v * 16 + R.PCI_MSIX_ENTRY_VECTOR_CTRL] = 0 if v < count else 1
        elif kind == "msi":
            if not 0 < count <= self.spec.msi_vectors:
                raise err(errno.EINVAL, f"{self.bdf}: {count} MSI vectors")
            self.irq_teardown("msix")
            mme = (count - 1).bit_length()
            flags = cfg.read(MSI_CAP + R.PCI_MSI_FLAGS, 2) & ~R.PCI_MSI_FLAGS_QSIZE
            flags |= R.PCI_MSI_FLAGS_ENABLE | (mme << 4)
            cfg.poke(MSI_CAP + R.PCI_MSI_FLAGS, 2, flags)
            cfg.poke(MSI_CAP + R.PCI_MSI_MASK_64, 4, 0)
        elif kind == "intx":
            command = cfg.read(R.PCI_COMMAND, 2)
            cfg.poke(R.PCI_COMMAND, 2, command & ~R.PCI_COMMAND_INTX_DISABLE)
        else:
            raise err(errno.EINVAL, f"interrupt kind {kind!r}")
        self._deliver_pending()

    def irq_teardown(self, kind: str) -> None:
        """pci_free_irq_vectors: MSI-X or MSI disabled, INTx masked (INTx Disable set)."""
        cfg = self.config
        if kind == "msix" and self.spec.msix is not None:
            flags = cfg.read(MSIX_CAP + R.PCI_MSIX_FLAGS, 2)
            cfg.poke(MSIX_CAP + R.PCI_MSIX_FLAGS, 2, flags & ~R.PCI_MSIX_FLAGS_ENABLE)
            for v in range(self.spec.msix.vectors):
                self.msix_table[v * 16 + R.PCI_MSIX_ENTRY_VECTOR_CTRL] = 1
        elif kind == "msi" and self.spec.msi_vectors:
            flags = cfg.read(MSI_CAP + R.PCI_MSI_FLAGS, 2)
            flags &= ~(R.PCI_MSI_FLAGS_ENABLE | R.PCI_MSI_FLAGS_QSIZE)
            cfg.poke(MSI_CAP + R.PCI_MSI_FLAGS, 2, flags)
        elif kind == "intx":
            command = cfg.read(R.PCI_COMMAND, 2)
            cfg.poke(R.PCI_COMMAND, 2, command | R.PCI_COMMAND_INTX_DISABLE)

    # -- reset ------------------------------------------------------------------------
    def reset(self) -> None:
        """Function Level Reset: every register to its power-on value (Bus Master, Memory
        Space, MSI and MSI-X off, vectors masked), device state reset, DMA stopped.

        A PF keeps its SR-IOV NumVFs/VF Enable and its VFs: Linux saves and restores them
        around a reset (pci_restore_iov_state), folded here into the reset (model)."""
        sriov = self._sriov_pos()
        saved = bytes(self.config.data[sriov : sriov + 0x40]) if sriov else b""
        self.config = self._build_config()
        if sriov:
            self.config.data[sriov : sriov + 0x40] = saved
        self._power_on_bars()
        self.resets += 1
        self.reset_device()

    def reset_device(self) -> None:
        """Device-specific power-on state (engines override)."""

    # -- SR-IOV -----------------------------------------------------------------------
    def _sriov_pos(self) -> int:
        if not self.spec.total_vfs or self.is_virtfn:
            return 0
        return SRIOV_EXT_CAP

    def vf_rid(self, index: int, num_vfs: int | None = None) -> int:
        """Routing ID of VF ``index`` (SR-IOV spec §3.3.10: First VF Offset + i * Stride)."""
        pos = self._sriov_pos()
        if not pos:
            raise err(errno.ENODEV, f"{self.bdf} is not an SR-IOV PF")
        offset = self.config.read(pos + R.PCI_SRIOV_VF_OFFSET, 2)
        stride = self.config.read(pos + R.PCI_SRIOV_VF_STRIDE, 2)
        return (self.rid + offset + index * stride) & 0xFFFF

    def _sriov_ctrl_changed(self, before: int, after: int) -> None:
        from iommufd_model.devices.sriov import vf_enable_changed

        vf_enable_changed(self, before, after)

    def sriov_set_num_vfs(self, n: int) -> None:
        """Write ``n`` to sriov_numvfs (drivers/pci/iov.c sriov_numvfs_store + sriov_enable
        / sriov_disable); OSError with the kernel's errno on refusal."""
        from iommufd_model.devices.sriov import set_num_vfs

        set_num_vfs(self, n)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.bdf}@{self.iommu.name}>"
