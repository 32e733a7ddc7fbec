"""The ``iommufd-model`` console script: list drivers, run the cross-vendor matrix.

Stdlib only (argparse, json, concurrent.futures): the runtime dependencies stay pluggy and attrs.
What ``--help`` shows is :data:`DESCRIPTION`, written for users.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from html import escape as esc
from pathlib import Path
from typing import Any

from iommufd_model import __version__
from iommufd_model.plugins import DriverRegistry, default_registry
from iommufd_model.scenarios import (
    FAIL,
    PASS,
    SCENARIOS,
    UNSUPPORTED,
    Scenario,
    ScenarioResult,
    run_scenario,
)
from iommufd_model.scenarios.base import COST_KEYS


def _problems(reg: DriverRegistry) -> list[dict[str, str]]:
    return [
        {"name": p.name, "distribution": p.distribution, "error": p.one_line_message()}
        for p in reg.problems
    ]


def _print_problems(reg: DriverRegistry) -> None:
    for p in reg.problems:
        print(f"BROKEN {p.line()}", file=sys.stderr)


def _cmd_drivers(args: argparse.Namespace, reg: DriverRegistry) -> int:
    rows = [
        {
            "name": e.name,
            "distribution": e.distribution,
            "version": e.version,
            "description": e.info.description,
            "features": sorted(f.value for f in e.info.features),
        }
        for e in reg.drivers.values()
    ]
    if args.json:
        print(json.dumps({"drivers": rows, "problems": _problems(reg)}, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<12} {r['distribution']} {r['version']}: {r['description']}")
            print(f"{'':<12} features: {', '.join(r['features'])}")
        _print_problems(reg)
    # A broken plugin is an installation error the user must see in the exit status too.
    return 0 if reg.drivers and not reg.problems else 1


class _Progress:
    """A one-line ``[n/total] scenario @ driver`` on stderr, only when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            width = 24
            filled = width * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {label:<48.48}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 90 + "\r")
            sys.stderr.flush()


def _select(
    names: list[str] | None, known: Sequence[str], what: str, broken: dict[str, str] | None = None
) -> list[str]:
    """The ``known`` names the user asked for (all without a filter), in ``known``'s order;
    a name that is not known ends the run with one line, naming why a broken plugin is."""
    if not names:
        return list(known)
    broken = broken or {}
    for n in names:
        if n in broken:
            raise SystemExit(f"iommufd-model: {what} {n} is installed but broken: {broken[n]}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(
            f"iommufd-model: unknown {what}(s): {', '.join(unknown)} (known: {', '.join(known)})"
        )
    return [n for n in known if n in names]


def _check_output(option: str, path: str | None) -> None:
    """Refuse, in one line and before any cell runs, an output file that cannot be written."""
    if path is None or path == "-":
        return
    target = Path(path)
    folder = target.parent
    why = ""
    if target.is_dir():
        why = "is a directory"
    elif not folder.is_dir():
        why = f"no such directory: {folder}"
    elif not os.access(target if target.exists() else folder, os.W_OK):
        why = "permission denied"
    if why:
        raise SystemExit(f"iommufd-model: cannot write {option} {path}: {why}")


def _jobs(value: str) -> int:
    """``-n auto`` (one process per CPU this process may use) or ``-n N``."""
    if value == "auto":
        return max(
            1,
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1,
        )
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("-n must be at least 1")
    return n


# -- the report: one Matrix, rendered as a text table, JSON and a self-contained HTML page ----
CELL = {PASS: "pass", FAIL: "FAIL", UNSUPPORTED: "unsupported"}
# The costs a table cell shows, compactly, with their one-letter units (all are in --json).
COMPACT = (
    ("traps", "t"),
    ("walk_mem_refs", "w"),
    ("iotlb_hits", "h"),
    ("iotlb_misses", "m"),
    ("commands", "c"),
)
LEGEND = (
    "costs: t VMM traps, w page-walk memory references, h/m IOTLB hits/misses, "
    "c commands processed, ms wall time (all summed over the cell's machines)"
)
# What the HTML chart plots: one panel per cost, a bar per driver per scenario.
CHART = (
    ("traps", "VMM traps"),
    ("walk_mem_refs", "page-walk memory refs"),
    ("iotlb_hits", "IOTLB hits"),
    ("iotlb_misses", "IOTLB misses"),
    ("commands", "commands processed"),
    ("wall_ms", "wall time (ms)"),
)
# Okabe-Ito colours without their vermillion and red-like hues: no driver's bar can be read
# as the red of a FAIL cell, and the set stays distinct for colour-blind readers.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#56b4e9", "#cc79a7", "#f0e442", "#000000")


