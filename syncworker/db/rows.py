"""Typed rows: the targets of psycopg.rows.class_row, one per statement shape.

A row's fields are the columns its statement returns, by name (the files in
db/sql/queries/ name every column). `event` is the pg_notify() a statement
runs in its RETURNING (void): a column so that the event goes out with the
write, never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ClaimedRun:
    id: int
    job: str
    scope: str | None
    source: str
    triggered_by: str | None
    payload: dict[str, Any]
    scheduled_for: datetime | None
    attempt: int
    max_attempts: int
    worker_id: str
    # The run_steps row of this attempt's first step, when the claim wrote it.
    first_step_id: int | None = None


@dataclass(frozen=True)
class ClaimRow:
    """claim_next: the run as its claim wrote it."""

    id: int
    job: str
    scope: str | None
    source: str
    triggered_by: str | None
    payload: dict[str, Any] | None
    scheduled_for: datetime | None
    attempt: int
    max_attempts: int
    event: object
    first_step_id: int | None

    def run(self, worker_id: str) -> ClaimedRun:
        return ClaimedRun(
            id=self.id,
            job=self.job,
            scope=self.scope,
            source=self.source,
            triggered_by=self.triggered_by,
            payload=self.payload or {},
            scheduled_for=self.scheduled_for,
            attempt=self.attempt,
            max_attempts=self.max_attempts,
            worker_id=worker_id,
            first_step_id=self.first_step_id,
        )


@dataclass(frozen=True)
class ReservedClaimRow(ClaimRow):
    """claim_reserved: the same, and how many reservations it gave back."""

    released: int


@dataclass(frozen=True)
class Triggered:
    run_id: int
    created: bool


@dataclass(frozen=True)
class TriggeredForCaller:
    run_id: int


@dataclass(frozen=True)
class TriggeredAndClaimed:
    run_id: int
    created: bool
    # Set when the run was inserted claimed for the calling worker.
    step_id: int | None
    max_attempts: int | None


@dataclass(frozen=True)
class EnqueuedFire:
    """enqueue_fire: a run of the fire, or (both None) a fire with no run."""

    run_id: int | None
    created: bool | None


@dataclass(frozen=True)
class ClaimedFire:
    name: str


@dataclass(frozen=True)
class FireState:
    name: str
    last_fire_at: datetime | None


@dataclass(frozen=True)
class FencedWrite:
    """A fenced write that went through (no row: the run was not ours)."""

    id: int
    event: object


@dataclass(frozen=True)
class RowId:
    id: int


@dataclass(frozen=True)
class Requeued:
    status: str
    event: object


@dataclass(frozen=True)
class Released:
    released: int


@dataclass(frozen=True)
class Freed:
    freed: int


@dataclass(frozen=True)
class LockKey:
    lock_key: int


@dataclass(frozen=True)
class LockTaken:
    taken: bool


@dataclass(frozen=True)
class Heartbeat:
    running: list[int]


@dataclass(frozen=True)
class Recovered:
    id: int
    job: str
    scope: str | None
    status: str
    event: object

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "job": self.job, "scope": self.scope, "status": self.status}


@dataclass(frozen=True)
class MaxId:
    max_id: int


@dataclass(frozen=True)
class Allowed:
    allowed: bool | None


@dataclass(frozen=True)
class Found:
    found: int


@dataclass(frozen=True)
class Version:
    version: int


@dataclass(frozen=True)
class JobName:
    name: str


@dataclass(frozen=True)
class PendingCount:
    job: str
    pending: int


@dataclass(frozen=True)
class LastSuccess:
    job: str
    scope: str | None
    finished_at: float


@dataclass(frozen=True)
class Clock:
    now: datetime


@dataclass(frozen=True)
class ServerVersion:
    version: str


@dataclass(frozen=True)
class Hold:
    """pause(): a job's or a scope's hold, as written."""

    job: str
    scope: str | None
    paused_at: datetime
    paused_by: str
    reason: str | None
    until: datetime | None


@dataclass(frozen=True)
class Lifted:
    lifted: bool


@dataclass(frozen=True)
class HoldEnd:
    until: datetime | None


@dataclass(frozen=True)
class CancelWhy:
    why: str


@dataclass(frozen=True)
class CancelStatus:
    status: str


@dataclass(frozen=True)
class Held:
    held: bool


@dataclass(frozen=True)
class BackfillJob:
    """backfill_job: what a backfill's fires are computed from."""

    name: str
    enabled: bool
    schedule: list[str]
    timezone: str
    scopes: list[str] | None
    misfire_limit: int


@dataclass(frozen=True)
class Backfilled:
    """backfill: one run queued for one fire."""

    run_id: int
    scope: str | None
    scheduled_for: datetime
