"""Drain a Redis list into PostgreSQL and a JSONL file per day, a batch at a time.

Each batch is all or nothing:

1. claim: LMOVE up to `batch_size` messages from `<prefix>:<scope>` onto
   `<prefix>:<scope>:processing`, in one MULTI;
2. store: in one PostgreSQL transaction, insert them into `queue_messages`
   and append them to `<dir>/<scope>-<YYYY-MM-DD>.jsonl`, recording the
   file's new committed length in `queue_files` in the same transaction;
3. then delete the processing list.

If step 2 fails, the transaction rolls back, the file is cut back to its
committed length, and the messages move back to the queue in their order;
the run fails and the job's `retries` try again. If the worker dies in the
middle, the next run starts by moving whatever the processing list holds
back to the queue, and `(queue, message_id)` being unique keeps a batch that
had committed from being stored twice.

Settings: REDIS_URL (default redis://127.0.0.1:6379/0), QUEUE_DRAIN_PREFIX
(default "queue_drain"), QUEUE_DRAIN_DIR (default "./messages") and
QUEUE_DRAIN_BATCH_SIZE (default 100) from the worker's environment; a
trigger's payload may give its own "batch_size".
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from psycopg.types.json import Jsonb

from syncworker import SyncContext

MAX_BATCH_SIZE = 10_000


@dataclass(frozen=True)
class Settings:
    redis_url: str
    prefix: str
    directory: Path
    batch_size: int


def settings(ctx: SyncContext) -> Settings:
    env = os.environ
    raw = ctx.payload.get("batch_size", env.get("QUEUE_DRAIN_BATCH_SIZE", 100))
    try:
        batch_size = int(raw)
    except (TypeError, ValueError):
        batch_size = 0
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be 1 to {MAX_BATCH_SIZE}, not {raw!r}")
    return Settings(
        redis_url=env.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        prefix=env.get("QUEUE_DRAIN_PREFIX", "queue_drain"),
        directory=Path(env.get("QUEUE_DRAIN_DIR", "messages")),
        batch_size=batch_size,
    )


async def drain(ctx: SyncContext) -> None:
    """The step: drain the scope's queue until it is empty or the worker stops."""
    cfg = settings(ctx)
    scope = ctx.scope or "default"
    queue = f"{cfg.prefix}:{scope}"
    processing = f"{queue}:processing"
    client = aioredis.from_url(cfg.redis_url, decode_responses=True)
    try:
        restored = await put_back(client, queue, processing)
        if restored:
            ctx.log.warning("batch_restored", messages=restored, reason="left by a run that died")
        ctx.total(await client.llen(queue))
        while not ctx.stopping.is_set():  # draining: stop between batches
            batch = await claim(client, queue, processing, cfg.batch_size)
            if not batch:
                break
            try:
                inserted = await store(ctx, cfg, scope, batch)
            except BaseException as exc:
                # Cancelled too (timeout, shutdown): a batch never stays claimed.
                await put_back(client, queue, processing)
                ctx.log.warning("batch_rolled_back", messages=len(batch), error=str(exc)[:300])
                raise
            await client.delete(processing)
            ctx.count(processed=len(batch), inserted=inserted)
    finally:
        await client.aclose()


async def claim(client: aioredis.Redis, queue: str, processing: str, size: int) -> list[str]:
    """Move up to `size` of the oldest messages onto the processing list, at once.

    Producers LPUSH, so the oldest message is at the right: LMOVE RIGHT LEFT
    keeps the oldest at the processing list's right end too.
    """
    async with client.pipeline(transaction=True) as pipe:
        for _ in range(size):
            pipe.lmove(queue, processing, "RIGHT", "LEFT")
        moved = await pipe.execute()
    return [m for m in moved if m is not None]


async def put_back(client: aioredis.Redis, queue: str, processing: str) -> int:
    """Move the processing list back onto the queue's consuming end, newest
    first, so the queue is in its old order again. Each move is atomic: a
    crash in between leaves the rest for the next run to move."""
    moved = 0
    while await client.lmove(processing, queue, "LEFT", "RIGHT") is not None:
        moved += 1
    return moved


_INSERT = """
INSERT INTO queue_messages (queue, message_id, body, run_id)
SELECT %(queue)s, m.body ->> 'id', m.body, %(run)s
FROM jsonb_array_elements(%(batch)s) WITH ORDINALITY AS m(body, n)
ORDER BY m.n
ON CONFLICT (queue, message_id) DO NOTHING
RETURNING id, body
"""


async def store(ctx: SyncContext, cfg: Settings, scope: str, batch: list[str]) -> int:
    """Insert the batch and append it to today's file, in one transaction.
    Returns how many were new (a message stored before is skipped)."""
    bodies: list[Any] = []
    for message in batch:
        try:
            bodies.append(json.loads(message))
        except ValueError:
            bodies.append(message)  # as a JSON string, which the table refuses
    path = cfg.directory / f"{scope}-{datetime.now(UTC):%Y-%m-%d}.jsonl"
    committed: int | None = None
    try:
        async with ctx.connection() as conn, conn.transaction():
            cur = await conn.execute(
                _INSERT, {"queue": scope, "run": ctx.run_id, "batch": Jsonb(bodies)}
            )
            rows = sorted(await cur.fetchall())  # by id: the batch's order
            await conn.execute(
                "INSERT INTO queue_files (path) VALUES (%s) ON CONFLICT DO NOTHING", (str(path),)
            )
            cur = await conn.execute(
                "SELECT committed FROM queue_files WHERE path = %s FOR UPDATE", (str(path),)
            )
            found = await cur.fetchone()
            assert found is not None
            committed = int(found[0])
            lines = [json.dumps(body, ensure_ascii=False) + "\n" for _, body in rows]
            data = "".join(lines).encode()
            size = await asyncio.to_thread(_append, ctx, path, committed, data)
            await conn.execute(
                "UPDATE queue_files SET committed = %s WHERE path = %s", (size, str(path))
            )
    except BaseException:
        if committed is not None:
            _cut(path, committed)
        raise
    ctx.log.info("batch_drained", messages=len(batch), inserted=len(rows), file=str(path))
    return len(rows)


def _append(ctx: SyncContext, path: Path, committed: int, data: bytes) -> int:
    """Append at the committed length (dropping a tail no transaction
    committed) and make it durable before the transaction commits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as fh:
        actual = fh.seek(0, os.SEEK_END)
        if actual > committed:
            fh.truncate(committed)
        elif actual < committed:
            ctx.log.warning("file_shorter_than_committed", file=str(path), size=actual)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()


def _cut(path: Path, committed: int) -> None:
    if path.exists() and path.stat().st_size > committed:
        with path.open("r+b") as fh:
            fh.truncate(committed)