@dataclasses.dataclass
class Matrix:
    """A finished run: the rows, the columns and every cell, in display order."""

    scenarios: list[Scenario]
    drivers: list[str]
    cells: dict[tuple[str, str], ScenarioResult]
    problems: list[dict[str, str]] = dataclasses.field(default_factory=list)
    jobs: int = 1
    wall_s: float = 0.0

    def cell(self, scenario: str, driver: str) -> ScenarioResult:
        return self.cells[scenario, driver]

    def to_json(self) -> dict[str, Any]:
        return {
            "drivers": self.drivers,
            "scenarios": [
                {"name": s.name, "doc": s.doc, "features": sorted(f.value for f in s.features)}
                for s in self.scenarios
            ],
            "cost_keys": [*COST_KEYS, "wall_s"],
            "cells": [c.to_json() for c in self.cells.values()],
            "problems": self.problems,
            "jobs": self.jobs,
            "wall_s": self.wall_s,
        }


def compact_number(n: int) -> str:
    return str(n) if n < 10_000 else f"{n // 1000}k" if n < 10_000_000 else f"{n // 10**6}M"


def cell_text(r: ScenarioResult) -> str:
    """``pass 0t 96w 3h 5m 0c 4ms``: the status, then the compact costs (none if unsupported)."""
    if r.status == UNSUPPORTED:
        return CELL[r.status]
    costs = " ".join(f"{compact_number(r.costs.get(k, 0))}{unit}" for k, unit in COMPACT)
    return f"{CELL[r.status]} {costs} {r.wall_s * 1000:.0f}ms"


def reasons(m: Matrix) -> list[str]:
    return [
        f"{r.scenario} @ {r.driver}: {CELL[r.status]}: {r.detail}"
        for r in m.cells.values()
        if r.status != PASS
    ]


