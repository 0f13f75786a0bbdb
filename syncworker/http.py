"""The optional HTTP server: the probes (/healthz, /status, /metrics), the
HTTP API and the dashboard (syncworker/web/ has the routes).

A minimal HTTP/1.1 server on the worker's own event loop, on purpose: a
stuck loop answers nothing, which is what a health probe should see. One
request per connection (`Connection: close`), bounded request heads and
bodies and time limits, so a slow or hostile client cannot hold it. An
event stream (web/sse.py) is the one long answer: it is written as its
events come, and a client that stops reading is cut off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

from structlog.typing import FilteringBoundLogger

from syncworker.config import ConfigError, http_address, http_is_loopback
from syncworker.web.replies import Reply, Request, Response, Stream, error

MAX_LINE = 8192  # one request line or header line
MAX_HEAD = 32768  # request line and headers together
MAX_HEADERS = 100
MAX_BODY = 65536  # a POST's JSON: a trigger's payload is the only large part
READ_TIMEOUT = 5.0  # for the whole request head and body
WRITE_TIMEOUT = 5.0  # one answer, or one chunk of an event stream
MAX_CONNECTIONS = 64  # short requests at once; event streams have their own limit


# The application: a request in, an answer out (web/app.py builds it).
App = Callable[[Request], Awaitable[Reply]]


class HttpServer:
    """The listening socket and the connections it is serving."""

    def __init__(self, app: App, log: FilteringBoundLogger) -> None:
        self._app = app
        self._log = log
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._streaming = 0  # of _conns, those writing an event stream

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
            busy = len(self._conns) - self._streaming > MAX_CONNECTIONS
            response = await self._respond(reader, busy)
            if isinstance(response, Stream):
                await self._stream(writer, response)
            elif response is not None:
                writer.write(_encode(response))
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
        except OSError:  # TimeoutError and ConnectionError among them
            writer.transport.abort()  # a client that does not read gets no more time
        finally:
            self._conns.discard(task)
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, stream: Stream) -> None:
        self._streaming += 1
        try:
            writer.write(_encode_head(HTTPStatus.OK, stream.content_type, None, stream.headers))
            async for chunk in stream.chunks:
                writer.write(chunk)
                # A client that does not read fills the socket's buffers; it
                # is cut off here, or by its queue in web/sse.py, whichever
                # comes first.
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
        finally:
            self._streaming -= 1
            await _close(stream)

    async def _respond(self, reader: asyncio.StreamReader, busy: bool) -> Reply | None:
        if busy:
            return error(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections")
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request = await _read_request(reader)
        except TimeoutError:
            return error(HTTPStatus.REQUEST_TIMEOUT, "request timeout")
        if not isinstance(request, Request):
            return request
        method = request.method
        try:
            response = await self._app(request)
        except Exception as exc:
            self._log.error("http_handler_failed", path=request.path[:200], error=repr(exc)[:500])
            response = error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        if method == "HEAD":
            # Probes (curl -I, load balancers) ask HEAD: GET's answer, no body.
            if isinstance(response, Stream):
                await _close(response)  # never started: nothing to stream for a HEAD
                response = Response(HTTPStatus.OK, b"", response.content_type, response.headers)
            response = replace(response, head_only=True)
        status = response.status if isinstance(response, Response) else HTTPStatus.OK
        # Never the query string nor a header: the path is all that is logged.
        self._log.debug("http_request", method=method[:16], path=request.path[:200], status=status)
        return response


async def start_http(
    address: str,
    app: App,
    *,
    log: FilteringBoundLogger,
    config_source: str,
    writable: bool,
) -> HttpServer:
    """Listen on `address` (the `http` setting) or raise ConfigError naming it."""
    host, port = http_address(address)
    server = HttpServer(app, log)
    try:
        await server.start(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        log.error("http_bind_failed", address=address, error=reason)
        raise ConfigError(config_source, "http", f"cannot listen on {address}: {reason}") from None
    log.info("http_listening", address=address, writes=writable)
    if not writable and not http_is_loopback(address):
        # Read-only without a token, but the dashboard shows every job, run
        # and error to whoever reaches the address.
        log.warning(
            "http_exposed_without_token",
            address=address,
            hint="set http_token (or bind 127.0.0.1 behind a reverse proxy with its own auth)",
        )
    return server


async def _read_request(reader: asyncio.StreamReader) -> Request | Response | None:
    """The request, an error response, or None when the client closed
    without sending anything."""
    try:
        first = await reader.readline()
        if not first:
            return None
        size = len(first)
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = await reader.readline()
            size += len(line)
            if size > MAX_HEAD:
                break
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                return error(HTTPStatus.BAD_REQUEST, "incomplete request")
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        else:
            return error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
        if size > MAX_HEAD:
            return error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
    except ValueError:  # a line over MAX_LINE
        return error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request line or header too long")
    parts = first.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3 or not parts[1] or not parts[2].startswith("HTTP/1."):
        return error(HTTPStatus.BAD_REQUEST, "bad request line")
    method, target = parts[0], parts[1]
    body = b""
    if "transfer-encoding" in headers:
        # Chunked bodies are not read: every client of this API sends a length.
        return error(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
    length_text = headers.get("content-length", "0")
    if not (length_text.isascii() and length_text.isdigit()):
        return error(HTTPStatus.BAD_REQUEST, "bad Content-Length")
    length = int(length_text)
    if length > MAX_BODY:
        # Refused before reading a byte of it.
        return error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
    if length:
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            return error(HTTPStatus.BAD_REQUEST, "incomplete body")
    path, _, query = target.partition("?")
    return Request(
        method=method,
        path=unquote(path),
        query=dict(parse_qsl(query, keep_blank_values=True)),
        headers=headers,
        body=body,
    )


async def _close(stream: Stream) -> None:
    """End a stream's generator, so what it holds (a queue) is let go now."""
    aclose = getattr(stream.chunks, "aclose", None)
    if aclose is not None:
        await aclose()


def _encode_head(
    status: int, content_type: str, length: int | None, headers: tuple[tuple[str, str], ...]
) -> bytes:
    reason = HTTPStatus(status).phrase
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        *([f"Content-Length: {length}"] if length is not None else []),
        "Cache-Control: no-store",
        "Connection: close",
        "X-Content-Type-Options: nosniff",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _encode(response: Response) -> bytes:
    head = _encode_head(
        response.status, response.content_type, len(response.body), response.headers
    )
    return head + (b"" if response.head_only else response.body)
