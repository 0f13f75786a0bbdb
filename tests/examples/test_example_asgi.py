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


def test_under_uvicorn_a_second_ctrl_c_forces_the_drain(database_url, tmp_path: Path):
    """A real uvicorn: the first Ctrl-C starts the drain of a run that will not
    end by itself; the second one cancels it (drain_forced), and the server
    exits at once instead of after drain_timeout."""
    import os
    import shutil
    import signal
    import subprocess
    import threading
    import time

    from syncworker.embedded import free_port
    from tests.harness import JOBS_DIR, _base_env, query, wait_until, write_config

    shutil.copy(REPO / "examples" / "asgi" / "app.py", tmp_path / "app.py")
    write_config(
        tmp_path / "syncworker.toml",
        database_url,
        '[jobs.held]\nsteps = ["sw_testjobs:wait_release"]\n',
        drain_timeout=120,
    )
    env = {**_base_env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{JOBS_DIR}"}
    proc = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "uvicorn"), "app:app", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]

    def seen(event: str) -> bool:
        return any(f'"event": "{event}"' in line for line in list(lines))

    try:
        wait_until(lambda: seen("worker_started"), what="the worker listening")
        [(run_id,)] = query(database_url, "SELECT run_id FROM syncworker.trigger('held')")
        wait_until(
            lambda: query(database_url, "SELECT 1 FROM test_log WHERE run_id = %s", (run_id,)),
            what="the held run under way",
        )
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: seen("drain_started"), what="drain_started")
        second = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, "".join(lines[-30:])
        assert time.monotonic() - second < 15
        assert seen("drain_forced") and seen("worker_stopped"), "".join(lines[-30:])
        assert query(
            database_url, "SELECT status FROM syncworker.runs WHERE id = %s", (run_id,)
        ) == [("pending",)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
