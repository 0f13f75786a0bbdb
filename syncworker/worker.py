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
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import psycopg
from psycopg.pq import ConnStatus
from psycopg_pool import AsyncConnectionPool
from structlog.typing import FilteringBoundLogger

from syncworker import reserved, runtime, schedule, systemd
from syncworker.aio import cancel_and_wait, wait_event
from syncworker.config import ConfigError, JobConfig, Settings
from syncworker.db import ClaimedRun, Store, fetch_scopes, session
from syncworker.dbclock import DbClock
from syncworker.dberrors import TRANSIENT, TRANSIENT_OR_TIMEOUT, config_problem
from syncworker.exits import EX_SOFTWARE
from syncworker.http import start_http, worker_routes
from syncworker.lease import Lease, LeaseTiming, Token
from syncworker.listener import KEEPALIVES, MAX_BACKOFF, listen_forever
from syncworker.listenprobe import notifications_arrive
from syncworker.logs import make_logger
from syncworker.metrics import Metrics
from syncworker.orchestrator import RunEnv, execute_run
from syncworker.pruning import prune_pass
from syncworker.reload import plan_reload
from syncworker.steppool import make_step_pool
from syncworker.steps import Step, resolve_job_steps
from syncworker.triggers import JobInfo, Rejected, TriggerRequest, parse_notification
from syncworker.version import VERSION

