"""The ``iommufd-model`` console script: list drivers, run the cross-vendor matrix.

Stdlib only (argparse, json, concurrent.futures): the runtime dependencies stay pluggy and attrs.
What ``--help`` shows is :data:`DESCRIPTION`, written for users.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
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
)
from iommufd_model.scenarios.base import COST_KEYS
from iommufd_model.shards import (
    ShardResult,
    ShardSpec,
    ShardsUnavailable,
    machine_module,
    run_shard,
    shard_specs,
)
from iommufd_model.sweep import (
    ClusterError,
    Column,
    Progress,
    cell_specs,
    columns,
    default_jobs,
    execute,
    run_cell,
)


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
        return default_jobs()
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
    """A finished run: the rows, the columns and every cell, in display order.

    A column is a driver under one configuration (:class:`~iommufd_model.sweep.Column`):
    a plain run has one per driver (its defaults), a ``--sweep`` one per declared option set
    too, shown as one table per driver. Cells are keyed by (scenario, column label).
    """

    scenarios: list[Scenario]
    columns: list[Column]
    cells: dict[tuple[str, str], ScenarioResult]
    problems: list[dict[str, str]] = dataclasses.field(default_factory=list)
    jobs: int = 1
    wall_s: float = 0.0
    sweep: bool = False
    executor: str = "in process"

    @property
    def drivers(self) -> list[str]:
        return list(dict.fromkeys(c.driver for c in self.columns))

    def cell(self, scenario: str, column: str) -> ScenarioResult:
        return self.cells[scenario, column]

    def groups(self) -> list[tuple[str, list[Column]]]:
        """The tables to show: one of every column, or (sweep) one per driver."""
        if not self.sweep:
            return [("", self.columns)]
        return [(d, [c for c in self.columns if c.driver == d]) for d in self.drivers]

    def heading(self, col: Column) -> str:
        """A column's header inside its table: the driver, or (sweep) the option set."""
        return col.option_set.name if self.sweep else col.label

    def to_json(self) -> dict[str, Any]:
        return {
            "drivers": self.drivers,
            "sweep": self.sweep,
            "columns": [c.to_json() for c in self.columns],
            "scenarios": [
                {"name": s.name, "doc": s.doc, "features": sorted(f.value for f in s.features)}
                for s in self.scenarios
            ],
            "cost_keys": [*COST_KEYS, "wall_s"],
            "cells": [c.to_json() for c in self.cells.values()],
            "problems": self.problems,
            "jobs": self.jobs,
            "executor": self.executor,
            "wall_s": self.wall_s,
        }


def compact_number(n: int) -> str:
    return str(n) if n < 10_000 else f"{n // 1000}k" if n < 10_000_000 else f"{n // 10**6}M"


def status_text(r: ScenarioResult) -> str:
    """The cell's label: "unsupported upstream" when Linux 7.2 refuses the feature as well."""
    return (
        f"{CELL[r.status]} upstream" if r.status == UNSUPPORTED and r.upstream else CELL[r.status]
    )


def cell_text(r: ScenarioResult) -> str:
    """``pass 0t 96w 3h 5m 0c 4ms``: the status, then the compact costs (none if unsupported)."""
    if r.status == UNSUPPORTED:
        return status_text(r)
    costs = " ".join(f"{compact_number(r.costs.get(k, 0))}{unit}" for k, unit in COMPACT)
    return f"{CELL[r.status]} {costs} {r.wall_s * 1000:.0f}ms"


def reasons(m: Matrix) -> list[str]:
    return [
        f"{r.scenario} @ {label}: {status_text(r)}: {r.detail}"
        for (_, label), r in m.cells.items()
        if r.status != PASS
    ]