def render_table(m: Matrix) -> str:
    names = [s.name for s in m.scenarios]
    first = max([len("scenario"), *map(len, names)])
    texts = {key: cell_text(r) for key, r in m.cells.items()}
    widths = [max([len(d), *(len(texts[s, d]) for s in names)]) for d in m.drivers]
    cols = list(zip(m.drivers, widths, strict=True))
    lines = ["  ".join([f"{'scenario':<{first}}", *(f"{d:<{w}}" for d, w in cols)]).rstrip()]
    lines.append("  ".join(["-" * first, *("-" * w for w in widths)]))
    for sc in names:
        row = [f"{sc:<{first}}", *(f"{texts[sc, d]:<{w}}" for d, w in cols)]
        lines.append("  ".join(row).rstrip())
    lines += ["", LEGEND]
    notes = reasons(m)
    if notes:
        lines += ["", "reasons:", *(f"  {n}" for n in notes)]
    return "\n".join(lines)


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
thead th{background:#f0f0f0}
td.pass{background:#e6f4e6}td.fail{background:#fbe0e0}td.unsupported{background:#f3f3f3;color:#777}
td .costs{display:block;font:12px monospace;color:#555}
.fail .st{font-weight:bold;color:#b00}
td .why{display:block;max-width:28em;font:12px monospace;color:#800;white-space:pre-wrap}
li{font-family:monospace}
svg text{font:11px system-ui,sans-serif}
"""


def _chart_value(r: ScenarioResult, key: str) -> float:
    return r.wall_s * 1000 if key == "wall_ms" else float(r.costs.get(key, 0))


def _bar_width(value: float, peak: float, width: float) -> float:
    """Log-scale bar length: costs span 1 to millions, so a linear bar would show only the
    largest cell; ``log(1 + v)`` keeps 0 at zero length and every non-zero cost visible."""
    return width * math.log1p(value) / math.log1p(peak)


def render_svg(m: Matrix) -> str:
    """Grouped horizontal bars (log scale): a panel per cost, a group per scenario, a bar per
    driver."""
    bar, gap, label_w, panel_w, top = 6, 8, 190, 150, 40
    group = bar * len(m.drivers) + gap
    height = top + group * len(m.scenarios) + 30
    width = label_w + panel_w * len(CHART) + 10
    colour = {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(m.drivers)}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="costs" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
        "<title>costs per vendor per scenario</title>",
    ]
    for i, s in enumerate(m.scenarios):
        y = top + i * group + group / 2
        out.append(f'<text x="{label_w - 6}" y="{y:.0f}" text-anchor="end">{esc(s.name)}</text>')
    for p, (key, title) in enumerate(CHART):
        x0 = label_w + p * panel_w
        supported = [r for r in m.cells.values() if r.status != UNSUPPORTED]
        peak = max([_chart_value(r, key) for r in supported] + [1.0])
        out.append(f'<text x="{x0 + 4}" y="{top - 22}" font-weight="bold">{esc(title)}</text>')
        out.append(f'<text x="{x0 + 4}" y="{top - 8}">max {peak:,.0f}, log scale</text>')
        out.append(f'<line x1="{x0}" y1="{top - 4}" x2="{x0}" y2="{height - 30}" stroke="#999"/>')
        for i, s in enumerate(m.scenarios):
            for j, d in enumerate(m.drivers):
                r = m.cell(s.name, d)
                if r.status == UNSUPPORTED:
                    continue
                v = _chart_value(r, key)
                w = _bar_width(v, peak, panel_w - 12)
                y = top + i * group + j * bar
                out.append(
                    f'<rect x="{x0 + 1}" y="{y}" width="{w:.1f}" height="{bar - 1}" '
                    f'fill="{colour[d]}"><title>{esc(s.name)} @ {esc(d)}: {title} '
                    f"{v:,.0f}</title></rect>"
                )
    for j, d in enumerate(m.drivers):
        x = label_w + j * 110
        out.append(f'<rect x="{x}" y="{height - 20}" width="10" height="10" fill="{colour[d]}"/>')
        out.append(f'<text x="{x + 14}" y="{height - 11}">{esc(d)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_html(m: Matrix) -> str:
    """A self-contained page: inline CSS, the table, the reasons, an inline SVG chart."""
    head = "".join(f"<th>{esc(d)}</th>" for d in m.drivers)
    rows = []
    for s in m.scenarios:
        tds = []
        for d in m.drivers:
            r = m.cell(s.name, d)
            costs = cell_text(r).split(" ", 1)[1] if r.status != UNSUPPORTED else esc(r.detail)
            why = f'<span class="why">{esc(r.detail)}</span>' if r.status == FAIL else ""
            tds.append(
                f'<td class="{r.status}" data-scenario="{esc(s.name)}" '
                f'data-driver="{esc(d)}" data-status="{r.status}">'
                f'<span class="st">{CELL[r.status]}</span>'
                f'<span class="costs">{costs}</span>{why}</td>'
            )
        rows.append(
            f'<tr><th scope="row" title="{esc(s.doc)}">{esc(s.name)}</th>{"".join(tds)}</tr>'
        )
    notes = "".join(f"<li>{esc(n)}</li>" for n in reasons(m)) or "<li>none</li>"
    docs = "".join(f"<dt>{esc(s.name)}</dt><dd>{esc(s.doc)}</dd>" for s in m.scenarios)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>iommufd-model matrix</title>
<style>{CSS}</style>
</head>
<body>
<h1>iommufd-model matrix</h1>
<p>{len(m.scenarios)} scenarios &times; {len(m.drivers)} drivers, {m.jobs} process(es),
{m.wall_s:.1f} s. {esc(LEGEND)}.</p>
<table id="matrix">
<thead><tr><th>scenario</th>{head}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
<h2>Reasons</h2>
<ul id="reasons">{notes}</ul>
<h2>Costs per vendor per scenario</h2>
{render_svg(m)}
<h2>Scenarios</h2>
<dl>{docs}</dl>
</body>
</html>
"""


# The registry the pool's workers run cells against. Workers are forked, so they inherit it
# (a hand-built registry in a test included); under spawn they load the installed drivers.
_WORKER_REGISTRY: DriverRegistry | None = None


def _run_cell(scenario: str, driver: str) -> ScenarioResult:
    return run_scenario(SCENARIOS[scenario], driver, _WORKER_REGISTRY)


def run_cells(
    scenarios: list[str],
    drivers: list[str],
    reg: DriverRegistry,
    jobs: int = 1,
    progress: _Progress | None = None,
) -> dict[tuple[str, str], ScenarioResult]:
    """Every (scenario, driver) cell, serially or in ``jobs`` processes; same results."""
    global _WORKER_REGISTRY
    todo = [(sc, drv) for sc in scenarios for drv in drivers]
    cells: dict[tuple[str, str], ScenarioResult] = {}
    if jobs <= 1 or len(todo) <= 1:
        for sc, drv in todo:
            cells[sc, drv] = run_scenario(SCENARIOS[sc], drv, reg)
            if progress:
                progress.step(f"{sc} @ {drv}")
        return cells
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    _WORKER_REGISTRY = reg
    try:
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx) as pool:
            futures = {pool.submit(_run_cell, sc, drv): (sc, drv) for sc, drv in todo}
            for fut in as_completed(futures):
                sc, drv = futures[fut]
                cells[sc, drv] = fut.result()
                if progress:
                    progress.step(f"{sc} @ {drv}")
    finally:
        _WORKER_REGISTRY = None
    return {key: cells[key] for key in todo}  # the serial order, whatever finished first


def _write(option: str, path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:  # checked before the run; this is what changed since
        raise SystemExit(f"iommufd-model: cannot write {option} {path}: {exc.strerror}") from None


def _json_target(args: argparse.Namespace) -> str | None:
    """Where ``--json`` goes: a FILE after ``matrix``, stdout for a bare ``--json``."""
    value = getattr(args, "json", False)
    return value if isinstance(value, str) else ("-" if value else None)


def _cmd_matrix(args: argparse.Namespace, reg: DriverRegistry) -> int:
    json_to = _json_target(args)
    _check_output("--json", json_to)
    _check_output("--html", args.html)
    if not reg.drivers:
        _print_problems(reg)
        print("iommufd-model: no driver could be loaded", file=sys.stderr)
        return 1
    broken = {p.name: p.one_line_message() for p in reg.problems}
    drivers = _select(args.driver, sorted(reg.drivers), "driver", broken)
    scenarios = _select(args.scenario, list(SCENARIOS), "scenario")
    progress = _Progress(len(drivers) * len(scenarios))
    start = time.perf_counter()
    cells = run_cells(scenarios, drivers, reg, args.jobs, progress)
    progress.close()
    matrix = Matrix(
        scenarios=[SCENARIOS[s] for s in scenarios],
        drivers=drivers,
        cells=cells,
        problems=_problems(reg),
        jobs=args.jobs,
        wall_s=time.perf_counter() - start,
    )
    if json_to is not None:
        _write("--json", json_to, json.dumps(matrix.to_json(), indent=2) + "\n")
    if args.html:
        _write("--html", args.html, render_html(matrix))
    if json_to != "-":
        print(render_table(matrix))
        _print_problems(reg)
    return 1 if any(c.status == FAIL for c in cells.values()) else 0


DESCRIPTION = """\
A model of Linux iommufd (/dev/iommu) and the IOMMU hardware behind it, with vendor drivers
as plugins. 'drivers' lists the installed driver plugins (and broken ones, with the reason);
'matrix' runs every scenario against every driver and prints pass / FAIL / unsupported with
the hardware costs of each cell; 'run' runs a program with /dev/iommu served by the model."""

EPILOG = """\
exit status: 0 on success; 1 when a matrix cell FAILs, no driver loads, an output file cannot
be written (checked before the run) or, for 'drivers', an installed plugin is broken; 2 for a
bad option; 'run' exits with the program's status (127 when it cannot start)."""


def _global_options(parser: argparse.ArgumentParser, *, sub: bool) -> None:
    """Options accepted before and after the subcommand. After it they default to
    SUPPRESS, so a value given before the subcommand is not reset by the subparser."""
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if sub else False,
        help="machine-readable output on stdout",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iommufd-model",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, sub=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_drivers = sub.add_parser(
        "drivers",
        help="list installed driver plugins and broken ones",
        description="List every installed driver plugin with its distribution, version and "
        "features; a plugin that failed to load is listed as BROKEN with the reason, and the "
        "exit status is then 1.",
    )
    _global_options(p_drivers, sub=True)
    p_drivers.set_defaults(func=_cmd_drivers)
    p_matrix = sub.add_parser(
        "matrix",
        help="run every scenario against every driver",
        description="Rows are scenarios, columns drivers; each cell is pass, FAIL or "
        "unsupported (with the feature and errno), with its costs.",
    )
    p_matrix.add_argument("--scenario", action="append", metavar="NAME", help="only this one")
    p_matrix.add_argument("--driver", action="append", metavar="NAME", help="only this one")
    p_matrix.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="all cells and costs as JSON, to FILE (the table still prints) or to stdout",
    )
    p_matrix.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    p_matrix.add_argument(
        "-n",
        dest="jobs",
        type=_jobs,
        default=1,
        metavar="auto|N",
        help="run cells in N worker processes (auto: one per CPU); default 1",
    )
    p_matrix.set_defaults(func=_cmd_matrix)
    p_run = sub.add_parser(
        "run",
        help="run a program with /dev/iommu served by the model",
        description="Runs an unmodified, dynamically linked PROGRAM with /dev/iommu (and "
        "the files it hands out) served by one model shared by all its processes; see "
        "docs/running-programs.md.",
    )
    p_run.add_argument(
        "--iommu",
        action="append",
        metavar="DRIVER",
        help="an IOMMU instance of DRIVER (repeatable; default: mock)",
    )
    p_run.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="plain DMA-capable PCI devices behind each IOMMU (default 1 without --device, else 0)",
    )
    p_run.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="KIND@IOMMU[,...]",
        help="a modelled PCI function (generic, ioat, dsa...) behind the first IOMMU of that "
        "driver or instance index (repeatable; the drivers named become the IOMMUs when "
        "--iommu is not given); the first one's BDF is exported as VFIO_SELFTESTS_BDF",
    )
    p_run.add_argument(
        "--bdf-args",
        action="store_true",
        help="append every modelled function's BDF to the program's arguments",
    )
    p_run.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS...]")
    p_run.set_defaults(func=_cmd_run)
    return parser


