"""Behind a real PgBouncer (issue 13): transaction pooling with a direct
listening session (`listen_url`, `pooler = "transaction"`), poll mode
(`listen = false`), session pooling, and the start-up probe that refuses a
listening session through a transaction pooler with exit 78."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import Daemon, execute, query, wait_until, write_config
from tests.invariants import assert_invariants, trigger
from tests.pgbouncer import PgBouncer

JOBS = """
[jobs.solo]
steps = ["sw_testjobs:record"]

[jobs.sync]
scopes = ["RIO", "HOU", "NYC"]
steps = ["sw_testjobs:record", "sw_testjobs:second"]
"""


@pytest.fixture
def bouncer(database_url: str) -> Iterator[PgBouncer]:
    made = PgBouncer(database_url)
    yield made
    made.close()


def _succeeded(url: str) -> int:
    [(n,)] = query(url, "SELECT count(*) FROM syncworker.runs WHERE status = 'succeeded'")
    return int(n)


def _serve_many(url: str, daemon: Daemon, *, notify: bool) -> None:
    """Enough runs that every statement runs far past psycopg's prepare
    threshold (5): prepared statements would break through the pooler."""
    for i in range(12):
        execute(url, "SELECT * FROM syncworker.trigger('sync')")
        trigger(url, "solo", i=i)
        if notify:
            execute(url, "NOTIFY sync_trigger, 'solo'")
    wait_until(
        lambda: (
            query(
                url, "SELECT count(*) FROM syncworker.runs WHERE status IN ('pending', 'running')"
            )
            == [(0,)]
        ),
        what="every run served",
        timeout=90,
    )
    assert _succeeded(url) >= 4  # triggers of a pending key join it
    failed = query(url, "SELECT id, error FROM syncworker.runs WHERE status <> 'succeeded'")
    assert failed == []
    assert not daemon.events("worker_crashed")


def test_transaction_pooling_with_a_direct_listening_session(
    database_url, tmp_path, start, bouncer
):
    config = write_config(
        tmp_path / "c.toml",
        bouncer.url,
        JOBS,
        listen_url=database_url,
        pooler="transaction",
    )
    daemon = start(config)
    _serve_many(database_url, daemon, notify=True)
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log_text()
    assert_invariants(database_url)


def test_poll_mode_through_transaction_pooling(database_url, tmp_path, start, bouncer):
    config = write_config(
        tmp_path / "c.toml",
        bouncer.url,
        JOBS,
        listen=False,
        poll_interval=0.2,
        pooler="transaction",
    )
    daemon = start(config)
    _serve_many(database_url, daemon, notify=False)
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_listening_through_transaction_pooling_exits_78_saying_what_to_set(
    database_url, tmp_path, bouncer
):
    daemon = Daemon(write_config(tmp_path / "c.toml", bouncer.url, JOBS))
    assert daemon.wait_exit(60) == 78
    text = daemon.log_text()
    assert "never came back" in text and "listen_url" in text and "listen = false" in text
    assert "Traceback" not in text


def test_session_pooling_keeps_working(database_url, tmp_path, start):
    session = PgBouncer(database_url, pool_mode="session")
    try:
        daemon = start(write_config(tmp_path / "c.toml", session.url, JOBS))
        _serve_many(database_url, daemon, notify=True)
        assert daemon.stop() == 0
        assert_invariants(database_url)
    finally:
        session.close()
