"""Every SQL statement of syncworker, in one place.

The per-key guarantees live in the schema (sql/*.sql: partial unique
indexes, the trigger() function); this module is the only Python code that
talks to those tables. Writes that conclude a run are fenced: they apply
only while the run is still `running` under this worker and attempt, so a
worker that lost its run to orphan recovery cannot overwrite the outcome.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from syncworker.config import ConfigError, JobConfig
from syncworker.counters import Counters

RUN_COLUMNS = (
    "id, job, scope, status, source, triggered_by, payload, scheduled_for, requested_at, "
    "started_at, finished_at, duration_ms, attempt, max_attempts, triggers, worker_id, "
    "current_step, records_total, records_processed, records_inserted, records_updated, "
    "records_deleted, records_errored, error"
)
# What a role granted every column of runs but payload may select (sql/007).
RUN_COLUMNS_NO_PAYLOAD = RUN_COLUMNS.replace("payload, ", "")


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


def _claimed_run(
    row: Sequence[Any], worker_id: str, first_step_id: int | None = None
) -> ClaimedRun:
    """A run from a row of (id, job, scope, source, triggered_by, payload,
    scheduled_for, attempt, max_attempts, ...)."""
    return ClaimedRun(
        id=row[0],
        job=row[1],
        scope=row[2],
        source=row[3],
        triggered_by=row[4],
        payload=row[5] or {},
        scheduled_for=row[6],
        attempt=row[7],
        max_attempts=row[8],
        worker_id=worker_id,
        first_step_id=first_step_id,
    )


async def fetch_scopes(conn: psycopg.AsyncConnection[Any], query: str) -> tuple[str, ...]:
    """Run a job's scopes_sql: the first column of each row, non-empty, unique."""
    cur = await conn.execute(query.encode())
    return tuple(dict.fromkeys(str(row[0]) for row in await cur.fetchall() if row[0]))


def wake_channel(schema: str) -> str:
    """The internal channel trigger() notifies when it enqueues runs."""
    return f"{schema}_wake"


def lock_namespace(schema: str) -> int:
    """First key of workers' liveness advisory locks: one namespace per schema."""
    return zlib.crc32(f"syncworker:{schema}".encode()) & 0x7FFFFFFF


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("syncworker") / "sql"
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), entry.read_text(encoding="utf-8")))
    return sorted(found)


