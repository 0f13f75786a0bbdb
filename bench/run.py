"""Run the scenarios, print the table, write bench/results/latest.json.

    python -m bench.run [--quick] [--only latency,idle,...]

`make bench` (and `make bench QUICK=1`) set up the bench venv and call this.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import REPO, Config, Row, Server

SCENARIOS = ["latency", "idle", "cron", "burst", "scaleout", "failover", "mirror", "prune"]
RESULTS = REPO / "bench" / "results"


def machine(server: Server) -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    import procrastinate
    import psycopg

    from syncworker.version import VERSION

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "postgresql": server.version(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "syncworker": VERSION,
        "procrastinate": procrastinate.__version__,
        "psycopg": psycopg.__version__,
    }


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: list[Row]) -> str:
    """A Markdown table: readable in a terminal, pasteable into RESULTS.md."""
    head = ["scenario", "metric", "unit", "syncworker", "procrastinate", "sw/pc", "target", "met"]
    body = [
        [
            r.scenario,
            r.metric,
            r.unit,
            fmt(r.syncworker),
            fmt(r.procrastinate),
            fmt(r.ratio),
            r.target,
            {True: "met", False: "MISSED", None: ""}[r.met],
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--only", default="", help="comma-separated scenarios")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    parser.add_argument(
        "--syncworker-src",
        type=Path,
        help="run the workers from another source tree (e.g. an unpacked older commit)",
    )
    args = parser.parse_args()
    if args.syncworker_src:
        os.environ["BENCH_SYNCWORKER_SRC"] = str(args.syncworker_src.resolve())
    cfg = Config.make(args.quick)
    chosen = [s for s in args.only.split(",") if s] or SCENARIOS
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    began = time.monotonic()
    server = Server()
    rows: list[Row] = []
    timings: dict[str, float] = {}
    failed: dict[str, str] = {}
    try:
        info = machine(server)
        print(f"bench: {'QUICK ' if cfg.quick else ''}{', '.join(chosen)}", file=sys.stderr)
        for name in chosen:
            start = time.monotonic()
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            module = importlib.import_module(f"bench.{name}")
            try:
                got = module.run(server, cfg)
            except Exception as exc:
                traceback.print_exc()
                failed[name] = f"{type(exc).__name__}: {exc}"[:2000]
                got = [Row(name, "scenario failed", "", str(exc).splitlines()[0][:80])]
            rows += got
            timings[name] = round(time.monotonic() - start, 1)
            print(f"bench: {name} took {timings[name]} s", file=sys.stderr, flush=True)
    finally:
        server.close()

    text = table(rows)
    print(text)
    met = [r for r in rows if r.met is True]
    missed = [r for r in rows if r.met is False]
    print(f"\ntargets met: {len(met)}, missed: {len(missed)}")
    for r in missed:
        print(f"  MISSED: {r.scenario}: {r.metric} = {fmt(r.syncworker)} {r.unit} ({r.target})")
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": cfg.quick,
        "syncworker_src": os.environ.get("BENCH_SYNCWORKER_SRC") or str(REPO),
        "config": vars(cfg),
        "machine": info,
        "seconds": round(time.monotonic() - began, 1),
        "scenario_seconds": timings,
        "failed": failed,
        "rows": [r.as_json() for r in rows],
        "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"written: {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
