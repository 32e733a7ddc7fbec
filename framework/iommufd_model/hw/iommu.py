"""The hardware side every vendor shares: an IOMMU instance that translates device DMA.

A vendor subclasses :class:`IommuHw` and implements :meth:`translate` by walking its own
in-memory structures. The DMA engine here turns translations into memory copies, one
translated page (of whatever size the walk found) at a time, so a 1 GiB page copies in one go.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import attrs

from iommufd_model.hw.compiled import load_walker
from iommufd_model.hw.iotlb import NEW_ENTRY, Iotlb
from iommufd_model.hw.memory import PAGE_SIZE, PhysicalMemory
from iommufd_model.hw.xlate import Front, Miss, Post, TlbCounts, Walk, Walker, stream_key
from iommufd_model.hw.xlate import HwStats as HwStats  # re-exported: the stats type
from iommufd_model.locking import locked

if TYPE_CHECKING:
    from iommufd_model.hw.pci import PageRequest, PciDevice
    from iommufd_model.ida import Ida
    from iommufd_model.machine import Machine


#: :meth:`IommuHw.iotlb_fast`'s answer: the IOTLB, the request's tag, the perm bits a hit needs
FastPath = tuple[Iotlb, Hashable, int]


class DmaFault(Exception):
    """A DMA the IOMMU refused; the hardware also logged it in its own fault/event record."""

    def __init__(
        self, dev: PciDevice, iova: int, write: bool, pasid: int | None, reason: str
    ) -> None:
        kind = "write" if write else "read"
        where = f" pasid {pasid}" if pasid is not None else ""
        super().__init__(f"DMA {kind} fault at {iova:#x}{where} from {dev.name}: {reason}")
        self.dev = dev
        self.iova = iova
        self.write = write
        self.pasid = pasid
        self.reason = reason


XLATE_MODULE = "iommufd_model.hw.xlate"
RUN_MODULE = "iommufd_model.hw.tlb_run"


class CacheDict(dict[Any, Any]):
    """A vendor's context cache (DTE, context/PASID entry, STE/CD cache) whose every change --
    a fill, an invalidation, a test clearing it -- makes the compiled translate front forget
    the request streams it knows (:class:`iommufd_model.hw.xlate.Front`), since their checks
    were read from it. Lookups stay the plain dict's."""

    def __init__(self, front: Front) -> None:
        super().__init__()
        self.front = front

    def __setitem__(self, key: Any, value: Any) -> None:
        self.front.forget()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.front.forget()
        super().__delitem__(key)

    def pop(self, key: Any, *default: Any) -> Any:
        self.front.forget()
        return super().pop(key, *default)

    def popitem(self) -> tuple[Any, Any]:
        self.front.forget()
        return super().popitem()

    def clear(self) -> None:
        self.front.forget()
        super().clear()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.front.forget()
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.front.forget()
        super().update(*args, **kwargs)


@attrs.define
class FaultRecord:
    """What the hardware logged for a fault, vendor-neutral (vendors log their own too)."""

    dev: str
    iova: int
    write: bool
    pasid: int | None
    reason: str


@attrs.define
class BurstRequest:
    """One DMA's translation in progress, page after page (:meth:`IommuHw.translate_run`,
    :meth:`IommuHw.dma_read`): who asks, which way, where it ends, the ``(pa, length)`` runs
    translated so far, and ``tables_only``: only walks that write no memory (no
    accessed/dirty updates) may run natively, as a read gathers bytes before it copies them.
    The model's own record (the hardware sees one request a page)."""

    dev: PciDevice
    pasid: int | None
    write: bool
    end: int
    runs: list[tuple[int, int]]
    tables_only: bool = False


