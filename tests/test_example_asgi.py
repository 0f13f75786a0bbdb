"""examples/asgi: the worker in an ASGI app's lifespan, driven through the
ASGI protocol itself (the callable a server such as uvicorn calls)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from syncworker.config import load_config
from tests.harness import REPO

sys.path.insert(0, str(REPO / "examples" / "asgi"))
from app import App


class Lifespan:
    """The server's side of the lifespan protocol."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def send(self, kind: str) -> dict[str, Any]:
        if self.task is None:
            self.task = asyncio.create_task(
                self.app({"type": "lifespan"}, self.inbox.get, self.outbox.put)
            )
        await self.inbox.put({"type": kind})
        return await asyncio.wait_for(self.outbox.get(), 60)


async def request(app: App, method: str, path: str) -> tuple[int, dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_the_asgi_example_runs_the_worker_in_its_lifespan(database_url, monkeypatch, capsys):
    monkeypatch.setenv("SYNCWORKER_DATABASE_URL", database_url)
    monkeypatch.setenv("SYNCWORKER_LOG_FORMAT", "json")
    config = REPO / "examples" / "asgi" / "syncworker.toml"
    app = App(lambda: load_config(config))

    async def serve() -> list[tuple[Any, ...]]:
        assert await request(app, "GET", "/healthz") == (503, {"error": "starting"})
        lifespan = Lifespan(app)
        assert await lifespan.send("lifespan.startup") == {"type": "lifespan.startup.complete"}
        assert await request(app, "GET", "/healthz") == (200, {"status": "ok"})

        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute("LISTEN sync_events")
            status, body = await request(app, "POST", "/sync/greet")
            assert status == 202, body
            [run_id] = body["runs"]
            async for note in conn.notifies(timeout=30):
                event = json.loads(note.payload)
                if event["run_id"] == run_id and event["event"] == "run_succeeded":
                    break
            else:
                pytest.fail("the triggered run did not succeed")
        assert (await request(app, "POST", "/sync/nope"))[0] == 404

        assert await lifespan.send("lifespan.shutdown") == {"type": "lifespan.shutdown.complete"}
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT r.source, r.status, r.records_processed, w.state FROM syncworker.runs r"
                " JOIN syncworker.workers w ON w.id = r.worker_id"
            )
            return await cur.fetchall()

    assert asyncio.run(serve()) == [("web", "succeeded", 1, "stopped")]
    assert '"event": "worker_stopped"' in capsys.readouterr().err


def test_the_asgi_example_refuses_to_start_on_a_bad_config(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[jobs.greet]\nsteps = ["asgi_sync:greet"]\ntimeout = -1\n')
    app = App(lambda: load_config(bad))

    async def start() -> dict[str, Any]:
        return await Lifespan(app).send("lifespan.startup")

    failed = asyncio.run(start())
    assert failed["type"] == "lifespan.startup.failed"
    assert "timeout" in failed["message"]