def _text_table(m: Matrix, cols: list[Column], text: dict[tuple[str, str], str]) -> list[str]:
    names = [s.name for s in m.scenarios]
    first = max([len("scenario"), *map(len, names)])
    widths = [max([len(m.heading(c)), *(len(text[s, c.label]) for s in names)]) for c in cols]
    sized = list(zip(cols, widths, strict=True))
    head = [f"{'scenario':<{first}}", *(f"{m.heading(c):<{w}}" for c, w in sized)]
    lines = ["  ".join(head).rstrip(), "  ".join(["-" * first, *("-" * w for w in widths)])]
    for sc in names:
        row = [f"{sc:<{first}}", *(f"{text[sc, c.label]:<{w}}" for c, w in sized)]
        lines.append("  ".join(row).rstrip())
    return lines


def option_set_lines(m: Matrix) -> list[str]:
    """What each swept column is: ``amd:host4: host_levels=4 (lacks: ...) -- why``."""
    out = []
    for c in m.columns:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(c.option_set.options.items()))
        lacks = ", ".join(sorted(f.value for f in c.option_set.lacks))
        adds = ", ".join(sorted(f.value for f in c.option_set.adds))
        out.append(
            f"{c.label}: {opts or 'no options'}"
            + (f" (lacks {lacks})" if lacks else "")
            + (f" (adds {adds})" if adds else "")
            + (f" -- {c.option_set.doc}" if c.option_set.doc else "")
        )
    return out


def render_table(m: Matrix) -> str:
    """The plain matrix: one table, a cell with its costs. A sweep: one table per driver,
    a column per option set and only the status in a cell (the costs are in the JSON/HTML)."""
    if m.sweep:
        text = {key: status_text(r) for key, r in m.cells.items()}
    else:
        text = {key: cell_text(r) for key, r in m.cells.items()}
    lines: list[str] = []
    for title, cols in m.groups():
        if title:
            lines += [f"== {title} ==", ""]
        lines += [*_text_table(m, cols, text), ""]
    if m.sweep:
        lines += ["option sets:", *(f"  {n}" for n in option_set_lines(m)), ""]
    else:
        lines += [LEGEND, ""]
    notes = reasons(m)
    if notes:
        lines += ["reasons:", *(f"  {n}" for n in notes)]
    return "\n".join(lines).rstrip("\n")


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


