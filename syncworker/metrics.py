"""The worker's Prometheus metrics, in a registry of its own.

Counters and the histogram are updated where things happen in the worker;
the database-backed gauges (pending runs, last success) are read at scrape
time by `render`, so they are fresh and shared by every instance alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg import sql

# The plain text format generate_latest writes; newer prometheus-client
# versions advertise 1.0.0 as "latest", which older Prometheus servers reject.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Runs go from seconds to the default one-hour timeout and beyond.
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)

_JOBS = "SELECT name FROM {s}.jobs"
_PENDING = "SELECT job, count(*) FROM {s}.runs WHERE status = 'pending' GROUP BY job"
# Runs grow without bound, so no max() over all of them on every scrape: the
# runs of a key never overlap, so its newest succeeded run finished last, and
# runs_by_job finds it reading only the runs since. The ORDER BY names the
# index's columns so the planner keeps to it (`scope IS NULL` is no equality).
_LAST_SUCCESS = """
SELECT j.name, k.scope, extract(epoch FROM l.finished_at)::float8
FROM {s}.jobs j
CROSS JOIN LATERAL unnest(coalesce(j.scopes, ARRAY[NULL::text])) AS k(scope)
CROSS JOIN LATERAL (
    (SELECT r.finished_at FROM {s}.runs r
     WHERE k.scope IS NOT NULL AND r.job = j.name AND r.scope = k.scope
       AND r.status = 'succeeded'
     ORDER BY r.job, r.scope, r.id DESC LIMIT 1)
    UNION ALL
    (SELECT r.finished_at FROM {s}.runs r
     WHERE k.scope IS NULL AND r.job = j.name AND r.scope IS NULL
       AND r.status = 'succeeded'
     ORDER BY r.job, r.scope, r.id DESC LIMIT 1)
) l
WHERE l.finished_at IS NOT NULL
"""


@dataclass(frozen=True)
class DbSnapshot:
    """What the database said at scrape time."""

    pending: dict[str, int] = field(default_factory=dict)
    last_success: list[tuple[str, str | None, float]] = field(default_factory=list)


async def read_snapshot(conn: psycopg.AsyncConnection[Any], schema: str) -> DbSnapshot:
    s = sql.Identifier(schema)
    # Every job shows, at 0 when nothing waits: absent is not zero to an alert
    # rule. The jobs table, not this worker's config, since a reload changes it.
    cur = await conn.execute(sql.SQL(_JOBS).format(s=s))
    pending = {str(name): 0 for (name,) in await cur.fetchall()}
    cur = await conn.execute(sql.SQL(_PENDING).format(s=s))
    pending.update({str(job): int(n) for job, n in await cur.fetchall()})
    cur = await conn.execute(sql.SQL(_LAST_SUCCESS).format(s=s))
    last = [(str(job), scope, float(ts)) for job, scope, ts in await cur.fetchall()]
    return DbSnapshot(pending=pending, last_success=last)


class _DbCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: DbSnapshot | None = None

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        pending = GaugeMetricFamily(
            "syncworker_runs_pending", "Runs waiting to be claimed, by job.", labels=["job"]
        )
        for job, n in sorted(snap.pending.items()):
            pending.add_metric([job], n)
        yield pending
        last = GaugeMetricFamily(
            "syncworker_last_success_timestamp_seconds",
            "When the last succeeded run of each job and scope finished (Unix time).",
            labels=["job", "scope"],
        )
        for job, scope, ts in sorted(snap.last_success, key=lambda r: (r[0], r[1] or "")):
            last.add_metric([job, scope or ""], ts)
        yield last


class _WithoutCreated(Collector):
    """The registry less the `*_created` samples, which the text format can
    only show as extra gauge series. (prometheus_client's own switch for
    this is process-wide.)"""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    """One worker's metrics; nothing goes to prometheus_client's global registry."""

    def __init__(self, version: str, worker_id: str, jobs: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Gauge(
            "syncworker_up",
            "1 while this worker process serves metrics; labels give its version and id.",
            ["version", "worker_id"],
            registry=r,
        ).labels(version, worker_id).set(1)
        self.database_up = Gauge(
            "syncworker_database_up",
            "1 while the worker's LISTEN session to the database is in place.",
            registry=r,
        )
        self.reconnects = Counter(
            "syncworker_database_reconnects",
            "Times the LISTEN session came back after being lost.",
            registry=r,
        )
        self.triggers_received = Counter(
            "syncworker_triggers_received",
            "NOTIFY payloads received on the trigger channel.",
            registry=r,
        )
        self.triggers_rejected = Counter(
            "syncworker_triggers_rejected",
            "Received NOTIFY payloads refused (bad payload, unknown or disabled job or scope).",
            registry=r,
        )
        self.triggers_failed = Counter(
            "syncworker_triggers_failed",
            "Received NOTIFY payloads that could not be stored (database error).",
            registry=r,
        )
        self.runs_running = Gauge(
            "syncworker_runs_running",
            "Runs this worker is executing now, by job.",
            ["job"],
            registry=r,
        )
        self.runs_finished = Counter(
            "syncworker_runs_finished",
            "Runs this worker finished, by job and final status.",
            ["job", "status"],
            registry=r,
        )
        self.run_duration = Histogram(
            "syncworker_run_duration_seconds",
            "Time from claim to outcome of the runs this worker finished, by job.",
            ["job"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._db = _DbCollector()
        r.register(self._db)
        self._exposed = _WithoutCreated(r)
        self._seen_up = False
        # Every job's series from the start: a series that appears only at its
        # first increment hides that increment from rate() and increase().
        for job in jobs:
            self.runs_running.labels(job)
            self.run_duration.labels(job)
            for status in ("succeeded", "failed"):
                self.runs_finished.labels(job, status)

    def database_state(self, up: bool) -> None:
        self.database_up.set(1 if up else 0)
        if up and self._seen_up:
            self.reconnects.inc()
        self._seen_up = self._seen_up or up

    def run_started(self, job: str) -> None:
        self.runs_running.labels(job).inc()

    def run_finished(self, job: str, status: str, seconds: float) -> None:
        self.runs_running.labels(job).dec()
        self.runs_finished.labels(job, status).inc()
        self.run_duration.labels(job).observe(seconds)

    def render(self, snapshot: DbSnapshot | None) -> bytes:
        """The text exposition; the database gauges are left out without a snapshot."""
        # Set and generated with no await in between: concurrent scrapes
        # cannot see each other's snapshot.
        self._db.snapshot = snapshot
        try:
            return generate_latest(self._exposed)
        finally:
            self._db.snapshot = None
