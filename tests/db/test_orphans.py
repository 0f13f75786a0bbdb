"""Which runs a worker takes back, read from a real database: a peer whose
lock is free counts as dead, except while every session may just have been
cut (we reconnected, or the server started, less than the grace ago)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from syncworker.db import Store
from tests.harness import cli, execute, query, write_config

JOBS = """
[jobs.solo]
steps = ["sw_testjobs:record"]
"""


@pytest.fixture
def orphan(database_url: str, tmp_path: Any) -> tuple[str, int]:
    """A run left `running` by a worker that holds no lock and beat just now:
    what every worker looks like to the first one back after a restart."""
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0
    execute(
        database_url,
        "INSERT INTO syncworker.workers (id, hostname, pid, version, state)"
        " VALUES ('peer', 'h', 1, 'v', 'running'), ('me', 'h', 2, 'v', 'idle')",
    )
    [(run_id,)] = query(
        database_url,
        "INSERT INTO syncworker.runs (job, status, source, started_at, worker_id)"
        " VALUES ('solo', 'running', 'test', now(), 'peer') RETURNING id",
    )
    return database_url, run_id


def _recover(url: str, *, judge_peers: bool, peer_grace: float) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        store = Store("syncworker", "sync_events")
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await store.recover_orphans(
                conn, "me", 30.0, [], judge_peers=judge_peers, peer_grace=peer_grace
            )

    return asyncio.run(go())


def _status(url: str, run_id: int) -> tuple[str, str | None]:
    [row] = query(url, "SELECT status, error FROM syncworker.runs WHERE id = %s", (run_id,))
    return row


def test_a_peer_without_its_lock_is_taken_back(orphan):
    url, run_id = orphan
    taken = _recover(url, judge_peers=True, peer_grace=0.0)
    assert [r["id"] for r in taken] == [run_id]
    assert _status(url, run_id) == ("pending", "worker lost")  # attempts left: retried


def test_not_right_after_our_own_reconnect(orphan):
    url, run_id = orphan
    assert _recover(url, judge_peers=False, peer_grace=0.0) == []
    assert _status(url, run_id) == ("running", None)


def test_not_while_the_server_is_younger_than_the_grace(orphan):
    url, run_id = orphan
    [(uptime,)] = query(url, "SELECT extract(epoch FROM now() - pg_postmaster_start_time())")
    assert _recover(url, judge_peers=True, peer_grace=float(uptime) + 3600) == []
    assert _status(url, run_id) == ("running", None)


def test_a_stopped_peer_is_taken_back_at_once(orphan):
    url, run_id = orphan
    execute(url, "UPDATE syncworker.workers SET state = 'stopped' WHERE id = 'peer'")
    taken = _recover(url, judge_peers=False, peer_grace=0.0)
    assert [r["id"] for r in taken] == [run_id]


def test_a_peer_is_judged_by_its_own_takeover_after(orphan):
    """A peer states in its row how long its runs stay its own (sql/009);
    a judge with a shorter interval of its own waits that long."""
    url, run_id = orphan
    execute(
        url,
        "UPDATE syncworker.workers SET takeover_after = 120, stale_after = 450,"
        " heartbeat_at = now() - interval '60 seconds' WHERE id = 'peer'",
    )
    assert _recover(url, judge_peers=True, peer_grace=0.0) == []
    assert _status(url, run_id) == ("running", None)
    execute(
        url,
        "UPDATE syncworker.workers SET heartbeat_at = now() - interval '130 seconds'"
        " WHERE id = 'peer'",
    )
    taken = _recover(url, judge_peers=True, peer_grace=0.0)
    assert [r["id"] for r in taken] == [run_id]


def test_a_peer_holding_its_lock_is_judged_by_its_own_stale_after(orphan):
    url, run_id = orphan
    execute(
        url,
        "UPDATE syncworker.workers SET takeover_after = 1, stale_after = 450,"
        " heartbeat_at = now() - interval '60 seconds' WHERE id = 'peer'",
    )

    async def go() -> list[dict[str, Any]]:
        store = Store("syncworker", "sync_events")
        async with (
            await psycopg.AsyncConnection.connect(url, autocommit=True) as holder,
            await psycopg.AsyncConnection.connect(url, autocommit=True) as judge,
        ):
            [(key,)] = await (
                await holder.execute("SELECT lock_key FROM syncworker.workers WHERE id = 'peer'")
            ).fetchall()
            await store.hold_liveness_lock(holder, key)
            # By the judge's own stale_after (30 s) the peer would be gone.
            return await store.recover_orphans(judge, "me", 30.0, [], judge_peers=True)

    assert asyncio.run(go()) == []
    assert _status(url, run_id) == ("running", None)
