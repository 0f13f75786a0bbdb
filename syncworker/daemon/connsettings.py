"""Connection settings every connection of the worker's gets, and the lock
budget of statements on the listening session."""

from __future__ import annotations

from typing import Any

# TCP keepalives find a silently dead server (host loss) without polling;
# tcp_user_timeout ends a connection whose sent data goes unacknowledged
# that long (a stalled network, where keepalives never start because data
# is in flight), and connect_timeout a connection attempt into one.
# Client-side deadlines (the listener's ping) cover what the kernel cannot
# see: a peer that acknowledges but never answers.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
    "connect_timeout": 10,
}

# The longest a statement on the listening session (a NOTIFY's enqueue, a
# reservation's claim) waits for a lock while the listener waits for it:
# two triggers of one key contend for milliseconds, an open app
# transaction holding the key for as long as it likes.
LISTENER_LOCK_TIMEOUT = "50ms"

# The listener's reconnect back-off: from INITIAL_BACKOFF, doubling, capped
# here; peers allow a reconnecting worker this long before judging it.
INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 10.0
