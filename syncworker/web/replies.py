"""The records the HTTP server and its handlers share, and the answers
every handler builds (JSON in and out; every error `{"error": message}`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from syncworker.status import to_json

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]  # the last value of each name
    headers: dict[str, str]  # names lower-case
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)  # the route's {names}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()
    # HEAD: the headers GET would send, Content-Length included, no body.
    head_only: bool = False


@dataclass(frozen=True)
class Stream:
    """An answer whose body is written chunk by chunk until `chunks` ends
    (Server-Sent Events): no Content-Length, and no time limit but each
    chunk's."""

    content_type: str
    chunks: AsyncIterator[bytes]
    headers: tuple[tuple[str, str], ...] = ()


Reply = Response | Stream


def text(status: int, body: str) -> Response:
    return Response(status, (body + "\n").encode())


def json_reply(status: int, data: Mapping[str, Any]) -> Response:
    # to_json: the datetimes and decimals of rows as `status --json` writes them.
    return Response(status, (to_json(data, indent=None) + "\n").encode(), JSON)


def error(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = (), **extra: Any
) -> Response:
    body = json.dumps({"error": message, **extra}) + "\n"
    return Response(status, body.encode(), JSON, headers)


class HttpError(Exception):
    """Raised by a handler's helpers: answered as error(status, message)."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.extra = extra

    def reply(self) -> Response:
        return error(self.status, self.message, self.headers, **self.extra)
