"""A step that mirrors the rows its trigger payload carries, for tests that
drive ctx.mirror through a real daemon."""

from __future__ import annotations

from syncworker import SyncContext
from syncworker.mirror import changes_table_ddl

SETUP_SQL = (
    "CREATE TABLE mirror_people (org text NOT NULL, id int NOT NULL, name text,"
    " PRIMARY KEY (org, id));" + changes_table_ddl("mirror_changes")
)


async def mirror_payload(ctx: SyncContext) -> None:
    await ctx.mirror(
        "mirror_people",
        ctx.payload["rows"],
        key=["org", "id"],
        scope_column="org",
        delete_missing=True,
        changes_table="mirror_changes",
        batch_size=2,
    )
