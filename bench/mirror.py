"""Scenario 7: the mirror toolkit against executemany. The measurement is
bench/mirror_bench.py's (it writes bench/results/mirror.json); this runs it
on the bench's server and puts its result in the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import REPO, Config, Row, Server

SCRIPT = REPO / "bench" / "mirror_bench.py"
RESULT = REPO / "bench" / "results" / "mirror.json"


def _rows(report: dict[str, Any], source: str) -> list[Row]:
    results = report["results"]
    mirror = results["mirror"]
    naive = results["naive_executemany"]
    n = f"{report['rows']:,} rows"
    detail = {"source": source, **{k: v for k, v in report.items() if k != "results"}}
    return [
        Row("7 mirror", f"ctx.mirror, {n}", "rows/s", mirror["rows_per_second"], detail=detail),
        Row("7 mirror", f"executemany upsert, {n}", "rows/s", naive["rows_per_second"]),
        Row(
            "7 mirror",
            "mirror / executemany (median times)",
            "x",
            naive["median_seconds"] / mirror["median_seconds"],
        ),
    ]


def run(server: Server, cfg: Config) -> list[Row]:
    if not SCRIPT.exists():
        if RESULT.exists():
            return _rows(json.loads(RESULT.read_text()), f"{RESULT.name} (no script to rerun)")
        return [Row("7 mirror", "not measured: bench/mirror_bench.py is not there", "", None)]
    out = RESULT if not cfg.quick else RESULT.with_name("mirror-quick.json")
    args = ["--output", str(out)] + (["--rows", "10000", "--repeat", "2"] if cfg.quick else [])
    env = {**os.environ, "SYNCWORKER_BENCH_DATABASE_URL": server.fresh("bench_mirror")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        if RESULT.exists():
            rows = _rows(json.loads(RESULT.read_text()), f"{RESULT.name}, an earlier run")
            rows[0].metric += f" (rerun failed: {tail[0][:60]})"
            return rows
        return [Row("7 mirror", f"mirror_bench.py failed: {tail[0][:80]}", "", None)]
    return _rows(json.loads(Path(out).read_text()), out.name)