def render_svg(m: Matrix, cols: list[Column], svg_id: str = "costs") -> str:
    """Grouped horizontal bars (log scale): a panel per cost, a group per scenario, a bar per
    column (a driver, or in a sweep one of the driver's option sets)."""
    bar, gap, label_w, panel_w, top = 6, 8, 190, 150, 40
    group = bar * len(cols) + gap
    height = top + group * len(m.scenarios) + 30
    width = label_w + panel_w * len(CHART) + 10
    colour = {c.label: PALETTE[i % len(PALETTE)] for i, c in enumerate(cols)}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{esc(svg_id)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
        "<title>costs per vendor per scenario</title>",
    ]
    for i, s in enumerate(m.scenarios):
        y = top + i * group + group / 2
        out.append(f'<text x="{label_w - 6}" y="{y:.0f}" text-anchor="end">{esc(s.name)}</text>')
    shown = [m.cell(s.name, c.label) for s in m.scenarios for c in cols]
    supported = [r for r in shown if r.status != UNSUPPORTED]
    for p, (key, title) in enumerate(CHART):
        x0 = label_w + p * panel_w
        peak = max([_chart_value(r, key) for r in supported] + [1.0])
        out.append(f'<text x="{x0 + 4}" y="{top - 22}" font-weight="bold">{esc(title)}</text>')
        out.append(f'<text x="{x0 + 4}" y="{top - 8}">max {peak:,.0f}, log scale</text>')
        out.append(f'<line x1="{x0}" y1="{top - 4}" x2="{x0}" y2="{height - 30}" stroke="#999"/>')
        for i, s in enumerate(m.scenarios):
            for j, c in enumerate(cols):
                r = m.cell(s.name, c.label)
                if r.status == UNSUPPORTED:
                    continue
                v = _chart_value(r, key)
                w = _bar_width(v, peak, panel_w - 12)
                y = top + i * group + j * bar
                out.append(
                    f'<rect x="{x0 + 1}" y="{y}" width="{w:.1f}" height="{bar - 1}" '
                    f'fill="{colour[c.label]}"><title>{esc(s.name)} @ {esc(c.label)}: {title} '
                    f"{v:,.0f}</title></rect>"
                )
    for j, c in enumerate(cols):
        x = label_w + j * 110
        out.append(
            f'<rect x="{x}" y="{height - 20}" width="10" height="10" fill="{colour[c.label]}"/>'
        )
        out.append(f'<text x="{x + 14}" y="{height - 11}">{esc(m.heading(c))}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _html_table(m: Matrix, cols: list[Column], table_id: str) -> str:
    head = "".join(f"<th>{esc(m.heading(c))}</th>" for c in cols)
    rows = []
    for s in m.scenarios:
        tds = []
        for c in cols:
            r = m.cell(s.name, c.label)
            costs = cell_text(r).split(" ", 1)[1] if r.status != UNSUPPORTED else esc(r.detail)
            why = f'<span class="why">{esc(r.detail)}</span>' if r.status == FAIL else ""
            tds.append(
                f'<td class="{r.status}" data-scenario="{esc(s.name)}" '
                f'data-driver="{esc(c.driver)}" data-option-set="{esc(c.option_set.name)}" '
                f'data-status="{r.status}"><span class="st">{status_text(r)}</span>'
                f'<span class="costs">{costs}</span>{why}</td>'
            )
        rows.append(
            f'<tr><th scope="row" title="{esc(s.doc)}">{esc(s.name)}</th>{"".join(tds)}</tr>'
        )
    return (
        f'<table id="{esc(table_id)}">\n<thead><tr><th>scenario</th>{head}</tr></thead>\n'
        f"<tbody>\n{chr(10).join(rows)}\n</tbody>\n</table>"
    )


def render_html(m: Matrix) -> str:
    """A self-contained page: inline CSS, the table(s), the reasons, inline SVG charts."""
    tables, charts = [], []
    for title, cols in m.groups():
        suffix = f"-{title}" if title else ""
        heading = f"<h2>{esc(title)}</h2>\n" if title else ""
        tables.append(heading + _html_table(m, cols, f"matrix{suffix}"))
        chart_heading = f"<h3>{esc(title)}</h3>\n" if title else ""
        charts.append(chart_heading + render_svg(m, cols, f"costs{suffix}"))
    notes = "".join(f"<li>{esc(n)}</li>" for n in reasons(m)) or "<li>none</li>"
    docs = "".join(f"<dt>{esc(s.name)}</dt><dd>{esc(s.doc)}</dd>" for s in m.scenarios)
    sets = ""
    if m.sweep:
        items = "".join(f"<li>{esc(n)}</li>" for n in option_set_lines(m))
        sets = f'<h2>Option sets</h2>\n<ul id="option-sets">{items}</ul>\n'
    what = (
        f"{len(m.scenarios)} scenarios &times; {len(m.columns)} driver configurations"
        if m.sweep
        else f"{len(m.scenarios)} scenarios &times; {len(m.drivers)} drivers"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>iommufd-model matrix</title>
<style>{CSS}</style>
</head>
<body>
<h1>iommufd-model {"sweep" if m.sweep else "matrix"}</h1>
<p>{what}, {esc(m.executor)},
{m.wall_s:.1f} s. {esc(LEGEND)}.</p>
{chr(10).join(tables)}
{sets}<h2>Reasons</h2>
<ul id="reasons">{notes}</ul>
<h2>Costs per vendor per scenario</h2>
{chr(10).join(charts)}
<h2>Scenarios</h2>
<dl>{docs}</dl>
</body>
</html>
"""


def run_cells(
    scenarios: list[str],
    cols: list[Column],
    reg: DriverRegistry,
    jobs: int = 1,
    scheduler: str | None = None,
    progress: Progress | None = None,
) -> dict[tuple[str, str], ScenarioResult]:
    """Every (scenario, column) cell: in this process, in ``jobs`` local processes, or on
    the Dask cluster whose scheduler is at ``scheduler``; the same results (but ``wall_s``)."""
    specs = cell_specs(scenarios, cols)
    step = progress.step if progress else None
    results = execute(run_cell, specs, reg, jobs, scheduler, step)
    return {(sp.scenario, sp.column.label): r for sp, r in zip(specs, results, strict=True)}


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


def _columns_asked(args: argparse.Namespace, reg: DriverRegistry) -> list[Column] | None:
    """The driver configurations ``--driver`` and ``--sweep`` ask for (None, said on stderr,
    when no driver loads); a bad name or ``--jobs`` with ``--scheduler`` ends the run."""
    if args.scheduler is not None and args.jobs is not None:
        raise SystemExit("iommufd-model: --jobs and --scheduler exclude each other")
    if not reg.drivers:
        _print_problems(reg)
        print("iommufd-model: no driver could be loaded", file=sys.stderr)
        return None
    broken = {p.name: p.one_line_message() for p in reg.problems}
    drivers = _select(args.driver, sorted(reg.drivers), "driver", broken)
    return columns(reg, drivers, sweep=args.sweep)


def _cmd_matrix(args: argparse.Namespace, reg: DriverRegistry) -> int:
    json_to = _json_target(args)
    _check_output("--json", json_to)
    _check_output("--html", args.html)
    cols = _columns_asked(args, reg)
    if cols is None:
        return 1
    scenarios = _select(args.scenario, list(SCENARIOS), "scenario")
    # The sweep is the long run: a pool of one process per CPU unless told otherwise.
    jobs = args.jobs if args.jobs is not None else default_jobs() if args.sweep else 1
    if args.scheduler is not None:
        jobs, executor = 0, f"Dask cluster at {args.scheduler}"
    else:
        executor = f"{jobs} local process(es)" if jobs > 1 else "in process"
    progress = Progress(len(cols) * len(scenarios))
    start = time.perf_counter()
    try:
        cells = run_cells(scenarios, cols, reg, jobs, args.scheduler, progress)
    except ClusterError as exc:
        raise SystemExit(f"iommufd-model: {exc}") from None
    finally:
        progress.close()
    matrix = Matrix(
        scenarios=[SCENARIOS[s] for s in scenarios],
        columns=cols,
        cells=cells,
        problems=_problems(reg),
        jobs=jobs,
        wall_s=time.perf_counter() - start,
        sweep=args.sweep,
        executor=executor,
    )
    if json_to is not None:
        _write("--json", json_to, json.dumps(matrix.to_json(), indent=2) + "\n")
    if args.html:
        _write("--html", args.html, render_html(matrix))
    if json_to != "-":
        print(render_table(matrix))
        _print_problems(reg)
    return 1 if any(c.status == FAIL for c in cells.values()) else 0


def _campaign_table(specs: list[ShardSpec], results: list[ShardResult]) -> str:
    """One line per driver configuration (shards, failures, examples, steps), then every
    failed shard with hypothesis' falsifying steps."""
    by_label: dict[str, list[ShardResult]] = {}
    for spec, r in zip(specs, results, strict=True):
        by_label.setdefault(spec.column.label, []).append(r)
    first = max([len("configuration"), *map(len, by_label)])
    lines = [f"{'configuration':<{first}}  shards  failed  examples   steps", "-" * (first + 35)]
    for label, rs in by_label.items():
        failed = sum(r.status == FAIL for r in rs)
        lines.append(
            f"{label:<{first}}  {len(rs):>6}  {failed:>6}  {sum(r.examples for r in rs):>8}"
            f"  {sum(r.steps for r in rs):>6}"
        )
    for spec, r in zip(specs, results, strict=True):
        if r.status == FAIL:
            lines += ["", f"FAIL {spec.column.label} seed {r.seed}:"]
            lines += [f"  {line}" for line in r.detail.splitlines()]
    return "\n".join(lines)


def _cmd_campaign(args: argparse.Namespace, reg: DriverRegistry) -> int:
    json_to = _json_target(args)
    _check_output("--json", json_to)
    try:
        machine_module()
    except ShardsUnavailable as exc:
        raise SystemExit(f"iommufd-model: {exc}") from None
    cols = _columns_asked(args, reg)
    if cols is None:
        return 1
    specs = shard_specs(cols, args.shards, args.seed, args.examples, args.steps)
    jobs = args.jobs if args.jobs is not None else default_jobs()
    progress = Progress(len(specs), unit="shards")
    start = time.perf_counter()
    try:
        results = execute(run_shard, specs, reg, jobs, args.scheduler, progress.step)
    except ClusterError as exc:
        raise SystemExit(f"iommufd-model: {exc}") from None
    finally:
        progress.close()
    data = {
        "columns": [c.to_json() for c in cols],
        "shards": [r.to_json() for r in results],
        "executor": f"Dask cluster at {args.scheduler}" if args.scheduler else f"{jobs} job(s)",
        "wall_s": time.perf_counter() - start,
    }
    if json_to is not None:
        _write("--json", json_to, json.dumps(data, indent=2) + "\n")
    if json_to != "-":
        print(_campaign_table(specs, results))
        _print_problems(reg)
    return 1 if any(r.status == FAIL for r in results) else 0


def _json_file_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"{what} as JSON, to FILE (the table still prints) or to stdout",
    )


def _driver_options(parser: argparse.ArgumentParser, sweep_help: str) -> None:
    """``--driver`` (repeatable) and ``--sweep``: which driver configurations run."""
    parser.add_argument("--driver", action="append", metavar="NAME", help="only this one")
    parser.add_argument("--sweep", action="store_true", help=sweep_help)


def _cell_options(parser: argparse.ArgumentParser, json_what: str, default_jobs_help: str) -> None:
    """What every command that runs cells (matrix cells, campaign shards) takes: ``--json``
    for the results, and where the cells run (``--jobs`` pool or ``--scheduler`` cluster)."""
    _json_file_option(parser, json_what)
    parser.add_argument(
        "-n",
        "--jobs",
        dest="jobs",
        type=_jobs,
        default=None,
        metavar="auto|N",
        help=f"run in a pool of N local worker processes (auto: one per CPU); {default_jobs_help}",
    )
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on the Dask distributed cluster whose scheduler is at ADDRESS "
        "(tcp://host:8786; needs the 'cluster' extra, and the same drivers on every worker)",
    )


