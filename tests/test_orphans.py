"""Which runs a worker takes back, read from a real database: a peer whose
lock is free counts as dead, except while every session may just have been
cut (we reconnected, or the server started, less than the grace ago)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from syncworker.store import Store
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
