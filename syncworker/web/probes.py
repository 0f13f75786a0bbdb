"""/healthz, /status and /metrics: what probes and scrapers read."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus

import psycopg

from syncworker.metrics import CONTENT_TYPE, Metrics, read_snapshot
from syncworker.status import to_json
from syncworker.web.api import DB_TIMEOUT, Api, Connect
from syncworker.web.replies import JSON, Reply, Request, Response, text
from syncworker.web.router import Router


def add_probes(
    router: Router,
    *,
    health: Callable[[], str | None],
    db_up: Callable[[], bool],
    connect: Connect,
    schema: str,
    metrics: Metrics,
    api: Api,
) -> None:
    # Built now, at start: importing prometheus_client on the first scrape
    # would hold the loop, and a trigger or cron fire with it, for ~50 ms.
    metrics.registry  # noqa: B018

    async def healthz(request: Request) -> Reply:
        reason = health()
        if reason is None:
            return text(HTTPStatus.OK, "ok")
        return text(HTTPStatus.SERVICE_UNAVAILABLE, reason)

    async def status(request: Request) -> Reply:
        data = await api.read_status(None)
        return Response(HTTPStatus.OK, (to_json(data) + "\n").encode(), JSON)

    async def metrics_text(request: Request) -> Reply:
        snapshot = None
        if db_up():
            try:
                async with asyncio.timeout(DB_TIMEOUT), connect() as conn:
                    snapshot = await read_snapshot(conn, schema)
            except (psycopg.Error, TimeoutError):
                pass  # the process's own metrics still answer; the gauges are left out
        return Response(HTTPStatus.OK, metrics.render(snapshot), CONTENT_TYPE)

    router.add("GET", "/healthz", healthz)
    router.add("GET", "/status", status)
    router.add("GET", "/metrics", metrics_text)
