"""The ``iommufd-model`` console script: list drivers, run the cross-vendor matrix.

Stdlib only (argparse, json): the runtime dependencies stay pluggy and attrs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from iommufd_model.plugins import DriverRegistry, default_registry
from iommufd_model.scenarios import FAIL, PASS, SCENARIOS, ScenarioResult, run_scenario

CELL = {PASS: "pass", FAIL: "FAIL", "unsupported": "unsupported"}


def _problems(reg: DriverRegistry) -> list[dict[str, str]]:
    return [
        {"name": p.name, "distribution": p.distribution, "error": p.message} for p in reg.problems
    ]


def _print_problems(reg: DriverRegistry) -> None:
    for p in reg.problems:
        print(f"BROKEN {p.name} (distribution {p.distribution}): {p.message}", file=sys.stderr)


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
    # Broken plugins are worth a warning, not a failure: only "nothing usable" is an error.
    return 0 if reg.drivers else 1


class _Progress:
    """A one-line ``[n/total] scenario @ driver`` on stderr, only when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty()

    def step(self, label: str) -> None:
        if self.enabled:
            width = 24
            filled = width * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {label:<48.48}")
            sys.stderr.flush()
        self.done += 1

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 90 + "\r")
            sys.stderr.flush()


def _select(names: list[str] | None, known: Sequence[str], what: str) -> list[str]:
    if not names:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"iommufd-model: unknown {what}(s): {', '.join(unknown)}"
                         f" (known: {', '.join(known)})")
    return [n for n in known if n in names]


def _table(
    scenarios: list[str], drivers: list[str], cells: dict[tuple[str, str], ScenarioResult]
) -> str:
    first = max([len("scenario"), *map(len, scenarios)])
    widths = [max(len(d), len("unsupported")) for d in drivers]
    head = [f"{'scenario':<{first}}", *(f"{d:<{w}}" for d, w in zip(drivers, widths, strict=True))]
    lines = ["  ".join(head).rstrip()]
    lines.append("  ".join(["-" * first, *("-" * w for w in widths)]))
    for sc in scenarios:
        row = [f"{sc:<{first}}"]
        row += [f"{CELL[cells[sc, d].status]:<{w}}" for d, w in zip(drivers, widths, strict=True)]
        lines.append("  ".join(row).rstrip())
    notes = [
        f"  {r.scenario} @ {r.driver}: {CELL[r.status]}: {r.detail}"
        for r in cells.values()
        if r.status != PASS
    ]
    if notes:
        lines += ["", "reasons:", *notes]
    return "\n".join(lines)


def _cmd_matrix(args: argparse.Namespace, reg: DriverRegistry) -> int:
    if not reg.drivers:
        _print_problems(reg)
        print("iommufd-model: no driver could be loaded", file=sys.stderr)
        return 1
    drivers = _select(args.driver, sorted(reg.drivers), "driver")
    scenarios = _select(args.scenario, list(SCENARIOS), "scenario")
    progress = _Progress(len(drivers) * len(scenarios))
    cells: dict[tuple[str, str], ScenarioResult] = {}
    for sc in scenarios:
        for drv in drivers:
            progress.step(f"{sc} @ {drv}")
            cells[sc, drv] = run_scenario(SCENARIOS[sc], drv, reg)
    progress.close()
    if args.json:
        out = {"cells": [c.to_json() for c in cells.values()], "problems": _problems(reg)}
        print(json.dumps(out, indent=2))
    else:
        print(_table(scenarios, drivers, cells))
        _print_problems(reg)
    return 1 if any(c.status == FAIL for c in cells.values()) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iommufd-model", description=__doc__)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    p_drivers = sub.add_parser("drivers", help="list installed driver plugins and broken ones")
    p_drivers.set_defaults(func=_cmd_drivers)
    p_matrix = sub.add_parser("matrix", help="run every scenario against every driver")
    p_matrix.add_argument("--scenario", action="append", metavar="NAME", help="only this one")
    p_matrix.add_argument("--driver", action="append", metavar="NAME", help="only this one")
    p_matrix.set_defaults(func=_cmd_matrix)
    return parser


def main(argv: Sequence[str] | None = None, registry: DriverRegistry | None = None) -> int:
    """Entry point; ``registry`` lets tests run the CLI over a hand-built set of drivers."""
    args = build_parser().parse_args(argv)
    reg = registry if registry is not None else default_registry()
    return int(args.func(args, reg))


if __name__ == "__main__":
    sys.exit(main())
