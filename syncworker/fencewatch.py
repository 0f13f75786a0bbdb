"""The lease watchdog: `python -I .../syncworker/fencewatch.py`, one per worker
(started by lease.py when a step first hands it a process).

It kills the processes a worker's steps started once the worker's lease on
their run lapses. It is a process of its own, in a session of its own, so it
acts while the worker is frozen (SIGSTOP, a debugger) or its loop is blocked;
child processes in their own session keep running in such a case, and only
something outside the worker can stop them.

It reads lines from stdin (lease.py `_Watchdog` writes them):

    lease EPOCH EXPIRES      the lease of EPOCH lasts until EXPIRES
                             (time.monotonic(), the same clock on one host)
    watch KEY EPOCH PID G    kill PID's process group (G=1) or PID (G=0)
                             once EPOCH is not the current epoch or expired
    unwatch KEY              the process ended: forget it

At end of file (the worker exited or died) it kills every process still
watched, since no one will renew their lease, and exits.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import sys
import time


def _kill(pid: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ends with its pipe only
    fd = sys.stdin.fileno()
    epoch, expires = 0, -math.inf
    watched: dict[int, tuple[int, int, bool]] = {}
    buffer = b""
    while True:
        now = time.monotonic()
        for key, (w_epoch, pid, group) in list(watched.items()):
            if w_epoch != epoch or now >= expires:
                _kill(pid, group)
                del watched[key]
        timeout = max(0.0, expires - now) if watched else None
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            for _, pid, group in watched.values():
                _kill(pid, group)
            return 0
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            parts = line.decode().split()
            if parts[:1] == ["lease"] and len(parts) == 3:
                new_epoch, new_expires = int(parts[1]), float(parts[2])
                if new_epoch >= epoch:
                    epoch, expires = new_epoch, new_expires
            elif parts[:1] == ["watch"] and len(parts) == 5:
                watched[int(parts[1])] = (int(parts[2]), int(parts[3]), parts[4] == "1")
            elif parts[:1] == ["unwatch"] and len(parts) == 2:
                watched.pop(int(parts[1]), None)


if __name__ == "__main__":
    sys.exit(main())
