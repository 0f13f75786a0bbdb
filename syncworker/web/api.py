"""The HTTP API's handlers: reads (status, runs, one run with its steps)
and writes (trigger, pause, resume, cancel), each over one pooled
connection with a time limit.

Writes call what the Python API calls (api.trigger_sync, control.pause,
resume, cancel), so they are the same actions, recorded the same way, with
`triggered_by` / `by` set to the token's name (auth.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from http import HTTPStatus
from typing import Any

import psycopg

from syncworker import control
from syncworker.api import TriggerError, trigger_sync
from syncworker.config import Settings
from syncworker.cronwords import describe
from syncworker.db import Store
from syncworker.logs import redact
from syncworker.web import bodies
from syncworker.web.replies import HttpError, Reply, Request, json_reply
from syncworker.web.router import Router

DB_TIMEOUT = 5.0  # one request's database work, connection included
STATUS_LIMIT = 20  # recent runs in /api/status, as `syncworker status`
RUNS_LIMIT = 50  # a page of /api/runs by default
MAX_RUNS_LIMIT = 500
STATUSES = ("pending", "running", "succeeded", "failed", "cancelled", "skipped")
FINISHED = ("succeeded", "failed", "cancelled", "skipped")

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class Api:
    def __init__(
        self,
        *,
        settings: Callable[[], Settings],
        db_up: Callable[[], bool],
        connect: Connect,
        store: Store,
        writer: Callable[[Request], str],
    ) -> None:
        self._settings = settings
        self._db_up = db_up
        self._connect = connect
        self._store = store
        self._writer = writer

    def add_routes(self, router: Router) -> None:
        router.add("GET", "/api/status", self.status)
        router.add("GET", "/api/runs", self.runs)
        router.add("GET", "/api/runs/{id}", self.run)
        router.add("POST", "/api/runs/{id}/cancel", self.cancel)
        router.add("POST", "/api/jobs/{job}/trigger", self.trigger)
        router.add("POST", "/api/jobs/{job}/pause", self.pause)
        router.add("POST", "/api/jobs/{job}/resume", self.resume)

    @asynccontextmanager
    async def _db(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection for one request; an outage or a slow database is a
        503 with the reason, never a traceback."""
        if not self._db_up():  # answered at once instead of after DB_TIMEOUT
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "database down")
        try:
            async with asyncio.timeout(DB_TIMEOUT), self._connect() as conn:
                yield conn
        except TimeoutError:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "database timeout") from None
        except psycopg.Error as exc:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, db_error(exc)) from None

    # -- reads ---------------------------------------------------------------------

    async def read_status(self, job: str | None) -> dict[str, Any]:
        """The `status --json` object (/status serves it as it is)."""
        async with self._db() as conn:
            return await self._store.read_status(conn, limit=STATUS_LIMIT, job=job)

    async def status(self, request: Request) -> Reply:
        data = await self.read_status(request.query.get("job") or None)
        for entry in data["jobs"]:
            # The dashboard's words for each schedule, in the job's timezone.
            entry["schedule_words"] = [describe(e) for e in entry["schedule"] or ()]
        return json_reply(HTTPStatus.OK, data)

    async def runs(self, request: Request) -> Reply:
        q = request.query
        status = q.get("status") or None
        if status is not None and status not in STATUSES:
            raise _bad(f"status must be one of {', '.join(STATUSES)}")
        limit = _int(q, "limit", 1, MAX_RUNS_LIMIT) or RUNS_LIMIT
        before = _int(q, "before", 1, 2**63 - 1)
        async with self._db() as conn:
            rows = await self._store.list_runs(
                conn,
                job=q.get("job") or None,
                scope=q.get("scope") or None,
                status=status,
                before=before,
                limit=limit + 1,  # one more than shown: is there a next page?
            )
        page = rows[:limit]
        more = len(rows) > limit
        return json_reply(
            HTTPStatus.OK,
            {"runs": page, "next_cursor": str(page[-1]["id"]) if more else None},
        )

    async def run(self, request: Request) -> Reply:
        run_id = _run_id(request)
        async with self._db() as conn:
            row = await self._store.read_run(conn, run_id)
            if row is None:
                raise HttpError(HTTPStatus.NOT_FOUND, f"unknown run {run_id}")
            row["steps"] = await self._store.read_run_steps(conn, run_id)
        return json_reply(HTTPStatus.OK, row)

    # -- writes --------------------------------------------------------------------

    async def trigger(self, request: Request) -> Reply:
        by = self._writer(request)
        job = request.params["job"]
        body = bodies.trigger(request.body)
        settings = self._settings()
        async with self._db() as conn:
            try:
                ids = await trigger_sync(
                    conn,
                    job,
                    scope=body.scope,
                    source="http",
                    triggered_by=by,
                    payload=body.payload,
                    run_after=body.run_after or None,
                    schema=settings.schema,
                )
            except TriggerError as exc:
                raise _refused(str(exc)) from None
        return json_reply(
            HTTPStatus.ACCEPTED,
            {"job": job, "scope": body.scope, "run_ids": ids, "triggered_by": by},
        )

    async def pause(self, request: Request) -> Reply:
        by = self._writer(request)
        body = bodies.pause(request.body)
        async with self._db() as conn:
            try:
                hold = await control.pause(
                    conn,
                    request.params["job"],
                    body.scope,
                    until=body.until,
                    reason=body.reason,
                    by=by,
                    schema=self._settings().schema,
                )
            except control.ControlError as exc:
                raise _refused(str(exc)) from None
        return json_reply(HTTPStatus.OK, {"paused": True, **dataclasses.asdict(hold)})

    async def resume(self, request: Request) -> Reply:
        by = self._writer(request)
        body = bodies.resume(request.body)
        job = request.params["job"]
        async with self._db() as conn:
            try:
                lifted = await control.resume(
                    conn, job, body.scope, by=by, schema=self._settings().schema
                )
            except control.ControlError as exc:
                raise _refused(str(exc)) from None
        return json_reply(HTTPStatus.OK, {"job": job, "scope": body.scope, "lifted": lifted})

    async def cancel(self, request: Request) -> Reply:
        by = self._writer(request)
        run_id = _run_id(request)
        body = bodies.cancel(request.body)
        settings = self._settings()
        async with self._db() as conn:
            try:
                status = await control.cancel(
                    conn,
                    run_id,
                    reason=body.reason,
                    by=by,
                    events=settings.events_channel,
                    schema=settings.schema,
                )
            except control.ControlError as exc:
                raise _refused(str(exc)) from None
        if status in FINISHED and status != "cancelled":
            raise HttpError(
                HTTPStatus.CONFLICT, f"run {run_id} already {status}", id=run_id, run_status=status
            )
        # "running": its worker stops it within a second; the event says when.
        code = HTTPStatus.OK if status == "cancelled" else HTTPStatus.ACCEPTED
        return json_reply(code, {"id": run_id, "status": status})


def _bad(message: str) -> HttpError:
    return HttpError(HTTPStatus.BAD_REQUEST, message)


def _refused(message: str) -> HttpError:
    """The database's refusal, with the code it deserves."""
    if message.startswith(("unknown job", "unknown run")):
        return HttpError(HTTPStatus.NOT_FOUND, message)
    if "is disabled" in message:
        return HttpError(HTTPStatus.CONFLICT, message)
    return HttpError(HTTPStatus.BAD_REQUEST, message)


def _run_id(request: Request) -> int:
    text = request.params["id"]
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise HttpError(HTTPStatus.NOT_FOUND, f"unknown run {text[:40]!r}")
    return int(text)


def _int(query: dict[str, str], name: str, low: int, high: int) -> int | None:
    text = query.get(name)
    if text is None or text == "":
        return None
    # The length first: int() of thousands of digits is slow, then refused.
    if len(text) > 19 or not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise _bad(f"{name} must be a whole number from {low} to {high}")
    return int(text)


def db_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "database timeout"
    text = str(exc).strip()
    return "database error: " + redact(text.splitlines()[0] if text else type(exc).__name__)
