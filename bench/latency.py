"""Scenario 1: trigger to step start.

Sequential: trigger, wait for the step's first line, wait for the run to
end, pause, next. The bench takes time.time_ns() right before the call; the
step takes it at its first line (bench/stamp.py); both on this machine's clock.
The pause lets the worker go back to idle (its state write, the claim that
finds nothing), so each sample is an idle worker answering one trigger.

Both systems run side by side, each on its own database, and the samples
are interleaved (one of each kind per round): a machine shared with other
work drifts by tens of percent within minutes, and both sides see the same.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import psycopg

from bench.common import (
    Config,
    Probe,
    Row,
    Server,
    connect,
    start_procrastinates,
    start_syncworkers,
    stop_all,
    summary,
    syncworker_config,
    workdir,
)
from syncworker import trigger_sync

JOBS = """
[jobs.ping]
steps = ["bench.sw_steps:mark"]
"""
WARMUP = 20
SETTLE = 0.01
COLD_PAUSE = 1.5
# The same with the CPUs barely idle between samples: on this VM a vCPU that
# idles for milliseconds takes a while to wake, and every hop (bench ->
# PostgreSQL -> listener -> worker -> PostgreSQL -> worker) pays for it.
WARM_PAUSE = 0.001
# What the apps in shared/seeds/ send with a trigger: a small JSON object.
PAYLOAD = '{"order_id": 48213, "tenant": "acme", "event": "order.updated"}'
LABELS = {
    "sql payload": "SELECT syncworker.trigger(..., payload) -> step",
    "notify payload": "NOTIFY sync_trigger, JSON with payload -> step",
    "trigger_sync payload": "trigger_sync(payload=...) -> step",
    "sql": "SELECT syncworker.trigger() -> step (no payload)",
    "trigger_sync": "trigger_sync() -> step (no payload)",
    "notify": "NOTIFY sync_trigger -> step (no payload)",
}


def _poller(conn: psycopg.Connection[Any], query: str) -> Callable[[int], None]:
    """Waits for a run (a job) to end by polling: a listener of the bench's
    own would be one more backend for every NOTIFY to wake, during the very
    moments measured. Polling starts once the step has started, outside them."""

    def settle(ident: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = conn.execute(query.encode(), (ident,)).fetchone()
            if row and row[0]:
                return
            time.sleep(0.001)
        raise TimeoutError(f"{ident} did not end")

    return settle


def measure(server: Server, cfg: Config) -> dict[str, list[float]]:
    from bench.proc_app import make_app

    sw_url = server.fresh("bench_latency_sw")
    pc_url = server.fresh("bench_latency_pc")
    app = make_app(pc_url)
    loop = asyncio.new_event_loop()
    workers = []
    with workdir("latency") as tmp:
        probe = Probe(tmp)
        try:
            loop.run_until_complete(app.open_async())
            loop.run_until_complete(app.schema_manager.apply_schema_async())
            config = syncworker_config(tmp / "sw.toml", sw_url, JOBS)
            workers += start_syncworkers(1, config, tmp, probe)
            workers += start_procrastinates(1, pc_url, tmp, probe)
            with (
                connect(sw_url) as conn,
                connect(sw_url) as sw_poll,
                connect(pc_url) as pc_poll,
            ):
                aconn = loop.run_until_complete(
                    psycopg.AsyncConnection.connect(sw_url, autocommit=True)
                )

                def by_sql() -> int:
                    began = time.time_ns()
                    conn.execute("SELECT * FROM syncworker.trigger('ping')")
                    return began

                def by_notify() -> int:
                    began = time.time_ns()
                    conn.execute("NOTIFY sync_trigger, 'ping'")
                    return began

                def by_sql_payload() -> int:
                    began = time.time_ns()
                    conn.execute(
                        "SELECT * FROM syncworker.trigger('ping', payload => %s::jsonb)",
                        (PAYLOAD,),
                    )
                    return began

                notify_payload = PAYLOAD.replace("{", '{"job": "ping", ', 1)

                def by_notify_payload() -> int:
                    began = time.time_ns()
                    conn.execute("SELECT pg_notify('sync_trigger', %s)", (notify_payload,))
                    return began

                async def api_payload() -> int:
                    began = time.time_ns()
                    await trigger_sync(aconn, "ping", source="bench", payload=payload_doc)
                    return began

                payload_doc = json.loads(PAYLOAD)

                async def api() -> int:
                    began = time.time_ns()
                    await trigger_sync(aconn, "ping", source="bench")
                    return began

                async def defer() -> int:
                    began = time.time_ns()
                    await app.configure_task("mark").defer_async()
                    return began

                sw_settle = _poller(
                    sw_poll, "SELECT status = 'succeeded' FROM syncworker.runs WHERE id = %s"
                )
                pc_settle = _poller(
                    pc_poll, "SELECT status = 'succeeded' FROM procrastinate_jobs WHERE id = %s"
                )
                kinds: dict[str, tuple[Callable[[], int], Callable[[int], None]]] = {
                    "sql payload": (by_sql_payload, sw_settle),
                    "notify payload": (by_notify_payload, sw_settle),
                    "trigger_sync payload": (
                        lambda: loop.run_until_complete(api_payload()),
                        sw_settle,
                    ),
                    "sql": (by_sql, sw_settle),
                    "trigger_sync": (lambda: loop.run_until_complete(api()), sw_settle),
                    "notify": (by_notify, sw_settle),
                    "procrastinate": (lambda: loop.run_until_complete(defer()), pc_settle),
                }
                results: dict[str, list[float]] = {k: [] for k in kinds}
                results |= {
                    f"{t} {k}": [] for t in ("cold", "warm") for k in ("sql", "procrastinate")
                }

                def sample(kind: str, pause: float, into: str) -> None:
                    fire, settle = kinds[kind]
                    began = fire()
                    stamp = probe.get()
                    settle(stamp.ident)
                    results[into].append((stamp.ns - began) / 1e6)
                    time.sleep(pause)

                for _ in range(WARMUP):
                    for kind in kinds:
                        sample(kind, SETTLE, kind)
                results = {k: [] for k in results}
                for _ in range(cfg.latency_n):
                    for kind in kinds:
                        sample(kind, SETTLE, kind)
                for _ in range(cfg.latency_n):
                    for kind in ("sql", "procrastinate"):
                        sample(kind, WARM_PAUSE, f"warm {kind}")
                for _ in range(cfg.cold_latency_n):
                    for kind in ("sql", "procrastinate"):
                        time.sleep(COLD_PAUSE)
                        sample(kind, 0, f"cold {kind}")
                loop.run_until_complete(aconn.close())
        finally:
            stop_all(workers)
            loop.run_until_complete(app.close_async())
            loop.close()
            probe.close()
    return results


def run(server: Server, cfg: Config) -> list[Row]:
    got = {k: summary(v) for k, v in measure(server, cfg).items()}
    pc = got["procrastinate"]
    rows = []
    for key, label in LABELS.items():
        s = got[key]
        ratio = s["p50"] / pc["p50"]
        detail = {"syncworker": s, "procrastinate (defer -> task)": pc}
        rows += [
            Row(
                "1 trigger latency",
                f"{label}, p50",
                "ms",
                s["p50"],
                pc["p50"],
                "<= 2 ms; sw/pc <= 0.5",
                s["p50"] <= 2.0 and ratio <= 0.5,
                detail,
            ),
            Row("1 trigger latency", f"{label}, p95", "ms", s["p95"], pc["p95"]),
            Row(
                "1 trigger latency",
                f"{label}, p99",
                "ms",
                s["p99"],
                pc["p99"],
                "<= 5 ms",
                s["p99"] <= 5.0,
            ),
        ]
    warm, warm_pc = got["warm sql"], got["warm procrastinate"]
    for q in ("p50", "p99"):
        rows.append(
            Row(
                "1 trigger latency",
                f"trigger() -> step, {WARM_PAUSE * 1000:g} ms pause (warm), {q}",
                "ms",
                warm[q],
                warm_pc[q],
                detail={"syncworker": warm, "procrastinate": warm_pc} if q == "p50" else {},
            )
        )
    cold, cold_pc = got["cold sql"], got["cold procrastinate"]
    rows.append(
        Row(
            "1 trigger latency",
            f"trigger() -> step after {COLD_PAUSE:g} s idle, p50 of {cold['n']}",
            "ms",
            cold["p50"],
            cold_pc["p50"],
            detail={"syncworker": cold, "procrastinate": cold_pc},
        )
    )
    return rows
