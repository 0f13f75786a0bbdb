"""syncworker: cron + LISTEN/NOTIFY sync jobs, coordinated by PostgreSQL."""

from syncworker.api import TriggerError, trigger_sync, trigger_sync_blocking
from syncworker.config import ConfigError, Settings, load_config
from syncworker.context import SyncContext
from syncworker.daemon.worker import Worker
from syncworker.version import VERSION

__all__ = [
    "VERSION",
    "ConfigError",
    "Settings",
    "SyncContext",
    "TriggerError",
    "Worker",
    "load_config",
    "trigger_sync",
    "trigger_sync_blocking",
]
