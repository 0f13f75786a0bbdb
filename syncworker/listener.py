"""Deprecated: moved to `syncworker.daemon.listener` (this path goes in the
next release)."""

import warnings

from syncworker.daemon.connsettings import INITIAL_BACKOFF, KEEPALIVES, MAX_BACKOFF
from syncworker.daemon.listener import OnConnect, OnNotify, OnState, listen_forever

warnings.warn(
    "syncworker.listener is deprecated; use syncworker.daemon.listener",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "INITIAL_BACKOFF",
    "KEEPALIVES",
    "MAX_BACKOFF",
    "OnConnect",
    "OnNotify",
    "OnState",
    "listen_forever",
]
