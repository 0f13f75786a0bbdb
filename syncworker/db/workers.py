"""Workers and liveness: a worker's row and beat, the session lock that says
it is alive, and what becomes of the runs and reservations of one gone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import psycopg

from syncworker.db import queries
from syncworker.db.base import StoreBase
from syncworker.db.rows import Freed, Heartbeat, LockKey, LockTaken, Recovered


class WorkerQueries(StoreBase):
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
        row = await queries.one(
            conn,
            self.q["register_worker"],
            {
                "id": worker_id,
                "hostname": hostname,
                "pid": pid,
                "version": version,
                "takeover": takeover_after,
                "stale": stale_after,
            },
            LockKey,
        )
        assert row is not None
        await queries.none(conn, self.q["forget_old_workers"])
        return int(row.lock_key)

    async def hold_liveness_lock(self, conn: psycopg.AsyncConnection[Any], lock_key: int) -> None:
        """Take the session lock that tells other workers this one is alive.

        Never waited for: after a partition the server may keep our old
        listening session, and the lock with it, until its own keepalives
        give up (hours by default). That session is ours and dead to us, so
        it is ended, and the lock taken on this one.
        """
        key = {"ns": self.lock_ns, "key": lock_key}
        for _ in range(50):
            row = await queries.one(conn, self.q["try_liveness_lock"], key, LockTaken)
            if row is not None and row.taken:
                return
            await queries.none(conn, self.q["end_liveness_lock_holder"], key)
            await asyncio.sleep(0.1)  # the ended session lets go of it
        raise psycopg.OperationalError("could not take this worker's liveness lock back")

    async def heartbeat(
        self, conn: psycopg.AsyncConnection[Any], worker_id: str, state: str
    ) -> set[int]:
        """Record this worker's beat and state; returns the ids of the runs the
        database still has `running` under this worker (its fence check)."""
        row = await queries.one(
            conn, self.q["heartbeat"], {"state": state, "id": worker_id}, Heartbeat
        )
        return set(row.running) if row is not None else set()

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
            rows = await queries.many(
                conn,
                self.q["recover_orphans"],
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
                Recovered,
            )
            return [r.as_dict() for r in rows]

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
        row = await queries.one(
            conn,
            self.q["unreserve_gone"],
            {
                "me": worker_id,
                "ns": self.lock_ns,
                "stale": stale_after,
                "judge": judge_peers,
                "grace": peer_grace,
                "takeover": takeover_after,
            },
            Freed,
        )
        return int(row.freed) if row is not None else 0
