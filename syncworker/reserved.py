"""Runs trigger() reserved for this worker (sql/005): a wake notification
names one, and the worker claims it before anything of it runs.

Nothing in the notification is trusted: any role may NOTIFY any channel,
and may replay an old wake. The notification only says which run to try;
the claim (`UPDATE ... WHERE id = .. AND reserved_for = me AND status =
'pending'`) decides whether it is ours, and the run starts from the row the
claim returns (job, scope, payload, attempt), never from the message. A
forged or stale wake finds no such row and starts nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker.db import ClaimedRun, Store


class Connect(Protocol):
    def __call__(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]: ...


def is_reservation(payload: str) -> bool:
    """Wake notifications carry a job name, or a reservation as a JSON object."""
    return payload.startswith("{")


def reserved_run_id(payload: str, worker_id: str) -> int | None:
    """The run id a reservation notification names for this worker; None if
    it names another worker or cannot be read. Only a hint of which run to
    try to claim: the claim checks everything against the row."""
    try:
        data = json.loads(payload)
        if not isinstance(data, dict) or data.get("reserved_for") != worker_id:
            return None
        run_id = data.get("id")
        if isinstance(run_id, bool) or not isinstance(run_id, int) or run_id <= 0:
            return None
        return run_id
    except ValueError:
        return None


async def claim(
    store: Store,
    connect: Connect,
    log: FilteringBoundLogger,
    worker_id: str,
    run_id: int,
    jobs: Sequence[str],
    first_steps: Mapping[str, str],
    lock_timeout: str | None = None,
) -> ClaimedRun | None:
    """Claim the run reserved for this worker, as the row the claim returns;
    None when it is not ours to start (not reserved for us, not pending, a
    job not run here, its key running elsewhere) or the claim failed.

    Triggers that joined the run while it was pending all happened before
    this claim, so before its step: the run serves them, and no follow-up is
    needed (the step starts only once the claim returns).

    With `lock_timeout`, a claim that would wait longer for the run's row
    raises LockNotAvailable (the caller claims again where it may wait).
    """
    try:
        async with connect() as conn:
            return await store.claim_reserved(
                conn, worker_id, run_id, jobs, first_steps, lock_timeout
            )
    except psycopg.errors.LockNotAvailable:
        if lock_timeout is not None:
            raise  # the caller's to claim again, waiting
        log.warning("claim_failed", run_id=run_id, error="the run's row stayed locked")
        return None
    except psycopg.Error as exc:
        # Still reserved for us if the claim did not go through: taken on
        # our next reconnect, or released by recovery if we are judged gone.
        log.warning("claim_failed", run_id=run_id, error=str(exc).strip()[:200])
        return None