class Store:
    """The SQL of one schema, composed once, run on connections given to it."""

    def __init__(self, schema: str, events_channel: str) -> None:
        self.schema = schema
        self.events_channel = events_channel
        self.wake = wake_channel(schema)
        self.lock_ns = lock_namespace(schema)
        s = sql.Identifier(schema)
        self._s = s
        q = self._compose
        self.q_trigger = q("SELECT run_id, created FROM {s}.trigger(%s, %s, %s, %s, %s, %s)")
        # The same, within a lock budget (see _LOCK_BUDGET_HEAD).
        self.q_trigger_budgeted = q(_TRIGGER_BUDGETED)
        self.q_claim = q(_CLAIM)
        self.q_trigger_and_claim = q(_TRIGGER_AND_CLAIM)
        self.q_finish = q(_FINISH)
        self.q_requeue = q(_REQUEUE)
        self.q_next_attempt = q(_NEXT_ATTEMPT)
        self.q_progress = q(_PROGRESS)
        self.q_step_start = q(_STEP_START)
        self.q_step_finish = q(_STEP_FINISH)
        # A fire is claimed only once due by the database's clock (with a
        # second for the worker's reading of it, dbclock.py): a worker whose
        # clock runs ahead can neither take fires early nor move
        # last_fire_at past now, which would hold every fire back.
        claim_fire = (
            "UPDATE {s}.jobs SET last_fire_at = %(fire)s"
            " WHERE name = %(job)s AND (last_fire_at IS NULL OR last_fire_at < %(fire)s)"
            " AND %(fire)s <= now() + interval '1 second'"
            " RETURNING name"
        )
        self.q_claim_fire = q(claim_fire)
        # The claim and its runs in one statement, so one round trip where
        # BEGIN, the claim, trigger() and COMMIT took four. A row per run, or
        # one with no run; no row at all: the fire was claimed already.
        self.q_enqueue_fire = q(
            "WITH fire AS (" + claim_fire + ")"
            " SELECT t.run_id, t.created FROM fire LEFT JOIN LATERAL"
            " {s}.trigger(fire.name, NULL, 'cron', 'cron', %(payload)s, %(fire)s) AS t ON true"
        )
        self.q_orphans = q(_ORPHANS)
        self.q_unreserve_gone = q(_UNRESERVE_GONE)
        self.q_claim_reserved = q(_CLAIM_RESERVED)
        self.q_release_reserved = q(_RELEASE_RESERVED)
        self.q_offer = q(
            "UPDATE {s}.workers SET concurrency = %(concurrency)s, first_steps = %(first)s,"
            " reserve_by_id = %(by_id)s WHERE id = %(id)s"
        )
        self.q_run = q("SELECT " + RUN_COLUMNS + _ONE_RUN)
        self.q_run_no_payload = q("SELECT " + RUN_COLUMNS_NO_PAYLOAD + _ONE_RUN)
        self.q_recent_runs = q("SELECT " + RUN_COLUMNS + _RECENT_RUNS)
        self.q_recent_runs_no_payload = q("SELECT " + RUN_COLUMNS_NO_PAYLOAD + _RECENT_RUNS)
        self.q_prune = q(_PRUNE)
        self.q_payload_privilege = q(_PAYLOAD_PRIVILEGE)

    def _compose(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(s=self._s)

    # -- schema -----------------------------------------------------------

    async def migrate(self, conn: psycopg.AsyncConnection[Any]) -> list[int]:
        """Create or upgrade the schema; returns the versions applied now."""
        applied_now: list[int] = []
        async with conn.transaction():
            # One migrator at a time across instances starting together.
            await conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (self.lock_ns,))
            # Not CREATE SCHEMA IF NOT EXISTS: PostgreSQL checks CREATE on the
            # database even when the schema exists, and a least-privilege worker
            # owns a schema a DBA made for it without that right.
            cur = await conn.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)
            )
            if await cur.fetchone() is None:
                await conn.execute(self._compose("CREATE SCHEMA {s}"))
            await conn.execute(
                self._compose(
                    "CREATE TABLE IF NOT EXISTS {s}.migrations ("
                    " version integer PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
            )
            cur = await conn.execute(self._compose("SELECT version FROM {s}.migrations"))
            done = {row[0] for row in await cur.fetchall()}
            schema_text = self._s.as_string(conn)
            wake_text = sql.Literal(self.wake).as_string(conn)
            lock_ns_text = sql.Literal(self.lock_ns).as_string(conn)
            for version, text in _migrations():
                if version in done:
                    continue
                body = (
                    text.replace("__SCHEMA__", schema_text)
                    .replace("__WAKE__", wake_text)
                    .replace("__LOCK_NS__", lock_ns_text)
                )
                await conn.execute(body.encode())
                await conn.execute(
                    self._compose("INSERT INTO {s}.migrations (version) VALUES (%s)"), (version,)
                )
                applied_now.append(version)
        return applied_now

    async def setup(
        self,
        conn: psycopg.AsyncConnection[Any],
        jobs: Mapping[str, JobConfig],
        source: str = "<config>",
    ) -> dict[str, tuple[str, ...] | None]:
        """Migrate, then register the jobs with their scopes (scopes_sql run now).

        Returns each job's scopes as registered. A scopes_sql the database
        refuses is a ConfigError naming the job's key (`source` is the file).
        """
        await self.migrate(conn)
        scopes: dict[str, tuple[str, ...] | None] = {}
        for name, job in jobs.items():
            if not job.scopes_sql:
                scopes[name] = job.scopes
                continue
            try:
                scopes[name] = await fetch_scopes(conn, job.scopes_sql)
            except psycopg.OperationalError:
                raise  # the connection, not the query: callers wait it out
            except psycopg.Error as exc:
                reason = exc.diag.message_primary or str(exc).strip() or type(exc).__name__
                raise ConfigError(
                    source, f"jobs.{name}.scopes_sql", f"the query failed: {reason}"
                ) from None
        await self.register_jobs(conn, jobs, scopes)
        return scopes

    async def register_jobs(
        self,
        conn: psycopg.AsyncConnection[Any],
        jobs: Mapping[str, JobConfig],
        scopes: Mapping[str, Sequence[str] | None],
    ) -> None:
        """Make syncworker.jobs match the configuration (trigger() reads it).

        A changed schedule restarts the misfire baseline at now(), so the new
        schedule is not judged against fires of the old one.
        """
        async with conn.transaction():
            for name, job in jobs.items():
                await conn.execute(
                    self._compose(_REGISTER_JOB),
                    {
                        "name": name,
                        "enabled": job.enabled,
                        "schedule": list(job.schedule),
                        "timezone": job.timezone,
                        "scopes": None if scopes.get(name) is None else list(scopes[name] or ()),
                        "scopes_sql": job.scopes_sql,
                        "on_overlap": job.on_overlap,
                        "misfire": job.misfire,
                        "retries": job.retries,
                        "timeout": job.timeout,
                    },
                )
            await conn.execute(
                self._compose("DELETE FROM {s}.jobs WHERE NOT (name = ANY(%s))"), (list(jobs),)
            )

    async def set_scopes(
        self, conn: psycopg.AsyncConnection[Any], job: str, scopes: Sequence[str]
    ) -> None:
        await conn.execute(
            self._compose("UPDATE {s}.jobs SET scopes = %s, updated_at = now() WHERE name = %s"),
            (list(scopes), job),
        )

    # -- triggers and cron fires -------------------------------------------

    async def trigger(
        self,
        conn: psycopg.AsyncConnection[Any],
        job: str,
        scope: str | None = None,
        *,
        source: str = "python",
        triggered_by: str | None = None,
        payload: Mapping[str, Any] | None = None,
        scheduled_for: datetime | None = None,
        lock_timeout: str | None = None,
    ) -> list[tuple[int, bool]]:
        """trigger(); with `lock_timeout`, it raises LockNotAvailable rather
        than wait longer than that for a lock (see _LOCK_BUDGET_HEAD)."""
        args: tuple[Any, ...] = (
            job,
            scope,
            source,
            triggered_by,
            Jsonb(dict(payload or {})),
            scheduled_for,
        )
        if lock_timeout is None:
            cur = await conn.execute(self.q_trigger, args)
        else:
            cur = await conn.execute(self.q_trigger_budgeted, (lock_timeout, *args))
        return [(int(r[0]), bool(r[1])) for r in await cur.fetchall()]

    async def trigger_and_claim(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        first_step: str | None,
        job: str,
        scope: str | None,
        *,
        source: str,
        triggered_by: str | None,
        payload: Mapping[str, Any],
        lock_timeout: str | None = None,
    ) -> list[tuple[int, bool, ClaimedRun | None]]:
        """trigger() for a worker that heard a NOTIFY: when this worker may
        take the run (`first_step` given) and the key has nothing pending,
        the run is inserted already claimed for it, with the first step's
        start, as claim() would write it (sql/006); otherwise plain trigger().
        Returns each run's id, whether it was created, and the run claimed
        for this worker, if any. A `lock_timeout` bounds its lock waits
        (see _LOCK_BUDGET_HEAD)."""
        cur = await conn.execute(
            self.q_trigger_and_claim,
            {
                "lock_timeout": lock_timeout,
                "me": worker_id,
                "first": first_step,
                "events": self.events_channel,
                "job": job,
                "scope": scope,
                "source": source,
                "by": triggered_by,
                "payload": Jsonb(dict(payload)),
            },
        )
        out: list[tuple[int, bool, ClaimedRun | None]] = []
        for run_id, created, step_id, max_attempts in await cur.fetchall():
            claimed = None
            if step_id is not None:
                claimed = ClaimedRun(
                    id=run_id,
                    job=job,
                    scope=scope,
                    source=source,
                    triggered_by=triggered_by,
                    payload=dict(payload),
                    scheduled_for=None,
                    attempt=1,
                    max_attempts=max_attempts,
                    worker_id=worker_id,
                    first_step_id=step_id,
                )
            out.append((int(run_id), bool(created), claimed))
        return out

    async def fire_state(self, conn: psycopg.AsyncConnection[Any]) -> dict[str, datetime | None]:
        cur = await conn.execute(self._compose("SELECT name, last_fire_at FROM {s}.jobs"))
        return {row[0]: row[1] for row in await cur.fetchall()}

    async def enqueue_fire(
        self,
        conn: psycopg.AsyncConnection[Any],
        job: str,
        fire: datetime,
        *,
        run: bool,
    ) -> list[tuple[int, bool]] | None:
        """Claim one cron fire for this instance and, if `run`, enqueue its runs.

        Returns None when another instance (or an earlier life of this one)
        claimed the fire already. The claim and the enqueue commit together,
        so a worker dying in between leaves the fire to the others.
        """
        if not run:
            cur = await conn.execute(self.q_claim_fire, {"fire": fire, "job": job})
            return None if await cur.fetchone() is None else []
        cur = await conn.execute(
            self.q_enqueue_fire, {"fire": fire, "job": job, "payload": Jsonb({})}
        )
        rows = await cur.fetchall()
        if not rows:
            return None
        return [(int(run_id), bool(created)) for run_id, created in rows if run_id is not None]

    async def set_next_fire(
        self, conn: psycopg.AsyncConnection[Any], fires: Mapping[str, datetime | None]
    ) -> None:
        if not fires:
            return
        await conn.execute(
            self._compose(
                "UPDATE {s}.jobs AS j SET next_fire_at = f.next"
                " FROM unnest(%s::text[], %s::timestamptz[]) AS f(name, next)"
                " WHERE j.name = f.name AND j.next_fire_at IS DISTINCT FROM f.next"
            ),
            (list(fires), list(fires.values())),
        )

    # -- runs ------------------------------------------------------------------

    async def claim(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        jobs: Sequence[str],
        first_steps: Mapping[str, str] | None = None,
    ) -> ClaimedRun | None:
        """Take the oldest pending run whose key is not running anywhere.

        With `first_steps` (job -> name of its first step), the same statement
        records the start of the run's first step, as step_started() would.
        """
        try:
            cur = await conn.execute(
                self.q_claim,
                {
                    "worker": worker_id,
                    "jobs": list(jobs),
                    "events": self.events_channel,
                    "first": Jsonb(dict(first_steps or {})),
                },
            )
        except psycopg.errors.UniqueViolation:
            # Another instance started a run of the same key between our
            # check and our update; the index refused ours. Nothing to claim.
            return None
        row = await cur.fetchone()
        if row is None:
            return None
        return _claimed_run(row, worker_id, first_step_id=row[10])

    async def next_attempt(self, conn: psycopg.AsyncConnection[Any], run: ClaimedRun) -> bool:
        cur = await conn.execute(
            self.q_next_attempt, {"id": run.id, "worker": run.worker_id, "attempt": run.attempt}
        )
        return await cur.fetchone() is not None

    async def progress(
        self,
        conn: psycopg.AsyncConnection[Any],
        run: ClaimedRun,
        counters: Counters,
        step: str | None,
        *,
        publish: bool = False,
    ) -> bool:
        """Write the run's counters and current step if this worker still owns
        the run; with `publish`, also send a `run_progress` event."""
        cur = await conn.execute(
            self.q_progress,
            {
                **self._fence(run),
                **counters.as_params(),
                "step": step,
                "events": self.events_channel,
                "publish": publish,
            },
        )
        return await cur.fetchone() is not None

    async def finish(
        self,
        conn: psycopg.AsyncConnection[Any],
        run: ClaimedRun,
        status: str,
        counters: Counters,
        error: str | None,
    ) -> bool:
        """Write the outcome if this worker still owns the run; publish the event."""
        cur = await conn.execute(
            self.q_finish,
            {
                **self._fence(run),
                **counters.as_params(),
                "status": status,
                "error": error,
                "events": self.events_channel,
                "event": f"run_{status}",
            },
        )
        return await cur.fetchone() is not None

    async def requeue(
        self, conn: psycopg.AsyncConnection[Any], run: ClaimedRun, reason: str
    ) -> str | None:
        """Give an interrupted run back: `pending`, or `cancelled` when a
        follow-up run of the key is already pending (it will do the work).
        Returns the new status, or None if the run was no longer ours."""
        cur = await conn.execute(
            self.q_requeue, {**self._fence(run), "error": reason, "events": self.events_channel}
        )
        row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def step_started(
        self,
        conn: psycopg.AsyncConnection[Any],
        run: ClaimedRun,
        position: int,
        name: str,
        counters: Counters,
    ) -> int:
        """Record a step's start and name it the run's current step (with the
        run's counters so far, fenced like progress()); returns its row id."""
        cur = await conn.execute(
            self.q_step_start,
            {**self._fence(run), **counters.as_params(), "position": position, "step": name},
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def step_finished(
        self,
        conn: psycopg.AsyncConnection[Any],
        step_id: int,
        status: str,
        counters: Counters,
        error: str | None,
    ) -> None:
        await conn.execute(
            self.q_step_finish,
            {"id": step_id, "status": status, "error": error, **counters.as_params()},
        )

    async def claim_reserved(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        run_id: int,
        jobs: Sequence[str],
        first_steps: Mapping[str, str],
        lock_timeout: str | None = None,
    ) -> ClaimedRun | None:
        """Claim run `run_id` if trigger() reserved it for this worker and it
        is still pending, recording its first step's start as claim() does;
        the run as its row says, or None when it is not ours to start. A
        reservation that cannot be taken (its key is running elsewhere, its
        job is not run here) is given back to the others."""
        try:
            cur = await conn.execute(
                self.q_claim_reserved,
                {
                    "lock_timeout": lock_timeout,
                    "id": run_id,
                    "worker": worker_id,
                    "jobs": list(jobs),
                    "first": Jsonb(dict(first_steps)),
                    "events": self.events_channel,
                    "wake": self.wake,
                },
            )
        except psycopg.errors.UniqueViolation:
            # A run of the key is running after all: not ours to start now.
            await self.release_reserved(conn, worker_id, only=run_id)
            return None
        row = await cur.fetchone()
        if row is None:
            return None
        return _claimed_run(row, worker_id, first_step_id=row[10])

    async def reserved_runs(self, conn: psycopg.AsyncConnection[Any], worker_id: str) -> list[int]:
        """Ids of the runs reserved for this worker and not claimed yet (for
        those whose notification it may not have heard)."""
        cur = await conn.execute(
            self._compose(
                "SELECT id FROM {s}.runs WHERE reserved_for = %s AND status = 'pending' ORDER BY id"
            ),
            (worker_id,),
        )
        return [int(r[0]) for r in await cur.fetchall()]

    async def release_reserved(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        *,
        only: int | None = None,
        keep: Sequence[int] = (),
    ) -> int:
        """Give back runs reserved for this worker (all, or `only` one), except
        those in `keep`, and wake the workers to claim them; returns how many."""
        cur = await conn.execute(
            self.q_release_reserved,
            {"worker": worker_id, "only": only, "keep": list(keep), "wake": self.wake},
        )
        row = await cur.fetchone()
        return int(row[0]) if row is not None else 0

    async def offer(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        concurrency: int,
        first_steps: Mapping[str, str],
        *,
        reserve_by_id: bool = False,
    ) -> None:
        """Tell trigger() what this worker takes reservations for: its slots
        and each enabled job's first step. `reserve_by_id`: it claims a
        reservation from the run's row, reading only the run's id off the
        wake (sql/007); trigger() reserves for no other worker."""
        await conn.execute(
            self.q_offer,
            {
                "id": worker_id,
                "concurrency": concurrency,
                "first": Jsonb(dict(first_steps)),
                "by_id": reserve_by_id,
            },
        )

    def _fence(self, run: ClaimedRun) -> dict[str, Any]:
        return {"id": run.id, "worker": run.worker_id, "attempt": run.attempt}

    # -- workers ---------------------------------------------------------------

    async def register_worker(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        hostname: str,
        pid: int,
        version: str,
        *,
        takeover_after: float,
        stale_after: float,
    ) -> int:
        """Insert this worker's row, with the silences after which peers may
        take its runs (sql/009); returns its lock key."""
        cur = await conn.execute(
            self._compose(
                "INSERT INTO {s}.workers"
                " (id, hostname, pid, version, state, takeover_after, stale_after)"
                " VALUES (%s, %s, %s, %s, 'starting', %s, %s) RETURNING lock_key"
            ),
            (worker_id, hostname, pid, version, takeover_after, stale_after),
        )
        row = await cur.fetchone()
        assert row is not None
        # Forget workers that stopped or vanished more than a day ago.
        await conn.execute(
            self._compose("DELETE FROM {s}.workers WHERE heartbeat_at < now() - interval '1 day'")
        )
        return int(row[0])

    async def hold_liveness_lock(self, conn: psycopg.AsyncConnection[Any], lock_key: int) -> None:
        """Take the session lock that tells other workers this one is alive.

        Never waited for: after a partition the server may keep our old
        listening session, and the lock with it, until its own keepalives
        give up (hours by default). That session is ours and dead to us, so
        it is ended, and the lock taken on this one.
        """
        for _ in range(50):
            cur = await conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s)", (self.lock_ns, lock_key)
            )
            row = await cur.fetchone()
            if row is not None and row[0]:
                return
            await conn.execute(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
                " AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND l.pid <> pg_backend_pid()",
                (self.lock_ns, lock_key),
            )
            await asyncio.sleep(0.1)  # the ended session lets go of it
        raise psycopg.OperationalError("could not take this worker's liveness lock back")

    async def heartbeat(
        self, conn: psycopg.AsyncConnection[Any], worker_id: str, state: str
    ) -> set[int]:
        """Record this worker's beat and state; returns the ids of the runs the
        database still has `running` under this worker (its fence check)."""
        cur = await conn.execute(
            self._compose(
                "UPDATE {s}.workers SET heartbeat_at = now(), state = %(state)s,"
                " stopped_at = CASE WHEN %(state)s = 'stopped' THEN now() END"
                " WHERE id = %(id)s"
                " RETURNING (SELECT coalesce(array_agg(r.id), '{{}}') FROM {s}.runs r"
                "            WHERE r.worker_id = %(id)s AND r.status = 'running')"
            ),
            {"state": state, "id": worker_id},
        )
        row = await cur.fetchone()
        return set(row[0]) if row is not None else set()

    async def recover_orphans(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        stale_after: float,
        in_flight: Sequence[int],
        *,
        judge_peers: bool = True,
        peer_grace: float = 0.0,
        takeover_after: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Take back runs whose worker is gone: retry them or fail them.

        Runs recorded under this worker but not in flight here are orphans too:
        their final write was lost in a database outage.

        Another worker's missing lock or stale heartbeat counts only with
        `judge_peers` and once the server has been up for `peer_grace`: a
        restart frees every session's lock, and a live worker needs that long
        to reconnect and take its lock again. A stopped or deleted worker
        counts at once. Neither counts before its heartbeat_at is
        `takeover_after` old: its lease (lease.py) may still hold.
        """
        async with conn.transaction():
            cur = await conn.execute(
                self.q_orphans,
                {
                    "me": worker_id,
                    "mine": list(in_flight),
                    "ns": self.lock_ns,
                    "stale": stale_after,
                    "judge": judge_peers,
                    "grace": peer_grace,
                    "takeover": takeover_after,
                    "events": self.events_channel,
                },
            )
            return [
                {"id": r[0], "job": r[1], "scope": r[2], "status": r[3]}
                for r in await cur.fetchall()
            ]

    async def unreserve_gone(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        stale_after: float,
        *,
        judge_peers: bool = True,
        peer_grace: float = 0.0,
        takeover_after: float = 0.0,
    ) -> int:
        """Clear the reservations of workers gone by the rules of
        recover_orphans(), so any worker may claim those runs; returns how many."""
        cur = await conn.execute(
            self.q_unreserve_gone,
            {
                "me": worker_id,
                "ns": self.lock_ns,
                "stale": stale_after,
                "judge": judge_peers,
                "grace": peer_grace,
                "takeover": takeover_after,
            },
        )
        row = await cur.fetchone()
        return int(row[0]) if row is not None else 0

    async def prune_history(
        self, conn: psycopg.AsyncConnection[Any], days: float, after: int, until: int
    ) -> int:
        """Delete the finished runs older than `days` whose id is in
        (`after`, `until`], but the newest of each key; returns how many."""
        cur = await conn.execute(self.q_prune, {"days": days, "after": after, "until": until})
        return cur.rowcount

    async def max_run_id(self, conn: psycopg.AsyncConnection[Any]) -> int:
        cur = await conn.execute(self._compose("SELECT coalesce(max(id), 0) FROM {s}.runs"))
        row = await cur.fetchone()
        return int(row[0]) if row is not None else 0

    # -- reading -----------------------------------------------------------------

    async def may_read_payload(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Whether this role may select runs.payload (sql/007: the app role
        may not, and reads payloads per scope from run_payloads). True when
        there is no runs table: the read that follows says so."""
        cur = await conn.execute(self.q_payload_privilege, (self.schema,))
        row = await cur.fetchone()
        return row is None or bool(row[0])

    async def read_status(
        self, conn: psycopg.AsyncConnection[Any], *, limit: int, job: str | None
    ) -> dict[str, Any]:
        """Workers, jobs, recent runs and a summary. The runs have no
        `payload` key when this role may not read it."""
        payload = await self.may_read_payload(conn)
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                self._compose(
                    "SELECT w.id, w.hostname, w.pid, w.version, w.state, w.started_at,"
                    " w.heartbeat_at, w.stopped_at,"
                    " (SELECT array_agg(r.id ORDER BY r.id) FROM {s}.runs r"
                    "   WHERE r.status = 'running' AND r.worker_id = w.id) AS current_runs"
                    " FROM {s}.workers w ORDER BY w.state = 'stopped', w.started_at DESC"
                )
            )
            workers = await cur.fetchall()
            await cur.execute(
                self._compose(
                    "SELECT j.name, j.enabled, j.schedule, j.timezone, j.scopes, j.next_fire_at,"
                    " j.last_fire_at, l.id AS last_run_id, l.status AS last_status,"
                    " l.finished_at AS last_finished_at"
                    " FROM {s}.jobs j LEFT JOIN LATERAL ("
                    "   SELECT id, status, finished_at FROM {s}.runs r WHERE r.job = j.name"
                    "   ORDER BY id DESC LIMIT 1) l ON true"
                    " WHERE %(job)s::text IS NULL OR j.name = %(job)s ORDER BY j.name"
                ),
                {"job": job},
            )
            jobs = await cur.fetchall()
            await cur.execute(
                self.q_recent_runs if payload else self.q_recent_runs_no_payload,
                {"job": job, "limit": limit},
            )
            runs = await cur.fetchall()
            await cur.execute(
                self._compose(
                    "SELECT count(*) AS total,"
                    " count(*) FILTER (WHERE status = 'succeeded') AS succeeded,"
                    " count(*) FILTER (WHERE status = 'failed') AS failed,"
                    " count(*) FILTER (WHERE status = 'pending') AS pending,"
                    " count(*) FILTER (WHERE status = 'running') AS running,"
                    " max(finished_at) FILTER (WHERE status = 'succeeded') AS last_success_at"
                    " FROM {s}.runs WHERE %(job)s::text IS NULL OR job = %(job)s"
                ),
                {"job": job},
            )
            summary = await cur.fetchone()
        return {"workers": workers, "jobs": jobs, "runs": runs, "summary": summary or {}}

    async def read_run(
        self, conn: psycopg.AsyncConnection[Any], run_id: int, *, payload: bool | None = None
    ) -> dict[str, Any] | None:
        """One run's row; without `payload` when this role may not read it
        (asked of the database unless `payload` says)."""
        if payload is None:
            payload = await self.may_read_payload(conn)
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(self.q_run if payload else self.q_run_no_payload, (run_id,))
            return await cur.fetchone()


