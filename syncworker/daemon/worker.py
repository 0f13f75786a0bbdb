"""The daemon: its services wired together, and its lifecycle in one place.

    NOTIFY / cron fire  ->  intake | scheduler  ->  store.trigger (pending, coalesced)
        -> wake  ->  executor (claim)  ->  orchestrator.execute_run

run() is the lifecycle: start (migrate, register, prove NOTIFYs arrive) ->
serve (every service's loop) -> drain (intake first; the listener and
liveness outlive it) -> stop (marked stopped, pools closed). Each service
gets what it needs from here; none imports another.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker import runtime, systemd
from syncworker.aio import Background, cancel_and_wait
from syncworker.config import Settings
from syncworker.daemon.catalog import Catalog, resolve
from syncworker.daemon.executor import Executor
from syncworker.daemon.intake import Intake
from syncworker.daemon.lifecycle import Lifecycle
from syncworker.daemon.listener import Listener
from syncworker.daemon.liveness import Liveness
from syncworker.daemon.maintenance import Maintenance
from syncworker.daemon.pool import Pools
from syncworker.daemon.reloader import Reloader
from syncworker.daemon.reservations import Reservations
from syncworker.daemon.scheduler import Scheduler
from syncworker.daemon.slots import Slots
from syncworker.daemon.startup import Startup
from syncworker.db import Store
from syncworker.dbclock import DbClock
from syncworker.events import cancelled_run_id, is_delay, is_hold_change, is_reservation
from syncworker.http import start_http
from syncworker.lease import Lease, LeaseTiming
from syncworker.logs import make_logger
from syncworker.metrics import Metrics
from syncworker.orchestrator import RunEnv
from syncworker.version import VERSION
from syncworker.web import auth
from syncworker.web.app import worker_app
from syncworker.web.sse import EventHub

# A connection lent from one of the pools for the length of an `async with`.
Lent = AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]


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
        self._load = load
        self.id = f"w-{secrets.token_hex(6)}"  # opaque: runs.worker_id is read by apps
        self.log = (log or make_logger(settings.log_level, settings.log_format)).bind(
            worker_id=self.id
        )
        self.store = Store(settings.schema, settings.events_channel)
        self.metrics = Metrics(VERSION, self.id, settings.jobs)
        self._config_source = config_source
        # Resolving imports every step now: a bad step is a config error at start.
        self._catalog = Catalog(resolve(settings, config_source))
        self._life = Lifecycle(lambda: self.settings.drain_timeout)
        self._slots: Slots[RunEnv] = Slots(settings.concurrency)
        # Proof that no peer may take our runs over yet (lease.py); renewed
        # by each heartbeat write, and checked by the runs' steps.
        self._lease = Lease(LeaseTiming(settings.heartbeat_interval))
        self._background = Background()
        self._pools: Pools | None = None
        self._main: asyncio.Task[None] | None = None
        # The HTTP event stream's clients, fed from the listening session,
        # which listens on the events channel too while `http` is set.
        self._events = EventHub(self.log) if settings.http else None
        self._wire()

    def _wire(self) -> None:
        common: dict[str, Any] = {"store": self.store, "log": self.log}
        self._executor = Executor(
            worker_id=self.id,
            catalog=self._catalog,
            slots=self._slots,
            lease=self._lease,
            life=self._life,
            connect=self._connect,
            step_connect=self._step_connect,
            background=self._background,
            metrics=self.metrics,
            state_changed=lambda: self._liveness.changed(),
            request_stop=self.stop,
            cancel_grace=lambda: self.settings.cancel_grace,
            **common,
        )
        wake, start_run = self._executor.wake, self._executor.start_run
        self._reservations = Reservations(
            worker_id=self.id,
            catalog=self._catalog,
            slots=self._slots,
            lease=self._lease,
            stopping=self._life.stopping,
            connect=self._connect,
            background=self._background,
            free_slot=self._free_slot,
            start_run=start_run,
            wake=wake,
            **common,
        )
        self._intake = Intake(
            worker_id=self.id,
            catalog=self._catalog,
            slots=self._slots,
            lease=self._lease,
            connect=self._connect,
            background=self._background,
            metrics=self.metrics,
            free_slot=self._free_slot,
            start_run=start_run,
            wake=wake,
            **common,
        )
        self._scheduler = Scheduler(
            catalog=self._catalog,
            clock=DbClock(self.log),
            connect=self._connect,
            db_up=self._life.db_up,
            stopping=self._life.stopping,
            wake=wake,
            passed=lambda: self._maintenance.sd_status(self._liveness.state()),
            **common,
        )
        self._maintenance = Maintenance(
            connect=self._connect,
            db_up=self._life.db_up,
            history_days=lambda: self.settings.history_days,
            runs=lambda: self._slots.runs,
            next_fires=lambda: self._scheduler.next_fires,
            **common,
        )
        self._liveness = Liveness(
            worker_id=self.id,
            slots=self._slots,
            lease=self._lease,
            life=self._life,
            connect=self._connect,
            cancel_run=self._executor.cancel_run,
            on_reserved=self._reservations.on_reserved,
            wake=wake,
            sd_status=self._maintenance.sd_status,
            **common,
        )
        self._reloader = Reloader(
            catalog=self._catalog,
            lease=self._lease,
            connect=self._connect,
            config_source=self._config_source,
            load=self._load,
            runs=lambda: self._slots.runs,
            rebase_fires=self._scheduler.rebase,
            offer=self._reservations.offer,
            applied=self._reloaded,
            **common,
        )
        self._startup = Startup(
            settings=lambda: self.settings,
            config_source=self._config_source,
            catalog=self._catalog,
            stopping=self._life.stopping,
            connect=self._connect,
            register=self._liveness.register,
            offer=self._reservations.offer,
            start_fires=self._scheduler.start_from,
            **common,
        )
        self._listener = Listener(
            lambda: self.settings,
            self.store.wake,
            log=self.log,
            connect=self._connect,
            on_connect=self._liveness.hold_lock,
            on_notify=self._on_notify,
            on_state=self._on_db_state,
            on_poll=wake,
            extra_channels=[self.settings.events_channel] if self._events is not None else [],
        )

    # -- the public face -----------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._catalog.now.settings

    @property
    def ready(self) -> asyncio.Event:
        """Set once the worker listens and can serve triggers."""
        return self._life.ready

    @property
    def exit_code(self) -> int:
        """What the process should exit with: 70 once the worker stopped by
        itself (an async step it could not cancel), never 0 then."""
        return self._life.exit_code

    def health(self) -> str | None:
        """None while the worker serves triggers; otherwise why not, in a few words."""
        return self._life.health(self._lease.valid())

    def abandoned(self) -> list[runtime.Leftover]:
        """Step work given up on but still running, of every run."""
        return self._slots.abandoned()

    def stuck_tasks(self) -> list[runtime.Leftover]:
        """Abandoned async steps still on this worker's loop."""
        return self._slots.stuck_tasks()

    def reload(self, settings: Settings | None = None) -> None:
        """Apply a new configuration without dropping runs in flight (SIGHUP).

        Without `settings`, the `load` given to the constructor reads it. Jobs,
        schedules, steps, drain_timeout, heartbeat_interval and history_days
        change; a config that fails to load or resolve is logged and the
        running one kept. Runs already under way finish as they started.
        """
        self._reloader.request(settings)

    def stop(self) -> None:
        """Begin a drain; a second call cancels in-flight runs at once."""
        life = self._life
        if life.stopping.is_set():
            if not life.force.is_set():
                self.log.warning("drain_forced", runs=sorted(self._slots.runs))
                life.force.set()
            return
        self.log.info(
            "drain_started", runs=sorted(self._slots.runs), timeout=self.settings.drain_timeout
        )
        systemd.notify("STOPPING=1")
        life.stopping.set()
        self._executor.drain_begins()
        self._liveness.changed()

    async def __aenter__(self) -> Worker:
        self._main = asyncio.create_task(self.run(), name="syncworker")
        ready = asyncio.create_task(self._life.ready.wait())
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

    # -- the lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        """Serve until stop() (or a signal handler calling it), then drain."""
        settings = self.settings
        self.log.info(
            "worker_starting",
            version=VERSION,
            jobs=sorted(settings.jobs),
            concurrency=settings.concurrency,
        )
        # Bound before anything else, so a taken port fails the start at once
        # and a probe sees "starting" while the database is still awaited.
        http = None
        if settings.http and self._events is not None:
            app = worker_app(
                settings=lambda: self.settings,
                health=self.health,
                db_up=self._life.db_up.is_set,
                connect=self._connect,
                store=self.store,
                metrics=self.metrics,
                events=self._events,
            )
            http = await start_http(
                settings.http,
                app,
                log=self.log,
                config_source=self._config_source,
                writable=bool(auth.tokens(settings)),
            )
        self._pools = Pools(settings)
        await self._pools.open()
        try:
            if await self._startup.run():
                await self._serve()
        finally:
            # As _serve does, when it did not end normally.
            await self._executor.settle_claims()
            await self._executor.drain()
            self._lease.close()
            await self._liveness.mark_stopped()
            if http is not None:
                await http.close()
            await self._pools.close()
            self.log.info("worker_stopped")

    async def _serve(self) -> None:
        self._lease.start(self._liveness.on_lease_lapsed)
        async with asyncio.TaskGroup() as tg:
            # Created in the order they were before the split: tasks take
            # their first step in creation order.
            listener = tg.create_task(self._listener.run(), name="listener")
            liveness = tg.create_task(self._liveness.run(), name="heartbeat")
            scheduler = tg.create_task(self._scheduler.run(), name="scheduler")
            executor = tg.create_task(self._executor.run(), name="executor")
            watchdog = tg.create_task(self._maintenance.watchdog(), name="watchdog")
            reloader = tg.create_task(self._reloader.run(), name="reloader")
            pruner = tg.create_task(self._maintenance.prune(), name="pruner")
            taking_work = [scheduler, executor, reloader, pruner]
            await self._life.stopping.wait()
            # 1. Take no new work. The listener stays up while runs drain,
            #    because its session holds the lock that marks this worker
            #    alive; what it hears now is enqueued, never claimed here.
            await cancel_and_wait(taking_work)
            # 2. A claim in flight becomes a run to drain: none may answer
            #    after the drain looked, and none begins now (_free_slot).
            await self._executor.settle_claims()
            # 3. Drain the runs.
            await self._executor.drain()
            # 4. Then the listening session and the heartbeat, the last to
            #    say this worker is alive.
            await cancel_and_wait([listener, liveness, watchdog])

    # -- wiring --------------------------------------------------------------------

    async def _on_notify(
        self, session: psycopg.AsyncConnection[Any] | None, notify: psycopg.Notify
    ) -> None:
        if self._events is not None and notify.channel == self.settings.events_channel:
            self._events.publish(notify.payload)
        elif notify.channel != self.store.wake:
            await self._intake.on_trigger(session, notify)
        elif is_hold_change(notify.payload):
            self._scheduler.reschedule()  # when the next hold ends
            self._executor.wake()
        elif is_delay(notify.payload):
            self._scheduler.delayed()  # when the soonest delayed run may start
        elif (cancelled := cancelled_run_id(notify.payload)) is not None:
            self._executor.cancel_requested(cancelled)
        elif is_reservation(notify.payload):
            await self._reservations.on_reservation(notify.payload, session)
        else:
            self._executor.wake()

    def _on_db_state(self, up: bool) -> None:
        self.metrics.database_state(up)
        life = self._life
        if not up:
            life.db_up.clear()
            if self._pools is not None:
                self._pools.outage()  # the pool's connections may be dead too: check them all
            return
        life.db_up.set()
        if self._events is not None and life.ready.is_set():
            self._events.resync()  # events published while we were deaf are lost
        # A reconnect: the outage may have cut every session.
        self._liveness.reconnected(serving=life.ready.is_set())
        # Whatever was enqueued while we were deaf is in the table: look.
        self._executor.wake()
        self._scheduler.reschedule()
        self._liveness.changed()
        if not life.ready.is_set():
            life.ready.set()
            self.log.info(
                "worker_started", channel=self.settings.channel, jobs=sorted(self.settings.jobs)
            )
            systemd.notify(f"READY=1\nSTATUS=listening on {self.settings.channel}")

    def _free_slot(self) -> bool:
        """A run could start here now: not stopping, a slot free counting the
        claims in flight and the starts and reservations being decided, and
        a lease that holds (a claim now could be taken over at once)."""
        return not self._life.stopping.is_set() and self._slots.room() and self._lease.valid()

    def _reloaded(self) -> None:
        self._scheduler.reschedule()
        self._executor.wake()
        self._liveness.changed()

    def _connect(self, timeout: float | None = None) -> Lent:
        """One of the worker's own connections."""
        assert self._pools is not None
        return self._pools.connect(timeout)

    def _step_connect(self) -> Lent:
        """A connection for a step (steppool.py): never one of the worker's own."""
        assert self._pools is not None
        return self._pools.step_connect()