def _cmd_run(args: argparse.Namespace, reg: DriverRegistry) -> int:
    from iommufd_model.run.launch import DeviceSpec, build_machine, iommus_for, run_program

    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("iommufd-model run: no program given", file=sys.stderr)
        return 2
    devices = args.devices if args.devices is not None else 0 if args.device else 1
    if devices < 0:
        print("iommufd-model run: --devices must be >= 0", file=sys.stderr)
        return 2
    try:
        specs = [spec for text in args.device for spec in DeviceSpec.parse(text)]
        machine = build_machine(iommus_for(args.iommu, specs), devices, reg, specs)
    except (ValueError, OSError) as exc:
        print(f"iommufd-model run: {exc}", file=sys.stderr)
        return 2
    try:
        rc, _server = run_program(argv, machine=machine, append_bdfs=args.bdf_args)
    except OSError as exc:
        print(f"iommufd-model run: {exc}", file=sys.stderr)
        return 127
    return rc


def main(argv: Sequence[str] | None = None, registry: DriverRegistry | None = None) -> int:
    """Entry point; ``registry`` lets tests run the CLI over a hand-built set of drivers."""
    args = build_parser().parse_args(argv)
    reg = registry if registry is not None else default_registry()
    return int(args.func(args, reg))


if __name__ == "__main__":
    sys.exit(main())
