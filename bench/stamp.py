"""The step side of the probe: one line per stamp into the bench's FIFO.

Lines are far below PIPE_BUF, so writes from several workers never interleave.
"""

from __future__ import annotations

import os

_fd: int | None = None


def stamp(tag: str, ident: int, ns: int) -> None:
    global _fd
    path = os.environ.get("BENCH_PROBE")
    if not path:
        return
    if _fd is None:
        _fd = os.open(path, os.O_WRONLY)
    os.write(_fd, f"{tag} {ident} {ns} {os.getpid()}\n".encode())
