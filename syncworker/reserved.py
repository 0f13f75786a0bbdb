"""Deprecated: reservation wakes are parsed in `syncworker.events` and
claimed by `syncworker.daemon.reservations`; this path goes in the next
release."""

import warnings

from syncworker.daemon.reservations import Connect, claim
from syncworker.events import is_reservation, reserved_run_id

warnings.warn(
    "syncworker.reserved is deprecated; use syncworker.events",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["Connect", "claim", "is_reservation", "reserved_run_id"]