_ONE_RUN = " FROM {s}.runs WHERE id = %s"
_RECENT_RUNS = (
    " FROM {s}.runs WHERE %(job)s::text IS NULL OR job = %(job)s ORDER BY id DESC LIMIT %(limit)s"
)

_PAYLOAD_PRIVILEGE = """
SELECT has_column_privilege(c.oid, 'payload', 'SELECT')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = 'runs'
"""

_REGISTER_JOB = """
INSERT INTO {s}.jobs AS j (name, enabled, schedule, timezone, scopes, scopes_sql, on_overlap,
                           misfire, retries, timeout, last_fire_at, updated_at)
VALUES (%(name)s, %(enabled)s, %(schedule)s, %(timezone)s, %(scopes)s, %(scopes_sql)s,
        %(on_overlap)s, %(misfire)s, %(retries)s, %(timeout)s, now(), now())
ON CONFLICT (name) DO UPDATE SET
    enabled = excluded.enabled,
    schedule = excluded.schedule,
    timezone = excluded.timezone,
    scopes = excluded.scopes,
    scopes_sql = excluded.scopes_sql,
    on_overlap = excluded.on_overlap,
    misfire = excluded.misfire,
    retries = excluded.retries,
    timeout = excluded.timeout,
    last_fire_at = CASE
        WHEN j.schedule IS DISTINCT FROM excluded.schedule
          OR j.timezone IS DISTINCT FROM excluded.timezone
          OR j.last_fire_at IS NULL
        THEN now() ELSE j.last_fire_at END,
    next_fire_at = CASE WHEN j.schedule IS DISTINCT FROM excluded.schedule
                        THEN NULL ELSE j.next_fire_at END,
    updated_at = now()
"""

