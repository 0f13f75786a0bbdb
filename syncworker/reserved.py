"""Runs trigger() reserved for this worker (sql/005): read the reservation off
the wake notification, and write its claim while the step already runs.

A reservation saves the claim's round trip before the step: no other worker
may claim a reserved run, so the reserved worker can start at once and write
the claim alongside. If the claim finds the reservation gone (released by a
recovery that judged this worker dead), the run is not ours and is cancelled.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker.store import ClaimedRun, Store

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]

# How long a reserved run's claim is retried through a lost connection. The
# step runs meanwhile; after this the run is given up here, and the
# reservation is released when the worker reconnects.
CLAIM_FOR = 10.0


def is_reservation(payload: str) -> bool:
    """Wake notifications carry a job name, or a reservation as a JSON object."""
    return payload.startswith("{")


def read_reservation(payload: str, worker_id: str) -> ClaimedRun | None:
    """The run a reservation notification names, as this worker would claim
    it; None if it is reserved for another worker or cannot be read."""
    try:
        data = json.loads(payload)
        if data.get("reserved_for") != worker_id:
            return None
        scheduled = data.get("scheduled_for")
        return ClaimedRun(
            id=int(data["id"]),
            job=str(data["job"]),
            scope=None if data.get("scope") is None else str(data["scope"]),
            source=str(data["source"]),
            triggered_by=None if data.get("triggered_by") is None else str(data["triggered_by"]),
            payload={},  # reserved through a notification only when empty (sql/005)
            scheduled_for=None if scheduled is None else datetime.fromisoformat(scheduled),
            attempt=int(data["attempt"]) + 1,
            max_attempts=int(data["max_attempts"]),
            worker_id=worker_id,
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None  # written by trigger() alone; a malformed one is a bug, not input


async def claim(
    store: Store,
    connect: Connect,
    log: FilteringBoundLogger,
    run: ClaimedRun,
    first_step: str,
) -> int | None:
    """Write the reserved run's claim; its first step's row id, or None when
    the run is not (or could not be made) this worker's.

    Until the claim is in, the run is still `pending`, and a trigger of its
    key joins it instead of asking for a run after it; but the step may have
    begun before that trigger. So when triggers joined the run, a follow-up
    run is requested: every trigger is followed by a run that starts after it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLAIM_FOR
    delay = 0.05
    while True:
        try:
            async with connect() as conn:
                claimed = await store.claim_reserved(conn, run, first_step)
            break
        except psycopg.OperationalError as exc:
            if loop.time() + delay > deadline:
                log.warning("claim_failed", run_id=run.id, error=str(exc).strip()[:200])
                return None
            await asyncio.sleep(delay)  # backoff between reconnect attempts
            delay = min(delay * 2, 2.0)
        except psycopg.Error as exc:
            log.error("claim_failed", run_id=run.id, error=str(exc).strip()[:200])
            return None
    if claimed is None:
        return None
    step_id, triggers = claimed
    if triggers > 1:
        await _follow_up(store, connect, log, run, triggers - 1)
    return step_id


async def _follow_up(
    store: Store, connect: Connect, log: FilteringBoundLogger, run: ClaimedRun, joined: int
) -> None:
    """Request the run after this one for triggers that joined it while its
    step may already have been under way."""
    try:
        async with connect() as conn:
            made = await store.trigger(
                conn,
                run.job,
                run.scope,
                source=run.source,
                triggered_by=run.triggered_by,
                payload=run.payload,
            )
    except psycopg.Error as exc:
        log.error("followup_failed", run_id=run.id, joined=joined, error=str(exc).strip()[:200])
        return
    # A run nobody triggered directly: said at info, with its id, so that
    # whoever counts runs against triggers can tell where it came from.
    [(followup_id, created)] = made
    log.info(
        "followup_requested", run_id=run.id, joined=joined, followup_id=followup_id, created=created
    )
