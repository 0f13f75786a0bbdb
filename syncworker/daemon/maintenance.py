"""Maintenance: history pruning, the systemd watchdog, systemd's status line.

Two loops, stopped at different points of a drain: `prune` with intake,
`watchdog` last (systemd must hear from a draining worker).

Leaderless: pruning deletes in id windows (pruning.py) that any number of
workers may walk at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker import systemd
from syncworker.db import Store
from syncworker.pruning import prune_pass

PRUNE_EVERY = 3600.0

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class Maintenance:
    def __init__(
        self,
        *,
        store: Store,
        connect: Connect,
        db_up: asyncio.Event,
        log: FilteringBoundLogger,
        history_days: Callable[[], float],
        runs: Callable[[], Iterable[int]],
        next_fires: Callable[[], Mapping[str, datetime | None]],
    ) -> None:
        self._store = store
        self._connect = connect
        self._db_up = db_up
        self._log = log
        self._history_days = history_days
        self._runs = runs
        self._next_fires = next_fires

    def sd_status(self, state: str) -> None:
        """What `systemctl status` shows: the runs under way, or the next fire."""
        if state == "running":
            text = "running " + ", ".join(f"run {i}" for i in sorted(self._runs()))
        else:
            text = "idle"
        fires = [(t, name) for name, t in self._next_fires().items() if t is not None]
        if fires:
            when, name = min(fires)
            text += f", next {name} at {when.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
        systemd.notify(f"STATUS={text}")

    async def watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while True:
            # Sent from the loop itself: a stuck loop stops the pings.
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def prune(self) -> None:
        """Delete finished runs older than history_days (pruning.py), at start
        and then hourly; a timer, since age is all that decides it."""
        while True:
            await self._db_up.wait()
            days = self._history_days()
            if days > 0:
                try:
                    deleted = await prune_pass(self._store, self._connect, self._log, days)
                except psycopg.Error as exc:
                    deleted = 0
                    self._log.warning("history_prune_failed", error=str(exc).strip()[:200])
                if deleted:
                    self._log.info("history_pruned", deleted=deleted, older_than_days=days)
            await asyncio.sleep(PRUNE_EVERY)