# _LOCK_BUDGET_*: a statement that brings its own lock_timeout, for the
# listener's enqueues: an app transaction holding a key (its trigger() left
# uncommitted) must not stall the session every notification comes through. set_config(..., true)
# lasts for the current transaction: in autocommit, this statement alone. The
# MATERIALIZED CTE is evaluated once, and the call takes an argument from it
# (an empty string), so the setting is in place before the call runs. None
# keeps the session's own setting.
_LOCK_BUDGET_HEAD = "WITH budget AS MATERIALIZED (SELECT set_config('lock_timeout', coalesce("
_LOCK_BUDGET_TAIL = "::text, current_setting('lock_timeout')), true) AS v)"

_TRIGGER_BUDGETED = (
    _LOCK_BUDGET_HEAD + "%s" + _LOCK_BUDGET_TAIL + " SELECT t.run_id, t.created FROM budget,"
    " LATERAL {s}.trigger(%s || left(budget.v, 0), %s, %s, %s, %s, %s) AS t"
)
_TRIGGER_AND_CLAIM = (
    _LOCK_BUDGET_HEAD
    + "%(lock_timeout)s"
    + _LOCK_BUDGET_TAIL
    + " SELECT t.run_id, t.created, t.step_id, t.max_attempts FROM budget,"
    " LATERAL {s}.trigger_and_claim(%(me)s || left(budget.v, 0), %(first)s, %(events)s,"
    " %(job)s, %(scope)s, %(source)s, %(by)s, %(payload)s) AS t"
)

