"""Deprecated: the Worker moved to `syncworker.daemon.worker` (import it as
`from syncworker import Worker`), its timings to the services that use them;
this path, and the names it re-exports, go in the next release."""

import warnings

from syncworker.daemon.connsettings import LISTENER_LOCK_TIMEOUT
from syncworker.daemon.intake import DEFERRED_ENQUEUES
from syncworker.daemon.liveness import STATE_SETTLE
from syncworker.daemon.maintenance import PRUNE_EVERY
from syncworker.daemon.pool import CHECK_IDLE_AFTER, POOL_CLOSE, RECONNECT_ATTEMPT
from syncworker.daemon.scheduler import MISFIRE_GRACE, SCHEDULER_MAX_SLEEP
from syncworker.daemon.worker import Worker

warnings.warn(
    "syncworker.worker is deprecated; use `from syncworker import Worker`",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "CHECK_IDLE_AFTER",
    "DEFERRED_ENQUEUES",
    "LISTENER_LOCK_TIMEOUT",
    "MISFIRE_GRACE",
    "POOL_CLOSE",
    "PRUNE_EVERY",
    "RECONNECT_ATTEMPT",
    "SCHEDULER_MAX_SLEEP",
    "STATE_SETTLE",
    "Worker",
]