# A fire noticed later than this counts as missed (misfire policy applies).
MISFIRE_GRACE = 60.0
# Longest the scheduler sleeps without re-reading the clock: a safety net
# against wall-clock jumps (suspend, NTP steps); fires still wake it exactly.
SCHEDULER_MAX_SLEEP = 300.0
RECONNECT_ATTEMPT = 10.0
PRUNE_EVERY = 3600.0
# A pooled connection that completed its work less than this long ago, with
# no outage seen since, is handed out without the pool's check: a round trip
# that cost as much again as the claim it preceded. One that died within the
# window fails its statement with the OperationalError every caller handles
# already, and the pool drops it.
CHECK_IDLE_AFTER = 1.0
# How long after a change of state (idle, running, draining) it is written.
STATE_SETTLE = 0.2
# How long closing a pool waits for its connection attempts in flight.
POOL_CLOSE = 0.5
# The longest a NOTIFY's enqueue waits for a lock while the listener waits
# for it (see _enqueue). Two triggers of one key contend for milliseconds.
LISTENER_LOCK_TIMEOUT = "50ms"
# Deferred enqueues that may wait on locks at once, each holding a pooled
# connection; the pool has 2 per slot and 2 more.
DEFERRED_ENQUEUES = 2


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
        load: Callable[[], Settings] | None = None,
    ) -> None:
        """`load` re-reads the configuration for `reload()` (SIGHUP); without
        it, reload() needs the new settings passed in."""
        self.settings = settings
        self._load = load
        self.log = log or make_logger(settings.log_level, settings.log_format)
        self.id = f"w-{secrets.token_hex(6)}"  # opaque: runs.worker_id is read by apps
        self.log = self.log.bind(worker_id=self.id)
        self.store = Store(settings.schema, settings.events_channel)
        self.metrics = Metrics(VERSION, self.id, settings.jobs)
        self._config_source = config_source
        # Resolving imports every step now: a bad step is a config error at start.
        self._steps: dict[str, list[Step]] = {
            name: resolve_job_steps(name, job, config_source, settings.database_url)
            for name, job in settings.jobs.items()
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
        self._envs: dict[int, RunEnv] = {}
        # Each run's step work beyond its task (runtime.py); a run whose task
        # ended with steps abandoned but still running stays in _lingering,
        # holding its slot, until they end.
        self._work: dict[int, runtime.RunWork] = {}
        self._lingering: dict[int, runtime.RunWork] = {}
        # What the process should exit with: 70 once the worker stopped by
        # itself (an async step it could not cancel), never 0 then.
        self.exit_code = 0
        self._drain_deadline: float | None = None
        self._said_abandoned = False
        # Set when the liveness session was re-established: the next beat
        # checks at once which runs are still ours.
        self._recheck = False
        # Until then, other workers' missing locks and stale heartbeats prove
        # nothing: we have just reconnected, and so may they be about to.
        self._judge_peers_at = 0.0
        self._fire_cursor: dict[str, datetime | None] = {}
        self._lock_key: int | None = None
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._step_pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        # One release of untaken reservations at a time (_release_untaken).
        self._releasing: asyncio.Future[None] | None = None
        self._release_again = False
        # Deferred enqueues waiting for a key's lock (see _enqueue): a few
        # at a time, so NOTIFYs of locked keys cannot take the whole pool.
        self._deferred = asyncio.Semaphore(DEFERRED_ENQUEUES)
        self._used_at: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )
        self._main: asyncio.Task[None] | None = None
        self._claiming: asyncio.Future[bool] | None = None
        self._reload = asyncio.Event()
        self._reload_with: Settings | None = None
        self._next_fires: dict[str, datetime | None] = {}
        self._clock = DbClock(self.log)
        # Fire-and-forget writes (releasing a reservation): held so that
        # asyncio does not collect them mid-flight.
        self._background: set[asyncio.Task[Any]] = set()
        # Reserved runs waiting for our claim in flight before being taken.
        self._deciding: set[int] = set()
        # trigger_and_claim() calls in flight that may claim a run for us:
        # each holds a slot, as a claim in flight does.
        self._starting = 0
        # Proof that no peer may take our runs over yet (lease.py); renewed
        # by each heartbeat write, and checked by the runs' steps.
        self._lease = Lease(LeaseTiming(settings.heartbeat_interval))

    # -- public face -----------------------------------------------------------

    @property
    def ready(self) -> asyncio.Event:
        """Set once the worker listens and can serve triggers."""
        return self._ready

    def health(self) -> str | None:
        """None while the worker serves triggers; otherwise why not, in a few words."""
        if self._stopping.is_set():
            return "draining"
        if not self._ready.is_set():
            return "starting"
        if not self._db_up.is_set():
            return "database down"
        if not self._lease.valid():
            # The listener may still hear, but no heartbeat got through in
            # time (a stalled pool, a database refusing writes).
            return "heartbeat not confirmed"
        return None

    def reload(self, settings: Settings | None = None) -> None:
        """Apply a new configuration without dropping runs in flight (SIGHUP).

        Without `settings`, the `load` given to the constructor reads it. Jobs,
        schedules, steps, drain_timeout, heartbeat_interval and history_days
        change; a config that fails to load or resolve is logged and the
        running one kept. Runs already under way finish as they started.
        """
        self._reload_with = settings
        self._reload.set()

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
        # Bound before anything else, so a taken port fails the start at once
        # and a probe sees "starting" while the database is still awaited.
        http = None
        if settings.http:
            routes = worker_routes(
                health=self.health,
                db_up=self._db_up.is_set,
                connect=self._connect,
                store=self.store,
                metrics=self.metrics,
            )
            http = await start_http(
                settings.http, routes, log=self.log, config_source=self._config_source
            )
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            settings.database_url,
            min_size=1,
            max_size=settings.concurrency * 2 + 2,
            open=False,
            # Behind a transaction-mode pooler a connection is another
            # server's at each transaction: no server-side prepared statements.
            kwargs={
                "autocommit": True,
                **KEEPALIVES,
                **({"prepare_threshold": None} if settings.pooler == "transaction" else {}),
            },
            check=self._check_connection,
            timeout=10.0,
            # psycopg_pool doubles the delay between connection attempts with
            # no cap for as long as one attempt lasts: under an infinite
            # timeout a long outage left hours between tries. A finite one
            # ends the attempt, and the next checkout starts a fresh one at
            # once, so the pool is never more than a few seconds behind the
            # listener, which reconnects on its own capped back-off.
            reconnect_timeout=RECONNECT_ATTEMPT,
            name="syncworker",
        )
        self._pool = pool
        await pool.open(wait=False)
        self._step_pool = make_step_pool(settings, self._check_connection)
        await self._step_pool.open(wait=False)
        try:
            if await self._start():
                await self._serve()
        finally:
            await self._drain()
            self._lease.close()
            await self._mark_stopped()
            if http is not None:
                await http.close()
            # Not the default 5 s: a connection attempt to a database that
            # is down must not hold the exit (nothing is left to write).
            await self._step_pool.close(timeout=POOL_CLOSE)
            await pool.close(timeout=POOL_CLOSE)
            self.log.info("worker_stopped")

    # -- start ------------------------------------------------------------------

    async def _start(self) -> bool:
        """Migrate, register jobs and this worker; wait out a database outage.
        A stop ends the wait at once, even inside a connection attempt."""
        attempt = asyncio.ensure_future(self._start_attempts())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({attempt, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not attempt.done():
            await cancel_and_wait([attempt])
            return False
        return attempt.result()

    async def _start_attempts(self) -> bool:
        delay = 0.2
        down = False
        while not self._stopping.is_set():
            try:
                async with self._connect() as conn:
                    self._scopes = await self.store.setup(conn, self._jobs, self._config_source)
                    self._job_info = self._make_job_info()
                    sent = time.monotonic()
                    self._lock_key = await self.store.register_worker(
                        conn,
                        self.id,
                        socket.gethostname(),
                        os.getpid(),
                        VERSION,
                        takeover_after=self._lease.timing.takeover_after,
                        stale_after=self._lease.timing.stale_after,
                    )
                    self._lease.renew(sent, time.monotonic())  # its heartbeat_at is now()
                    await self._offer(conn)
                    self._fire_cursor = await self.store.fire_state(conn)
                if self.settings.listen:
                    await self._check_listening()
                if down:
                    self.log.info("db_reconnected")
                return True
            except TRANSIENT as exc:
                # The pool's timeout hides why its connections failed: ask
                # the server directly, so a refusal that retrying cannot
                # mend (a wrong role, database or password) ends the start.
                await self._refuse_bad_settings()
                if not down:
                    self.log.warning("db_disconnected", error=str(exc).strip().splitlines()[0])
                    down = True
                await wait_event(self._stopping, delay)
                delay = min(delay * 2, 10.0)
        return False

    async def _check_listening(self) -> None:
        """ConfigError (exit 78) if NOTIFYs cannot reach the listening session
        (listenprobe.py): a transaction-mode pooler in its way."""
        if await notifications_arrive(self.settings.listen_conninfo, KEEPALIVES):
            return
        key = "listen_url" if self.settings.listen_url else "database_url"
        raise ConfigError(
            self._config_source,
            key,
            "a NOTIFY sent on this connection never came back to it, so no trigger would"
            " be heard (a transaction-mode pooler such as PgBouncer?): set listen_url to"
            ' a direct connection to PostgreSQL and pooler = "transaction", or'
            " listen = false to poll every poll_interval seconds instead",
        )

    async def _refuse_bad_settings(self) -> None:
        """Raise ConfigError (exit 78) with the server's reason if it refuses
        our connection settings; return for an outage or success."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.settings.database_url, autocommit=True, **KEEPALIVES
            )
        except psycopg.Error as exc:
            reason = config_problem(exc)
            if reason is not None:
                raise ConfigError(
                    self._config_source, "database_url", f"the server refused it: {reason}"
                ) from None
            return
        await conn.close()

    async def _serve(self) -> None:
        self._lease.start(self._on_lease_lapsed)
        async with asyncio.TaskGroup() as tg:
            listener = tg.create_task(self._listen(), name="listener")
            heartbeat = tg.create_task(self._heartbeat(), name="heartbeat")
            scheduler = tg.create_task(self._schedule(), name="scheduler")
            executor = tg.create_task(self._execute(), name="executor")
            watchdog = tg.create_task(self._watchdog(), name="watchdog")
            reloader = tg.create_task(self._reloader(), name="reloader")
            pruner = tg.create_task(self._prune_history(), name="pruner")
            await self._stopping.wait()
            # Stop taking new work; the listener stays up while runs drain
            # because its session holds the lock that marks this worker alive.
            await cancel_and_wait([scheduler, executor, reloader, pruner])
            if self._claiming is not None:  # a claim in flight becomes a run to drain
                await asyncio.gather(self._claiming, return_exceptions=True)
            await self._drain()
            await cancel_and_wait([listener, heartbeat, watchdog])

    # -- listening and triggers ---------------------------------------------------

    async def _listen(self) -> None:
        if not self.settings.listen:
            await self._poll()
            return
        await listen_forever(
            self.settings.listen_conninfo,
            [self.settings.channel, self.store.wake],
            log=self.log,
            on_connect=self._on_listen_connect,
            on_notify=self._on_notify,
            on_state=self._on_db_state,
            ping_every=max(self.settings.heartbeat_interval, 1.0) * 3,
            ping_deadline=max(self.settings.heartbeat_interval, 1.0) * 2,
        )

    async def _poll(self) -> None:
        """`listen = false`: no session to LISTEN on (README, "Production
        databases"). Every poll_interval the database is asked whether it is
        there, and the executor looks for pending runs; NOTIFYs are not
        heard, trigger() calls and cron fires are. Without a session, no
        liveness lock is held: peers judge this worker by its heartbeat."""
        up: bool | None = None
        while True:
            try:
                async with self._connect() as conn:
                    await session.ping(conn)
                now_up = True
            except TRANSIENT as exc:
                now_up = False
                if up is not False:
                    self.log.warning("db_disconnected", error=str(exc).strip().splitlines()[0])
            if now_up != up:
                if now_up and up is False:
                    self.log.info("db_reconnected")
                self._on_db_state(now_up)
                up = now_up
            self._wake.set()
            await asyncio.sleep(self.settings.poll_interval)  # poll mode: polling is the point

    async def _on_listen_connect(self, conn: psycopg.AsyncConnection[Any]) -> None:
        assert self._lock_key is not None
        await self.store.hold_liveness_lock(conn, self._lock_key)

    def _on_db_state(self, up: bool) -> None:
        self.metrics.database_state(up)
        if not up:
            self._db_up.clear()
            self._used_at.clear()  # the pool's connections may be dead too: check them all
            return
        self._db_up.set()
        self._recheck = True
        if self._ready.is_set():  # a reconnect: the outage may have cut every session
            self._judge_peers_at = asyncio.get_running_loop().time() + self._peer_grace()
        # Whatever was enqueued while we were deaf is in the table: look.
        self._wake.set()
        self._reschedule.set()
        self._state_changed.set()
        if not self._ready.is_set():
            self._ready.set()
            self.log.info("worker_started", channel=self.settings.channel, jobs=sorted(self._jobs))
            systemd.notify(f"READY=1\nSTATUS=listening on {self.settings.channel}")

    async def _on_notify(
        self, session: psycopg.AsyncConnection[Any] | None, notify: psycopg.Notify
    ) -> None:
        if notify.channel == self.store.wake:
            if reserved.is_reservation(notify.payload):
                await self._on_reservation(notify.payload, session)
            else:
                self._wake.set()
            return
        self.metrics.count_trigger("received")
        said = False  # trigger_received, which every notification gets first
        try:
            parsed = parse_notification(notify.payload, self._job_info)
            if isinstance(parsed, Rejected):
                said = self._log_received(notify)
                self.metrics.count_trigger("rejected")
                self.log.warning(
                    "trigger_rejected", reason=parsed.reason, payload=notify.payload[:200]
                )
                return
            # The call goes out first, and the line is written while the
            # database works on it: a log line is a tenth of the time from
            # the NOTIFY to the step.
            enqueue = asyncio.ensure_future(self._enqueue(session, parsed))
            try:
                await asyncio.sleep(0)  # one turn: the task sends the call
                said = self._log_received(notify)
            finally:
                await enqueue  # cancelled meanwhile or not: it is under way
        except Exception as exc:
            # Guarantee 7: no payload may stop the daemon, not even one that
            # trips a bug; this runs on the listener, whose end would be ours.
            if not said:
                self._log_received(notify)
            self.metrics.count_trigger("failed")
            self.log.error("trigger_failed", error=repr(exc)[:500], exc_info=True)

    def _log_received(self, notify: psycopg.Notify) -> bool:
        self.log.info("trigger_received", payload=notify.payload[:200], sender_pid=notify.pid)
        return True

    async def _on_reservation(
        self, payload: str, session: psycopg.AsyncConnection[Any] | None
    ) -> None:
        """A wake naming a run reserved for us: try to claim it. The message
        is only a hint (any role may send one): the claim decides.

        On the session that heard it when it came alone (as _enqueue does):
        no task to spawn and no pooled connection to check out before the
        step. The claim then waits for the run's row at most
        LISTENER_LOCK_TIMEOUT, and past that is made again on a pooled one.
        """
        run_id = reserved.reserved_run_id(payload, self.id)
        if run_id is None:
            return
        claiming = self._claiming is not None and not self._claiming.done()
        if (
            session is None
            or run_id in self._runs
            or run_id in self._deciding
            or claiming
            or not self._free_slot()
        ):
            self._on_reserved(run_id)
            return
        self._deciding.add(run_id)
        token = self._lease.token()
        try:
            await self._claim_reserved(run_id, token, session)
        except psycopg.errors.LockNotAvailable:
            self._deciding.add(run_id)  # still deciding: on a pooled session now
            self._spawn(self._claim_reserved(run_id, token))

    def _on_reserved(self, run_id: int) -> None:
        # Heard twice (the notification, and the look after a reconnect), or
        # replayed: claimed once at most.
        if run_id in self._runs or run_id in self._deciding:
            return
        if self._claiming is not None and not self._claiming.done():
            # Our claim in flight may take the last slot: decide after it.
            self._spawn(self._take_after_claim(run_id, self._claiming))
        else:
            self._take_reservation(run_id)

    async def _take_after_claim(self, run_id: int, claiming: asyncio.Future[bool]) -> None:
        self._deciding.add(run_id)
        try:
            await asyncio.wait({claiming})
        finally:
            self._deciding.discard(run_id)
        if run_id not in self._runs:
            self._take_reservation(run_id)

    def _free_slot(self) -> bool:
        """A run could start here now: not stopping, and a slot free counting
        the claim in flight and the starts and reservations being decided."""
        claiming = self._claiming is not None and not self._claiming.done()
        taken = (
            len(self._runs) + len(self._lingering) + len(self._deciding) + claiming + self._starting
        )
        return (
            not self._stopping.is_set()
            and taken < self.settings.concurrency
            and self._lease.valid()  # a claim now could be taken over at once
        )

    def _take_reservation(self, run_id: int) -> None:
        if not self._free_slot():
            reason = "draining" if self._stopping.is_set() else "no free slot"
            self.log.debug("reservation_released", run_id=run_id, reason=reason)
            self._release_untaken()
            return
        # The slot is held from now: counted in _deciding until the claim
        # answers, then in _runs if it made the run ours. The lease's token
        # is taken before the claim is sent: it must hold from then on.
        self._deciding.add(run_id)
        self._spawn(self._claim_reserved(run_id, self._lease.token()))

    async def _claim_reserved(
        self, run_id: int, token: Token, session: psycopg.AsyncConnection[Any] | None = None
    ) -> None:
        """Claim; with `session` (the listener's), within its lock budget."""
        # The steps as they are now, as in _claim_one.
        steps = self._steps
        first = {job: job_steps[0].name for job, job_steps in steps.items() if job_steps}
        connect: reserved.Connect = (
            self._connect if session is None else (lambda: nullcontext(session))
        )
        try:
            run = await reserved.claim(
                self.store,
                connect,
                self.log,
                self.id,
                run_id,
                self._claimable,
                first,
                lock_timeout=None if session is None else LISTENER_LOCK_TIMEOUT,
            )
        finally:
            self._deciding.discard(run_id)
        if run is None:
            self.log.debug("reservation_not_claimed", run_id=run_id)
            self._wake.set()  # the slot it held is free again
            return
        self._start_run(run, steps[run.job], via="reservation", token=token)

    def _release_untaken(self) -> None:
        """Give back every reservation we are not taking, in one statement at
        a time however many wakes asked: a flood of forged wakes while every
        slot is busy must not queue a pooled statement each, ahead of the
        heartbeat (its lease would lapse)."""
        if self._releasing is not None and not self._releasing.done():
            self._release_again = True
            return
        self._release_again = False
        self._releasing = asyncio.ensure_future(self._release_all_untaken())

    async def _release_all_untaken(self) -> None:
        while True:
            try:
                async with self._connect() as conn:
                    await self.store.release_reserved(
                        conn, self.id, keep=[*self._runs, *self._deciding]
                    )
            except TRANSIENT as exc:
                self.log.warning("release_failed", error=str(exc).strip().splitlines()[0])
            if not self._release_again:
                return
            self._release_again = False

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _offer(self, conn: psycopg.AsyncConnection[Any]) -> None:
        first = {job: steps[0].name for job, steps in self._steps.items() if steps}
        enabled = {job: step for job, step in first.items() if job in self._claimable}
        # We claim a reservation from its row and read nothing else off its
        # wake (reserved.py), so trigger() may reserve for us (sql/007).
        await self.store.offer(
            conn, self.id, self.settings.concurrency, enabled, reserve_by_id=True
        )

    async def _enqueue(
        self,
        session: psycopg.AsyncConnection[Any] | None,
        requests: Sequence[TriggerRequest],
        lock_timeout: str | None = LISTENER_LOCK_TIMEOUT,
        claim: bool = True,
    ) -> None:
        """Enqueue on the session that heard the NOTIFY when it is offered
        (listener.py says why), else on a pooled one.

        The listener waits for this call before it reads the next
        notification, so the call may wait for a lock only `lock_timeout`:
        an app transaction holding the key (a trigger() of it left open)
        would hold up every notification behind it. A request that finds
        its key locked is enqueued again in the background, where it waits
        as long as the lock is held, holding no slot (`claim` False: a
        plain trigger(), whose wake-up gets the run claimed)."""
        # All of a notification's requests or none; a lone trigger() call is
        # atomic by itself, and BEGIN and COMMIT would cost two round trips.
        atomic = len(requests) > 1
        try:
            async with (
                nullcontext(session) if session is not None else self._connect() as conn,
                conn.transaction() if atomic else nullcontext(),
            ):
                if not atomic:
                    runs = await self._enqueue_and_claim(conn, requests[0], lock_timeout, claim)
                else:
                    runs = await self._enqueue_all(conn, requests, lock_timeout)
        except psycopg.errors.LockNotAvailable:
            # Nothing was written (the statement, or the transaction, failed).
            self.log.info("trigger_deferred", reason="its key is locked by an open transaction")
            self._spawn(self._enqueue_deferred(requests))
            return
        except psycopg.errors.InvalidParameterValue as exc:
            # trigger() refused it (the database's view of the jobs differs).
            reason = exc.diag.message_primary or str(exc)
            self.metrics.count_trigger("rejected")
            self.log.warning("trigger_rejected", reason=reason.removeprefix("syncworker: "))
            return
        except psycopg.Error as exc:
            self.metrics.count_trigger("failed")
            self.log.error("trigger_failed", error=str(exc).strip().splitlines()[0])
            return
        # One outcome per notification: this, trigger_rejected or trigger_failed.
        # No wake-up of our own: trigger()'s notification wakes every worker,
        # and may reserve the run for one, which a claim of ours would only
        # delay (claims pass reserved runs over).
        self.log.info("trigger_enqueued", runs=runs)

    async def _enqueue_deferred(self, requests: Sequence[TriggerRequest]) -> None:
        async with self._deferred:
            await self._enqueue(None, requests, lock_timeout=None, claim=False)

    async def _enqueue_all(
        self,
        conn: psycopg.AsyncConnection[Any],
        requests: Sequence[TriggerRequest],
        lock_timeout: str | None,
    ) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = []
        for req in requests:
            ids = await self.store.trigger(
                conn,
                req.job,
                req.scope,
                source=req.source,
                triggered_by=req.triggered_by,
                payload=req.payload,
                lock_timeout=lock_timeout,
            )
            runs += [
                {"job": req.job, "scope": req.scope, "run_id": i, "created": created}
                for i, created in ids
            ]
        return runs

    async def _enqueue_and_claim(
        self,
        conn: psycopg.AsyncConnection[Any],
        req: TriggerRequest,
        lock_timeout: str | None,
        claim: bool,
    ) -> list[dict[str, Any]]:
        """A lone request: the run it creates may be claimed for us by the
        same call (trigger_and_claim), and start on its answer."""
        job_steps = self._steps.get(req.job)  # as the claim records them
        first = job_steps[0].name if claim and job_steps and self._free_slot() else None
        # Taken before the claim is sent: the lease must hold from then on.
        token = self._lease.token()
        self._starting += first is not None
        try:
            made = await self.store.trigger_and_claim(
                conn,
                self.id,
                first,
                req.job,
                req.scope,
                source=req.source,
                triggered_by=req.triggered_by,
                payload=req.payload,
                lock_timeout=lock_timeout,
            )
        finally:
            self._starting -= first is not None
        claimed_runs = [claimed for _, _, claimed in made if claimed is not None]
        if job_steps:  # set whenever a run was claimed: `first` needs it
            for run in claimed_runs:
                self._start_run(run, job_steps, via="trigger", token=token)
        if first is not None and not claimed_runs:
            self._wake.set()  # the slot it held is free again
        if claimed_runs:
            # A turn of the loop: the step begins before trigger_enqueued's
            # line is written, which would hold it up by as long.
            await asyncio.sleep(0)
        return [
            {"job": req.job, "scope": req.scope, "run_id": run_id, "created": created}
            for run_id, created, _ in made
        ]

    # -- cron ------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            await self._db_up.wait()
            self._reschedule.clear()
            try:
                delay = await self._schedule_pass()
            except TRANSIENT as exc:
                self.log.warning("schedule_pass_failed", error=str(exc).strip().splitlines()[0])
                await self._db_up.wait()
                await asyncio.sleep(0.1)  # let the pool notice the outage is over
                continue
            await wait_event(self._reschedule, delay)

    async def _schedule_pass(self) -> float:
        """Enqueue every due fire; returns seconds until the next one. Times
        are the database's (dbclock.py): every worker decides by one clock."""
        async with self._connect() as conn:
            await self._clock.read(conn)
        now = self._clock.now()
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
        self._next_fires = upcoming
        if not self._stopping.is_set():
            self._sd_status(self._state())
        soonest = min((t for t in upcoming.values() if t is not None), default=None)
        if soonest is None:
            return SCHEDULER_MAX_SLEEP
        seconds = (soonest - self._clock.now()).total_seconds()
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
        try:
            scopes = await fetch_scopes(conn, job.scopes_sql)
        except psycopg.OperationalError:
            raise  # the scheduler's outage handling
        except psycopg.Error as exc:
            # The query broke (a table renamed, a grant revoked): the fire
            # goes ahead with the scopes known so far, and the scheduler with
            # it; raising would end the daemon.
            self.log.error(
                "scopes_sql_failed",
                job=name,
                error=str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc),
                kept=list(self._scopes.get(name) or ()),
            )
            return
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
            while self._lease.valid() and len(self._runs) + len(self._lingering) + len(
                self._deciding
            ) + self._starting < (self.settings.concurrency):
                # Shielded: a stop arriving between the claim's commit and the
                # run's start must not leave a claimed run that nobody runs.
                self._claiming = asyncio.ensure_future(self._claim_one())
                if not await asyncio.shield(self._claiming):
                    break

    async def _claim_one(self) -> bool:
        # The steps as they are now: a reload during the claim must not make
        # the run start other steps than the one the claim recorded.
        steps = self._steps
        first = {job: job_steps[0].name for job, job_steps in steps.items() if job_steps}
        # Taken before the claim is sent: the lease must hold from then on.
        token = self._lease.token()
        try:
            async with self._connect() as conn:
                run = await self.store.claim(conn, self.id, self._claimable, first)
        except TRANSIENT as exc:
            self.log.warning("claim_failed", error=str(exc).strip().splitlines()[0])
            return False  # the listener's reconnect wakes us again
        if run is None:
            return False
        self._start_run(run, steps[run.job], token=token)
        return True

    def _start_run(
        self,
        run: ClaimedRun,
        steps: Sequence[Step],
        via: str = "claim",
        token: Token | None = None,
    ) -> None:
        """`token` is the lease's, taken before the claim was sent."""
        env = RunEnv(
            store=self.store,
            connect=self._connect,
            step_connect=self._step_connect,
            log=self.log,
            stopping=self._stopping,
            via=via,
            token=token if token is not None else self._lease.token(),
        )
        work = self._run_work(run)
        task = asyncio.create_task(
            execute_run(run, self._jobs[run.job], steps, env),
            name=f"run-{run.id}",
            context=runtime.context_for(work),
        )
        self._runs[run.id] = task
        self._envs[run.id] = env
        self._state_changed.set()
        loop = asyncio.get_running_loop()
        claimed = loop.time()
        self.metrics.run_started(run.job)

        def done(t: asyncio.Task[str]) -> None:
            self._runs.pop(run.id, None)
            self._envs.pop(run.id, None)
            if work.busy():
                self._lingering[run.id] = work  # its slot is freed by on_idle
            else:
                self._work.pop(run.id, None)
            self._state_changed.set()
            self._wake.set()  # a slot is free, and a follow-up of this key may wait
            self.metrics.run_finished(run.job, _outcome(t, env), loop.time() - claimed)
            if not t.cancelled() and t.exception() is not None:
                self.log.error("run_crashed", run_id=run.id, exc_info=t.exception())

        task.add_done_callback(done)

    async def _drain(self) -> None:
        """Wait for in-flight runs up to drain_timeout (or a second signal), then
        cancel the rest; each cancelled run puts itself back to pending. Steps
        abandoned meanwhile are waited for until the same deadline."""
        if self._drain_deadline is None:  # once: run() drains again on its way out
            self._drain_deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout
        deadline = self._drain_deadline
        tasks = set(self._runs.values())
        if tasks:
            gathered: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
            await self._until_forced({gathered}, deadline)
            leftover = [t for t in tasks if not t.done()]
            if leftover:
                self.log.warning("drain_cancelling", runs=sorted(self._runs))
                reason = "second signal" if self._force.is_set() else "drain timeout"
                for run_id in list(self._runs):
                    if run_id in self._work:
                        self._work[run_id].reason = reason
                await cancel_and_wait(leftover)
            await gathered
        await self._drain_abandoned(deadline)

    async def _until_forced(self, futures: set[asyncio.Future[Any]], deadline: float) -> None:
        """Wait for all of `futures` until `deadline` or a second signal."""
        if not futures or self._force.is_set():
            return
        together: asyncio.Future[Any] = asyncio.gather(*futures, return_exceptions=True)
        force: asyncio.Future[Any] = asyncio.create_task(self._force.wait())
        try:
            await asyncio.wait(
                {together, force},
                timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            force.cancel()

    async def _drain_abandoned(self, deadline: float) -> None:
        """Give abandoned steps until the drain's deadline to end; then say
        which still run. The process exit ends their threads; a task of ours
        still running makes the exit non-zero (cli.py exits without waiting)."""
        left = self.abandoned()
        await self._until_forced({a.ended for a in left}, deadline)
        left = self.abandoned()
        if not left or self._said_abandoned:
            return
        self._said_abandoned = True
        self.log.warning("drain_abandoned", steps=[a.describe() for a in left])
        if self.stuck_tasks():
            self.exit_code = EX_SOFTWARE

    def abandoned(self) -> list[runtime.Leftover]:
        """Step work given up on but still running, of every run."""
        return [left for work in self._work.values() for left in work.leftovers]

    def stuck_tasks(self) -> list[runtime.Leftover]:
        """Abandoned async steps still on this worker's loop."""
        return [left for left in self.abandoned() if left.kind == "task"]

    def _run_work(self, run: ClaimedRun) -> runtime.RunWork:
        work = runtime.RunWork(run.id, run.job)

        def on_abandon(left: runtime.Leftover) -> None:
            if left.kind != "task":
                return
            # An async step that ignores its cancellation holds the loop's
            # time and its slot for as long as it likes: a restart is the
            # only way to be rid of it, so the worker drains and exits 70
            # for its supervisor to start it again.
            self.exit_code = EX_SOFTWARE
            if not self._stopping.is_set():
                self.log.error(
                    "worker_restart_needed",
                    reason="an async step did not end after its cancellation",
                    **left.describe(),
                )
                self.stop()

        def on_idle() -> None:
            if self._lingering.pop(run.id, None) is not None:
                self._work.pop(run.id, None)
                self._state_changed.set()
                self._wake.set()  # its slot is free now

        work.on_abandon = on_abandon
        work.on_idle = on_idle
        self._work[run.id] = work
        return work

    def _cancel_run(self, run_id: int, reason: str) -> None:
        """Cancel a run's task, and kill its steps' child processes at once:
        the run is not ours to execute any more."""
        task, work = self._runs.get(run_id), self._work.get(run_id)
        if work is not None:
            work.reason = reason
            work.kill()
        if task is not None:
            task.cancel()

    # -- liveness -------------------------------------------------------------------

    def _state(self) -> str:
        if self._stopping.is_set():
            return "draining"
        return "running" if self._runs or self._lingering else "idle"

    async def _heartbeat(self) -> None:
        """Beat every renew_every (heartbeat_interval / 6) on a fixed deadline,
        renewing the lease, and write state changes within STATE_SETTLE; look
        for runs to take over every recover_every. State changes never push
        the deadline back: a busy worker must keep beating, or its lease
        lapses and others would take its live runs."""
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self._lease.timing.renew_every
        next_sweep = loop.time() + self._lease.timing.recover_every
        last_state = ""
        while True:
            await wait_event(self._state_changed, max(0.0, next_beat - loop.time()))
            if loop.time() < next_beat and not self._recheck:
                # A state change: write where the state settles. Runs of a few
                # milliseconds flip it twice each, and two writes per run were
                # a third of a short run's statements, taken while it started.
                await asyncio.sleep(min(STATE_SETTLE, next_beat - loop.time()))
            self._state_changed.clear()
            timing = self._lease.timing  # read each time: a reload may change it
            due = loop.time() >= next_beat
            if due:
                next_beat = loop.time() + timing.renew_every
            sweep = loop.time() >= next_sweep
            if sweep:
                next_sweep = loop.time() + timing.recover_every
            if not self._db_up.is_set():
                continue
            recheck, self._recheck = self._recheck, False
            due = due or recheck
            sweep = sweep or recheck
            state = self._state()
            changed = state != last_state
            try:
                # A write that cannot be made within the lease is retried on
                # another connection rather than awaited past it.
                async with asyncio.timeout(timing.self_fence_after) as deadline:
                    async with self._connect() as conn:
                        if due or changed:
                            await self._beat(conn, state, recheck, last_state)
                            last_state = state
                        deadline.reschedule(None)
                        if sweep:
                            await self._recover(conn)
            except TRANSIENT_OR_TIMEOUT as exc:
                error = str(exc).strip().splitlines()[0] if str(exc).strip() else "timed out"
                self.log.warning("heartbeat_failed", error=error)
                continue
            if sweep and state != "draining":
                self._wake.set()  # safety net: a missed wake-up costs one sweep at most
            if state != "draining" and (sweep or changed):
                self._sd_status(state)

    async def _beat(
        self, conn: psycopg.AsyncConnection[Any], state: str, recheck: bool, last_state: str
    ) -> None:
        """One heartbeat write: renews the lease from its send time, and fences
        the runs the database no longer has under this worker."""
        # Runs claimed after this snapshot are ours for sure.
        in_flight = list(self._runs)
        sent = time.monotonic()
        owned = await self.store.heartbeat(conn, self.id, state)
        was_valid = self._lease.valid()
        self._lease.renew(sent, time.monotonic())
        if not was_valid and self._lease.valid():
            self.log.debug("lease_renewed", after_lapse=True)
            self._wake.set()  # claims wait for a valid lease
        self._fence(in_flight, owned)
        if recheck:
            # Reserved while we were not listening: the
            # notification is lost, the reservation is not.
            for run_id in await self.store.reserved_runs(conn, self.id):
                self._on_reserved(run_id)
        if state == "draining" != last_state:
            # We take no reservation from now on.
            await self.store.release_reserved(conn, self.id, keep=[*self._runs, *self._deciding])

    def _on_lease_lapsed(self) -> None:
        """No heartbeat write was confirmed in time: a peer may take our runs
        over once takeover_after has passed since the last one, so every
        run's step stops now (each run logs run_self_fenced and puts itself
        back to pending if the database still has it as ours)."""
        runs = [
            run_id
            for run_id, env in self._envs.items()
            if not env.settling.is_set() and env.token is not None and not env.token.valid()
        ]
        (self.log.warning if runs else self.log.debug)(
            "lease_lapsed",
            runs=sorted(runs),
            self_fence_after=self._lease.timing.self_fence_after,
        )
        for run_id in runs:
            # Child processes (isolation = "process") are killed at once too.
            self._cancel_run(run_id, "self-fenced")

    def _fence(self, in_flight: Sequence[int], owned: set[int]) -> None:
        """Stop running what the database says is no longer ours: our liveness
        session died for a moment and another worker took the run back."""
        for run_id in in_flight:
            task, env = self._runs.get(run_id), self._envs.get(run_id)
            if run_id in owned or task is None or env is None or env.settling.is_set():
                continue
            self.log.warning("run_fenced", run_id=run_id, reason="no longer owned by this worker")
            env.lost.set()
            self._cancel_run(run_id, "fenced")

    def _peer_grace(self) -> float:
        """How long a live worker may need to take its lock and beat again
        after an outage: its listener's longest back-off, then a stale span."""
        return MAX_BACKOFF + self._lease.timing.stale_after

    async def _recover(self, conn: psycopg.AsyncConnection[Any]) -> None:
        recovered = await self.store.recover_orphans(
            conn,
            self.id,
            self._lease.timing.stale_after,
            list(self._runs),
            judge_peers=asyncio.get_running_loop().time() >= self._judge_peers_at,
            peer_grace=self._peer_grace(),
            takeover_after=self._lease.timing.takeover_after,
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
        unreserved = await self.store.unreserve_gone(
            conn,
            self.id,
            self._lease.timing.stale_after,
            judge_peers=asyncio.get_running_loop().time() >= self._judge_peers_at,
            peer_grace=self._peer_grace(),
            takeover_after=self._lease.timing.takeover_after,
        )
        if recovered or unreserved:
            self._wake.set()

    def _sd_status(self, state: str) -> None:
        """What `systemctl status` shows: the runs under way, or the next fire."""
        if state == "running":
            text = "running " + ", ".join(f"run {i}" for i in sorted(self._runs))
        else:
            text = "idle"
        fires = [(t, name) for name, t in self._next_fires.items() if t is not None]
        if fires:
            when, name = min(fires)
            text += f", next {name} at {when.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
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
                await self.store.release_reserved(conn, self.id)
        except TRANSIENT_OR_TIMEOUT as exc:
            self.log.warning("heartbeat_failed", error=str(exc).strip().splitlines()[0])

    # -- reload and housekeeping ---------------------------------------------------------

    async def _reloader(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
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
            plan = plan_reload(self.settings, given)
            # Every step is imported before anything changes: all or nothing.
            steps = {
                name: resolve_job_steps(name, job, source, plan.settings.database_url)
                for name, job in plan.settings.jobs.items()
            }
        except ConfigError as exc:
            self.log.error("config_reload_failed", error=str(exc), kept="the running config")
            return
        jobs = plan.settings.jobs
        try:
            async with self._connect() as conn:
                scopes = await self.store.setup(conn, jobs, source)
                fired = await self.store.fire_state(conn)
        except ConfigError as exc:  # a scopes_sql the database refuses
            self.log.error("config_reload_failed", error=str(exc), kept="the running config")
            return
        except (psycopg.Error, TimeoutError) as exc:
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            self.log.error("config_reload_failed", error=error, kept="the running config")
            return
        # A job whose schedule changed got a new misfire baseline in the
        # database; the others keep the fire this worker last handled.
        for name, job in jobs.items():
            old = self._jobs.get(name)
            if old is None or (old.schedule, old.timezone) != (job.schedule, job.timezone):
                self._fire_cursor[name] = fired.get(name)
        for name in plan.removed:
            self._fire_cursor.pop(name, None)
        self.settings = plan.settings
        self._lease.timing = LeaseTiming(plan.settings.heartbeat_interval)
        self._jobs = jobs
        self._steps = steps
        self._scopes = scopes
        self._job_info = self._make_job_info()
        self._claimable = [name for name, job in jobs.items() if job.enabled]
        try:
            async with self._connect() as conn:
                await self._offer(conn)
        except TRANSIENT as exc:
            # Reservations for a removed job are declined; new jobs go the
            # claim's way until the next reload or restart.
            self.log.warning("offer_failed", error=str(exc).strip().splitlines()[0])
        self.log.info(
            "config_reloaded",
            added=list(plan.added),
            removed=list(plan.removed),
            changed=list(plan.changed),
            restart_needed=list(plan.restart_needed),
            runs_in_flight=sorted(self._runs),
        )
        self._reschedule.set()
        self._wake.set()
        self._state_changed.set()

    async def _prune_history(self) -> None:
        """Delete finished runs older than history_days (pruning.py), at start
        and then hourly; a timer, since age is all that decides it."""
        while True:
            await self._db_up.wait()
            days = self.settings.history_days
            if days > 0:
                try:
                    deleted = await prune_pass(self.store, self._connect, self.log, days)
                except psycopg.Error as exc:
                    deleted = 0
                    self.log.warning("history_prune_failed", error=str(exc).strip()[:200])
                if deleted:
                    self.log.info("history_pruned", deleted=deleted, older_than_days=days)
            await asyncio.sleep(PRUNE_EVERY)

    # -- helpers -----------------------------------------------------------------------

    def _connect(
        self, timeout: float | None = None
    ) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """One of the worker's own connections."""
        assert self._pool is not None
        return self._lend(self._pool, timeout)

    def _step_connect(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A connection for a step (steppool.py): never one of the worker's own."""
        assert self._step_pool is not None
        return self._lend(self._step_pool, None)

    @asynccontextmanager
    async def _lend(
        self, pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]], timeout: float | None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """From `pool`, noting when it was last used well (_check_connection)."""
        async with pool.connection(timeout=timeout) as conn:
            try:
                yield conn
            except BaseException:
                self._used_at.pop(conn, None)
                raise
            self._used_at[conn] = time.monotonic()

    async def _check_connection(self, conn: psycopg.AsyncConnection[Any]) -> None:
        used = self._used_at.get(conn)
        if (
            used is not None
            and time.monotonic() - used < CHECK_IDLE_AFTER
            and conn.pgconn.status == ConnStatus.OK
        ):
            return
        await AsyncConnectionPool.check_connection(conn)


def _outcome(task: asyncio.Task[str], env: RunEnv) -> str:
    """A finished run's status for the metrics: what execute_run returned (the
    status it wrote), else why it has none."""
    if task.cancelled():
        return "lost" if env.lost.is_set() else "interrupted"
    if task.exception() is not None:
        return "crashed"
    return task.result()