# pg_notify() in RETURNING publishes the run event in the same statement, and
# so in the same transaction, as the status change it reports.
_EVENT = (
    "pg_notify(%(events)s, json_build_object('event', {event}, 'run_id', r.id, 'job', r.job,"
    " 'scope', r.scope, 'status', r.status)::text)"
)

# The pick, claimable() (sql/004: the oldest pending run whose key is not
# running, FOR UPDATE SKIP LOCKED, found in id order whatever the statistics),
# is a MATERIALIZED CTE, evaluated exactly once: as a FROM subquery the
# planner may rescan it once per outer row, and every rescan of LIMIT 1 ...
# SKIP LOCKED picks (and this UPDATE claims) another run.
# started_at is clock_timestamp(), read while the row is written: now() is
# the transaction's start, taken before the snapshot, so on a busy server it
# can predate the finish of the run this claim saw end, and the run log would
# show two runs of one key overlapping when they did not.
# The first step's start is written by the same statement: an idle worker's
# trigger-to-step time is counted in round trips, and this saves one.
_CLAIM = (
    """
WITH picked AS MATERIALIZED (
    SELECT id FROM {s}.claimable(%(jobs)s) AS id
), claimed AS (
    UPDATE {s}.runs AS r
    SET status = 'running', started_at = clock_timestamp(), finished_at = NULL,
        duration_ms = NULL, worker_id = %(worker)s, attempt = r.attempt + 1, error = NULL,
        current_step = %(first)s::jsonb ->> r.job,
        records_total = NULL, records_processed = 0, records_inserted = 0, records_updated = 0,
        records_deleted = 0, records_errored = 0
    FROM picked
    WHERE r.id = picked.id
    RETURNING r.id, r.job, r.scope, r.source, r.triggered_by, r.payload, r.scheduled_for,
              r.attempt, r.max_attempts, """
    + _EVENT.replace("{event}", "'run_started'")
    + """ AS event
), step AS (
    INSERT INTO {s}.run_steps (run_id, attempt, position, name, status)
    SELECT c.id, c.attempt, 0, %(first)s::jsonb ->> c.job, 'running'
    FROM claimed c WHERE %(first)s::jsonb ->> c.job IS NOT NULL
    RETURNING id
)
SELECT c.id, c.job, c.scope, c.source, c.triggered_by, c.payload, c.scheduled_for,
       c.attempt, c.max_attempts, c.event, (SELECT id FROM step)
FROM claimed c
"""
)

