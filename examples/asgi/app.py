"""A minimal ASGI app that runs a syncworker in its lifespan.

No framework: the ASGI protocol is a callable, and the worker needs only the
lifespan's startup and shutdown. The worker starts listening before the app
takes requests and drains its run in flight before the server exits, so a
deploy never cuts a sync in half. The server's signal handling stays the
server's: on SIGTERM it ends the lifespan, and that stops the worker. While
the worker drains, a second SIGINT or SIGTERM forces the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import psycopg

import syncworker

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CONFIG = Path(__file__).with_name("syncworker.toml")


class App:
    """The web app: POST /sync/JOB triggers a job, GET /healthz reports the worker."""

    def __init__(self, load: Callable[[], syncworker.Settings] | None = None) -> None:
        self._load = load or (lambda: syncworker.load_config(CONFIG))
        self._stack = AsyncExitStack()
        self.worker: syncworker.Worker | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    settings = self._load()
                    self.worker = await self._stack.enter_async_context(
                        syncworker.Worker(settings, load=self._load)
                    )
                except Exception as exc:  # the server refuses to start, and says why
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                with _second_signal_forces(self.worker):
                    await self._stack.aclose()  # stop() and wait for the drain
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        worker = self.worker
        if worker is None:
            return await _reply(send, 503, {"error": "starting"})
        if method == "GET" and path == "/healthz":
            problem = worker.health()
            return await _reply(send, 503 if problem else 200, {"status": problem or "ok"})
        if method == "POST" and path.startswith("/sync/"):
            job = path.removeprefix("/sync/")
            async with await psycopg.AsyncConnection.connect(
                worker.settings.database_url, autocommit=True
            ) as conn:
                try:
                    runs = await syncworker.trigger_sync(conn, job, source="web")
                except syncworker.TriggerError as exc:
                    return await _reply(send, 404, {"error": str(exc)})
            return await _reply(send, 202, {"runs": runs})
        await _reply(send, 404, {"error": "not found"})


@contextlib.contextmanager
def _second_signal_forces(worker: syncworker.Worker | None) -> Iterator[None]:
    """While the lifespan drains, a SIGINT or SIGTERM calls worker.stop()
    again, which cancels the runs in flight at once (as a second Ctrl-C does
    under `syncworker run`). uvicorn keeps the signals after its first one to
    itself: it only notes them and goes on awaiting the lifespan, so without
    this the drain lasts up to drain_timeout whatever the user presses."""
    loop = asyncio.get_running_loop()
    taken: list[tuple[signal.Signals, Any]] = []
    if worker is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, worker.stop)
            except (NotImplementedError, RuntimeError):  # no such handlers here (Windows)
                continue
            taken.append((sig, previous))
    try:
        yield
    finally:
        for sig, previous in taken:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous)  # the server's own handler again


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


app = App()
