"""The daemon's loop: listener, scheduler, executor and heartbeat as one task
tree that waits on events (a notification, the next cron fire, a run
finishing, a signal), plus the drain on stop.

    NOTIFY / cron fire  ->  triggers.parse  ->  store.trigger (pending, coalesced)
        -> wake  ->  store.claim (SKIP LOCKED)  ->  orchestrator.execute_run
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from structlog.typing import FilteringBoundLogger

from syncworker import schedule, systemd
from syncworker.aio import wait_event
from syncworker.config import JobConfig, Settings
from syncworker.listener import KEEPALIVES, listen_forever
from syncworker.logs import make_logger
from syncworker.orchestrator import RunEnv, execute_run
from syncworker.steps import Step, resolve_job_steps
from syncworker.store import ClaimedRun, Store, fetch_scopes
from syncworker.triggers import JobInfo, Rejected, TriggerRequest, parse_notification
from syncworker.version import VERSION

# A fire noticed later than this counts as missed (misfire policy applies).
MISFIRE_GRACE = 60.0
# Longest the scheduler sleeps without re-reading the clock: a safety net
# against wall-clock jumps (suspend, NTP steps); fires still wake it exactly.
SCHEDULER_MAX_SLEEP = 300.0
STALE_HEARTBEATS = 3


class Worker:
    """One syncworker instance.

    Run it with `await worker.run()` (returns after a stop and drain), or as
    `async with Worker(settings) as w:` inside another asyncio program, whose
    own signal handling then calls `w.stop()`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        log: FilteringBoundLogger | None = None,
        config_source: str = "<config>",
    ) -> None:
        self.settings = settings
        self.log = log or make_logger(settings.log_level, settings.log_format)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.log = self.log.bind(worker_id=self.id)
        self.store = Store(settings.schema, settings.events_channel)
        # Resolving imports every step now: a bad step is a config error at start.
        self._steps: dict[str, list[Step]] = {
            name: resolve_job_steps(name, job, config_source) for name, job in settings.jobs.items()
        }
        self._jobs: Mapping[str, JobConfig] = settings.jobs
        self._scopes: dict[str, tuple[str, ...] | None] = {
            name: job.scopes for name, job in settings.jobs.items()
        }
        self._job_info = self._make_job_info()
        self._claimable = [name for name, job in settings.jobs.items() if job.enabled]

        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._wake = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._reschedule = asyncio.Event()
        self._db_up = asyncio.Event()
        self._ready = asyncio.Event()
        self._runs: dict[int, asyncio.Task[str]] = {}
        self._fire_cursor: dict[str, datetime | None] = {}
        self._lock_key: int | None = None
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._main: asyncio.Task[None] | None = None
        self._claiming: asyncio.Future[bool] | None = None

    # -- public face -----------------------------------------------------------

    @property
    def ready(self) -> asyncio.Event:
        """Set once the worker listens and can serve triggers."""
        return self._ready

    def stop(self) -> None:
        """Begin a drain; a second call cancels in-flight runs at once."""
        if self._stopping.is_set():
            if not self._force.is_set():
                self.log.warning("drain_forced", runs=sorted(self._runs))
                self._force.set()
            return
        self.log.info("drain_started", runs=sorted(self._runs), timeout=self.settings.drain_timeout)
        systemd.notify("STOPPING=1")
        self._stopping.set()
        self._state_changed.set()

    async def __aenter__(self) -> Worker:
        self._main = asyncio.create_task(self.run(), name="syncworker")
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({self._main, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._main.done():
            self._main.result()  # startup failed: raise its error here
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._main is not None:
            await self._main

    async def run(self) -> None:
        """Serve until stop() (or a signal handler calling it), then drain."""
        settings = self.settings
        self.log.info(
            "worker_starting",
            version=VERSION,
            jobs=sorted(self._jobs),
            concurrency=settings.concurrency,
        )
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            settings.database_url,
            min_size=1,
            max_size=settings.concurrency * 2 + 2,
            open=False,
            kwargs={"autocommit": True, **KEEPALIVES},
            check=AsyncConnectionPool.check_connection,
            timeout=10.0,
            reconnect_timeout=float("inf"),
            name="syncworker",
        )
        self._pool = pool
        await pool.open(wait=False)
        try:
            if await self._start():
                await self._serve()
        finally:
            await self._drain()
            await self._mark_stopped()
            await pool.close()
            self.log.info("worker_stopped")

    # -- start ------------------------------------------------------------------

    async def _start(self) -> bool:
        """Migrate, register jobs and this worker; wait out a database outage."""
        delay = 0.2
        down = False
        while not self._stopping.is_set():
            try:
                async with self._connect() as conn:
                    self._scopes = await self.store.setup(conn, self._jobs)
                    self._job_info = self._make_job_info()
                    self._lock_key = await self.store.register_worker(
                        conn, self.id, socket.gethostname(), os.getpid(), VERSION
                    )
                    self._fire_cursor = await self.store.fire_state(conn)
                if down:
                    self.log.info("db_reconnected")
                return True
            except psycopg.OperationalError as exc:
                if not down:
                    self.log.warning("db_disconnected", error=str(exc).strip().splitlines()[0])
                    down = True
                await wait_event(self._stopping, delay)
                delay = min(delay * 2, 10.0)
        return False

    async def _serve(self) -> None:
        async with asyncio.TaskGroup() as tg:
            listener = tg.create_task(self._listen(), name="listener")
            heartbeat = tg.create_task(self._heartbeat(), name="heartbeat")
            scheduler = tg.create_task(self._schedule(), name="scheduler")
            executor = tg.create_task(self._execute(), name="executor")
            watchdog = tg.create_task(self._watchdog(), name="watchdog")
            await self._stopping.wait()
            # Stop taking new work; the listener stays up while runs drain
            # because its session holds the lock that marks this worker alive.
            scheduler.cancel()
            executor.cancel()
            await asyncio.gather(scheduler, executor, return_exceptions=True)
            if self._claiming is not None:  # a claim in flight becomes a run to drain
                await asyncio.gather(self._claiming, return_exceptions=True)
            await self._drain()
            for task in (listener, heartbeat, watchdog):
                task.cancel()

    # -- listening and triggers ---------------------------------------------------

    async def _listen(self) -> None:
        await listen_forever(
            self.settings.database_url,
            [self.settings.channel, self.store.wake],
            log=self.log,
            on_connect=self._on_listen_connect,
            on_notify=self._on_notify,
            on_state=self._on_db_state,
            ping_every=max(self.settings.heartbeat_interval, 1.0) * 3,
        )

    async def _on_listen_connect(self, conn: psycopg.AsyncConnection[Any]) -> None:
        assert self._lock_key is not None
        await self.store.hold_liveness_lock(conn, self._lock_key)

    def _on_db_state(self, up: bool) -> None:
        if not up:
            self._db_up.clear()
            return
        self._db_up.set()
        # Whatever was enqueued while we were deaf is in the table: look.
        self._wake.set()
        self._reschedule.set()
        self._state_changed.set()
        if not self._ready.is_set():
            self._ready.set()
            self.log.info("worker_started", channel=self.settings.channel, jobs=sorted(self._jobs))
            systemd.notify(f"READY=1\nSTATUS=listening on {self.settings.channel}")

    async def _on_notify(self, notify: psycopg.Notify) -> None:
        if notify.channel == self.store.wake:
            self._wake.set()
            return
        self.log.info("trigger_received", payload=notify.payload[:200], sender_pid=notify.pid)
        parsed = parse_notification(notify.payload, self._job_info)
        if isinstance(parsed, Rejected):
            self.log.warning("trigger_rejected", reason=parsed.reason, payload=notify.payload[:200])
            return
        await self._enqueue(parsed)

    async def _enqueue(self, requests: Sequence[TriggerRequest]) -> None:
        try:
            async with self._connect() as conn, conn.transaction():
                for req in requests:
                    ids = await self.store.trigger(
                        conn,
                        req.job,
                        req.scope,
                        source=req.source,
                        triggered_by=req.triggered_by,
                        payload=req.payload,
                    )
                    self.log.debug("trigger_enqueued", job=req.job, scope=req.scope, runs=ids)
        except psycopg.errors.InvalidParameterValue as exc:
            # trigger() refused it (the database's view of the jobs differs).
            reason = exc.diag.message_primary or str(exc)
            self.log.warning("trigger_rejected", reason=reason.removeprefix("syncworker: "))
            return
        except psycopg.Error as exc:
            self.log.error("trigger_failed", error=str(exc).strip().splitlines()[0])
            return
        self._wake.set()

    # -- cron ------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            await self._db_up.wait()
            self._reschedule.clear()
            try:
                delay = await self._schedule_pass()
            except psycopg.OperationalError as exc:
                self.log.warning("schedule_pass_failed", error=str(exc).strip().splitlines()[0])
                await self._db_up.wait()
                await asyncio.sleep(0.1)  # let the pool notice the outage is over
                continue
            await wait_event(self._reschedule, delay)

    async def _schedule_pass(self) -> float:
        """Enqueue every due fire; returns seconds until the next one."""
        now = datetime.now(UTC)
        upcoming: dict[str, datetime | None] = {}
        for name, job in self._jobs.items():
            if not job.enabled or not job.schedule:
                continue
            zone = job.zone
            due = schedule.latest_fire(job.schedule, zone, now)
            last = self._fire_cursor.get(name)
            if due is not None and (last is None or due > last):
                await self._fire(name, job, due, now, baseline=last is None)
                self._fire_cursor[name] = due
            upcoming[name] = schedule.next_fire(job.schedule, zone, now)
        async with self._connect() as conn:
            await self.store.set_next_fire(conn, upcoming)
        soonest = min((t for t in upcoming.values() if t is not None), default=None)
        if soonest is None:
            return SCHEDULER_MAX_SLEEP
        seconds = (soonest - datetime.now(UTC)).total_seconds()
        return min(max(seconds, 0.0), SCHEDULER_MAX_SLEEP)

    async def _fire(
        self, name: str, job: JobConfig, due: datetime, now: datetime, *, baseline: bool
    ) -> None:
        late = (now - due).total_seconds()
        # With no baseline the job has never been seen firing: start counting now.
        run = not baseline and not (job.misfire == "skip" and late > MISFIRE_GRACE)
        async with self._connect() as conn:
            if run and job.scopes_sql:
                await self._refresh_scopes(conn, name, job)
            try:
                result = await self.store.enqueue_fire(conn, name, due, run=run)
            except (psycopg.errors.UniqueViolation, psycopg.errors.InvalidParameterValue) as exc:
                self.log.warning("cron_fire_refused", job=name, scheduled_for=due, error=str(exc))
                return
        if result is None:
            self.log.debug("cron_fire_taken", job=name, scheduled_for=due)
            return
        if run:
            self.log.info(
                "cron_fired",
                job=name,
                scheduled_for=due.isoformat(),
                late_ms=round(late * 1000),
                missed=late > MISFIRE_GRACE,
                runs=[run_id for run_id, _ in result],
            )
            self._wake.set()
        elif not baseline:
            self.log.info("misfire_skipped", job=name, scheduled_for=due.isoformat())

    async def _refresh_scopes(
        self, conn: psycopg.AsyncConnection[Any], name: str, job: JobConfig
    ) -> None:
        assert job.scopes_sql is not None
        scopes = await fetch_scopes(conn, job.scopes_sql)
        if scopes != self._scopes.get(name):
            self.log.info("scopes_changed", job=name, scopes=list(scopes))
            self._scopes[name] = scopes
            self._job_info = self._make_job_info()
            await self.store.set_scopes(conn, name, scopes)

    def _make_job_info(self) -> dict[str, JobInfo]:
        return {
            name: JobInfo(
                enabled=job.enabled,
                scopes=self._scopes.get(name) if (job.scopes or job.scopes_sql) else None,
            )
            for name, job in self._jobs.items()
        }

    # -- executing runs ------------------------------------------------------------

    async def _execute(self) -> None:
        self._wake.set()  # pending runs may be waiting from before we started
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._db_up.wait()
            while len(self._runs) < self.settings.concurrency:
                # Shielded: a stop arriving between the claim's commit and the
                # run's start must not leave a claimed run that nobody runs.
                self._claiming = asyncio.ensure_future(self._claim_one())
                if not await asyncio.shield(self._claiming):
                    break

    async def _claim_one(self) -> bool:
        try:
            async with self._connect() as conn:
                run = await self.store.claim(conn, self.id, self._claimable)
        except psycopg.OperationalError as exc:
            self.log.warning("claim_failed", error=str(exc).strip().splitlines()[0])
            return False  # the listener's reconnect wakes us again
        if run is None:
            return False
        self._start_run(run)
        return True

    def _start_run(self, run: ClaimedRun) -> None:
        env = RunEnv(store=self.store, connect=self._connect, log=self.log, stopping=self._stopping)
        task = asyncio.create_task(
            execute_run(run, self._jobs[run.job], self._steps[run.job], env), name=f"run-{run.id}"
        )
        self._runs[run.id] = task
        self._state_changed.set()

        def done(t: asyncio.Task[str]) -> None:
            self._runs.pop(run.id, None)
            self._state_changed.set()
            self._wake.set()  # a slot is free, and a follow-up of this key may wait
            if not t.cancelled() and t.exception() is not None:
                self.log.error("run_crashed", run_id=run.id, exc_info=t.exception())

        task.add_done_callback(done)

    async def _drain(self) -> None:
        """Wait for in-flight runs up to drain_timeout (or a second signal), then
        cancel the rest; each cancelled run puts itself back to pending."""
        tasks = set(self._runs.values())
        if not tasks:
            return
        gathered: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
        force: asyncio.Future[Any] = asyncio.create_task(self._force.wait())
        try:
            await asyncio.wait(
                {gathered, force},
                timeout=self.settings.drain_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            force.cancel()
        leftover = [t for t in tasks if not t.done()]
        if leftover:
            self.log.warning("drain_cancelling", runs=sorted(self._runs))
            for task in leftover:
                task.cancel()
        await gathered

    # -- liveness -------------------------------------------------------------------

    def _state(self) -> str:
        if self._stopping.is_set():
            return "draining"
        return "running" if self._runs else "idle"

    async def _heartbeat(self) -> None:
        """Beat every heartbeat_interval on a fixed deadline, and write state
        changes as they happen. State changes never push the deadline back: a
        busy worker must keep beating, or others would take its live runs."""
        loop = asyncio.get_running_loop()
        interval = self.settings.heartbeat_interval
        next_beat = loop.time() + interval
        last_state = ""
        while True:
            await wait_event(self._state_changed, max(0.0, next_beat - loop.time()))
            self._state_changed.clear()
            due = loop.time() >= next_beat
            if due:
                next_beat = loop.time() + interval
            if not self._db_up.is_set():
                continue
            state = self._state()
            try:
                async with self._connect() as conn:
                    if due or state != last_state:
                        await self.store.heartbeat(conn, self.id, state)
                        last_state = state
                    if due:
                        await self._recover(conn)
            except psycopg.OperationalError as exc:
                self.log.warning("heartbeat_failed", error=str(exc).strip().splitlines()[0])
                continue
            if due and state != "draining":
                self._wake.set()  # safety net: a missed wake-up costs one interval at most
            if state != "draining":
                self._sd_status(state)

    async def _recover(self, conn: psycopg.AsyncConnection[Any]) -> None:
        recovered = await self.store.recover_orphans(
            conn, self.id, self.settings.heartbeat_interval * STALE_HEARTBEATS, list(self._runs)
        )
        for row in recovered:
            self.log.warning(
                "run_recovered",
                run_id=row["id"],
                job=row["job"],
                scope=row["scope"],
                status=row["status"],
                reason="worker lost",
            )
        if recovered:
            self._wake.set()

    def _sd_status(self, state: str) -> None:
        if state == "running":
            text = "running " + ", ".join(f"run {i}" for i in sorted(self._runs))
        else:
            text = "idle"
        systemd.notify(f"STATUS={text}")

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while True:
            # Sent from the loop itself: a stuck loop stops the pings.
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _mark_stopped(self) -> None:
        if self._lock_key is None:
            return
        try:
            async with self._connect(timeout=5.0) as conn:
                await self.store.heartbeat(conn, self.id, "stopped")
        except (psycopg.OperationalError, TimeoutError) as exc:
            self.log.warning("heartbeat_failed", error=str(exc).strip().splitlines()[0])

    # -- helpers -----------------------------------------------------------------------

    @asynccontextmanager
    async def _connect(
        self, timeout: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        assert self._pool is not None
        async with self._pool.connection(timeout=timeout) as conn:
            yield conn
