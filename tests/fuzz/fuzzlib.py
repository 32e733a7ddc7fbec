"""The byte-level fuzz kit: worlds to put raw bytes in, the checks every harness applies, the
outcome signatures and the corpus on disk.

A harness (see :mod:`harnesses`) takes raw bytes, places them where the hardware or the driver
reads them, triggers the consumer and returns an *outcome signature*: a short string such as
``"ok,ok,F:not-present,..."`` or ``"EINVAL"``. The corpus manifest pins that signature per
input, so a replay catches behaviour changes, not only crashes. A check that fails raises
:class:`FuzzBug` (an ``AssertionError``); any exception other than ``OSError`` (from a uAPI
call or the VMM's emulation) or ``DmaFault`` (from a DMA) propagates as a bug too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

os.environ.setdefault("IOMMUFD_MODEL_STRICT", "1")  # a model bug raises instead of EIO

HERE = Path(__file__).resolve().parent
for _p in (HERE, HERE.parent, HERE.parent / "robustness"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import iommufd_model as im  # noqa: E402
from iommufd_model.hw.iommu import DmaFault, IommuHw  # noqa: E402
from iommufd_model.hw.memory import PAGE_SHIFT, PAGE_SIZE  # noqa: E402
from iommufd_model.hw.pci import PciDevice  # noqa: E402
from iommufd_model.vmm import GuestDomain, Vm  # noqa: E402

CORPUS = HERE / "corpus"
MANIFEST = CORPUS / "manifest.json"
MIB = 1 << 20
RAM = 8 * MIB
POOL = 2 * MIB
PASID = 5  # the PASID of the PASID-tagged harnesses
VIRT_ID = 0x18
IOVA = 0x4000_0000
BUF = 4 * PAGE_SIZE
#: the accesses every translation harness tries: (iova, write)
PROBES = ((IOVA, False), (IOVA + PAGE_SIZE, True), (IOVA + 3 * PAGE_SIZE + 8, False),
          (IOVA + 2 * MIB, True))  # fmt: skip
MAX_INPUT = 512
VICTIM = 16 * PAGE_SIZE


class FuzzBug(AssertionError):
    """A harness check failed: the model did something no input may make it do."""


# -- outcome signatures ---------------------------------------------------------------------------
_NUM = re.compile(r"0x[0-9a-fA-F]+|\b\d+\b")


def reason_class(reason: str) -> str:
    """A fault reason without its addresses and numbers (the signature must not depend on
    where the fuzz pointed, only on what kind of outcome it produced)."""
    return _NUM.sub("#", reason)[:48]


def errno_sig(exc: OSError) -> str:
    code = exc.errno
    if not isinstance(code, int) or code not in errno.errorcode:
        raise FuzzBug(f"OSError without a kernel errno: {exc!r}")
    return errno.errorcode[code]


def guarded(fn: Callable[[], object]) -> str:
    """Run a uAPI call or a VMM emulation step: ``ok`` or the errno name. Anything else that
    escapes is a bug and propagates."""
    try:
        fn()
    except OSError as exc:
        return errno_sig(exc)
    return "ok"


# -- the worlds -----------------------------------------------------------------------------------
class World:
    """What every world offers the checks: a machine, a device to probe with and the set of
    host frames its translations may land in (None: anywhere in memory, for host-owned
    formats the kernel writes)."""

    machine: Any
    hw: IommuHw
    dev: PciDevice
    allowed: frozenset[int] | None
    pasid: int | None = None

    victim: dict[int, bytes]

    def _make_victim(self) -> None:
        """A bystander process's memory (another VM's RAM) that no fuzz may touch."""
        proc = self.machine.new_process()
        va = proc.mmap(VICTIM)
        proc.write(va, bytes(range(251)) * (VICTIM // 251) + bytes(VICTIM % 251))
        mem = self.machine.memory
        self.victim = {
            pfn: bytes(mem._pages[pfn])
            for pfn in (proc.translate(va + off) for off in range(0, VICTIM, PAGE_SIZE))
        }

    def probe(self) -> str:
        """Translate every :data:`PROBES` access: ``ok`` or the fault's reason class. A
        translation outside the allowed frames (or outside memory) is a :class:`FuzzBug`."""
        out = []
        size = self.machine.memory.size
        for iova, write in PROBES:
            try:
                pa, run = self.hw.translate(self.dev, iova, self.pasid, write)
            except DmaFault as exc:
                out.append("F:" + reason_class(exc.reason))
                continue
            if run <= 0 or pa < 0 or pa + 1 > size:
                raise FuzzBug(f"translation of {iova:#x} to {pa:#x}+{run:#x} outside memory")
            if self.allowed is not None:
                last = min(run, 2 * MIB) - 1
                for pfn in range(pa >> PAGE_SHIFT, ((pa + last) >> PAGE_SHIFT) + 1):
                    if pfn not in self.allowed:
                        raise FuzzBug(f"{iova:#x} translated to {pa:#x}: frame {pfn:#x} "
                                      "is not the VM's")  # fmt: skip
            out.append("ok")
        return ",".join(out)

    def events(self) -> str:
        """The vendor's hardware records since the last call (event log / fault records)."""
        hw: Any = self.hw
        if hasattr(hw, "read_events"):  # AMD: the event log
            codes = {ev.code for ev in hw.read_events()}
        elif hasattr(hw, "records"):  # VT-d: the fault records
            codes = {r.reason for r in hw.records}
            hw.records.clear()
        else:  # SMMUv3: the event queue
            codes = {ev.id for ev in hw.events}
            hw.events.clear()
        return "ev" + ".".join(f"{c:x}" for c in sorted(codes))

    @contextmanager
    def isolation(self) -> Iterator[None]:
        """Check (2): the bystander's memory is unchanged and no free frame got written (a
        hardware write the fuzz aimed outside every allocation). Kernel-owned frames (its
        tables, queues, logs) change legitimately and are not compared."""
        if self.allowed is None:  # host-owned formats: the kernel may point anywhere
            yield
            return
        mem = self.machine.memory
        before = set(mem._pages)
        yield
        for pfn, data in self.victim.items():
            if bytes(mem._pages.get(pfn, b"")) != data:
                raise FuzzBug(f"bystander frame {pfn:#x} changed")
        for pfn in set(mem._pages) - before:
            if not mem.frame_refs(pfn) and any(mem._pages[pfn]):
                raise FuzzBug(f"free frame {pfn:#x} was written")


