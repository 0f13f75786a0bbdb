"""examples/queue_drain: Redis lists into PostgreSQL and JSONL files, a batch
at a time and all or nothing, run by a real daemon. Needs the `redis`
package and a Redis server on 127.0.0.1:6379; skipped otherwise."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import REPO, execute, query, wait_until

redis = pytest.importorskip(
    "redis", reason="examples/queue_drain needs the redis package: pip install '.[examples]'"
)

EXAMPLE = REPO / "examples" / "queue_drain"
WAIT = 90.0


@pytest.fixture
def red() -> Iterator[tuple[Any, str]]:
    """A Redis client and a key prefix of this test's own, deleted afterwards."""
    client = redis.Redis(
        host="127.0.0.1",
        port=6379,
        socket_connect_timeout=1,
        socket_timeout=10,
        decode_responses=True,
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis answering on 127.0.0.1:6379 ({exc})")
    prefix = f"sw_test_{secrets.token_hex(6)}"
    yield client, prefix
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def drainer(database_url, tmp_path, start, red):  # type: ignore[no-untyped-def]
    """The example's daemon, on this test's database, prefix and folder."""
    _, prefix = red
    execute(database_url, (EXAMPLE / "setup.sql").read_text())
    env = {
        "SYNCWORKER_DATABASE_URL": database_url,
        "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(REPO)]),
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "QUEUE_DRAIN_PREFIX": prefix,
        "QUEUE_DRAIN_DIR": str(tmp_path / "messages"),
        # No cron fires in the middle of a test, and quick retries; the rest
        # is the example's config as it is.
        "SYNCWORKER_JOBS": json.dumps({"queue_drain": {"schedule": [], "retry_backoff": 0.1}}),
    }
    return start(EXAMPLE / "syncworker.toml", env)


def push(client: Any, queue: str, *messages: Any) -> None:
    """As a producer would: LPUSH, oldest first."""
    for message in messages:
        client.lpush(queue, message if isinstance(message, str) else json.dumps(message))


def drain(url: str, scope: str, **payload: Any) -> dict:
    [(previous,)] = query(url, "SELECT coalesce(max(id), 0) FROM syncworker.runs")
    doc = {"job": "queue_drain", "scope": scope, **payload}
    execute(url, "SELECT pg_notify('sync_trigger', %s)", (json.dumps(doc),))

    def done() -> dict | None:
        rows = query(
            url,
            "SELECT row_to_json(r) FROM syncworker.runs r"
            " WHERE id > %s AND status NOT IN ('pending', 'running')",
            (previous,),
        )
        return rows[0][0] if rows else None

    return wait_until(done, timeout=WAIT, what=f"a queue_drain run of {scope}")


def stored(url: str, queue: str = "in") -> list[str]:
    rows = query(
        url, "SELECT message_id FROM queue_messages WHERE queue = %s ORDER BY id", (queue,)
    )
    return [m for (m,) in rows]


def file_ids(folder: Path, scope: str = "in") -> list[str]:
    files = sorted((folder / "messages").glob(f"{scope}-*.jsonl"))
    return [json.loads(line)["id"] for f in files for line in f.read_text().splitlines()]


def test_drains_in_batches_into_the_table_and_the_day_file(database_url, tmp_path, red, drainer):
    client, prefix = red
    ids = [f"m{i:02}" for i in range(1, 26)]
    push(client, f"{prefix}:in", *({"id": m, "n": i} for i, m in enumerate(ids)))
    push(client, f"{prefix}:out", {"id": "o1"})

    run = drain(database_url, "in", batch_size=10)
    assert run["status"] == "succeeded", run
    assert (run["records_total"], run["records_processed"], run["records_inserted"]) == (25, 25, 25)
    assert stored(database_url) == ids
    assert file_ids(tmp_path) == ids
    [day_file] = (tmp_path / "messages").glob("in-*.jsonl")
    assert query(database_url, "SELECT path, committed FROM queue_files") == [
        (str(day_file), day_file.stat().st_size)
    ]
    assert client.llen(f"{prefix}:in") == client.llen(f"{prefix}:in:processing") == 0
    batches = [r["messages"] for r in drainer.events("batch_drained", run_id=run["id"])]
    assert batches == [10, 10, 5]
    # The other scope's queue is its own key, drained by its own runs.
    assert client.lrange(f"{prefix}:out", 0, -1) == [json.dumps({"id": "o1"})]


def test_a_failing_batch_goes_back_to_the_queue_and_nothing_is_half_written(
    database_url, tmp_path, red, drainer
):
    client, prefix = red
    queue = f"{prefix}:in"
    bad = json.dumps({"text": "a message without an id"})
    push(client, queue, {"id": "g1"}, {"id": "g2"}, {"id": "g3"}, bad, {"id": "g4"})

    run = drain(database_url, "in", batch_size=2)
    # The first batch committed; the second, with the bad message, never
    # does, however often the job's `retries` (3) try it.
    assert run["status"] == "failed" and run["attempt"] == 4, run
    assert 'null value in column "message_id"' in run["error"]
    assert stored(database_url) == ["g1", "g2"]
    assert file_ids(tmp_path) == ["g1", "g2"]
    [(committed,)] = query(database_url, "SELECT committed FROM queue_files")
    [day_file] = (tmp_path / "messages").glob("in-*.jsonl")
    assert day_file.stat().st_size == committed
    # Back in the queue in their order (the oldest at the right), none in flight.
    assert client.lrange(queue, 0, -1) == [json.dumps({"id": "g4"}), bad, json.dumps({"id": "g3"})]
    assert client.llen(f"{queue}:processing") == 0
    rolled = drainer.events("batch_rolled_back", run_id=run["id"])
    assert len(rolled) == 4 and {r["messages"] for r in rolled} == {2}

    # Someone takes the poison message out; the next run drains the rest.
    assert client.lrem(queue, 1, bad) == 1
    again = drain(database_url, "in", batch_size=2)
    assert again["status"] == "succeeded", again
    assert stored(database_url) == file_ids(tmp_path) == ["g1", "g2", "g3", "g4"]


def test_a_run_after_a_crash_restores_the_claimed_batch_and_stores_it_once(
    database_url, tmp_path, red, drainer
):
    """As if a worker died after committing p1's batch but before clearing
    the processing list, with half a line written after the last commit."""
    client, prefix = red
    queue = f"{prefix}:in"
    # p1 then p2 were claimed (oldest at the right), q1 arrived since.
    client.rpush(f"{queue}:processing", json.dumps({"id": "p2"}), json.dumps({"id": "p1"}))
    push(client, queue, {"id": "q1"})
    folder = tmp_path / "messages"
    folder.mkdir()
    run_day = query(database_url, "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD')")[0][0]
    day_file = folder / f"in-{run_day}.jsonl"
    committed_line = json.dumps({"id": "p1"}) + "\n"
    day_file.write_text(committed_line + '{"id": "p2", "half a li')
    execute(
        database_url,
        """INSERT INTO queue_messages (queue, message_id, body, run_id)
           VALUES ('in', 'p1', '{"id": "p1"}', 0)""",
    )
    execute(
        database_url,
        "INSERT INTO queue_files VALUES (%s, %s)",
        (str(day_file), len(committed_line)),
    )

    run = drain(database_url, "in")
    assert run["status"] == "succeeded", run
    assert (run["records_processed"], run["records_inserted"]) == (3, 2)
    drainer.wait_for("batch_restored", run_id=run["id"], messages=2)
    assert stored(database_url) == ["p1", "p2", "q1"]
    assert file_ids(tmp_path) == ["p1", "p2", "q1"]
    assert client.llen(queue) == client.llen(f"{queue}:processing") == 0
