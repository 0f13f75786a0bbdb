"""The Prometheus form of a worker's metrics, built at scrape time from the
counts syncworker.metrics keeps. Imported only by a worker that serves
/metrics, or a host that asks for `worker.metrics.registry`."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from syncworker.logwriter import lost_lines
from syncworker.metrics import DURATION_BUCKETS, DbSnapshot, Metrics, TriggerOutcome

_TRIGGERS: tuple[tuple[TriggerOutcome, str], ...] = (
    ("received", "NOTIFY payloads received on the trigger channel."),
    (
        "rejected",
        "Received NOTIFY payloads refused (bad payload, unknown or disabled job or scope).",
    ),
    ("failed", "Received NOTIFY payloads that could not be stored (database error)."),
)
# Written as prometheus_client's own histograms write them: 1 as "1.0".
_BOUNDS = [repr(float(b)) for b in DURATION_BUCKETS] + ["+Inf"]


def build_registry(metrics: Metrics) -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(_WorkerCollector(metrics))
    return registry


class _WorkerCollector(Collector):
    # Families built from the counts on each scrape carry no `*_created`
    # samples, which the text format could only show as extra gauge series.

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        up = GaugeMetricFamily(
            "syncworker_up",
            "1 while this worker process serves metrics; labels give its version and id.",
            labels=["version", "worker_id"],
        )
        up.add_metric([m.version, m.worker_id], 1)
        yield up
        yield GaugeMetricFamily(
            "syncworker_database_up",
            "1 while the worker's LISTEN session to the database is in place.",
            value=1 if m.database_up else 0,
        )
        yield CounterMetricFamily(
            "syncworker_database_reconnects",
            "Times the LISTEN session came back after being lost.",
            value=m.reconnects,
        )
        yield CounterMetricFamily(
            "syncworker_log_lines_lost",
            "Log lines dropped because stderr was closed, broken or full.",
            value=lost_lines(),
        )
        for outcome, doc in _TRIGGERS:
            yield CounterMetricFamily(
                f"syncworker_triggers_{outcome}", doc, value=m.triggers[outcome]
            )
        running = GaugeMetricFamily(
            "syncworker_runs_running", "Runs this worker is executing now, by job.", labels=["job"]
        )
        for job, n in m.running.items():
            running.add_metric([job], n)
        yield running
        finished = CounterMetricFamily(
            "syncworker_runs_finished",
            "Runs this worker finished, by job and final status.",
            labels=["job", "status"],
        )
        for (job, status), n in m.finished.items():
            finished.add_metric([job, status], n)
        yield finished
        duration = HistogramMetricFamily(
            "syncworker_run_duration_seconds",
            "Time from claim to outcome of the runs this worker finished, by job.",
            labels=["job"],
        )
        for job, d in m.durations.items():
            duration.add_metric(
                [job], list(zip(_BOUNDS, accumulate(d.buckets), strict=True)), d.total
            )
        yield duration
        if m.snapshot is not None:
            yield from _database_gauges(m.snapshot)


def _database_gauges(snap: DbSnapshot) -> Iterator[Metric]:
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
