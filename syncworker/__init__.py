"""syncworker: cron + LISTEN/NOTIFY sync jobs, coordinated by PostgreSQL."""

from syncworker.api import TriggerError, trigger_sync, trigger_sync_blocking
from syncworker.backfill import Backfill, backfill
from syncworker.config import ConfigError, Settings, load_config
from syncworker.context import SyncContext
from syncworker.control import (
    ControlError,
    cancel,
    pause,
    pause_blocking,
    resume,
    resume_blocking,
)
from syncworker.daemon.worker import Worker
from syncworker.version import VERSION

__all__ = [
    "VERSION",
    "Backfill",
    "ConfigError",
    "ControlError",
    "Settings",
    "SyncContext",
    "TriggerError",
    "Worker",
    "backfill",
    "cancel",
    "load_config",
    "pause",
    "pause_blocking",
    "resume",
    "resume_blocking",
    "trigger_sync",
    "trigger_sync_blocking",
]
