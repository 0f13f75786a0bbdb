"""The process: one service per long-running loop, wired in `worker.py`.

Services (listener, intake, scheduler, executor, reservations, liveness,
maintenance, reloader, pool) never import one another: `worker.py` builds
each with its collaborators (callables, and the shared records below) and
runs them. Shared records any service may import: `lifecycle` (the events
of start, serve, drain, stop), `catalog` (the frozen snapshot of settings,
jobs, steps and scopes), `slots` (the one concurrency ledger) and
`connsettings` (connection settings and lock budgets). tests/unit/test_layering.py holds it so.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Worker"]


def __getattr__(name: str) -> Any:
    # Not imported eagerly: modules below the daemon (steppool) import its
    # shared records, and the package must not drag the wiring in with them.
    if name == "Worker":
        from syncworker.daemon.worker import Worker

        return Worker
    raise AttributeError(name)
