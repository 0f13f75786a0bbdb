"""The worker's metrics: plain counts kept as things happen.

The worker counts triggers and runs here as they happen; the database-backed
gauges (pending runs, last success) are read at scrape time, so they are
fresh and shared by every instance alike. prometheus_client is imported only
when something asks for the Prometheus form (`registry`, `render`): in
syncworker.metrics_export. A worker without `http` never loads it, which
keeps some 1.4 MiB of modules out of every idle process.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import psycopg

from syncworker.db import queries
from syncworker.db.queries import for_schema
from syncworker.db.rows import JobName, LastSuccess, PendingCount

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# The plain text format generate_latest writes; newer prometheus-client
# versions advertise 1.0.0 as "latest", which older Prometheus servers reject.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Runs go from seconds to the default one-hour timeout and beyond.
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


@dataclass(frozen=True)
class DbSnapshot:
    """What the database said at scrape time."""

    pending: dict[str, int] = field(default_factory=dict)
    last_success: list[tuple[str, str | None, float]] = field(default_factory=list)


async def read_snapshot(conn: psycopg.AsyncConnection[Any], schema: str) -> DbSnapshot:
    q = for_schema(schema)
    # Every job shows, at 0 when nothing waits: absent is not zero to an alert
    # rule. The jobs table, not this worker's config, since a reload changes it.
    jobs = await queries.many(conn, q["metrics_jobs"], None, JobName)
    pending = {str(j.name): 0 for j in jobs}
    counts = await queries.many(conn, q["metrics_pending"], None, PendingCount)
    pending.update({str(c.job): int(c.pending) for c in counts})
    rows = await queries.many(conn, q["metrics_last_success"], None, LastSuccess)
    last = [(str(r.job), r.scope, float(r.finished_at)) for r in rows]
    return DbSnapshot(pending=pending, last_success=last)


TriggerOutcome = Literal["received", "rejected", "failed"]
RUN_STATUSES_SHOWN = ("succeeded", "failed")


@dataclass
class Durations:
    """One job's run-duration histogram: a count per bucket (not cumulative;
    the last one is above every bound) and the sum."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        # A bucket counts what is at most its bound: bisect_left finds it.
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds


class Metrics:
    """One worker's metrics; nothing goes to prometheus_client's global registry."""

    def __init__(self, version: str, worker_id: str, jobs: Iterable[str]) -> None:
        self.version = version
        self.worker_id = worker_id
        self.database_up = False
        self.reconnects = 0
        self.triggers: dict[TriggerOutcome, int] = {"received": 0, "rejected": 0, "failed": 0}
        self.running: dict[str, int] = {}
        self.finished: dict[tuple[str, str], int] = {}
        self.durations: dict[str, Durations] = {}
        # Set only while render() builds its answer (see there).
        self.snapshot: DbSnapshot | None = None
        self._seen_up = False
        self._registry: CollectorRegistry | None = None
        # Every job's series from the start: a series that appears only at its
        # first increment hides that increment from rate() and increase().
        for job in jobs:
            self._job(job)
            for status in RUN_STATUSES_SHOWN:
                self.finished.setdefault((job, status), 0)

    def _job(self, job: str) -> None:
        self.running.setdefault(job, 0)
        self.durations.setdefault(job, Durations())

    def database_state(self, up: bool) -> None:
        self.database_up = up
        if up and self._seen_up:
            self.reconnects += 1
        self._seen_up = self._seen_up or up

    def count_trigger(self, outcome: TriggerOutcome) -> None:
        self.triggers[outcome] += 1

    def run_started(self, job: str) -> None:
        self._job(job)
        self.running[job] += 1

    def run_finished(self, job: str, status: str, seconds: float) -> None:
        self._job(job)
        self.running[job] -= 1
        self.finished[job, status] = self.finished.get((job, status), 0) + 1
        self.durations[job].observe(seconds)

    @property
    def registry(self) -> CollectorRegistry:
        """These metrics and the process's own (`process_*`, `python_*`) in a
        prometheus_client registry of this worker's own, built on first use."""
        if self._registry is None:
            from syncworker.metrics_export import build_registry

            self._registry = build_registry(self)
        return self._registry

    def render(self, snapshot: DbSnapshot | None) -> bytes:
        """The text exposition; the database gauges are left out without a snapshot."""
        from prometheus_client import generate_latest

        registry = self.registry
        # Set and generated with no await in between: concurrent scrapes
        # cannot see each other's snapshot.
        self.snapshot = snapshot
        try:
            return generate_latest(registry)
        finally:
            self.snapshot = None
