"""Scenario 6: fail-over. Two workers with heartbeat_interval = 1; a run
holds its step on one of them; kill -9 that worker; the delay is from the
kill (time.time_ns() right before it) to the run's step starting again on
the other (the step's own stamp). A fresh worker replaces the killed one
before the next round."""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import time

from bench.common import (
    Config,
    Probe,
    Process,
    Row,
    Server,
    connect,
    start_syncworker,
    stop_all,
    syncworker_config,
    workdir,
)

JOBS = """
[jobs.hold]
steps = ["bench.sw_steps:hold"]
retries = 100
retry_backoff = 0
"""


def run(server: Server, cfg: Config) -> list[Row]:
    url = server.fresh("bench_failover")
    delays: list[float] = []
    with workdir("failover") as tmp:
        probe = Probe(tmp)
        config = syncworker_config(tmp / "sw.toml", url, JOBS, heartbeat_interval=1)
        started = 0

        def fresh() -> Process:
            nonlocal started
            started += 1
            worker = start_syncworker(config, tmp / f"sw-{started}.log", probe)
            worker.wait_log('"worker_started"')
            return worker

        workers = {w.pid: w for w in (fresh(), fresh())}
        try:
            with connect(url) as conn:
                release = tmp / "release"
                conn.execute(
                    "SELECT * FROM syncworker.trigger('hold', payload => %s)",
                    (json.dumps({"release": str(release)}),),
                )
            holder = probe.get()
            # Survivors find a dead worker's runs at their heartbeats: a kill
            # right after a replacement started would always land a whole
            # interval before its first beat. A random pause puts it anywhere.
            pauses = random.Random(6)
            for _ in range(cfg.failovers):
                time.sleep(pauses.uniform(1.0, 2.0))
                began = time.time_ns()
                os.kill(holder.pid, signal.SIGKILL)
                workers.pop(holder.pid).kill()
                again = probe.get(timeout=30)
                if again.ident != holder.ident or again.pid == holder.pid:
                    raise RuntimeError(f"unexpected restart {again} after killing {holder}")
                delays.append((again.ns - began) / 1e6)
                holder = again
                replacement = fresh()
                workers[replacement.pid] = replacement
            release.touch()
        finally:
            stop_all(list(workers.values()))
            probe.close()
    return [
        Row(
            "6 fail-over",
            f"kill -9 -> step again elsewhere, median of {len(delays)}",
            "ms",
            statistics.median(delays),
            detail={"delays_ms": delays},
        ),
        Row(
            "6 fail-over",
            f"kill -9 -> step again elsewhere, max of {len(delays)}",
            "ms",
            max(delays),
            target="< 2,000 ms (heartbeat_interval = 1)",
            met=max(delays) < 2000,
        ),
    ]