_FENCE = (
    "r.id = %(id)s AND r.status = 'running'"
    " AND r.worker_id = %(worker)s AND r.attempt = %(attempt)s"
)

_COUNTER_SET = """
    records_total = %(total)s, records_processed = %(processed)s,
    records_inserted = %(inserted)s, records_updated = %(updated)s,
    records_deleted = %(deleted)s, records_errored = %(errored)s"""

_FINISH = (
    """
UPDATE {s}.runs AS r
SET status = %(status)s, finished_at = now(), current_step = NULL,
    duration_ms = (extract(epoch FROM now() - r.started_at) * 1000)::bigint,
    error = %(error)s,"""
    + _COUNTER_SET
    + """
WHERE """
    + _FENCE
    + """
RETURNING r.id, """
    + _EVENT.replace("{event}", "%(event)s::text")
)

# Only the orchestrator's periodic flush publishes: the write at each step
# start stays silent, so runs made of quick steps add no events to the
# channel, and followers see only status changes for them.
_PROGRESS = (
    """
UPDATE {s}.runs AS r SET current_step = %(step)s,"""
    + _COUNTER_SET
    + """
WHERE """
    + _FENCE
    + """
RETURNING r.id, CASE WHEN %(publish)s THEN pg_notify(%(events)s, json_build_object(
    'event', 'run_progress', 'run_id', r.id, 'job', r.job, 'scope', r.scope,
    'status', r.status, 'step', r.current_step, 'records_processed', r.records_processed,
    'records_total', r.records_total)::text) END"""
)