DESCRIPTION = """\
A model of Linux iommufd (/dev/iommu) and the IOMMU hardware behind it, with vendor drivers
as plugins. 'drivers' lists the installed driver plugins (and broken ones, with the reason);
'matrix' runs every scenario against every driver and prints pass / FAIL / unsupported with
the hardware costs of each cell (--sweep: under every option set the drivers declare);
'campaign' runs the conformance kit's uAPI state machine in seeded shards; both run locally
or on a Dask cluster (--scheduler); 'run' runs a program with /dev/iommu served by the model."""

EPILOG = """\
exit status: 0 on success; 1 when a matrix cell or campaign shard FAILs, no driver loads, an
output file cannot be written (checked before the run) or, for 'drivers', an installed plugin
is broken; 2 for a bad option; 'run' exits with the program's status (127 when it cannot
start)."""


def _subcommand(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    func: Callable[[argparse.Namespace, DriverRegistry], int],
    name: str,
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    """A subcommand's parser, run by ``func``: one place that names, describes and binds
    every subcommand (``summary`` is its line in the top-level ``--help``)."""
    parser = sub.add_parser(name, help=summary, description=description)
    parser.set_defaults(func=func)
    return parser


def _global_options(parser: argparse.ArgumentParser, *, sub: bool) -> None:
    """Options accepted before and after the subcommand. After it they default to
    SUPPRESS, so a value given before the subcommand is not reset by the subparser."""
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if sub else False,
        help="machine-readable output on stdout",
    )


