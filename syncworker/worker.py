"""Deprecated: the Worker moved to `syncworker.daemon.worker` (import it as
`from syncworker import Worker`); this path goes in the next release."""

import warnings

from syncworker.daemon.worker import Worker

warnings.warn(
    "syncworker.worker is deprecated; use `from syncworker import Worker`",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["Worker"]