class IommuHw:
    """One IOMMU instance: owns the devices behind it and translates their DMA."""

    #: entry-point name of the driver that owns this instance (routing key)
    driver_name: str = ""

    def __init__(self, machine: Machine, index: int) -> None:
        self.machine = machine
        self.memory: PhysicalMemory = machine.memory
        self.index = index
        self.devices: dict[int, PciDevice] = {}
        # The compiled front (or its pure source under IOMMUFD_MODEL_PURE=1, chosen when the
        # instance is built) answers translate() for request streams the vendor recorded
        # (IOTLB hits); everything else reaches the vendor's own translate() as before.
        self.xlate = xlate = load_walker(XLATE_MODULE)
        self.stats: HwStats = xlate.HwStats()
        self.front: Front = xlate.Front(self.stats, type(self).translate.__get__(self))
        #: the compiled IOTLB runs (or their pure source), for a burst's walks (:meth:`walk_run`)
        self.burst = load_walker(RUN_MODULE)
        vars(self)["translate"] = self.front.translate
        self.fault_log: list[FaultRecord] = []
        # The driver's ID spaces (``Ida(..., owner=self)``): the kit checks none leaks.
        self.id_spaces: list[Ida] = []
        #: the driver's per-instance state, set by its ``probe`` hook and read back with
        #: :func:`iommufd_model.driver.driver_state` (the hardware never looks at it)
        self.driver_state: Any = None

    @property
    def name(self) -> str:
        return f"{self.driver_name}{self.index}"

    def translate(
        self, dev: PciDevice, iova: int, pasid: int | None, write: bool
    ) -> tuple[int, int]:
        """Translate one access: ``(pa, run)`` where ``run`` bytes from ``pa`` stay contiguous.

        Raise :class:`DmaFault` (after logging it) when the access is not allowed.
        """
        raise NotImplementedError

    def front_miss(
        self,
        walk: Walk,
        post: Post,
        iotlb: Iotlb,
        prot_mask: int,
        need: tuple[int, int],
        extra: tuple[int, int],
        *,
        clamp: bool,
    ) -> Miss:
        """How the compiled front walks and caches a stream's IOTLB misses into ``iotlb``
        (:class:`iommufd_model.hw.xlate.Miss`: the rules of the vendor's own translate(),
        ``post`` for the rest), for :meth:`Front.learn`."""
        return self.xlate.Miss(  # type: ignore[no-any-return]
            walk,
            post,
            iotlb._fifo,
            iotlb.capacity,
            prot_mask,
            need,
            extra,
            self.memory.size,
            clamp,
        )

    def bind_walk(
        self, walker: Walker, ctx: tuple[object, ...], *, read_writes: bool = True
    ) -> Walk:
        """``walker`` (a vendor walker's bound entry) bound to a stream's table fields
        (:class:`iommufd_model.hw.xlate.Walk`), in this instance's build of the front
        (compiled, or pure under ``IOMMUFD_MODEL_PURE=1``); ``read_writes``: whether a
        read's walk may write memory (accessed bits), for :meth:`burst_walks_write`."""
        return self.xlate.Walk(walker, ctx, read_writes)  # type: ignore[no-any-return]

    def fault(
        self, dev: PciDevice, iova: int, write: bool, pasid: int | None, reason: str
    ) -> DmaFault:
        """Log a fault and build the exception to raise; vendors override to write event logs."""
        self.stats.faults += 1
        self.fault_log.append(FaultRecord(dev.name, iova, write, pasid, reason))
        return DmaFault(dev, iova, write, pasid, reason)

    def page_request(self, dev: PciDevice, req: PageRequest) -> bool:
        """The one entry of a device's PCIe page request (:meth:`PciDevice.page_request`):
        the vendor writes ``req`` into its own queue in its own format -- AMD's PPR log,
        VT-d's page request queue, SMMUv3's PRI queue -- and raises the interrupt its
        driver's handler runs on; the driver answers through its ``page_response`` hook.
        Returns whether the request was queued (False: refused or lost, the vendor's
        registers say which). An IOMMU without a page request interface loses every request:
        this default, which vendors with one override (taking the model lock)."""
        return False

    def iotlb_fast(self, dev: PciDevice, pasid: int | None, write: bool) -> FastPath | None:
        """How this device's requests hit the IOTLB, for the rest of a burst after a first
        successful :meth:`translate` of it: ``(iotlb, tag, need)`` -- a hit needs every bit
        of ``need`` in the entry's ``perm`` -- or None (no IOTLB on this path, or no fast
        path). Valid until the next full translation: only the IOTLB may be consulted on the
        way (:meth:`translate_run`)."""
        return None

    def walk_run(self, req: BurstRequest, iova: int) -> int:
        """Pages from ``iova`` towards ``req.end`` that the IOTLB holds nothing for, walked
        and cached natively as :meth:`translate` would (same answers, IOTLB fills and
        statistics), within a burst after a successful :meth:`translate` of ``req.dev``: their
        runs go to ``req.runs``; returns the first address not translated (``iova`` when there
        is no such path). Stops before any page that would fault, hit the IOTLB, or need what
        only :meth:`translate` does (``req.tables_only``: one that writes memory).

        This default walks with what the vendor taught the compiled translate front for the
        request stream (``Front.learn``'s :class:`~iommufd_model.hw.xlate.Miss`: the bound
        walker and the rules of its own translate() for a clean walk), in one compiled loop
        (``tlb_run.walk_run``): the same walk, fill and answer as the front's per-call miss,
        page after page. A vendor with a walk of its own for bursts overrides it."""
        streams = self.front.streams
        if not streams:  # nothing learnt (or a vendor that never learns): no ``dev.rid``
            return iova
        stream = streams.get(stream_key(req.dev.rid, req.pasid))
        if stream is None:
            return iova
        miss = stream.miss
        if miss is None or (req.tables_only and self.burst_walks_write(miss.walk)):
            return iova
        rule = (
            miss.prot_mask,
            miss.need_read,
            miss.need_write,
            miss.extra_read,
            miss.extra_write,
            miss.mem_end,
            miss.clamp,
        )
        walks, refs, stop = self.burst.walk_run(
            stream.tables,
            miss.fifo,
            miss.capacity,
            stream.tag,
            miss.walk,
            NEW_ENTRY,
            rule,
            iova,
            req.end,
            req.write,
            req.runs,
        )
        self.count_walks(stream.counts, walks, refs)
        return int(stop)

    def count_walks(self, counts: TlbCounts, walks: int, refs: int) -> None:
        """A burst's ``walks`` IOTLB misses (``counts``: the IOTLB's counters), walked with
        ``refs`` memory reads in all, counted as :meth:`translate` counts each."""
        counts.misses += walks
        stats = self.stats
        stats.translations += walks
        stats.iotlb_misses += walks
        stats.walk_mem_refs += refs

    def burst_walks_write(self, walk: Walk) -> bool:
        """Whether a read's walks with ``walk`` (a stream's bound walker, from
        :meth:`front_miss`) may write memory (accessed bits): such reads leave their misses
        to :meth:`translate`. The vendor says so when it binds the walk
        (:meth:`bind_walk`'s ``read_writes``, True unless it knows better)."""
        return walk.read_writes

    @locked
    def translate_run(
        self, dev: PciDevice, iova: int, n: int, pasid: int | None, write: bool
    ) -> list[tuple[int, int]]:
        """Translate the ``n`` bytes from ``iova`` as ``(pa, length)`` runs, in order.

        Behaves as :meth:`translate` page after page (same faults, same statistics); IOTLB
        hits after the first page are looked up natively (:meth:`iotlb_fast`).
        """
        return self._translate_run(dev, iova, n, pasid, write)

    def _translate_run(
        self, dev: PciDevice, iova: int, n: int, pasid: int | None, write: bool
    ) -> list[tuple[int, int]]:
        req = BurstRequest(dev, pasid, write, iova + n, [])
        end = req.end
        while iova < end:
            iova = self._translate_one(req, iova)
            if iova < end:
                iova = self._hits(req, iova)
        return req.runs

    def _translate_one(self, req: BurstRequest, iova: int) -> int:
        """One full translation (walk and fault included): its run goes to ``req.runs``."""
        pa, run = self.translate(req.dev, iova, req.pasid, req.write)
        chunk = min(req.end - iova, run)
        req.runs.append((pa, chunk))
        return iova + chunk

    def _hits(self, req: BurstRequest, iova: int) -> int:
        """IOTLB hits and native walks (:meth:`walk_run`) from ``iova`` on, after a full
        translation: the address they reach."""
        fast = self.iotlb_fast(req.dev, req.pasid, req.write)
        if fast is None:
            return iova
        iotlb, tag, need = fast
        stats = self.stats
        end = req.end
        runs = req.runs
        while True:
            hits, stop = iotlb.hit_run(tag, iova, end, need, self.memory.size, runs)
            stats.translations += hits
            stats.iotlb_hits += hits
            if stop >= end:
                return stop
            # A miss: the vendor's native walks, as long as its translate() would only walk.
            iova = self.walk_run(req, stop)
            if iova == stop:
                return stop

    # -- the DMA engine -----------------------------------------------------------------
    @locked
    def dma_read(self, dev: PciDevice, iova: int, n: int, pasid: int | None) -> bytes:
        # The runs of a first translation and the hits and native walks after it are copied
        # out at once (one copy of every byte: ``PhysicalMemory.read_runs``), before the next
        # full translation: that one may walk and set A/D bits in memory an earlier run
        # covers, and the device read those bytes before it.
        parts: list[bytes] = []
        req = BurstRequest(dev, pasid, False, iova + n, [], tables_only=True)
        runs = req.runs
        read_runs = self.memory.read_runs
        end = req.end
        while iova < end:
            iova = self._translate_one(req, iova)
            if iova < end:
                iova = self._hits(req, iova)
            parts.append(read_runs(runs))
            runs.clear()
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    @locked
    def dma_write(
        self, dev: PciDevice, iova: int, data: bytes | bytearray | memoryview, pasid: int | None
    ) -> None:
        # Translate everything first: a faulting DMA must not have written a prefix.
        # ``bytes(data)`` (no copy for bytes) freezes the source: it may alias the target memory.
        runs = self._translate_run(dev, iova, len(data), pasid, True)
        src = bytes(data)
        write = self.memory.write_from
        pos = 0
        for pa, chunk in runs:
            write(pa, src, pos, chunk)
            pos += chunk

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "driver": self.driver_name, "devices": len(self.devices)}


def page_run(iova: int, page_size: int = PAGE_SIZE) -> int:
    """Bytes from ``iova`` to the end of its naturally aligned page of ``page_size``."""
    return page_size - (iova & (page_size - 1))
