"""The worker embedded in another asyncio program: the host owns the loop and signals."""

from __future__ import annotations

import asyncio
import gc
import json

import psycopg

import syncworker
from syncworker.config import validate_config
from syncworker.logs import make_logger


def test_async_with_worker_serves_triggers_and_stops_cleanly(database_url, capsys):
    settings = validate_config(
        {
            "database_url": database_url,
            "heartbeat_interval": 1,
            "jobs": {"sync": {"steps": ["sw_testjobs:record"], "scopes": ["A", "B"]}},
        }
    )

    frozen_before = gc.get_freeze_count()

    async def host() -> list[tuple[str, str]]:
        async with syncworker.Worker(settings, log=make_logger("info", "json")) as worker:
            assert worker.ready.is_set()
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                await conn.execute("LISTEN sync_events")
                ids = await syncworker.trigger_sync(conn, "sync", source="embedded")
                done: set[int] = set()
                async for note in conn.notifies(timeout=30):
                    event = json.loads(note.payload)
                    if event["event"] == "run_succeeded":
                        done.add(event["run_id"])
                    if done == set(ids):
                        break
                assert done == set(ids)
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT r.status, w.state FROM syncworker.runs r"
                " JOIN syncworker.workers w ON w.id = r.worker_id ORDER BY r.id"
            )
            return await cur.fetchall()

    rows = asyncio.run(host())
    assert rows == [("succeeded", "stopped"), ("succeeded", "stopped")]
    # Only `syncworker run` freezes its heap; the host's heap is the host's.
    assert gc.get_freeze_count() == frozen_before
    assert '"event": "worker_stopped"' in capsys.readouterr().err


def test_run_embedded_prints_a_url_that_psql_notify_drives(tmp_path, daemons):
    """What `make run` does: a throwaway PostgreSQL, the URL printed, NOTIFY works."""
    import re

    from tests.harness import REPO, Daemon, query, wait_until

    config = tmp_path / "c.toml"
    config.write_text((REPO / "examples/hello/syncworker.toml").read_text())
    daemon = Daemon(
        config, env={"PYTHONPATH": str(REPO / "examples/hello")}, extra_args=["--embedded"]
    )
    daemons.append(daemon)
    daemon.ready(timeout=60)
    [url] = re.findall(r"embedded PostgreSQL: (\S+)", daemon.log_text())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("NOTIFY sync_trigger, 'hello'")
    rows = wait_until(
        lambda: (
            r
            if len(
                r := query(
                    url, "SELECT scope, status FROM syncworker.runs WHERE status = 'succeeded'"
                )
            )
            == 2
            else None
        ),
        what="both hello scopes to succeed",
    )
    assert sorted(rows) == [("north", "succeeded"), ("south", "succeeded")]
    assert daemon.stop() == 0
