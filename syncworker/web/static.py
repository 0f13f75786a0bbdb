"""The dashboard's files (static/), read once at start and served with a
strict Content-Security-Policy: scripts and styles from this origin's files
only (no inline script, no CDN), requests to this origin only, no framing."""

from __future__ import annotations

from http import HTTPStatus
from importlib import resources

from syncworker.web.replies import Reply, Request, Response
from syncworker.web.router import Router

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY = (
    ("Content-Security-Policy", CSP),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


def add_static(router: Router) -> None:
    folder = resources.files("syncworker.web").joinpath("static")
    for path, (name, content_type) in FILES.items():
        response = Response(
            HTTPStatus.OK, folder.joinpath(name).read_bytes(), content_type, SECURITY
        )

        async def serve(request: Request, response: Response = response) -> Reply:
            return response

        router.add("GET", path, serve)
