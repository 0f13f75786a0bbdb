"""/api/events: the run events the database publishes on `events_channel`,
as Server-Sent Events to every client that asks.

One LISTEN serves every client: the worker's own listening session also
listens on the events channel while `http` is set, and hands each
notification to `EventHub.publish`, which parses it once (any role may
NOTIFY the channel: only the fields of a run event are passed on, re-encoded)
and appends the encoded bytes to each client's queue. A queue holds at most
QUEUE_BYTES: a client that falls that far behind (it stopped reading, and
its socket's buffers are full) is dropped, so a slow client never grows the
worker's memory; at most MAX_STREAMS x QUEUE_BYTES (32 MiB) in all, whatever
is published. An idle stream costs nothing: it waits on its own
event; one keep-alive task, only while streams are open, writes a comment to
every stream every KEEPALIVE seconds so proxies keep them open.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import deque
from collections.abc import AsyncIterator
from http import HTTPStatus

from structlog.typing import FilteringBoundLogger

from syncworker.events import parse_run_event
from syncworker.web.replies import Reply, Request, Stream, error

# What a client may be behind before it is dropped: some 600 real events
# (~200 bytes each), or 16 of the largest a forged NOTIFY can carry.
QUEUE_BYTES = 128 * 1024
MAX_STREAMS = 256  # open streams at once; more answer 503
KEEPALIVE = 15.0  # seconds between comments on a quiet stream
MAX_PAYLOAD = 8000  # PostgreSQL's own limit on a NOTIFY payload
RETRY_MS = 3000  # how soon a browser's EventSource reconnects

_KEEPALIVE = b": keep-alive\n\n"
# After a reconnect of the listening session: events may have been missed,
# so clients re-read what they show.
_RESYNC = b"event: resync\ndata: {}\n\n"


class _Client:
    __slots__ = ("chunks", "dropped", "ready", "size")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0  # bytes in chunks
        self.ready = asyncio.Event()
        self.dropped = False

    def put(self, chunk: bytes) -> bool:
        """Queue a chunk; False (and the client marked dropped) when full."""
        if self.dropped:
            return False
        if self.size + len(chunk) > QUEUE_BYTES:
            self.dropped = True
            self.chunks.clear()  # its memory goes now, not when its socket times out
            self.size = 0
            self.ready.set()
            return False
        self.chunks.append(chunk)
        self.size += len(chunk)
        self.ready.set()
        return True

    def take(self) -> bytes:
        """Everything queued, as one write."""
        chunk = b"".join(self.chunks)
        self.chunks.clear()
        self.size = 0
        return chunk


class EventHub:
    def __init__(self, log: FilteringBoundLogger) -> None:
        self._log = log
        self._clients: set[_Client] = set()
        self._keepalive: asyncio.Task[None] | None = None
        self.dropped = 0  # clients dropped for being slow, since start

    @property
    def clients(self) -> int:
        return len(self._clients)

    def publish(self, payload: str) -> None:
        """A notification on the events channel, from the listening session."""
        if not self._clients or len(payload) > MAX_PAYLOAD:
            return
        event = parse_run_event(payload)
        if event is None:
            return  # not a run event: nothing a client could use
        fields = {k: v for k, v in dataclasses.asdict(event).items() if v is not None}
        data = json.dumps(fields, separators=(",", ":"))
        self._send(f"event: {event.event}\ndata: {data}\n\n".encode())

    def resync(self) -> None:
        """The listening session reconnected: events may have been missed."""
        self._send(_RESYNC)

    def _send(self, chunk: bytes) -> None:
        for client in list(self._clients):
            if not client.put(chunk):
                self._drop(client)

    def _drop(self, client: _Client) -> None:
        if client in self._clients:
            self._clients.discard(client)
            self.dropped += 1
            self._log.warning("sse_client_dropped", behind_bytes=QUEUE_BYTES, streams=self.clients)

    async def handle(self, request: Request) -> Reply:
        if len(self._clients) >= MAX_STREAMS:
            return error(HTTPStatus.SERVICE_UNAVAILABLE, "too many event streams")
        headers = (("X-Accel-Buffering", "no"),)  # nginx: pass each event on at once
        return Stream("text/event-stream; charset=utf-8", self._stream(), headers)

    async def _stream(self) -> AsyncIterator[bytes]:
        # Registered once the server starts writing the stream, so a client
        # is in the set exactly while its stream runs.
        client = _Client()
        self._clients.add(client)
        if self._keepalive is None:
            self._keepalive = asyncio.create_task(self._beat(), name="sse-keepalive")
        try:
            yield f"retry: {RETRY_MS}\n: connected\n\n".encode()
            while True:
                await client.ready.wait()
                client.ready.clear()
                if client.dropped:
                    return
                yield client.take()
        finally:
            self._clients.discard(client)
            if not self._clients and self._keepalive is not None:
                self._keepalive.cancel()
                self._keepalive = None

    async def _beat(self) -> None:
        while True:
            # the keep-alive: one timer for all streams, none when none is open
            await asyncio.sleep(KEEPALIVE)
            self._send(_KEEPALIVE)