# One statement, so one round trip between a claim and the step's first line.
_STEP_START = (
    """
WITH progress AS (
    UPDATE {s}.runs AS r SET current_step = %(step)s,"""
    + _COUNTER_SET
    + """
    WHERE """
    + _FENCE
    + """
)
INSERT INTO {s}.run_steps (run_id, attempt, position, name, status)
VALUES (%(id)s, %(attempt)s, %(position)s, %(step)s, 'running')
RETURNING id"""
)

_NEXT_ATTEMPT = (
    """
UPDATE {s}.runs AS r SET attempt = r.attempt + 1
WHERE """
    + _FENCE
    + """
RETURNING r.id"""
)

# The attempt number stays: it keys the attempt's run_steps rows, and the
# next claim starts a new attempt (always at least one more try).
_REQUEUE = (
    """
UPDATE {s}.runs AS r
SET status = CASE WHEN f.has_pending THEN 'cancelled' ELSE 'pending' END,
    finished_at = CASE WHEN f.has_pending THEN now() END,
    duration_ms = CASE WHEN f.has_pending
                       THEN (extract(epoch FROM now() - r.started_at) * 1000)::bigint END,
    started_at = CASE WHEN f.has_pending THEN r.started_at END,
    worker_id = CASE WHEN f.has_pending THEN r.worker_id END,
    current_step = NULL, error = %(error)s
FROM (SELECT EXISTS (
        SELECT 1 FROM {s}.runs p, {s}.runs me
        WHERE me.id = %(id)s AND p.status = 'pending' AND p.job = me.job
          AND coalesce(p.scope, '') = coalesce(me.scope, ''))
      AS has_pending) AS f
WHERE """
    + _FENCE
    + """
RETURNING r.status, """
    + _EVENT.replace("{event}", "'run_cancelled'")
)

_STEP_FINISH = """
UPDATE {s}.run_steps
SET status = %(status)s, finished_at = now(), error = %(error)s,
    duration_ms = (extract(epoch FROM now() - started_at) * 1000)::bigint,
    records_total = %(total)s, records_processed = %(processed)s,
    records_inserted = %(inserted)s, records_updated = %(updated)s,
    records_deleted = %(deleted)s, records_errored = %(errored)s
WHERE id = %(id)s
"""

# A run is orphaned when its worker no longer holds its liveness lock (the
# session died: kill -9, host loss, lost connection), has stopped, has no
# row, or stopped heartbeating. It goes back to pending while it has
# attempts left and no follow-up is already pending, else it fails.
# Worker `w` (LEFT JOINed) is gone: no row, stopped, or, when peers may be
# judged (recover_orphans), its liveness lock free or its heartbeat stale.
# Either way its heartbeat must be `takeover` old, by this database's clock
# as it was written: until then the worker's lease may hold and its steps run
# (lease.py; README "Self-fencing"). `takeover` and `stale` are the judged
# worker's own, from its row (sql/009): its lease is as long as its interval
# says, whatever the judge's; a row without them (an earlier version) is
# judged by the judge's.
_GONE = """(w.id IS NULL
           OR w.state = 'stopped'
           OR %(judge)s
              AND pg_postmaster_start_time() < now() - make_interval(secs => %(grace)s)
              AND w.heartbeat_at < now() - make_interval(
                  secs => coalesce(w.takeover_after, %(takeover)s))
              AND (w.heartbeat_at < now() - make_interval(
                       secs => coalesce(w.stale_after, %(stale)s))
                   OR NOT EXISTS (
                       SELECT 1 FROM pg_locks l
                       WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                         -- pg_locks spans the cluster; lock keys are per database
                         AND l.database = (SELECT oid FROM pg_database
                                           WHERE datname = current_database())
                         AND l.classid = %(ns)s::bigint::oid
                         AND l.objid = w.lock_key::bigint::oid)))"""

