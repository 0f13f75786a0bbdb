"""What a config reload (SIGHUP) may change, and what it changed.

Jobs and their tunables change in place; the keys that shape connections,
sockets, channels and the logger only take effect on a restart, so a reload
keeps their running values and says which ones it left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from syncworker.config import Settings

# Changing these would mean new connections, sockets, channels or a new logger
# under runs in flight; the pool is sized from concurrency.
RESTART_ONLY = (
    "database_url",
    "schema",
    "channel",
    "events_channel",
    "http",
    "log_level",
    "log_format",
    "log_stream",
    "concurrency",
    "listen_url",
    "pooler",
    "listen",
    "poll_interval",
    "step_pool_size",
    "step_connect_timeout",
)


@dataclass(frozen=True)
class Reload:
    settings: Settings  # the new config with the restart-only keys kept as they run
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]  # jobs whose definition differs
    restart_needed: tuple[str, ...]  # restart-only keys the new file changes


def plan_reload(running: Settings, loaded: Settings) -> Reload:
    # database_url is left out of restart_needed: a --database-url or
    # --embedded override always differs from the file, and naming it would
    # report a change that is not one.
    restart_needed = tuple(
        key
        for key in RESTART_ONLY
        if key != "database_url" and getattr(loaded, key) != getattr(running, key)
    )
    settings = loaded.model_copy(update={key: getattr(running, key) for key in RESTART_ONLY})
    old, new = running.jobs, settings.jobs
    return Reload(
        settings=settings,
        added=tuple(sorted(set(new) - set(old))),
        removed=tuple(sorted(set(old) - set(new))),
        changed=tuple(sorted(n for n in set(old) & set(new) if old[n] != new[n])),
        restart_needed=restart_needed,
    )
