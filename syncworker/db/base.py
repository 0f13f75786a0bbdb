"""What every per-concern query class of the Store shares: the schema's
names and its composed statements."""

from __future__ import annotations

import zlib

from syncworker.db.queries import Queries, for_schema


def wake_channel(schema: str) -> str:
    """The internal channel trigger() notifies when it enqueues runs."""
    return f"{schema}_wake"


def lock_namespace(schema: str) -> int:
    """First key of workers' liveness advisory locks: one namespace per schema."""
    return zlib.crc32(f"syncworker:{schema}".encode()) & 0x7FFFFFFF


class StoreBase:
    """The SQL of one schema, composed once, run on connections given to it."""

    def __init__(self, schema: str, events_channel: str) -> None:
        self.schema = schema
        self.events_channel = events_channel
        self.wake = wake_channel(schema)
        self.lock_ns = lock_namespace(schema)
        self.q: Queries = for_schema(schema)
