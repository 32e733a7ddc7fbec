"""Start one run: a machine, its model server, the program under the preload library."""

from __future__ import annotations

import os
import resource
import secrets
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import attrs

from iommufd_model import vfio
from iommufd_model.machine import Machine
from iommufd_model.plugins import DriverRegistry
from iommufd_model.run.server import Opener, Server, spin_us_of
from iommufd_model.run.sysfs import SysfsView, TreeFn, WriteFn
from iommufd_model.vfio import sysfs as vfio_sysfs

#: the fault-injection knobs iommufd_fail_nth sets up under /sys/kernel/debug, which the
#: preload redirects to a private directory of the run
_DEBUGFS_FILES = (
    "failslab/ignore-gfp-wait",
    "failslab/verbose",
    "fail_page_alloc/ignore-gfp-wait",
    "fail_page_alloc/ignore-gfp-highmem",
    "fail_page_alloc/verbose",
    "fail_iommufd/verbose",
)


def preload_path() -> Path:
    """The preload library built with the package (setup.py compiles run/preload.c)."""
    here = Path(__file__).parent
    for suffix in EXTENSION_SUFFIXES:
        lib = here / f"_preload{suffix}"
        if lib.exists():
            return lib
    raise FileNotFoundError(
        f"the preload library is missing in {here}: reinstall iommufd-model (needs gcc)"
    )


