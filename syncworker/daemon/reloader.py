"""The reloader: SIGHUP (or reload()) -> a new snapshot -> the services told.

All or nothing: the file is read and validated, every step imported and the
jobs registered in the database before anything in force changes; a reload
that fails anywhere is logged and the running configuration kept. Runs under
way finish with the steps they started with (catalog.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker import systemd
from syncworker.config import ConfigError, JobConfig, Settings
from syncworker.daemon.catalog import Catalog, resolve
from syncworker.db import Store
from syncworker.dberrors import TRANSIENT, first_line
from syncworker.lease import Lease, LeaseTiming
from syncworker.reload import plan_reload

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class Reloader:
    def __init__(
        self,
        *,
        store: Store,
        catalog: Catalog,
        lease: Lease,
        connect: Connect,
        log: FilteringBoundLogger,
        config_source: str,
        load: Callable[[], Settings] | None,
        runs: Callable[[], Iterable[int]],
        rebase_fires: Callable[
            [Mapping[str, JobConfig], Mapping[str, JobConfig], Mapping[str, datetime | None]],
            None,
        ],
        offer: Callable[[psycopg.AsyncConnection[Any]], Any],
        applied: Callable[[], None],
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._lease = lease
        self._connect = connect
        self._log = log
        self._config_source = config_source
        self._load = load
        self._runs = runs
        self._rebase_fires = rebase_fires
        self._offer = offer
        self._applied = applied
        self._asked = asyncio.Event()
        self._reload_with: Settings | None = None

    def request(self, settings: Settings | None) -> None:
        """Reload from `settings`, or from the file (`load`) without them."""
        self._reload_with = settings
        self._asked.set()

    async def run(self) -> None:
        while True:
            await self._asked.wait()
            self._asked.clear()
            given, self._reload_with = self._reload_with, None
            await self._apply_reload(given)

    async def _apply_reload(self, given: Settings | None) -> None:
        # systemd shows "reloading" until READY=1 comes back, failed or not.
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            await self._reload_config(given)
        finally:
            systemd.notify("READY=1")

    async def _reload_config(self, given: Settings | None) -> None:
        source = self._config_source
        try:
            if given is None:
                if self._load is None:
                    raise ConfigError(source, "", "no configuration file to reload from")
                given = self._load()
            old = self._catalog.now
            plan = plan_reload(old.settings, given)
            # Every step is imported before anything changes: all or nothing.
            snapshot = resolve(plan.settings, source)
        except ConfigError as exc:
            self._log.error("config_reload_failed", error=str(exc), kept="the running config")
            return
        jobs = plan.settings.jobs
        try:
            async with self._connect() as conn:
                scopes = await self._store.setup(conn, jobs, source)
                fired = await self._store.fire_state(conn)
        except ConfigError as exc:  # a scopes_sql the database refuses
            self._log.error("config_reload_failed", error=str(exc), kept="the running config")
            return
        except (psycopg.Error, TimeoutError) as exc:
            error = first_line(exc, repr(exc))
            self._log.error("config_reload_failed", error=error, kept="the running config")
            return
        self._rebase_fires(old.jobs, jobs, fired)
        self._catalog.replace(snapshot.with_scopes(scopes))
        self._lease.timing = LeaseTiming(plan.settings.heartbeat_interval)
        try:
            async with self._connect() as conn:
                await self._offer(conn)
        except TRANSIENT as exc:
            # Reservations for a removed job are declined; new jobs go the
            # claim's way until the next reload or restart.
            self._log.warning("offer_failed", error=first_line(exc))
        self._log.info(
            "config_reloaded",
            added=list(plan.added),
            removed=list(plan.removed),
            changed=list(plan.changed),
            restart_needed=list(plan.restart_needed),
            runs_in_flight=sorted(self._runs()),
        )
        self._applied()
