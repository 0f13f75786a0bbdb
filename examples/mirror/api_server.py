"""The example's stand-in for a remote API: organisations' users as paginated
JSON, from a data file that is read again on every request (edit it, and the
next sync sees the change).

    python api_server.py [--port 8765] [--data users.json] [--page-size 2]

GET /orgs/<org>/users?page=N answers
{"org": "RIO", "page": 1, "total": 5, "users": [...], "next": "/orgs/RIO/users?page=2"}
with "next": null on the last page, and 404 for an organisation it does not know.
"""

from __future__ import annotations

import argparse
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

DATA = Path(__file__).with_name("users.json")


def serve(data: Path = DATA, port: int = 8765, page_size: int = 2) -> ThreadingHTTPServer:
    """Start serving on 127.0.0.1:`port` (0 picks a free one) in a daemon
    thread; `server.shutdown()` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            if len(parts) != 3 or parts[0] != "orgs" or parts[2] != "users":
                return self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})
            org = unquote(parts[1])
            users = json.loads(data.read_text()).get(org)
            if users is None:
                return self._reply(HTTPStatus.NOT_FOUND, {"error": f"unknown org {org!r}"})
            try:
                page = int(parse_qs(url.query).get("page", ["1"])[0])
            except ValueError:
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": "page must be a number"})
            first = (page - 1) * page_size
            more = first + page_size < len(users)
            self._reply(
                HTTPStatus.OK,
                {
                    "org": org,
                    "page": page,
                    "total": len(users),
                    "users": users[first : first + page_size] if page >= 1 else [],
                    "next": f"/orgs/{quote(org)}/users?page={page + 1}" if more else None,
                },
            )

        def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the worker's log readable when both share a terminal

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description="the example's paginated users API")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--page-size", type=int, default=2)
    args = parser.parse_args()
    server = serve(args.data, args.port, args.page_size)
    print(f"serving {args.data} on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