@attrs.frozen
class DeviceSpec:
    """``--device KIND@IOMMU[:OPT=VALUE...]``: a modelled PCI function of ``kind`` behind
    ``iommu`` (a driver name: its first instance; or an instance index), with the kind's
    factory options (``generic@amd:total_vfs=2``: an SR-IOV PF)."""

    kind: str
    iommu: str
    opts: tuple[tuple[str, int | str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> list[DeviceSpec]:
        """``ioat@amd,dsa@intel_vtd`` -> two specs; ValueError on a malformed one."""
        specs = []
        for part in text.split(","):
            kind, at, rest = part.strip().partition("@")
            iommu, *options = rest.split(":")
            if not kind or not at or not iommu:
                raise ValueError(f"--device {part!r}: expected KIND@IOMMU (e.g. ioat@amd)")
            opts: list[tuple[str, int | str]] = []
            for opt in options:
                name, eq, value = opt.partition("=")
                if not name or not eq:
                    raise ValueError(f"--device {part!r}: option {opt!r} is not NAME=VALUE")
                opts.append((name, int(value, 0) if value.isdigit() else value))
            specs.append(cls(kind, iommu, tuple(opts)))
        return specs


def iommus_for(iommus: Sequence[str] | None, specs: Sequence[DeviceSpec]) -> list[str]:
    """The run's IOMMU instances: ``--iommu`` as given, else one instance of each driver the
    devices name (in order), else the mock."""
    if iommus:
        return list(iommus)
    named = [s.iommu for s in specs if not s.iommu.isdigit()]
    return list(dict.fromkeys(named)) or ["mock"]


def build_machine(
    iommus: Sequence[str],
    devices: int,
    registry: DriverRegistry | None = None,
    functions: Sequence[DeviceSpec] = (),
) -> Machine:
    """The run's machine: one instance per ``--iommu``, ``devices`` plain DMA-capable PCI
    devices behind each, then the modelled functions of ``functions`` in order (their BDFs
    follow from that order: ``Machine.add_pci_function``)."""
    machine = Machine.build(list(iommus), registry=registry)
    for index in range(len(machine.iommus)):
        for _ in range(devices):
            machine.add_pci_device(index)
    for spec in functions:
        if spec.iommu.isdigit():
            index = int(spec.iommu)
        else:
            names = [hw.driver_name for hw in machine.iommus]
            if spec.iommu not in names:
                raise ValueError(f"--device {spec.kind}@{spec.iommu}: no {spec.iommu} IOMMU")
            index = names.index(spec.iommu)
        if not 0 <= index < len(machine.iommus):
            raise ValueError(f"--device {spec.kind}@{spec.iommu}: no IOMMU instance {index}")
        opts: dict[str, Any] = dict(spec.opts)
        try:
            machine.add_pci_function(spec.kind, index, **opts)
        except TypeError as exc:
            raise ValueError(f"--device {spec.kind}@{spec.iommu}: {exc}") from None
    return machine


def run_program(
    argv: Sequence[str],
    *,
    iommus: Sequence[str] = ("mock",),
    devices: int = 0,
    env: dict[str, str] | None = None,
    registry: DriverRegistry | None = None,
    log: Any = None,
    machine: Machine | None = None,
    openers: Sequence[tuple[str, Opener]] | None = None,
    sysfs: tuple[TreeFn, WriteFn] | None = None,
    append_bdfs: bool = False,
) -> tuple[int, Server]:
    """Run ``argv`` to completion; returns (exit status as a shell gives it, the server).

    ``openers`` are ``(path prefix, opener)`` pairs: ``open()`` of a path under a prefix is
    served by the model (the first opener that knows the path), every other path by the
    kernel; by default VFIO's (``/dev/vfio/...``, :func:`iommufd_model.vfio.open_path`).
    ``sysfs`` is the model's sysfs (its tree and its attribute writes), seen by the program
    in place of the host's (run/sysfs.py); by default VFIO's view of the machine's functions.

    The program finds the machine's modelled PCI functions as the kernel's VFIO selftests
    do: ``VFIO_SELFTESTS_BDF`` names the first (unless the environment sets it), and with
    ``append_bdfs`` every BDF is appended to ``argv``."""
    if machine is None:
        machine = build_machine(iommus, devices, registry)
    if openers is None:
        openers = [(vfio.VFIO_DIR + "/", vfio.open_path)]
    if sysfs is None:
        sysfs = (vfio_sysfs.tree, vfio_sysfs.write)
    bdfs = [fn.bdf for fn in machine.pci_functions()]
    if append_bdfs:
        argv = [*argv, *bdfs]
    # the server keeps a descriptor per file the program shares with it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    run = secrets.token_hex(8)
    server = Server(
        machine, run, f"iommufd-model-server/{run}", log=log, openers=[op for _, op in openers]
    )
    child_env = dict(os.environ if env is None else env)
    lib = str(preload_path())
    old = child_env.get("LD_PRELOAD")
    child_env["LD_PRELOAD"] = f"{lib} {old}" if old else lib
    child_env["IOMMUFD_MODEL_SOCK"] = f"iommufd-model-server/{run}"
    child_env["IOMMUFD_MODEL_RUN"] = run
    if bdfs:
        child_env.setdefault("VFIO_SELFTESTS_BDF", bdfs[0])
    child_env["IOMMUFD_MODEL_PATHS"] = "\n".join(dict.fromkeys(prefix for prefix, _ in openers))
    with tempfile.TemporaryDirectory(prefix="iommufd-model-run-") as tmp:
        debugfs = Path(tmp, "debugfs")
        for rel in _DEBUGFS_FILES:
            path = debugfs / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("1\n")
        child_env["IOMMUFD_MODEL_DEBUGFS"] = str(debugfs)
        try:
            spin = Path(tmp, "spin")
            child_env.update(server.share_spin_page(str(spin), spin_us_of(child_env)))
            if sysfs is not None:
                view = SysfsView(machine, Path(tmp, "sysfs"), *sysfs)
                server.openers.append(view.open)
                child_env["IOMMUFD_MODEL_VIEW"] = str(view.root)
                child_env["IOMMUFD_MODEL_VIEW_PREFIXES"] = "\n".join(view.prefixes())
            proc = subprocess.Popen(
                list(argv),
                env=child_env,
                # the program gets the descriptor limit it would have had
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
            )
        except BaseException:
            server.close()
            raise
        try:
            server.serve_until(lambda: proc.poll() is not None)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            proc.wait()
        finally:
            server.close()
    rc = proc.returncode
    return (128 - rc if rc < 0 else rc), server
