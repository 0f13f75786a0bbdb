"""The database: every statement by name in sql/queries/, the migrations in
sql/migrations/, the current schema in sql/schema/, and the typed Store
the rest of the package calls."""

from syncworker.db.base import lock_namespace, wake_channel
from syncworker.db.rows import ClaimedRun
from syncworker.db.schema import fetch_scopes, migrations
from syncworker.db.store import Store

__all__ = ["ClaimedRun", "Store", "fetch_scopes", "lock_namespace", "migrations", "wake_channel"]
