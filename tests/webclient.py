"""A client of the HTTP API as curl would be: urllib for requests, raw
sockets for event streams, straight to 127.0.0.1 whatever proxy is set."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    raw_body: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON answer) of one request."""
    data = (
        raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
    )
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers
    )
    try:
        with _opener.open(request, timeout=10) as response:
            status, got, text = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, got, text = exc.code, dict(exc.headers), exc.read()
    return status, got, json.loads(text) if text else None


class EventStream:
    """One open /api/events connection, read as the bytes arrive."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # set before connecting: it bounds the window offered
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(
            b"GET /api/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
        )
        self.buffer = b""

    def head(self) -> bytes:
        """The response head; after it, the stream's own preamble is read."""
        while b"\r\n\r\n" not in self.buffer:
            self._recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the server closed the stream")
        self.buffer += chunk

    def next_event(self, timeout: float = 10.0) -> tuple[str, dict[str, Any]]:
        """The next `event:`/`data:` block (comments skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n\n" in self.buffer:
                block, _, self.buffer = self.buffer.partition(b"\n\n")
                name, data = "message", None
                for line in block.decode().split("\n"):
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                if data is not None:
                    return name, data
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no event")
            self.sock.settimeout(remaining)
            self._recv()

    def close(self) -> None:
        self.sock.close()