_ORPHANS = (
    """
WITH lost AS (
    SELECT r.id,
           r.attempt < r.max_attempts AND NOT EXISTS (
               SELECT 1 FROM {s}.runs p
               WHERE p.status = 'pending' AND p.job = r.job
                 AND coalesce(p.scope, '') = coalesce(r.scope, '')) AS retry
    FROM {s}.runs r
    LEFT JOIN {s}.workers w ON w.id = r.worker_id
    WHERE r.status = 'running'
      AND (r.worker_id = %(me)s AND NOT (r.id = ANY(%(mine)s::bigint[]))
           -- not one claimed after the in-flight list was taken
           AND r.started_at < now() - make_interval(secs => %(stale)s)
           OR r.worker_id IS DISTINCT FROM %(me)s AND """
    + _GONE
    + """)
    FOR UPDATE OF r SKIP LOCKED
), steps AS (
    UPDATE {s}.run_steps st
    SET status = 'failed', finished_at = now(), error = 'worker lost',
        duration_ms = (extract(epoch FROM now() - st.started_at) * 1000)::bigint
    FROM lost WHERE st.run_id = lost.id AND st.status = 'running'
)
UPDATE {s}.runs AS r
SET status = CASE WHEN lost.retry THEN 'pending' ELSE 'failed' END,
    started_at = CASE WHEN lost.retry THEN NULL ELSE r.started_at END,
    finished_at = CASE WHEN lost.retry THEN NULL ELSE now() END,
    duration_ms = CASE WHEN lost.retry THEN NULL
                       ELSE (extract(epoch FROM now() - r.started_at) * 1000)::bigint END,
    worker_id = CASE WHEN lost.retry THEN NULL ELSE r.worker_id END,
    current_step = NULL, error = 'worker lost'
FROM lost WHERE r.id = lost.id
RETURNING r.id, r.job, r.scope, r.status, """
    + _EVENT.replace(
        "{event}", "CASE WHEN r.status = 'failed' THEN 'run_failed' ELSE 'run_cancelled' END"
    )
)

_UNRESERVE_GONE = (
    """
WITH gone AS (
    SELECT r.id FROM {s}.runs r
    LEFT JOIN {s}.workers w ON w.id = r.reserved_for
    WHERE r.reserved_for IS NOT NULL AND r.reserved_for <> %(me)s AND r.status = 'pending'
      AND """
    + _GONE
    + """
    FOR UPDATE OF r SKIP LOCKED
), freed AS (
    UPDATE {s}.runs AS r SET reserved_for = NULL FROM gone WHERE r.id = gone.id RETURNING r.id
)
SELECT count(*) FROM freed
"""
)

# A reserved run's claim (sql/005): the reservation is the fence. The
# notification that named the run is a hint and nothing more: this statement
# alone decides, from the row, whether the run is ours (reserved for us,
# still pending, a job we run), and returns the row the step starts from,
# with the same writes as _CLAIM. A reservation of a job we no longer run (a
# reload since it was made) is given back in the same statement.
_CLAIM_RESERVED = (
    _LOCK_BUDGET_HEAD
    + "%(lock_timeout)s"
    + _LOCK_BUDGET_TAIL
    + """, target AS MATERIALIZED (
    -- Joined with budget: its lock_timeout is set before the row is locked.
    SELECT r.id, r.job = ANY(%(jobs)s) AS ours FROM {s}.runs r, budget
    WHERE r.id = %(id)s AND r.status = 'pending' AND r.reserved_for = %(worker)s
    FOR UPDATE OF r
), released AS (
    UPDATE {s}.runs AS r SET reserved_for = NULL
    FROM target t WHERE r.id = t.id AND NOT t.ours
    RETURNING pg_notify(%(wake)s, r.job)
), claimed AS (
    UPDATE {s}.runs AS r
    SET status = 'running', started_at = clock_timestamp(), finished_at = NULL,
        duration_ms = NULL, worker_id = %(worker)s, attempt = r.attempt + 1, error = NULL,
        reserved_for = NULL, current_step = %(first)s::jsonb ->> r.job,
        records_total = NULL, records_processed = 0, records_inserted = 0, records_updated = 0,
        records_deleted = 0, records_errored = 0
    FROM target t
    WHERE r.id = t.id AND t.ours
    RETURNING r.id, r.job, r.scope, r.source, r.triggered_by, r.payload, r.scheduled_for,
              r.attempt, r.max_attempts, """
    + _EVENT.replace("{event}", "'run_started'")
    + """ AS event
), step AS (
    INSERT INTO {s}.run_steps (run_id, attempt, position, name, status)
    SELECT c.id, c.attempt, 0, %(first)s::jsonb ->> c.job, 'running'
    FROM claimed c WHERE %(first)s::jsonb ->> c.job IS NOT NULL
    RETURNING id
)
SELECT c.id, c.job, c.scope, c.source, c.triggered_by, c.payload, c.scheduled_for,
       c.attempt, c.max_attempts, c.event, (SELECT id FROM step),
       (SELECT count(*) FROM released)
FROM claimed c
"""
)

_RELEASE_RESERVED = """
WITH freed AS (
    UPDATE {s}.runs AS r SET reserved_for = NULL
    WHERE r.reserved_for = %(worker)s AND r.status = 'pending'
      AND (%(only)s::bigint IS NULL OR r.id = %(only)s::bigint)
      AND NOT (r.id = ANY(%(keep)s::bigint[]))
    RETURNING r.job
)
SELECT count(pg_notify(%(wake)s, job)) FROM freed
"""

# One window of ids (pruning.py), under SKIP LOCKED, so pruning never holds
# many locks or waits on another instance doing the same. The newest run of
# each key is kept however old, so `status` and the metrics still show every
# key's last result. The test for a newer run is split on scope being NULL:
# `IS NOT DISTINCT FROM` cannot use runs_by_job (job, scope, id DESC), and
# without the index each test read every run of the job.
_PRUNE = """
WITH old AS (
    SELECT r.id FROM {s}.runs r
    WHERE r.id > %(after)s AND r.id <= %(until)s
      AND r.status IN ('succeeded', 'failed', 'cancelled', 'skipped')
      AND r.finished_at < now() - make_interval(secs => %(days)s * 86400)
      AND (r.scope IS NULL AND EXISTS (
               SELECT 1 FROM {s}.runs n
               WHERE n.job = r.job AND n.scope IS NULL AND n.id > r.id)
           OR r.scope IS NOT NULL AND EXISTS (
               SELECT 1 FROM {s}.runs n
               WHERE n.job = r.job AND n.scope = r.scope AND n.id > r.id))
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {s}.runs AS r USING old WHERE r.id = old.id
"""
