"""The optional HTTP endpoint: /healthz, /status and /metrics.

A minimal HTTP/1.1 server on the worker's own event loop, on purpose: a
stuck loop answers nothing, which is what a health probe should see. One
request per connection (`Connection: close`), GET only, bounded request
heads and time limits, so a slow or hostile client cannot hold it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker.config import ConfigError, http_address
from syncworker.db import Store
from syncworker.logs import redact
from syncworker.metrics import CONTENT_TYPE, Metrics, read_snapshot
from syncworker.status import to_json

MAX_LINE = 8192  # one request line or header line
MAX_HEAD = 32768  # request line and headers together
MAX_HEADERS = 100
READ_TIMEOUT = 5.0  # for the whole request head
WRITE_TIMEOUT = 5.0
DB_TIMEOUT = 5.0  # a scrape or status read, connection included
MAX_CONNECTIONS = 64
STATUS_LIMIT = 20  # recent runs in /status, as `syncworker status`

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()
    # HEAD: the headers GET would send, Content-Length included, no body.
    head_only: bool = False


Route = Callable[[], Awaitable[Response]]


class HttpServer:
    """The listening socket and the connections it is serving."""

    def __init__(self, routes: Mapping[str, Route], log: FilteringBoundLogger) -> None:
        self._routes = routes
        self._log = log
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int) -> None:
        # `limit` bounds each line readline() takes; longer ones raise.
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_LINE)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Python 3.11's wait_closed() does not wait for open connections, and
        # a handler left running would use the pool after it is closed.
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            response = await self._respond(reader, len(self._conns) > MAX_CONNECTIONS)
            if response is not None:
                writer.write(_encode(response))
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
        except OSError:  # TimeoutError and ConnectionError among them
            writer.transport.abort()  # a client that does not read gets no more time
        finally:
            self._conns.discard(task)
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader, busy: bool) -> Response | None:
        if busy:
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections")
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await _read_head(reader)
        except TimeoutError:
            return _text(HTTPStatus.REQUEST_TIMEOUT, "request timeout")
        if not isinstance(head, tuple):
            return head
        method, target = head
        path = target.partition("?")[0]
        route = self._routes.get(path)
        if route is None:
            response = _text(HTTPStatus.NOT_FOUND, "not found")
        elif method not in ("GET", "HEAD"):
            response = _text(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed")
            response = replace(response, headers=(("Allow", "GET, HEAD"),))
        else:
            try:
                response = await route()
            except Exception as exc:
                self._log.error("http_handler_failed", path=path, error=repr(exc)[:500])
                response = _text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        if method == "HEAD":
            # Probes (curl -I, load balancers) ask HEAD: GET's answer, no body.
            response = replace(response, head_only=True)
        self._log.debug("http_request", method=method[:16], path=path[:200], status=response.status)
        return response


async def start_http(
    address: str,
    routes: Mapping[str, Route],
    *,
    log: FilteringBoundLogger,
    config_source: str,
) -> HttpServer:
    """Listen on `address` (the `http` setting) or raise ConfigError naming it."""
    host, port = http_address(address)
    server = HttpServer(routes, log)
    try:
        await server.start(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        log.error("http_bind_failed", address=address, error=reason)
        raise ConfigError(config_source, "http", f"cannot listen on {address}: {reason}") from None
    log.info("http_listening", address=address)
    return server


def worker_routes(
    *,
    health: Callable[[], str | None],
    db_up: Callable[[], bool],
    connect: Connect,
    store: Store,
    metrics: Metrics,
) -> dict[str, Route]:
    """The three endpoints over one worker's state and database."""
    # Built now, at start: importing prometheus_client on the first scrape
    # would hold the loop, and a trigger or cron fire with it, for ~50 ms.
    metrics.registry  # noqa: B018

    async def healthz() -> Response:
        reason = health()
        if reason is None:
            return _text(HTTPStatus.OK, "ok")
        return _text(HTTPStatus.SERVICE_UNAVAILABLE, reason)

    async def status() -> Response:
        # Checked first so an outage answers at once instead of after DB_TIMEOUT.
        if not db_up():
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "database down"})
        try:
            async with asyncio.timeout(DB_TIMEOUT), connect() as conn:
                data = await store.read_status(conn, limit=STATUS_LIMIT, job=None)
        except (psycopg.Error, TimeoutError) as exc:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": _db_error(exc)})
        return Response(HTTPStatus.OK, (to_json(data) + "\n").encode(), JSON)

    async def metrics_text() -> Response:
        snapshot = None
        if db_up():
            try:
                async with asyncio.timeout(DB_TIMEOUT), connect() as conn:
                    snapshot = await read_snapshot(conn, store.schema)
            except (psycopg.Error, TimeoutError):
                pass  # the process's own metrics still answer; the gauges are left out
        return Response(HTTPStatus.OK, metrics.render(snapshot), CONTENT_TYPE)

    return {"/healthz": healthz, "/status": status, "/metrics": metrics_text}


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str] | Response | None:
    """(method, target) of the request, an error response, or None when the
    client closed without sending anything."""
    try:
        first = await reader.readline()
        if not first:
            return None
        size = len(first)
        for _ in range(MAX_HEADERS + 1):
            line = await reader.readline()
            size += len(line)
            if size > MAX_HEAD:
                break
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                return _text(HTTPStatus.BAD_REQUEST, "incomplete request")
        else:
            return _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
        if size > MAX_HEAD:
            return _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
    except ValueError:  # a line over MAX_LINE
        return _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request line or header too long")
    parts = first.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3 or not parts[1] or not parts[2].startswith("HTTP/1."):
        return _text(HTTPStatus.BAD_REQUEST, "bad request line")
    return parts[0], parts[1]


def _encode(response: Response) -> bytes:
    reason = HTTPStatus(response.status).phrase
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    body = b"" if response.head_only else response.body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _text(status: HTTPStatus, text: str) -> Response:
    return Response(status, (text + "\n").encode())


def _json(status: HTTPStatus, data: Mapping[str, Any]) -> Response:
    return Response(status, (json.dumps(data) + "\n").encode(), JSON)


def _db_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "database timeout"
    text = str(exc).strip()
    return "database error: " + redact(text.splitlines()[0] if text else type(exc).__name__)
