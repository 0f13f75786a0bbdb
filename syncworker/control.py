"""Operators' actions from Python, the equivalents of syncworker.pause(),
resume() and cancel() in SQL and of `syncworker pause` / `resume` / `cancel`.

Like trigger_sync, each joins the caller's transaction: durable when the
call returns on an autocommit connection, else with the caller's commit.
Every action is recorded in the `actions` table, by `by` or else the
connection's role.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row

from syncworker.db import queries
from syncworker.db.rows import CancelStatus, Hold, Lifted


class ControlError(ValueError):
    """The database refused the action: an unknown job, scope or run, an
    until that is not in the future."""


def _pause(
    schema: str,
    job: str,
    scope: str | None,
    until: datetime | None,
    reason: str | None,
    by: str | None,
) -> tuple[queries.Query, dict[str, Any]]:
    q = queries.for_schema(schema)
    if until is not None and until.tzinfo is None:
        until = until.astimezone()  # a naive time is this machine's local time, as in the CLI
    params = {"job": job, "scope": scope, "until": until, "reason": reason, "by": by}
    return q["pause"], params


def _resume(
    schema: str, job: str, scope: str | None, by: str | None
) -> tuple[queries.Query, dict[str, Any]]:
    q = queries.for_schema(schema)
    return q["resume"], {"job": job, "scope": scope, "by": by}


async def pause(
    conn: psycopg.AsyncConnection[Any],
    job: str,
    scope: str | None = None,
    *,
    until: datetime | None = None,
    reason: str | None = None,
    by: str | None = None,
    schema: str = "syncworker",
) -> Hold:
    """Hold `job` (or one `scope` of it) on every worker until resume() or
    `until`; returns the hold as written."""
    query, params = _pause(schema, job, scope, until, reason, by)
    with refused():
        row = await queries.one(conn, query, params, Hold)
    assert row is not None  # pause() returns its row or raises
    return row


async def resume(
    conn: psycopg.AsyncConnection[Any],
    job: str,
    scope: str | None = None,
    *,
    by: str | None = None,
    schema: str = "syncworker",
) -> bool:
    """Lift the hold of `job` (or of one `scope`); whether one was in force."""
    query, params = _resume(schema, job, scope, by)
    with refused():
        row = await queries.one(conn, query, params, Lifted)
    return row is not None and row.lifted


def pause_blocking(
    conn: psycopg.Connection[Any],
    job: str,
    scope: str | None = None,
    *,
    until: datetime | None = None,
    reason: str | None = None,
    by: str | None = None,
    schema: str = "syncworker",
) -> Hold:
    """pause(), on a blocking psycopg connection."""
    query, params = _pause(schema, job, scope, until, reason, by)
    with refused(), conn.cursor(row_factory=class_row(Hold)) as cur:
        row = cur.execute(query.composed, params).fetchone()
    assert row is not None
    return row


def resume_blocking(
    conn: psycopg.Connection[Any],
    job: str,
    scope: str | None = None,
    *,
    by: str | None = None,
    schema: str = "syncworker",
) -> bool:
    """resume(), on a blocking psycopg connection."""
    query, params = _resume(schema, job, scope, by)
    with refused(), conn.cursor(row_factory=class_row(Lifted)) as cur:
        row = cur.execute(query.composed, params).fetchone()
    return row is not None and row.lifted


async def cancel(
    conn: psycopg.AsyncConnection[Any],
    run_id: int,
    *,
    reason: str | None = None,
    by: str | None = None,
    events: str = "sync_events",
    schema: str = "syncworker",
) -> str:
    """Cancel run `run_id`: a pending one at once, a running one by its
    owner within a second (`cancel_grace` for a step that does not stop);
    returns the run's status after the request (`cancelled`, `running`, or
    the status of a run that had finished, left as it was). `events` is the
    worker's events_channel, where a pending run's run_cancelled goes."""
    params = {"id": run_id, "reason": reason, "by": by, "events": events}
    q = queries.for_schema(schema)
    with refused():
        row = await queries.one(conn, q["cancel"], params, CancelStatus)
    assert row is not None
    return row.status


@contextlib.contextmanager
def refused() -> Iterator[None]:
    """The database's refusal (22023) as a ControlError naming what was wrong."""
    try:
        yield
    except psycopg.errors.InvalidParameterValue as exc:
        raise ControlError(_message(exc)) from None


def _message(exc: psycopg.Error) -> str:
    text = (exc.diag.message_primary or str(exc)).removeprefix("syncworker: ")
    if exc.diag.message_hint:
        text += f" ({exc.diag.message_hint})"
    return text
