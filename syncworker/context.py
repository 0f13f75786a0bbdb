"""SyncContext: everything a step sees of its run."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker.counters import COUNTERS, Counters
from syncworker.mirror import DEFAULT_BATCH_SIZE, MirrorResult, Rows, mirror

ConnectionFactory = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class StopRequest:
    """The worker's drain request as one step sees it.

    Reads like an asyncio.Event (`is_set()`, `await wait()`), and remembers
    whether this step saw it set: a step that saw it and returned stopped at
    a safe point before its end, so the run is requeued instead of being
    recorded as succeeded. A step that never looks simply finishes.
    """

    def __init__(self, event: asyncio.Event) -> None:
        self._event = event
        self.observed = False

    def is_set(self) -> bool:
        if self._event.is_set():
            self.observed = True
            return True
        return False

    async def wait(self) -> bool:
        await self._event.wait()
        self.observed = True
        return True

    def requested(self) -> bool:
        """Whether a drain is under way, without counting as seen: for the
        worker's own bookkeeping, never for a step's decision."""
        return self._event.is_set()


@dataclass
class SyncContext:
    """Handed to every step. Counters add up into the run's row.

    `stopping` is set when the worker starts draining: a long step should
    check it at safe points and return early; a run whose step saw it set is
    requeued (pending) rather than recorded as done.
    """

    run_id: int
    job: str
    scope: str | None
    source: str
    triggered_by: str | None
    payload: dict[str, Any]
    attempt: int
    log: FilteringBoundLogger
    stopping: StopRequest
    _connect: ConnectionFactory
    _run_counters: Counters
    _step_counters: Counters = field(default_factory=Counters)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # The cron fire this run is for (its scheduled time), None for a trigger.
    scheduled_for: datetime | None = None

    def count(self, **amounts: int) -> None:
        """Add to the run's counters: processed, inserted, updated, deleted, errored.

        inserted/updated/deleted also count as processed unless `processed`
        is given explicitly.
        """
        unknown = set(amounts) - set(COUNTERS)
        if unknown:
            raise ValueError(f"unknown counter(s) {sorted(unknown)}; use {', '.join(COUNTERS)}")
        if "processed" not in amounts:
            amounts = {
                **amounts,
                "processed": sum(amounts.get(k, 0) for k in ("inserted", "updated", "deleted")),
            }
        with self._lock:  # plain functions call this from a worker thread
            for counters in (self._run_counters, self._step_counters):
                for key, value in amounts.items():
                    setattr(counters, key, getattr(counters, key) + int(value))

    def total(self, expected: int) -> None:
        """The number of records this run expects to handle, for progress."""
        with self._lock:
            self._run_counters.total = int(expected)
            self._step_counters.total = int(expected)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection to the application database, returned when the block ends."""
        async with self._connect() as conn:
            yield conn

    async def mirror(
        self,
        table: str | Sequence[str],
        rows: Rows,
        *,
        key: Sequence[str],
        scope_column: str | None = None,
        delete_missing: bool = False,
        changes_table: str | Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> MirrorResult:
        """Make `table` hold `rows` in one transaction and count what changed
        (see syncworker.mirror). With `scope_column`, only this run's scope."""
        async with self.connection() as conn:
            result = await mirror(
                conn,
                table,
                rows,
                key=key,
                scope=self.scope,
                scope_column=scope_column,
                delete_missing=delete_missing,
                changes_table=changes_table,
                batch_size=batch_size,
                run_id=self.run_id,
            )
        # Counted once committed: a rolled-back mirror changed nothing.
        self.count(
            processed=result.processed,
            inserted=result.inserted,
            updated=result.updated,
            deleted=result.deleted,
        )
        self.log.info(
            "mirror_done",
            table=table if isinstance(table, str) else ".".join(table),
            inserted=result.inserted,
            updated=result.updated,
            unchanged=result.unchanged,
            deleted=result.deleted,
        )
        return result

    def snapshot(self) -> tuple[Counters, Counters]:
        """Copies of (run, step) counters, taken under the lock."""
        with self._lock:
            return (Counters(**vars(self._run_counters)), Counters(**vars(self._step_counters)))