class GuestWorld(World):
    """A VM with the vendor's guest IOMMU, one passed-through device and a guest domain that
    maps :data:`BUF` bytes at :data:`IOVA` -- the two_vms_isolated hostile guest, alone."""

    def __init__(
        self,
        driver: str,
        *,
        accelerated: bool = False,
        options: dict[str, Any] | None = None,
        pasid: int | None = None,
    ) -> None:
        self.machine = m = im.Machine.build(iommus=[driver], options=options or {})
        self.hw = m.iommus[0]
        self.vm = vm = Vm(m, RAM, table_pool=POOL)
        self.g: Any = vm.viommu(self.hw, accelerated=accelerated)
        self.gdev = self.g.add_device(m.add_pci_device(iommu=0), VIRT_ID)
        self.dev = self.gdev.dev
        self.dom: GuestDomain = self.g.attach(self.gdev)
        self.buf = vm.alloc_buffer(BUF)
        self.g.map(self.dom, IOVA, self.buf, BUF)
        self.g.invalidate(self.dom)
        if pasid is not None:  # a second guest domain on that PASID: the probes use it
            self.pdom: GuestDomain = self.g.attach(self.gdev, pasid=pasid)
            self.g.map(self.pdom, IOVA, self.buf, BUF)
            self.g.invalidate(self.pdom)
            self.pasid = pasid
        #: a zeroed guest page a fuzzed pointer can name (its GPA is the same in every run)
        self.spare = vm.memory.alloc_frame() << PAGE_SHIFT
        self.allowed = frozenset(
            vm.vmm.translate(vm.ram_va + off) for off in range(0, RAM, PAGE_SIZE)
        )
        self._make_victim()
        self.events()  # start from an empty log

    @property
    def gmem(self) -> Any:
        return self.vm.memory

    def path_tables(self, root: int, fmt: Any, iova: int = IOVA) -> list[int]:
        """The guest table pages the walk of ``iova`` reads, root first (guest addresses)."""
        return walk_path(self.gmem, root, fmt, iova)


# The AMD host corpus was grown on v1 tables of Mode 4, the model's fixed depth before v1
# domains started at generic_pt's Mode 3 and grew on demand; its inputs (planted PDEs, DTE
# roots) keep their meaning on that start.
HOST_OPTIONS: dict[str, dict[str, Any]] = {"amd": {"domain_levels": 4}}


