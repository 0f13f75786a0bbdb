"""Deprecated: the database layer is `syncworker.db` now.

This module re-exports it so that `from syncworker.store import Store`
keeps working for one release, with a DeprecationWarning.
"""

from __future__ import annotations

import warnings

from syncworker.db import (
    ClaimedRun,
    Store,
    fetch_scopes,
    lock_namespace,
    migrations,
    wake_channel,
)
from syncworker.db.schema import migrations as _migrations

warnings.warn(
    "syncworker.store is deprecated; import from syncworker.db",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "ClaimedRun",
    "Store",
    "_migrations",
    "fetch_scopes",
    "lock_namespace",
    "migrations",
    "wake_channel",
]
