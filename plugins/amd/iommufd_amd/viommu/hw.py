"""The HW-vIOMMU as hardware: per-guest slots of one AMD IOMMU (spec pub. 48882, vIOMMU chapter;
AMD's tree AMDESE/linux-iommu ``viommu.c`` / ``amd_viommu.h`` / ``amd_iommu_types.h``).

What the hardware owns per guest ID (``gid``):

* its 64 bytes of **guest MMIO** in the IOMMU Private Address space (PAS): the command buffer,
  event log and PPR head/tail pointers and the guest status, reached by the guest through its
  4 KiB **VF MMIO** page (the window the VMM maps for it: :class:`VfMmioWindow`, no trap);
* its **DevID** and **DomID mapping tables** in the PAS, written by the hardware itself when the
  host driver issues map commands through the guest's **VF control MMIO** (VFCTRL);
* its guest command buffer and guest event log, given as guest-physical ranges and reached
  through the **translate DeviceID** DTE (the nest parent's host v1 table, i.e. stage 2);
* its bit in the **command-buffer dirty-status** region of the PAS.

Every PAS access is a translation of the IOMMU's own DevID through the PAS v1 table (IOTLB
cached under the PAS DomainID); every guest-RAM access is a translation of the guest's
translate DeviceID (IOTLB cached under the nest parent's DomainID), so the guest can reach
nothing but its RAM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from iommufd_amd import commands as C
from iommufd_amd import events as E
from iommufd_amd import regs as R
from iommufd_model.hw.memory import PAGE_SIZE as PAGE

if TYPE_CHECKING:
    from iommufd_amd.dte import Dte
    from iommufd_amd.hw import AmdIommu

IOMMU_DEVID = 0x0002  # the IOMMU's own function (00:00.2), its DTE maps the PAS
MAX_GUESTS = 0xFFFF  # guest IDs 1..0xFFFF (VIOMMU_MAX_GUESTID is 64 Ki; 0 is never handed out)
#: Guest commands the hardware executes itself; anything else legal is left to the VMM.
VIRTUALISED = frozenset(
    {
        C.COMPLETION_WAIT,
        C.INVALIDATE_DEVTAB_ENTRY,
        C.INVALIDATE_IOMMU_PAGES,
        C.INVALIDATE_IOTLB_PAGES,
    }
)
#: VFCTRL guest buffer register -> (head, tail, run status bit, bits cleared on reprogramming,
#: enable bit) of the guest's buffer.
GUEST_BUFFERS = {
    R.VFCTRL_CMD_CONTROL: (
        R.VF_CMD_HEAD,
        R.VF_CMD_TAIL,
        R.ST_CMDBUF_RUN,
        R.GST_CMD_TRAP,
        R.GCMD_CMDBUF_EN,
    ),
    R.VFCTRL_EVT_CONTROL: (
        R.VF_EVT_HEAD,
        R.VF_EVT_TAIL,
        R.ST_EVT_RUN,
        R.ST_EVT_OVERFLOW,
        R.GEVT_LOG_EN,
    ),
    R.VFCTRL_PPR_CONTROL: (
        R.VF_PPR_HEAD,
        R.VF_PPR_TAIL,
        R.ST_PPR_RUN,
        R.ST_PPR_OVERFLOW,
        R.GPPR_LOG_EN,
    ),
}
#: Commands only the host driver may issue (a guest's are illegal).
HOST_ONLY = frozenset({C.INSERT_GUEST_EVENT, C.RESET_VMMIO})
#: Events of a guest device that go to its guest (the rest are the host's business).
GUEST_EVENTS = frozenset({E.IO_PAGE_FAULT, E.INVALID_DEVICE_REQUEST})


class PasError(OSError):
    """A PAS or guest-RAM access the hardware could not translate."""


class GuestSlot:
    """The hardware state of one guest ID that lives in registers (VFCTRL) and counters."""

    def __init__(self, gid: int) -> None:
        self.gid = gid
        self.vfctrl: dict[int, int] = {}
        self.trans_devid = -1
        self.hdom_to_gdom: dict[int, int] = {}  # reverse DomID map (for guest event tags)
        self.in_cmd = False
        self.stalled = False
        self.notify: Callable[[GuestSlot], None] | None = None  # the VMM's "interrupt"
        self.window = VfMmioWindow(self)
        self.hw: ViommuHw | None = None
        # counters (what the hardware did for this guest)
        self.commands = 0
        self.dropped = 0  # commands naming a gDomID/gDevID the guest does not own
        self.traps = 0  # commands handed to the VMM
        self.completion_interrupts = 0
        self.events = 0
        self.events_lost = 0
        self.errors = 0  # illegal commands and buffer access errors

    def ring(self, off: int) -> tuple[int, int] | None:
        """``(gpa base, entries)`` of the guest buffer whose VFCTRL register is at ``off``."""
        val = self.vfctrl.get(off, 0)
        log2 = val & R.GBUF_LEN_MASK
        if not val & R.GCMD_CMDBUF_EN or log2 < R.LEN_MIN:  # bit 8 enables every buffer
            return None
        return R.gbuf_base(off, val), 1 << log2


class VfMmioWindow:
    """The guest's 4 KiB VF MMIO page (offsets of the guest's MMIO page at 0x2000: CMD_HEAD 0x0
    ... PPR_TAIL 0x38), backed by the guest's slot in the PAS. The driver registers it as the
    vIOMMU's iommufd mmap region (``length`` / ``read`` / ``write`` bytes, AMD's
    ``iommufd_viommu_alloc_mmap()`` of the VF BAR page); the VMM maps it into the guest, so
    guest accesses never exit. ``read`` / ``write`` of whole registers (``reg`` / ``set``) are
    the same accesses by value."""

    length = R.VF_MMIO_SIZE

    def __init__(self, slot: GuestSlot) -> None:
        self.slot = slot
        self.accesses = 0

    def _units(self, offset: int, n: int) -> range:
        if offset < 0 or n < 0 or offset + n > self.length or offset % 4 or n % 4:
            raise OSError(14, f"VF MMIO access {offset:#x}/{n} outside the page or unaligned")
        return range(offset, offset + n, 4)

    def read(self, offset: int, n: int) -> bytes:
        """MmapRegion: ``n`` bytes at ``offset`` in 32-bit units (reserved space reads 0)."""
        out = bytearray()
        for at in self._units(offset, n):
            val = self.reg(at & ~7)
            out += ((val >> 32) if at & 4 else val & 0xFFFF_FFFF).to_bytes(4, "little")
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """MmapRegion: stores in 64-bit units where aligned, else 32-bit ones merged into the
        register (the guest's ``writeq`` / ``writel``)."""
        pos = 0
        for at in self._units(offset, len(data)):
            if at < offset + pos:
                continue
            if at % 8 == 0 and len(data) - (at - offset) >= 8:
                self.set(at, int.from_bytes(data[at - offset : at - offset + 8], "little"))
                pos = at - offset + 8
            else:
                half = int.from_bytes(data[at - offset : at - offset + 4], "little")
                cur = self.reg(at & ~7)
                val = (cur & 0xFFFF_FFFF) | half << 32 if at & 4 else (cur & ~0xFFFF_FFFF) | half
                self.set(at & ~7, val)
                pos = at - offset + 4

    def reg(self, offset: int) -> int:
        """One 64-bit register of the page."""
        self.accesses += 1
        hw = self.slot.hw
        if hw is None or offset & 7 or offset >= R.PAS_GUEST_MMIO_ENTRY:
            return 0
        return hw.greg(self.slot, offset)

    def set(self, offset: int, value: int) -> None:
        """A 64-bit store to one register of the page."""
        self.accesses += 1
        hw = self.slot.hw
        if hw is None or offset & 7 or offset >= R.PAS_GUEST_MMIO_ENTRY:
            return
        hw.guest_write(self.slot, offset, value & ((1 << 64) - 1))

    def set_notify(self, fn: Callable[[GuestSlot], None] | None) -> None:
        """The VMM's interrupt line for command traps (an eventfd in a real VMM)."""
        self.slot.notify = fn


class ViommuHw:
    """The vIOMMU part of one :class:`~iommufd_amd.hw.AmdIommu`."""

    def __init__(self, hw: AmdIommu, max_guests: int) -> None:
        self.hw = hw
        self.max_guests = max_guests
        self.slots: dict[int, GuestSlot] = {}

    @property
    def enabled(self) -> bool:
        ctrl = self.hw.control
        return bool(ctrl & R.CTRL_VIOMMU_EN and ctrl & R.CTRL_VCMD_EN)

    # -- address spaces ----------------------------------------------------------------------
    def _pa(self, devid: int, addr: int, write: bool) -> int:
        from iommufd_amd.hw import TranslationError

        try:
            pa, _run = self.hw.lookup(devid, addr, None, write)
        except TranslationError as exc:
            raise PasError(14, f"devid {devid:#x} cannot reach {addr:#x}: {exc.reason}") from None
        return pa

    def pas_read_u64(self, addr: int) -> int:
        return self.hw.memory.read_u64(self._pa(IOMMU_DEVID, addr, False))

    def pas_write_u64(self, addr: int, value: int) -> None:
        self.hw.memory.write_u64(self._pa(IOMMU_DEVID, addr, True), value)

    def gpa(self, slot: GuestSlot, gpa: int, write: bool) -> int:
        """Guest-physical -> system address through the guest's translate DeviceID (stage 2)."""
        return self._pa(slot.trans_devid, gpa, write)

    # -- guest MMIO (in the PAS) -----------------------------------------------------------------
    def greg(self, slot: GuestSlot, off: int) -> int:
        return self.pas_read_u64(R.PAS_GUEST_MMIO_BASE + slot.gid * R.PAS_GUEST_MMIO_ENTRY + off)

    def set_greg(self, slot: GuestSlot, off: int, value: int) -> None:
        addr = R.PAS_GUEST_MMIO_BASE + slot.gid * R.PAS_GUEST_MMIO_ENTRY + off
        self.pas_write_u64(addr, value)

    def _status(self, slot: GuestSlot, bits: int, on: bool = True) -> None:
        st = self.greg(slot, R.VF_STATUS)
        self.set_greg(slot, R.VF_STATUS, st | bits if on else st & ~bits)

    def guest_write(self, slot: GuestSlot, off: int, value: int) -> None:
        """A guest store to its VF MMIO page (never a trap)."""
        if off == R.VF_CMD_TAIL:
            self.set_greg(slot, off, value & R.PTR_MASK)
            if value & R.PTR_MASK != self.greg(slot, R.VF_CMD_HEAD):
                self._dirty(slot)
            self.process(slot)
        elif off in (R.VF_EVT_HEAD, R.VF_PPR_HEAD):
            self.set_greg(slot, off, value & R.PTR_MASK)
        elif off == R.VF_STATUS:
            st = self.greg(slot, off)
            clear = value & (R.ST_RW1C | R.GST_CMD_TRAP)
            self.set_greg(slot, off, st & ~clear)
            if clear & R.GST_CMD_TRAP and slot.stalled:
                self._resume(slot)
        # CMD_HEAD and the tails the hardware owns are read-only to the guest.

    def _dirty(self, slot: GuestSlot) -> None:
        """The model's reading of the command-buffer dirty-status region (PAS 0x400000): the
        hardware sets the guest's bit when its command buffer gets new commands; the bit sits
        where AMD's ``viommu_clear_dirty_status_mask()`` clears it."""
        gid = slot.gid
        addr = R.PAS_CMDBUF_DIRTY_BASE + (((gid & 0xFF) << 4) | (((gid >> 13) & 0x7) << 2))
        try:
            self.pas_write_u64(addr, self.pas_read_u64(addr) | 1 << ((gid >> 8) & 0x1F))
        except PasError:
            self._hw_error(addr)

    def _hw_error(self, addr: int) -> None:
        """EVENT_TYPE_VIOMMU_HW_ERR in the host event log: the PAS could not be reached."""
        self.hw.log_event(E.Event(E.VIOMMU_HW_ERROR, IOMMU_DEVID, address=addr))

    # -- commands of the host command buffer ------------------------------------------------
    def reset_vmmio(self, gid: int) -> None:
        """RESET_VMMIO: the guest's virtualised registers (its guest MMIO slot in the PAS) go
        back to their reset value 0 and its command processor forgets any stall."""
        slot = self.slot(gid)
        slot.stalled = False
        base = R.PAS_GUEST_MMIO_BASE + gid * R.PAS_GUEST_MMIO_ENTRY
        try:
            for off in range(0, R.PAS_GUEST_MMIO_ENTRY, 8):
                self.pas_write_u64(base + off, 0)
        except PasError:
            self._hw_error(base)

    def insert_guest_event(self, gid: int) -> None:
        """INSERT_GUEST_EVENT, as the model reads it: the hypervisor wrote one entry at the
        guest event log's tail in guest RAM; the hardware publishes it (tail + 1, EventLogInt)."""
        slot = self.slot(gid)
        ring = slot.ring(R.VFCTRL_EVT_CONTROL)
        if ring is None or not self.greg(slot, R.VF_STATUS) & R.ST_EVT_RUN:
            return
        _base, n = ring
        tail = (self.greg(slot, R.VF_EVT_TAIL) // R.ENTRY_SIZE) % n
        self.set_greg(slot, R.VF_EVT_TAIL, ((tail + 1) % n) * R.ENTRY_SIZE)
        self._status(slot, R.ST_EVT_INT)
        slot.events += 1

    # -- VF control MMIO (host driver only) ------------------------------------------------------
    def slot(self, gid: int) -> GuestSlot:
        """The hardware state of guest ID ``gid`` (created on first use)."""
        slot = self.slots.get(gid)
        if slot is None:
            slot = self.slots[gid] = GuestSlot(gid)
            slot.hw = self
        return slot

    def map_all(self, gid: int, off: int, hid: int) -> None:
        """The effect of 64 Ki map commands ``gID -> hid`` (gID 0..0xFFFF, VALID) at VFCTRL
        ``off``: the whole mapping table written with one entry value, page by page through
        the PAS (the model's shortcut for ``viommu_clear_mapping()``'s loop)."""
        slot = self.slot(gid)
        entry = (hid & 0xFFFF) << R.MAP_HID_SHIFT | R.MAP_V
        if off == R.VFCTRL_DID_MAP_CONTROL0:
            base = R.PAS_DEVID_MAP_BASE + gid * R.PAS_DEVID_MAP_SIZE
            size, esize = R.PAS_DEVID_MAP_SIZE, R.PAS_DEVID_ENTRY
        else:
            base = R.PAS_DOMID_MAP_BASE + gid * R.PAS_DOMID_MAP_SIZE
            size, esize = R.PAS_DOMID_MAP_SIZE, R.PAS_DOMID_ENTRY
            slot.hdom_to_gdom.clear()
        page = (entry.to_bytes(8, "little") + bytes(esize - 8)) * (PAGE // esize)
        hw = self.hw
        mem = hw.memory
        dte, why = hw._dte(IOMMU_DEVID, base, None, True)
        for addr in range(base, base + size, PAGE):
            # A streaming fill: walked through the PAS table without allocating IOTLB entries
            # (the model's choice, so 2 x 384 table pages do not crowd the IOTLB).
            st, pa, *_ = hw.walk.walk_v1(
                mem._pages, mem.size, dte.host_root, dte.mode, addr, True, dte.had
            )
            if why or not dte.v or st != 0 or pa + PAGE > mem.size:
                self._hw_error(addr)
                return
            mem.write(pa, page)

    def vfctrl_write(self, gid: int, off: int, value: int) -> None:
        slot = self.slot(gid)
        if off in (R.VFCTRL_DID_MAP_CONTROL0, R.VFCTRL_DID_MAP_CONTROL1):
            if value & R.MAPCTL_GO:
                self._map_command(slot, off, value)
            return
        old = slot.vfctrl.get(off, 0)
        slot.vfctrl[off] = value
        if off == R.VFCTRL_MISC_CONTROL:
            slot.trans_devid = (value >> R.MISC_TRANS_DEVID_SHIFT) & 0xFFFF if value else -1
        elif off in GUEST_BUFFERS and old != value:
            # A (re)programmed guest buffer starts empty; its enable bit (8) makes it run. The
            # PPR log is accepted and programmed; no PRI request is modelled.
            head, tail, run, stop, enable = GUEST_BUFFERS[off]
            if off == R.VFCTRL_CMD_CONTROL:
                slot.stalled = False
            self.set_greg(slot, head, 0)
            self.set_greg(slot, tail, 0)
            self._status(slot, run | stop, False)
            if value & enable:
                self._status(slot, run)

    def vfctrl_read(self, gid: int, off: int) -> int:
        slot = self.slots.get(gid)
        return 0 if slot is None else slot.vfctrl.get(off, 0)

    def release(self, gid: int) -> None:
        """The guest ID went back to the pool: forget its register state."""
        self.slots.pop(gid, None)

    def _map_command(self, slot: GuestSlot, off: int, value: int) -> None:
        gid_ = (value >> R.MAPCTL_GID_SHIFT) & 0xFFFF
        hid = (value >> R.MAPCTL_HID_SHIFT) & 0xFFFF
        entry = (hid << R.MAP_HID_SHIFT | R.MAP_V) if value & R.MAPCTL_VALID else 0
        if off == R.VFCTRL_DID_MAP_CONTROL0:
            addr = R.PAS_DEVID_MAP_BASE + slot.gid * R.PAS_DEVID_MAP_SIZE + gid_ * R.PAS_DEVID_ENTRY
        else:
            addr = R.PAS_DOMID_MAP_BASE + slot.gid * R.PAS_DOMID_MAP_SIZE + gid_ * R.PAS_DOMID_ENTRY
            for h, g in list(slot.hdom_to_gdom.items()):
                if g == gid_:
                    del slot.hdom_to_gdom[h]
            if entry:
                slot.hdom_to_gdom[hid] = gid_
        try:
            self.pas_write_u64(addr, entry)
        except PasError:
            self._hw_error(addr)

    def _lookup_map(self, slot: GuestSlot, base: int, size: int, esize: int, gid_: int) -> int:
        """The host ID a guest ID maps to, -1 when unmapped (or the table is unreachable)."""
        try:
            entry = self.pas_read_u64(base + slot.gid * size + (gid_ & 0xFFFF) * esize)
        except PasError:
            return -1
        return (entry >> R.MAP_HID_SHIFT) & 0xFFFF if entry & R.MAP_V else -1

    def hdevid(self, slot: GuestSlot, gdevid: int) -> int:
        return self._lookup_map(
            slot, R.PAS_DEVID_MAP_BASE, R.PAS_DEVID_MAP_SIZE, R.PAS_DEVID_ENTRY, gdevid
        )

    def hdomid(self, slot: GuestSlot, gdomid: int) -> int:
        return self._lookup_map(
            slot, R.PAS_DOMID_MAP_BASE, R.PAS_DOMID_MAP_SIZE, R.PAS_DOMID_ENTRY, gdomid
        )

    # -- the guest command processor ------------------------------------------------------------
    def process(self, slot: GuestSlot) -> None:
        """Fetch guest commands from guest RAM (through stage 2) between head and tail."""
        if slot.in_cmd or slot.stalled or not self.enabled:
            return
        ring = slot.ring(R.VFCTRL_CMD_CONTROL)
        if ring is None:
            return
        base, n = ring
        slot.in_cmd = True
        trapped = False
        mem = self.hw.memory
        try:
            if not self.greg(slot, R.VF_STATUS) & R.ST_CMDBUF_RUN:
                return
            # The processor keeps its head internally and writes it back as it goes; the
            # guest's tail is read once per doorbell (a later store rings again).
            head = (self.greg(slot, R.VF_CMD_HEAD) // R.ENTRY_SIZE) % n
            tail = (self.greg(slot, R.VF_CMD_TAIL) // R.ENTRY_SIZE) % n
            while head != tail:
                gpa = base + head * R.ENTRY_SIZE
                try:
                    raw = mem.read(self.gpa(slot, gpa, False), R.ENTRY_SIZE)
                except OSError:
                    self._stop(slot, E.COMMAND_HARDWARE_ERROR, gpa)
                    break
                cmd = C.decode(raw)
                if cmd is None or cmd.opcode in HOST_ONLY:
                    self._stop(slot, E.ILLEGAL_COMMAND_ERROR, gpa)
                    break
                if cmd.opcode not in VIRTUALISED:
                    # Not virtualisable: stall on it and tell the VMM; never execute it.
                    slot.stalled = True
                    slot.traps += 1
                    self._status(slot, R.GST_CMD_TRAP)
                    self.hw.mmio.set(
                        "VIOMMU_STATUS", self.hw.mmio["VIOMMU_STATUS"] | R.VST_CMD_TRAP
                    )
                    trapped = True
                    break
                if not self._execute(slot, cmd, gpa):
                    break
                slot.commands += 1
                self.hw.stats.commands += 1
                head = (head + 1) % n
                self.set_greg(slot, R.VF_CMD_HEAD, head * R.ENTRY_SIZE)
        finally:
            slot.in_cmd = False
        if trapped and slot.notify is not None:
            slot.notify(slot)

    def _resume(self, slot: GuestSlot) -> None:
        """The VMM handled the stalled command (W1C of the trap bit): skip it and go on."""
        ring = slot.ring(R.VFCTRL_CMD_CONTROL)
        slot.stalled = False
        if ring is None:
            return
        _base, n = ring
        head = (self.greg(slot, R.VF_CMD_HEAD) // R.ENTRY_SIZE) % n
        self.set_greg(slot, R.VF_CMD_HEAD, ((head + 1) % n) * R.ENTRY_SIZE)
        if not any(s.stalled for s in self.slots.values()):
            self.hw.mmio.set("VIOMMU_STATUS", self.hw.mmio["VIOMMU_STATUS"] & ~R.VST_CMD_TRAP)
        self.process(slot)

    def _stop(self, slot: GuestSlot, code: int, gpa: int) -> None:
        """The guest's command processor halts on the failing command; the guest sees why."""
        slot.errors += 1
        self._status(slot, R.ST_CMDBUF_RUN, False)
        flags = E.HWERR_TYPE_READ << E.TYPE_SHIFT if code == E.COMMAND_HARDWARE_ERROR else 0
        self.guest_log(slot, E.Event(code, flags=flags, address=gpa))

    def _execute(self, slot: GuestSlot, cmd: C.Command, gpa: int) -> bool:
        op = cmd.opcode
        hw = self.hw
        if op == C.COMPLETION_WAIT:
            if cmd.s:
                try:
                    hw.memory.write_u64(self.gpa(slot, cmd.address, True), cmd.data)
                except OSError:
                    self._stop(slot, E.COMMAND_HARDWARE_ERROR, gpa)
                    return False
            if cmd.i:
                self._status(slot, R.ST_COMWAIT_INT)
                slot.completion_interrupts += 1
        elif op == C.INVALIDATE_IOMMU_PAGES:
            hdom = self.hdomid(slot, cmd.domid)
            if hdom < 0:
                slot.dropped += 1
            else:
                from iommufd_amd.hw import NO_PASID

                hw.invalidate_pages(hdom, cmd.pasid if cmd.gn else NO_PASID, cmd.address, cmd.s)
        elif op == C.INVALIDATE_DEVTAB_ENTRY:
            hdev = self.hdevid(slot, cmd.devid)
            if hdev < 0:
                slot.dropped += 1
            else:
                hw.dte_cache.pop(hdev, None)
        elif op == C.INVALIDATE_IOTLB_PAGES:
            hdev = self.hdevid(slot, cmd.devid)
            dev = hw.devices.get(hdev) if hdev >= 0 else None
            if hdev < 0:
                slot.dropped += 1
            elif dev is None or not dev.ats:
                self.guest_log(slot, E.Event(E.IOTLB_INV_TIMEOUT, devid=cmd.devid, address=gpa))
            else:
                hw.device_iotlb_invalidations += 1
        return True

    # -- the guest event log --------------------------------------------------------------------
    def guest_log(self, slot: GuestSlot, ev: E.Event) -> bool:
        """Append ``ev`` to the guest's event log in guest RAM; False when it has none running."""
        ring = slot.ring(R.VFCTRL_EVT_CONTROL)
        if ring is None or not self.greg(slot, R.VF_STATUS) & R.ST_EVT_RUN:
            return False
        base, n = ring
        head = (self.greg(slot, R.VF_EVT_HEAD) // R.ENTRY_SIZE) % n
        tail = (self.greg(slot, R.VF_EVT_TAIL) // R.ENTRY_SIZE) % n
        if (tail - head) % n == n - 1:
            self._status(slot, R.ST_EVT_OVERFLOW)
            slot.events_lost += 1
            return True
        gpa = base + tail * R.ENTRY_SIZE
        try:
            self.hw.memory.write(self.gpa(slot, gpa, True), ev.to_bytes())
        except OSError:
            # The guest's log is outside its RAM: EVENT_TYPE_GUEST_EVENT_FAULT for the host
            # (model's fields: DeviceID = the guest DeviceID, tag = the guest ID, the GPA).
            slot.events_lost += 1
            self.hw.log_event(E.Event(E.GUEST_EVENT_FAULT, ev.devid, slot.gid, address=gpa))
            return True
        self.set_greg(slot, R.VF_EVT_TAIL, ((tail + 1) % n) * R.ENTRY_SIZE)
        self._status(slot, R.ST_EVT_INT)
        slot.events += 1
        return True

    def route_event(self, dte: Dte, ev: E.Event) -> bool:
        """A device event: when the device belongs to a guest, rewrite it with the guest
        DevID (and gDomID) into the guest's log and tell the host driver (vEVENTQ).
        True when the host event log must not get it."""
        if not dte.viommu_en or ev.code not in GUEST_EVENTS:
            return False
        slot = self.slots.get(dte.guest_id)
        if slot is None:
            return False
        tag = ev.tag if ev.flags & E.F_GN else slot.hdom_to_gdom.get(ev.tag, 0)
        gev = E.Event(ev.code, dte.gdev_id, tag, ev.flags, ev.address)
        written = self.guest_log(slot, gev)
        if self.hw.viommu_irq is not None:
            self.hw.viommu_irq(slot.gid, gev)
        return written