class HostWorld(World):
    """A plain process DMA setup: an IOAS with :data:`BUF` bytes at :data:`IOVA`, the device
    attached to a paging HWPT. Host formats are the kernel's: translations may go anywhere
    in memory, so only "inside memory" and "no other exception" are checked."""

    def __init__(self, driver: str, *, nest_parent: bool = False) -> None:
        options = {driver: HOST_OPTIONS[driver]} if driver in HOST_OPTIONS else None
        self.machine = m = im.Machine.build(iommus=[driver], options=options)
        self.hw = m.iommus[0]
        self.dev = m.add_pci_device(iommu=0)
        self.proc = p = m.new_process()
        self.fd = fd = p.open_iommufd()
        self.dev_id = fd.bind(self.dev)
        self.ioas = fd.ioas_alloc()
        va = p.mmap(BUF)
        p.write(va, bytes(range(256)) * (BUF // 256))
        fd.ioas_map(self.ioas, va, BUF, iova=IOVA)
        flags = 1 if nest_parent else 0  # IOMMU_HWPT_ALLOC_NEST_PARENT
        self.hwpt = fd.hwpt_alloc(self.dev_id, self.ioas, flags=flags)
        fd.attach(self.dev_id, self.hwpt)
        self.dev.dma_read(IOVA, 8)
        self.spare = m.memory.alloc_frame() << PAGE_SHIFT
        self.allowed = None
        self.events()


def walk_path(mem: Any, root: int, fmt: Any, iova: int) -> list[int]:
    """Table pages on the walk of ``iova`` from ``root`` in ``fmt`` (a radix PtFormat)."""
    from iommufd_model.hw.radix import TABLE

    out = []
    table = root
    for level in range(fmt.levels - 1, -1, -1):
        out.append(table)
        kind, addr, _prot = fmt.decode(mem.read_u64(table + fmt.index(iova, level) * 8), level)
        if kind != TABLE:
            break
        table = addr
    return out


def words(data: bytes, n: int | None = None) -> list[int]:
    """``data`` as little-endian u64 words (zero padded), ``n`` of them when given."""
    count = n if n is not None else -(-len(data) // 8)
    raw = data.ljust(count * 8, b"\0")[: count * 8]
    return [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]


def plant_path(mem: Any, tables: list[int], fmt: Any, data: bytes, spare: int,
               iova: int = IOVA) -> None:  # fmt: skip
    """The page-table placement: word ``i`` of ``data`` replaces the entry the walk of
    ``iova`` reads in path table ``i`` (root first); the words left over are tiled over the
    ``spare`` page, which a fuzzed entry may point to (loops, tables elsewhere)."""
    ws = words(data)
    levels = fmt.levels
    for i, table in enumerate(tables):
        if i < len(ws):
            mem.write_u64(table + fmt.index(iova, levels - 1 - i) * 8, ws[i])
    rest = ws[len(tables) :]
    if rest:
        page = b"".join(w.to_bytes(8, "little") for w in rest) * (512 // len(rest) + 1)
        mem.write(spare, page[:PAGE_SIZE])


def plant_words(mem: Any, slots: list[int], data: bytes, spare: int) -> None:
    """Word ``i`` of ``data`` at address ``slots[i]``; the rest tiled over ``spare``."""
    ws = words(data)
    for slot, w in zip(slots, ws, strict=False):
        mem.write_u64(slot, w)
    rest = ws[len(slots) :]
    if rest:
        page = b"".join(w.to_bytes(8, "little") for w in rest) * (512 // len(rest) + 1)
        mem.write(spare, page[:PAGE_SIZE])


# -- harness registry -----------------------------------------------------------------------------
@attrs.frozen
class Harness:
    """One (vendor, format): ``run(bytes) -> signature`` and the seed inputs."""

    vendor: str
    fmt: str
    run: Callable[[bytes], str]
    seeds: Callable[[], list[bytes]]
    size: int  # the input's natural length in bytes (longer inputs are truncated to MAX_INPUT)
    doc: str

    @property
    def key(self) -> str:
        return f"{self.vendor}/{self.fmt}"


REGISTRY: dict[str, Harness] = {}


def harness(vendor: str, fmt: str, size: int, seeds: Callable[[], list[bytes]]
            ) -> Callable[[Callable[[bytes], str]], Callable[[bytes], str]]:  # fmt: skip
    def deco(fn: Callable[[bytes], str]) -> Callable[[bytes], str]:
        h = Harness(vendor, fmt, lambda data: fn(data[:MAX_INPUT]), seeds, size,
                    (fn.__doc__ or "").strip().split("\n")[0])  # fmt: skip
        REGISTRY[h.key] = h
        return fn

    return deco


# -- the corpus -----------------------------------------------------------------------------------
def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


def load_manifest() -> dict[str, dict[str, str]]:
    """``{"vendor/format": {"<sha1-prefix>": signature}}``."""
    if not MANIFEST.exists():
        return {}
    data: dict[str, dict[str, str]] = json.loads(MANIFEST.read_text())
    return data


def save_manifest(manifest: dict[str, dict[str, str]]) -> None:
    ordered = {k: dict(sorted(v.items())) for k, v in sorted(manifest.items())}
    MANIFEST.write_text(json.dumps(ordered, indent=1) + "\n")


def corpus_path(key: str, name: str) -> Path:
    return CORPUS / key / f"{name}.bin"


def corpus_entries() -> list[tuple[str, str, str]]:
    """Every ``(key, name, expected signature)`` in the manifest."""
    return [(k, n, s) for k, v in sorted(load_manifest().items()) for n, s in sorted(v.items())]


def add_to_corpus(manifest: dict[str, dict[str, str]], key: str, data: bytes, sig: str) -> str:
    name = digest(data)
    path = corpus_path(key, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    manifest.setdefault(key, {})[name] = sig
    return name


def u64s(*ws: int) -> bytes:
    return b"".join((w & (2**64 - 1)).to_bytes(8, "little") for w in ws)
