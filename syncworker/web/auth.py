"""Who may write: the Bearer token of a request against the configured ones.

No token configured: the API is read-only (403). A token that matches none:
401. Every configured token is compared, in constant time, whatever matched
first, so the answer's timing says nothing about which or how much matched.
The token itself is never logged nor echoed.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from http import HTTPStatus

from syncworker.config import Settings
from syncworker.web.replies import HttpError, Request

ANONYMOUS = "http"  # triggered_by of a write made with `http_token`
_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="syncworker"'),)


def tokens(settings: Settings) -> list[tuple[str, bytes]]:
    """(name, token) of every configured token."""
    found = [(name, t.get_secret_value().encode()) for name, t in settings.http_tokens.items()]
    if settings.http_token is not None:
        found.append((ANONYMOUS, settings.http_token.get_secret_value().encode()))
    return found


def writer(settings: Callable[[], Settings]) -> Callable[[Request], str]:
    """A check of write requests: the name a request writes as, else HttpError.
    Reads the settings at each request, so a reload (SIGHUP) rotates tokens."""

    def who(request: Request) -> str:
        known = tokens(settings())
        if not known:
            raise HttpError(
                HTTPStatus.FORBIDDEN,
                "this worker's HTTP API is read-only: set http_token to allow writes",
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HttpError(
                HTTPStatus.UNAUTHORIZED, "send Authorization: Bearer <token>", _CHALLENGE
            )
        offered = given.strip().encode("latin-1", "replace")
        name = None
        for candidate, token in known:
            if hmac.compare_digest(offered, token) and name is None:
                name = candidate
        if name is None:
            raise HttpError(HTTPStatus.UNAUTHORIZED, "wrong token", _CHALLENGE)
        return name

    return who
