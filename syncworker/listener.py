"""Deprecated: moved to `syncworker.daemon.listener` (this path goes in the
next release)."""

import warnings

from syncworker.daemon.connsettings import KEEPALIVES, MAX_BACKOFF
from syncworker.daemon.listener import listen_forever

warnings.warn(
    "syncworker.listener is deprecated; use syncworker.daemon.listener",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["KEEPALIVES", "MAX_BACKOFF", "listen_forever"]
