"""Method and path to handler: exact paths and `{name}` segments, with the
404 and 405 answers (JSON, 405 with Allow)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from http import HTTPStatus

from syncworker.web.replies import HttpError, Reply, Request, error

Handler = Callable[[Request], Awaitable[Reply]]


@dataclass(frozen=True)
class _Route:
    parts: tuple[str, ...]  # a segment, or "{name}" for any one segment
    methods: dict[str, Handler]

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.parts):
            return None
        params = {}
        for part, segment in zip(self.parts, segments, strict=True):
            if part.startswith("{"):
                if not segment:
                    return None
                params[part[1:-1]] = segment
            elif part != segment:
                return None
        return params


class Router:
    def __init__(self) -> None:
        self._routes: list[_Route] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        parts = tuple(pattern.split("/"))
        for route in self._routes:
            if route.parts == parts:
                route.methods[method] = handler
                return
        self._routes.append(_Route(parts, {method: handler}))

    async def __call__(self, request: Request) -> Reply:
        segments = request.path.split("/")
        for route in self._routes:
            params = route.match(segments)
            if params is None:
                continue
            method = "GET" if request.method == "HEAD" else request.method
            handler = route.methods.get(method)
            if handler is None:
                allowed = sorted(route.methods) + (["HEAD"] if "GET" in route.methods else [])
                return error(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    "method not allowed",
                    (("Allow", ", ".join(allowed)),),
                )
            try:
                return await handler(replace(request, params=params))
            except HttpError as exc:
                return exc.reply()
        return error(HTTPStatus.NOT_FOUND, "not found")
