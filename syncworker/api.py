"""trigger_sync: request runs from Python, the equivalent of syncworker.trigger().

The request joins the caller's transaction: on an autocommit connection it is
durable when the call returns; otherwise it commits (or rolls back) with the
caller's own work, like an outbox.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from syncworker.db.queries import for_schema
from syncworker.db.rows import TriggeredForCaller
from syncworker.triggers import MAX_RUN_AFTER

_ROW = class_row(TriggeredForCaller)


class TriggerError(ValueError):
    """The database refused the trigger: unknown job or scope, disabled job,
    a negative run_after."""


def _calls(
    job: str,
    scope: str | None,
    scopes: Sequence[str] | None,
    source: str,
    triggered_by: str | None,
    payload: Mapping[str, Any] | None,
    run_after: float | timedelta | None,
) -> list[dict[str, Any]]:
    """The parameters of one trigger() call per scope asked for."""
    if scope is not None and scopes is not None:
        raise TypeError("give scope or scopes, not both")
    if isinstance(run_after, int | float) and not (
        math.isfinite(run_after) and 0 <= run_after <= MAX_RUN_AFTER
    ):
        raise TriggerError(f"run_after must be a number of seconds from 0 to {MAX_RUN_AFTER:.0f}")
    delay = timedelta(seconds=run_after) if isinstance(run_after, int | float) else run_after
    chosen = list(dict.fromkeys(scopes)) if scopes is not None else [scope]
    body = Jsonb(dict(payload or {}))
    return [
        {
            "job": job,
            "scope": one,
            "source": source,
            "by": triggered_by,
            "payload": body,
            "run_after": delay,
        }
        for one in chosen
    ]


async def trigger_sync(
    conn: psycopg.AsyncConnection[Any],
    job: str,
    scope: str | None = None,
    *,
    scopes: Sequence[str] | None = None,
    source: str = "python",
    triggered_by: str | None = None,
    payload: Mapping[str, Any] | None = None,
    run_after: float | timedelta | None = None,
    schema: str = "syncworker",
) -> list[int]:
    """Request runs of `job` (every scope when none is given); returns run ids.
    With `run_after` (seconds or a timedelta) the runs start no sooner than
    that from now; a pending run joined moves its start to the later time."""
    ids: list[int] = []
    q = for_schema(schema)
    query = q["trigger_for_caller"].composed
    try:
        for params in _calls(job, scope, scopes, source, triggered_by, payload, run_after):
            async with conn.cursor(row_factory=_ROW) as cur:
                await cur.execute(query, params)
                ids.extend(int(row.run_id) for row in await cur.fetchall())
    except psycopg.errors.InvalidParameterValue as exc:
        raise TriggerError(_message(exc)) from None
    return ids


def trigger_sync_blocking(
    conn: psycopg.Connection[Any],
    job: str,
    scope: str | None = None,
    *,
    scopes: Sequence[str] | None = None,
    source: str = "python",
    triggered_by: str | None = None,
    payload: Mapping[str, Any] | None = None,
    run_after: float | timedelta | None = None,
    schema: str = "syncworker",
) -> list[int]:
    """The same as trigger_sync, on a blocking psycopg connection."""
    ids: list[int] = []
    q = for_schema(schema)
    query = q["trigger_for_caller"].composed
    try:
        for params in _calls(job, scope, scopes, source, triggered_by, payload, run_after):
            with conn.cursor(row_factory=_ROW) as cur:
                cur.execute(query, params)
                ids.extend(int(row.run_id) for row in cur.fetchall())
    except psycopg.errors.InvalidParameterValue as exc:
        raise TriggerError(_message(exc)) from None
    return ids


def _message(exc: psycopg.Error) -> str:
    text = (exc.diag.message_primary or str(exc)).removeprefix("syncworker: ")
    if exc.diag.message_hint:
        text += f" ({exc.diag.message_hint})"
    return text
