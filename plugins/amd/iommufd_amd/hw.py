"""The AMD IOMMU as hardware: MMIO registers with side effects, the command processor, the
event log, a device-table cache, the IOTLB and the translation of device requests.

Everything the driver tells the hardware goes through MMIO and memory: the device table,
the page tables and the command buffer live in :class:`PhysicalMemory`; the hardware reads
them when (and only when) it would on silicon. A DTE is read once and cached until
INVALIDATE_DEVTAB_ENTRY (or INVALIDATE_IOMMU_ALL) drops it; translations are cached in the
IOTLB, tagged by (DomainID, PASID), until INVALIDATE_IOMMU_PAGES drops them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from functools import partial
from typing import TYPE_CHECKING

from iommufd_amd import commands as C
from iommufd_amd import events as E
from iommufd_amd import ppr as P
from iommufd_amd import regs as R
from iommufd_amd.dte import DTE_SIZE, GUEST_PGTABLE_5_LEVEL, Dte, check
from iommufd_amd.gcr3 import GCR3_ADDR
from iommufd_amd.viommu.hw import ViommuHw
from iommufd_model.driver import IOMMU_READ, IOMMU_WRITE
from iommufd_model.hw.compiled import load_walker
from iommufd_model.hw.iommu import BurstRequest, CacheDict, DmaFault, FastPath, IommuHw, page_run
from iommufd_model.hw.iotlb import NEW_ENTRY, Iotlb, TlbEntry
from iommufd_model.hw.radix import TABLE
from iommufd_model.hw.regs import Mmio
from iommufd_model.hw.ring import MemRing
from iommufd_model.hw.x86_64 import X86_64Format
from iommufd_model.hw.xlate import Walk
from iommufd_model.locking import locked

if TYPE_CHECKING:
    from iommufd_model.hw.pci import PageRequest, PciDevice
    from iommufd_model.machine import Machine

WALK_MODULE = "iommufd_amd.walk"
X86_MODULE = "iommufd_model.hw.walk_x86"
NO_PASID = -1  # IOTLB tag of host (GN=0) translations
_DIRTY_DONE = 4  # TlbEntry.perm bit: the leaf's D bit is already set (or D is not tracked)

_REASONS = {1: "not-present", 2: "permission", 3: "address-size", 4: "bad-entry"}


class TranslationError(Exception):
    """Internal: one failed lookup, with the event the hardware logs for it."""

    def __init__(self, event: E.Event | None, reason: str) -> None:
        super().__init__(reason)
        self.event = event
        self.reason = reason


class AmdIommu(IommuHw):
    """One AMD IOMMU. ``host_levels`` is HATS (4..6), ``guest_levels`` GATS (4 or 5)."""

    def __init__(
        self,
        machine: Machine,
        index: int,
        *,
        host_levels: int = 6,
        guest_levels: int = 4,
        pasid_bits: int = 16,
        hd: bool = True,
        viommu_guests: int = 0,
        gst_buffer_trp: bool = True,
    ) -> None:
        super().__init__(machine, index)
        self.walk = load_walker(WALK_MODULE)
        self.x86 = load_walker(X86_MODULE)
        self.max_mode = host_levels
        self.gpt5 = guest_levels == 5
        self.pasid_bits = pasid_bits
        self.efr = (
            R.EFR_PREF_SUP
            | R.EFR_PPR_SUP
            | R.EFR_GT_SUP
            | R.EFR_IA_SUP
            | R.EFR_HE_SUP
            | (host_levels - 4) << R.EFR_HATS_SHIFT
            | (guest_levels - 4) << R.EFR_GATS_SHIFT
            | 1 << R.EFR_GLX_SHIFT  # GCR3 tables of up to 2 levels (GLX 0 and 1)
            | (pasid_bits - 1) << R.EFR_PASMAX_SHIFT
            | R.EFR_GIO_SUP
            | R.EFR_HA_SUP
            | (R.EFR_HD_SUP if hd else 0)
            | (R.EFR_VIOMMU_SUP if viommu_guests else 0)
        )
        # The HW-vIOMMU: ``viommu_guests`` guest IDs (0: no vIOMMU support).
        self.vi: ViommuHw | None = ViommuHw(self, viommu_guests) if viommu_guests else None
        self.efr2 = R.EFR2_GCR3TRPMODE
        self.max_glx = 1
        self.iotlb = Iotlb()
        # A DTE change forgets the request streams the compiled translate front knows.
        self.dte_cache: dict[int, tuple[Dte, str]] = CacheDict(self.front)
        self.devtab_base = 0
        self.devtab_entries = 0
        self.cmd_ring: MemRing | None = None
        self.evt_ring: MemRing | None = None
        self.ppr_ring: MemRing | None = None
        # Observable side channels of commands the model does not otherwise act on.
        self.ppr_responses: list[C.Command] = []
        self.irt_invalidations = 0
        self.device_iotlb_invalidations = 0
        self.completion_interrupts = 0
        self.events_lost = 0
        # The interrupts the driver handles (connected by its probe): the PPR log interrupt
        # and the vIOMMU event interrupt (guest ID, the event as the guest's log holds it).
        self.ppr_irq: Callable[[], None] | None = None
        self.viommu_irq: Callable[[int, E.Event], None] | None = None
        self._in_cmd = False
        self.mmio = m = Mmio(f"amd-iommu{index}")
        w = R.BASE_ADDR_MASK
        m.define(
            "DEV_TABLE_BASE",
            R.DEV_TABLE_BASE,
            writable=w | R.DEV_TABLE_SIZE_MASK,
            on_write=self._w_devtab,
        )
        lenf = R.LEN_MASK << R.LEN_SHIFT
        m.define(
            "CMD_BUF_BASE",
            R.CMD_BUF_BASE,
            writable=w | lenf,
            on_write=self._w_ring_base("CMD_BUF_BASE", "cmd_ring", R.CTRL_CMDBUF_EN),
        )
        m.define(
            "EVT_LOG_BASE",
            R.EVT_LOG_BASE,
            writable=w | lenf,
            on_write=self._w_ring_base("EVT_LOG_BASE", "evt_ring", R.CTRL_EVT_LOG_EN),
        )
        # GstBufferTRPMode (bit 60) sticks only on hardware that has it (viommu_enable() checks).
        ctrl_rw = ((1 << 64) - 1) & ~(0 if gst_buffer_trp else R.CTRL_GSTBUFFERTRPMODE)
        m.define("CONTROL", R.CONTROL, writable=ctrl_rw, on_write=self._w_control)
        m.define("EXCL_BASE", R.EXCL_BASE, writable=w | 3)
        m.define("EXCL_LIMIT", R.EXCL_LIMIT, writable=w)
        m.define("EFR", R.EFR, reset=self.efr, writable=0)
        m.define(
            "PPR_LOG_BASE",
            R.PPR_LOG_BASE,
            writable=w | lenf,
            on_write=self._w_ring_base("PPR_LOG_BASE", "ppr_ring", R.CTRL_PPRLOG_EN),
        )
        m.define("EFR2", R.EFR2, reset=self.efr2, writable=0)
        m.define("VIOMMU_STATUS", R.VIOMMU_STATUS, writable=0)
        m.define("CMD_HEAD", R.CMD_HEAD, writable=R.PTR_MASK, on_write=self._w_cmd_head)
        m.define("CMD_TAIL", R.CMD_TAIL, writable=R.PTR_MASK, on_write=self._w_cmd_tail)
        m.define("EVT_HEAD", R.EVT_HEAD, writable=R.PTR_MASK)
        m.define("EVT_TAIL", R.EVT_TAIL, writable=R.PTR_MASK, on_write=self._w_evt_tail)
        m.define("STATUS", R.STATUS, writable=R.ST_RW1C, on_write=self._w_status)
        m.define("PPR_HEAD", R.PPR_HEAD, writable=R.PTR_MASK)
        m.define("PPR_TAIL", R.PPR_TAIL, writable=R.PTR_MASK)

    # -- register side effects ------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.mmio["CONTROL"]

    def _status_set(self, bits: int, on: bool = True) -> None:
        st = self.mmio["STATUS"]
        self.mmio.set("STATUS", st | bits if on else st & ~bits)

    def _ring(self, value: int) -> MemRing | None:
        log2 = (value >> R.LEN_SHIFT) & R.LEN_MASK
        if log2 < R.LEN_MIN:
            return None  # reserved length: the buffer does not run
        return MemRing(self.memory, value & R.BASE_ADDR_MASK, R.ENTRY_SIZE, 1 << log2)

    def _w_devtab(self, old: int, new: int) -> None:
        self.devtab_base = new & R.BASE_ADDR_MASK
        self.devtab_entries = ((new & R.DEV_TABLE_SIZE_MASK) + 1) * 4096 // DTE_SIZE

    def _w_ring_base(self, reg: str, ring: str, enable: int) -> Callable[[int, int], None]:
        """The write handler of a ring's base register ``reg`` (CMD_BUF_BASE, EVT_LOG_BASE,
        PPR_LOG_BASE): ignored while the ring runs (``enable`` set in CONTROL); otherwise the
        attribute ``ring`` gets the new ring, and the write resets its head and tail."""
        prefix = reg.split("_")[0]

        def write(old: int, new: int) -> None:
            if self.control & enable:
                self.mmio.set(reg, old)  # ignored while the buffer runs
                return
            setattr(self, ring, self._ring(new))
            self.mmio.set(f"{prefix}_HEAD", 0)
            self.mmio.set(f"{prefix}_TAIL", 0)

        return write

    def _w_control(self, old: int, new: int) -> None:
        rose = new & ~old
        fell = old & ~new
        if fell & R.CTRL_CMDBUF_EN:
            self._status_set(R.ST_CMDBUF_RUN, False)
        if fell & R.CTRL_EVT_LOG_EN:
            self._status_set(R.ST_EVT_RUN, False)
        if fell & R.CTRL_PPRLOG_EN:
            self._status_set(R.ST_PPR_RUN, False)
        if rose & R.CTRL_EVT_LOG_EN and self.evt_ring is not None:
            self._status_set(R.ST_EVT_RUN)
        if rose & R.CTRL_PPRLOG_EN and self.ppr_ring is not None:
            self._status_set(R.ST_PPR_RUN)
        if rose & R.CTRL_CMDBUF_EN and self.cmd_ring is not None:
            # Enabling the command buffer starts fetching at the head pointer.
            self._status_set(R.ST_CMDBUF_RUN)
            self.process_commands()

    def _w_cmd_head(self, old: int, new: int) -> None:
        if self.mmio["STATUS"] & R.ST_CMDBUF_RUN:
            self.mmio.set("CMD_HEAD", old)  # the hardware owns the head while running

    def _w_cmd_tail(self, old: int, new: int) -> None:
        self.process_commands()

    def _w_evt_tail(self, old: int, new: int) -> None:
        if self.control & R.CTRL_EVT_LOG_EN:
            self.mmio.set("EVT_TAIL", old)  # the hardware owns the tail while logging

    def _w_status(self, old: int, new: int) -> None:
        # RW1C: the bits written as one clear; the rest is read-only.
        self.mmio.set("STATUS", old & ~(new & R.ST_RW1C))

    # -- the event log ------------------------------------------------------------------------
    def log_event(self, ev: E.Event) -> bool:
        """Append ``ev`` at the event log tail; overflow sets EventOverflow and drops it."""
        ring = self.evt_ring
        if ring is None or not self.mmio["STATUS"] & R.ST_EVT_RUN:
            self.events_lost += 1
            return False
        head = self.mmio["EVT_HEAD"] // R.ENTRY_SIZE
        tail = self.mmio["EVT_TAIL"] // R.ENTRY_SIZE
        if ring.is_full(head, tail):
            self._status_set(R.ST_EVT_OVERFLOW)
            self.events_lost += 1
            return False
        try:
            ring.write(tail, ev.to_bytes())
        except OSError:
            self.events_lost += 1
            return False
        self.mmio.set("EVT_TAIL", ((tail + 1) % ring.nentries) * R.ENTRY_SIZE)
        self._status_set(R.ST_EVT_INT)
        return True

    def read_events(self, consume: bool = True) -> list[E.Event]:
        """What software finds between the event head and tail (advances the head if asked)."""
        ring = self.evt_ring
        if ring is None:
            return []
        head = self.mmio["EVT_HEAD"] // R.ENTRY_SIZE
        tail = self.mmio["EVT_TAIL"] // R.ENTRY_SIZE
        out = [E.Event.from_bytes(ring.read(head + i)) for i in range(ring.count(head, tail))]
        if consume:
            self.mmio.write(R.EVT_HEAD, tail * R.ENTRY_SIZE)
        return out

    # -- page requests (PPR) ------------------------------------------------------------------
    @locked
    def page_request(self, dev: PciDevice, req: PageRequest) -> bool:
        """A PCIe Page Request from ``dev``: with the PPR log running and the device's DTE
        V and PPR set, the entry goes to the PPR log tail (PprInt set) and the driver's PPR
        interrupt runs. A valid DTE without PPR refuses the request: one INVALID_PPR_REQUEST
        event (0x9, the request's PASID, tag, flags and page) goes to the event log. Any other
        request is dropped without a trace (the model's choice: a DTE with V=0, a PPR log that
        is not running). Returns whether the request reached the PPR log."""
        ring = self.ppr_ring
        pasid = req.pasid
        dte, _why = self._dte(dev.rid, req.addr, pasid, req.write)
        flags = P.request_flags(req)
        tag = req.grpid | (P.TAG_LAST if req.last else 0)
        page = req.addr
        if dte.v and not dte.ppr:
            refused = E.Event(E.INVALID_PPR_REQUEST, dev.rid, pasid or 0, flags, page, tag)
            self.log_event(refused)
            return False
        if ring is None or not self.mmio["STATUS"] & R.ST_PPR_RUN or not dte.v:
            return False
        head = self.mmio["PPR_HEAD"] // R.ENTRY_SIZE
        tail = self.mmio["PPR_TAIL"] // R.ENTRY_SIZE
        if ring.is_full(head, tail):
            self._status_set(R.ST_PPR_OVERFLOW)
            return False
        entry = P.PprEntry(dev.rid, pasid or 0, tag, flags, page)
        ring.write(tail, entry.to_bytes())
        self.mmio.set("PPR_TAIL", ((tail + 1) % ring.nentries) * R.ENTRY_SIZE)
        self._status_set(R.ST_PPR_INT)
        if self.ppr_irq is not None:
            self.ppr_irq()
        return True

    # -- the command processor ------------------------------------------------------------------
    @property
    def cmd_running(self) -> bool:
        return bool(self.mmio["STATUS"] & R.ST_CMDBUF_RUN)

    def process_commands(self) -> None:
        """Fetch and execute commands from head to tail while the buffer runs."""
        if self._in_cmd:
            return
        ring = self.cmd_ring
        if ring is None:
            return
        self._in_cmd = True
        try:
            while self.cmd_running:
                head = self.mmio["CMD_HEAD"] // R.ENTRY_SIZE
                tail = self.mmio["CMD_TAIL"] // R.ENTRY_SIZE
                if head % ring.nentries == tail % ring.nentries:
                    break
                addr = ring.addr(head)
                try:
                    raw = ring.read(head)
                except OSError:
                    self._cmd_stop(E.COMMAND_HARDWARE_ERROR, addr)
                    break
                cmd = C.decode(raw)
                if cmd is None or not self._supported(cmd):
                    self._cmd_stop(E.ILLEGAL_COMMAND_ERROR, addr)
                    break
                if not self.execute(cmd, addr):
                    break
                self.stats.commands += 1
                self.mmio.set("CMD_HEAD", ((head + 1) % ring.nentries) * R.ENTRY_SIZE)
        finally:
            self._in_cmd = False

    def _supported(self, cmd: C.Command) -> bool:
        if cmd.opcode == C.INVALIDATE_IOMMU_ALL:
            return bool(self.efr & R.EFR_IA_SUP)
        if cmd.opcode == C.PREFETCH_IOMMU_PAGES:
            return bool(self.efr & R.EFR_PREF_SUP)
        if cmd.opcode == C.COMPLETE_PPR_REQUEST:
            return bool(self.efr & R.EFR_PPR_SUP)
        if cmd.opcode in (C.INSERT_GUEST_EVENT, C.RESET_VMMIO):
            return self.vi is not None
        return True

    def _cmd_stop(self, code: int, addr: int) -> None:
        """The command processor halts with its head on the failing command."""
        self._status_set(R.ST_CMDBUF_RUN, False)
        flags = HWERR_READ if code == E.COMMAND_HARDWARE_ERROR else 0
        self.log_event(E.Event(code, flags=flags, address=addr))

    def execute(self, cmd: C.Command, addr: int) -> bool:
        """Run one legal command; False when it stopped the processor."""
        op = cmd.opcode
        if op == C.COMPLETION_WAIT:
            if cmd.s:
                try:
                    self.memory.write_u64(cmd.address, cmd.data)
                except OSError:
                    self._cmd_stop(E.COMMAND_HARDWARE_ERROR, addr)
                    return False
            if cmd.i:
                self._status_set(R.ST_COMWAIT_INT)
                if self.control & R.CTRL_COMWAIT_INT_EN:
                    self.completion_interrupts += 1
        elif op == C.INVALIDATE_DEVTAB_ENTRY:
            self.dte_cache.pop(cmd.devid, None)
        elif op == C.INVALIDATE_IOMMU_PAGES:
            self.invalidate_pages(cmd.domid, cmd.pasid if cmd.gn else NO_PASID, cmd.address, cmd.s)
        elif op == C.INVALIDATE_IOTLB_PAGES:
            dev = self.devices.get(cmd.devid)
            if dev is None or not dev.ats:
                # No ATS function answers the invalidation request.
                self.log_event(E.Event(E.IOTLB_INV_TIMEOUT, devid=cmd.devid, address=addr))
            else:
                self.device_iotlb_invalidations += 1
        elif op == C.INVALIDATE_INTERRUPT_TABLE:
            self.irt_invalidations += 1
        elif op == C.PREFETCH_IOMMU_PAGES:
            pasid = cmd.pasid if cmd.gn else None
            if cmd.inval:
                dte = self.dte_cache.get(cmd.devid)
                if dte is not None:
                    tag = dte[0].domain_id, cmd.pasid if cmd.gn else NO_PASID
                    self.iotlb.flush_range(tag.__eq__, cmd.address, cmd.address + 0xFFF)
            with contextlib.suppress(TranslationError):  # a prefetch never faults
                self.lookup(cmd.devid, cmd.address, pasid, False)
        elif op == C.COMPLETE_PPR_REQUEST:
            self.ppr_responses.append(cmd)
        elif op == C.INVALIDATE_IOMMU_ALL:
            self.iotlb.flush_all()
            self.dte_cache.clear()
        elif op == C.RESET_VMMIO and self.vi is not None:
            self.vi.reset_vmmio(cmd.guest_id)
        elif op == C.INSERT_GUEST_EVENT and self.vi is not None:
            self.vi.insert_guest_event(cmd.guest_id)
        return True

    def invalidate_pages(self, domid: int, pasid: int, address: int, s: bool) -> None:
        """INVALIDATE_IOMMU_PAGES. GN=1 (``pasid`` >= 0): that PASID's translations in the
        range. GN=0: the domain's host translations in the range, and -- since a nested
        (GVA) entry cannot be matched by the guest-physical range it depends on -- every
        nested translation of the domain.
        """
        first, last = C.decode_range(address, s)
        if pasid >= 0:
            want: Hashable = (domid, pasid)
            self.iotlb.flush_range(want.__eq__, first, last)
            return
        host: Hashable = (domid, NO_PASID)
        self.iotlb.flush_range(host.__eq__, first, last)
        self.iotlb.flush_tag(lambda tag: _guest_tag_of(tag, domid))

    # -- the device table ------------------------------------------------------------------------
    def _dte(self, devid: int, iova: int, pasid: int | None, write: bool) -> tuple[Dte, str]:
        cached = self.dte_cache.get(devid)
        if cached is not None:
            return cached
        if devid >= self.devtab_entries:
            raise TranslationError(
                E.Event(E.ILLEGAL_DEV_TABLE_ENTRY, devid=devid, flags=_rw(write), address=iova),
                "device ID beyond the device table",
            )
        addr = self.devtab_base + devid * DTE_SIZE
        try:
            raw = self.memory.read(addr, DTE_SIZE)
        except OSError:
            raise TranslationError(
                E.Event(
                    E.DEV_TAB_HARDWARE_ERROR,
                    devid=devid,
                    flags=HWERR_READ | _rw(write),
                    address=addr,
                ),
                "device table read failed",
            ) from None
        dte = Dte.from_bytes(raw)
        why = check(
            dte,
            max_mode=self.max_mode,
            gt_enabled=bool(self.control & R.CTRL_GT_EN),
            max_glx=self.max_glx,
            gpt5=self.gpt5,
        )
        self.dte_cache[devid] = cached = (dte, why)
        return cached

    # -- translation ------------------------------------------------------------------------------
    def translate(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        self.stats.translations += 1
        try:
            pa, run = self.lookup(dev.rid, iova, pasid, write)
        except TranslationError as exc:
            raise self._refused(dev, iova, pasid, write, exc) from None
        return self._bounded(dev, iova, pasid, write, pa, run)

    def _refused(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool, exc: TranslationError
    ) -> DmaFault:
        """The event of a failed lookup goes to the event log (or a vIOMMU guest's)."""
        if exc.event is not None and not self._guest_event(dev.rid, exc.event):
            self.log_event(exc.event)
        return self.fault(dev, iova, write, pasid, exc.reason)

    def _bounded(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool, pa: int, run: int
    ) -> tuple[int, int]:
        size = self.memory.size
        if pa >= size:  # untranslated (V=0, Mode 0) beyond memory: nothing answers
            raise self.fault(dev, iova, write, pasid, f"master abort at PA {pa:#x}")
        return pa, min(run, size - pa)

    def _post_walk(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool, res: tuple[int, ...]
    ) -> tuple[int, int]:
        """translate() from a walk the compiled front made for a stream it knows (faults,
        master aborts, guest-table corner cases): the DTE is the cached one the stream was
        learnt from."""
        dte = self.dte_cache[dev.rid][0]
        tag = _iotlb_tag(dte, pasid)
        assert tag is not None  # a stream is only learnt with a tag
        try:
            pa, run = self._walked(dte, dev.rid, iova, pasid, write, tag, res)
        except TranslationError as exc:
            raise self._refused(dev, iova, pasid, write, exc) from None
        return self._bounded(dev, iova, pasid, write, pa, run)

    def iotlb_fast(self, dev: PciDevice, pasid: int | None, write: bool) -> FastPath | None:
        """After a translation of ``dev``: the IOTLB tag its requests use, as :meth:`lookup`
        decides it from the cached DTE (None when the DTE bypasses the IOTLB)."""
        cached = self.dte_cache.get(dev.rid)
        if cached is None:
            return None
        dte, why = cached
        if not dte.v or why or not dte.tv or (pasid is not None and not dte.gv):
            return None  # what lookup() refuses or passes untranslated never reaches the IOTLB
        tag = _iotlb_tag(dte, pasid)
        if tag is None:
            return None
        return self.iotlb, tag, (IOMMU_WRITE | _DIRTY_DONE) if write else IOMMU_READ

    def walk_run(self, req: BurstRequest, iova: int) -> int:
        """Host (v1) table walks of a burst in the compiled walker (``walk.walk_run``), for a
        DTE that :meth:`lookup` would walk with the v1 table; A/D updates (DTE HAD) count as
        memory writes for ``req.tables_only``. Other streams (guest tables, PASIDs) take the
        default: the compiled front's binding of their walks."""
        cached = self.dte_cache.get(req.dev.rid)
        if cached is None or req.pasid is not None:
            return super().walk_run(req, iova)
        dte, why = cached
        if not dte.v or why or not dte.tv or (req.tables_only and dte.had):
            return super().walk_run(req, iova)
        tag = _iotlb_tag(dte, None)
        if tag is None or tag[1] != NO_PASID:
            return super().walk_run(req, iova)  # no table, or the guest (v2) tables
        dte_prot = (IOMMU_READ if dte.ir else 0) | (IOMMU_WRITE if dte.iw else 0)
        iotlb = self.iotlb
        memory = self.memory
        walks, refs, stop = self.walk.walk_run(
            iotlb._tables,
            tag,
            iova,
            req.end,
            req.write,
            dte_prot,
            memory._pages,
            memory.size,
            dte.host_root,
            dte.mode,
            dte.had,
            partial(iotlb.ops.fill, iotlb._tables, iotlb._fifo, iotlb.capacity),
            NEW_ENTRY,
            req.runs,
        )
        self.count_walks(iotlb.counts, walks, refs)
        return int(stop)

    def _guest_event(self, devid: int, ev: E.Event) -> bool:
        """HW-vIOMMU: a guest device's event goes to its guest's event log instead."""
        if self.vi is None:
            return False
        cached = self.dte_cache.get(devid)
        return cached is not None and self.vi.route_event(cached[0], ev)

    def lookup(self, devid: int, iova: int, pasid: int | None, write: bool) -> tuple[int, int]:
        """``(pa, run)`` for one access of ``devid``, or :class:`TranslationError`."""
        dte, why = self._dte(devid, iova, pasid, write)
        if not dte.v:
            return iova, page_run(iova)  # V=0: the IOMMU passes the request untranslated
        gn_flags = _rw(write) | (E.F_GN if pasid is not None else 0)
        tag_lo = pasid if pasid is not None else dte.domain_id
        if why:
            raise TranslationError(
                E.Event(
                    E.ILLEGAL_DEV_TABLE_ENTRY, devid=devid, tag=tag_lo, flags=gn_flags, address=iova
                ),
                f"illegal DTE: {why}",
            )
        if not dte.tv:
            raise self._page_fault(dte, devid, iova, pasid, gn_flags, "blocked: DTE TV=0")
        if pasid is not None and not dte.gv:
            raise TranslationError(
                E.Event(
                    E.INVALID_DEVICE_REQUEST, devid=devid, tag=pasid, flags=gn_flags, address=iova
                ),
                "PASID request to a DTE without GV",
            )
        dte_prot = _dte_prot(dte, pasid)
        tag = _iotlb_tag(dte, pasid)
        if tag is None:
            # Translation disabled: the DTE's IR/IW alone decide.
            if not dte_prot & (IOMMU_WRITE if write else IOMMU_READ):
                raise self._page_fault(dte, devid, iova, pasid, gn_flags | E.F_PE, "permission")
            return iova, page_run(iova)
        iotlb = self.iotlb
        stats = self.stats
        hit = iotlb.lookup(tag, iova)
        need = IOMMU_WRITE if write else IOMMU_READ
        if hit is not None and hit.perm & need and (not write or hit.perm & _DIRTY_DONE):
            stats.iotlb_hits += 1
            self._learn(dte, devid, pasid, tag)
            off = iova & ((1 << hit.shift) - 1)
            return hit.pa + off, (1 << hit.shift) - off
        stats.iotlb_misses += 1
        res = self._walker(dte, tag)(iova, write)
        return self._walked(dte, devid, iova, pasid, write, tag, res)

    def _walker(self, dte: Dte, tag: tuple[int, int]) -> Walk:
        """The compiled walk of the tables ``tag`` names, bound to the DTE's fields: the
        guest (v2) tables of the tag's PASID, or the host (v1) table."""
        pages = self.memory._pages
        size = self.memory.size
        if tag[1] != NO_PASID:
            levels = 5 if dte.gpt_level == GUEST_PGTABLE_5_LEVEL else 4
            guest = (dte.gcr3, dte.glx, levels, tag[1], self.x86.walk_x86)
            ctx = (pages, size, dte.host_root, dte.mode, dte.had, *guest)
            # A read may set the guest tables' accessed bits.
            return self.bind_walk(self.walk.walk_nested_bound, ctx)
        host = (dte.host_root, dte.mode, dte.had)
        # A read's host (v1) walk writes memory only with DTE HAD (accessed bits).
        return self.bind_walk(
            self.walk.walk_v1_bound, (pages, size, *host), read_writes=bool(dte.had)
        )

    def _walked(
        self,
        dte: Dte,
        devid: int,
        iova: int,
        pasid: int | None,
        write: bool,
        tag: tuple[int, int],
        res: tuple[int, ...],
    ) -> tuple[int, int]:
        """The rest of :meth:`lookup` after an IOTLB miss's walk (``res``): its faults, the
        DTE's IR/IW, the IOTLB fill."""
        st, val, shift, refs, prot = res[:5]
        gn_flags = _rw(write) | (E.F_GN if pasid is not None else 0)
        if tag[1] != NO_PASID and st == self.walk.BAD_ENTRY and dte.mode == 0:
            st, val = self._classify_v2(dte, tag[1], iova, write, st, val)
        self.stats.walk_mem_refs += refs
        if st != 0:
            raise self._walk_fault(dte, devid, iova, pasid, gn_flags, st, val, prot)
        prot &= _dte_prot(dte, pasid)
        if not prot & (IOMMU_WRITE if write else IOMMU_READ):
            raise self._page_fault(
                dte, devid, iova, pasid, gn_flags | E.F_PR | E.F_PE, "permission"
            )
        if not dte.had & 2 or write:
            prot |= _DIRTY_DONE
        mask = (1 << shift) - 1
        if val >= self.memory.size:
            # A leaf beyond memory (a 512 GiB page too): the request ends in a master abort
            # (no event: the translation itself succeeded), and nothing is cached for it.
            raise TranslationError(None, f"master abort at PA {val:#x}")
        self.iotlb.insert(tag, iova, TlbEntry(val & ~mask, shift, prot, refs))
        self._learn(dte, devid, pasid, tag)
        return val, (1 << shift) - (val & mask)

    def _learn(self, dte: Dte, devid: int, pasid: int | None, tag: tuple[int, int]) -> None:
        """The stream passed every DTE check and uses ``tag``: its next IOTLB hits are the
        compiled front's (hw/xlate.py), which bounds them by memory as translate() does, and
        so are its misses that walk cleanly (:meth:`_walked`'s rules, in the front)."""
        iotlb = self.iotlb
        size = self.memory.size
        miss = self.front_miss(
            self._walker(dte, tag),
            self._post_walk,
            iotlb,
            _dte_prot(dte, pasid),
            (IOMMU_READ, IOMMU_WRITE),
            (0 if dte.had & 2 else _DIRTY_DONE, _DIRTY_DONE),
            clamp=True,
        )
        self.front.learn(
            devid,
            pasid,
            iotlb._tables,
            iotlb.counts,
            tag,
            IOMMU_READ,
            IOMMU_WRITE | _DIRTY_DONE,
            size,
            miss,
        )

    def _classify_v2(
        self, dte: Dte, pasid: int, iova: int, write: bool, st: int, val: int
    ) -> tuple[int, int]:
        """Slow path: a v2-only walk's BAD_ENTRY may be a table outside memory (hardware
        error) or a reserved PS bit (page fault); a re-walk of the tables tells them apart."""
        try:
            table = dte.gcr3
            for level in range(dte.glx, -1, -1):
                entry = self.memory.read_u64(table + ((pasid >> (9 * level)) & 0x1FF) * 8)
                table = entry & GCR3_ADDR
            cr3 = table
        except OSError:
            return self.walk.HW_ERROR, dte.gcr3
        levels = 5 if dte.gpt_level == GUEST_PGTABLE_5_LEVEL else 4
        fmt = X86_64Format(levels)
        table = cr3
        for level in range(levels - 1, -1, -1):
            slot = table + fmt.index(iova, level) * 8
            if slot + 8 > self.memory.size:
                return self.walk.HW_ERROR, table
            kind, addr, _prot = fmt.decode(self.memory.read_u64(slot), level)
            if kind != TABLE:
                break
            table = addr
        return st, val

    def _page_fault(
        self, dte: Dte, devid: int, iova: int, pasid: int | None, flags: int, reason: str
    ) -> TranslationError:
        tag = pasid if pasid is not None else dte.domain_id
        suppress = dte.sa or dte.se
        ev = None if suppress else E.Event(E.IO_PAGE_FAULT, devid, tag, flags, iova)
        return TranslationError(ev, reason)

    def _walk_fault(
        self,
        dte: Dte,
        devid: int,
        iova: int,
        pasid: int | None,
        flags: int,
        st: int,
        val: int,
        prot: int,
    ) -> TranslationError:
        w = self.walk
        tag = pasid if pasid is not None else dte.domain_id
        if st == w.HW_ERROR:
            ev = E.Event(E.PAGE_TAB_HARDWARE_ERROR, devid, tag, flags | HWERR_READ, val)
            return TranslationError(ev, f"page table read outside memory at {val:#x}")
        if st == w.PERMISSION:
            flags |= E.F_PR | E.F_PE
        elif st == w.BAD_ENTRY:
            flags |= E.F_PR | E.F_RZ
        elif st == w.S2_FAULT:
            return self._page_fault(
                dte, devid, iova, pasid, flags, f"stage-2 fault at gpa {val:#x}"
            )
        return self._page_fault(dte, devid, iova, pasid, flags, _REASONS.get(st, "fault"))


HWERR_READ = E.HWERR_TYPE_READ << E.TYPE_SHIFT


def _guest_tag_of(tag: Hashable, domid: int) -> bool:
    return isinstance(tag, tuple) and tag[0] == domid and tag[1] != NO_PASID


def _iotlb_tag(dte: Dte, pasid: int | None) -> tuple[int, int] | None:
    """The IOTLB tag of a request the DTE accepts: DomainID and the PASID whose guest (v2)
    tables translate it, or ``NO_PASID`` for the host (v1) table; None when the DTE translates
    nothing (no guest tables, Mode 0)."""
    if pasid is not None:
        return dte.domain_id, pasid
    if dte.gv and dte.giov:
        return dte.domain_id, 0  # GIOV: requests without PASID use PASID 0's tables
    if dte.mode:
        return dte.domain_id, NO_PASID
    return None


def _dte_prot(dte: Dte, pasid: int | None) -> int:
    """DTE IR/IW gate requests without PASID; PASID requests answer to their tables only."""
    if pasid is not None:
        return IOMMU_READ | IOMMU_WRITE
    return (IOMMU_READ if dte.ir else 0) | (IOMMU_WRITE if dte.iw else 0)


def _rw(write: bool) -> int:
    return E.F_RW if write else 0