def _version_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"iommufd-model {__version__}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iommufd-model",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _version_option(parser)
    _global_options(parser, sub=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_drivers = _subcommand(
        sub,
        _cmd_drivers,
        "drivers",
        "list installed driver plugins and broken ones",
        "List every installed driver plugin with its distribution, version and features; a "
        "plugin that failed to load is listed as BROKEN with the reason, and the exit status "
        "is then 1.",
    )
    _global_options(p_drivers, sub=True)
    p_matrix = _subcommand(
        sub,
        _cmd_matrix,
        "matrix",
        "run every scenario against every driver",
        "Rows are scenarios, columns drivers; each cell is pass, FAIL or unsupported (with the "
        "feature and errno), with its costs.",
    )
    p_matrix.add_argument("--scenario", action="append", metavar="NAME", help="only this one")
    _driver_options(
        p_matrix,
        "also run every scenario under each option set every driver declares "
        "(page-table levels, granules, address widths, PASID widths...)",
    )
    p_matrix.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    _cell_options(p_matrix, "all cells and costs", "default 1, for --sweep auto")
    p_campaign = _subcommand(
        sub,
        _cmd_campaign,
        "campaign",
        "run the kit's uAPI state machine in seeded shards",
        "The conformance kit's hypothesis state machine over the iommufd uAPI, cut into shards "
        "(a driver configuration and a seed each, --examples runs of up to --steps steps) run "
        "like matrix cells: in a local pool or on a Dask cluster; the same shard gives the "
        "same result anywhere. Needs the test extra (hypothesis, pytest).",
    )
    _driver_options(p_campaign, "also every option set each driver declares")
    p_campaign.add_argument(
        "--shards", type=int, default=4, metavar="N", help="seeds per configuration (4)"
    )
    p_campaign.add_argument("--seed", type=int, default=0, help="the first seed (0)")
    p_campaign.add_argument(
        "--examples", type=int, default=20, metavar="N", help="examples per shard (20)"
    )
    p_campaign.add_argument(
        "--steps", type=int, default=30, metavar="N", help="steps per example at most (30)"
    )
    _cell_options(p_campaign, "every shard", "default auto")
    p_run = _subcommand(
        sub,
        _cmd_run,
        "run",
        "run a program with /dev/iommu served by the model",
        "Runs an unmodified, dynamically linked PROGRAM with /dev/iommu (and the files it "
        "hands out) served by one model shared by all its processes; see "
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
        metavar="KIND@IOMMU[:OPT=VAL...][,...]",
        help="a modelled PCI function (generic, ioat, dsa...) behind the first IOMMU of that "
        "driver or instance index, with the kind's options (generic@amd:total_vfs=2 is an "
        "SR-IOV PF) (repeatable; the drivers named become the IOMMUs when --iommu is not "
        "given); the first one's BDF is exported as VFIO_SELFTESTS_BDF",
    )
    p_run.add_argument(
        "--bdf-args",
        action="store_true",
        help="append every modelled function's BDF to the program's arguments",
    )
    p_run.add_argument(
        "--cap",
        action="append",
        default=[],
        type=_cap_name,
        metavar="NAME",
        help="a capability (CAP_SYS_RESOURCE...) the model counts every process of the "
        "program as holding in its initial user namespace, on top of its real ones "
        "(repeatable; the model's own option: the simulated machine's kernel is the model)",
    )
    p_run.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS...]")
    for p in sub.choices.values():  # --version is global too: accepted after the subcommand
        _version_option(p)
    return parser


def _cap_name(text: str) -> str:
    """A ``--cap`` value: a capability name of Linux 7.2's capability.h (a usage error else)."""
    from iommufd_model import creds

    try:
        creds.cap_mask([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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
        machine.grant_caps(*args.cap)
    except (ValueError, OSError) as exc:
        print(f"iommufd-model run: {exc}", file=sys.stderr)
        return 2
    try:
        rc, _server = run_program(argv, machine=machine, append_bdfs=args.bdf_args)
    except ValueError as exc:  # a setting of the run's environment (IOMMUFD_MODEL_SPIN_US)
        print(f"iommufd-model run: {exc}", file=sys.stderr)
        return 2
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
