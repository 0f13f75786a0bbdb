"""Trigger-to-start latency of one real worker: N sequential syncworker.trigger()
calls, each waited for; reports started_at - requested_at (both taken by the
database clock) and the client-side round trip to run_started.

    .venv/bin/python bench/trigger_latency.py [N]

A first probe for the fuller suite of issue 6; starts its own embedded PostgreSQL.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).parent.parent))
from syncworker.embedded import EmbeddedPostgres
from tests.harness import Daemon, write_config

JOBS = """
[jobs.noop]
steps = ["sw_testjobs:plain"]
"""


def main(n: int) -> None:
    with EmbeddedPostgres() as pg, tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp) / "c.toml", pg.url, JOBS, log_level="info")
        daemon = Daemon(config, env={"SYNCWORKER_LOG_LEVEL": "info"}).ready()
        client: list[float] = []
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("LISTEN sync_events")
            for _ in range(n):
                began = time.perf_counter()
                conn.execute("SELECT * FROM syncworker.trigger('noop')")
                for note in conn.notifies(timeout=10):
                    if json.loads(note.payload)["event"] == "run_started":
                        client.append((time.perf_counter() - began) * 1000)
                        break
                for note in conn.notifies(timeout=10):
                    if json.loads(note.payload)["event"] == "run_succeeded":
                        break
            server = [
                r[0]
                for r in conn.execute(
                    "SELECT extract(epoch FROM started_at - requested_at) * 1000"
                    " FROM syncworker.runs ORDER BY id"
                ).fetchall()
            ]
        daemon.stop()

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[int(q) - 1]

    for name, values in (
        ("trigger() -> run_started event (client)", client),
        ("requested_at -> started_at (db clock)", [float(v) for v in server]),
    ):
        print(
            f"{name}: n={len(values)} p50={statistics.median(values):.2f} ms "
            f"p95={pct(values, 95):.2f} ms p99={pct(values, 99):.2f} ms"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
