"""The example's step: one organisation's users, read page by page from the
API and mirrored into that organisation's own table, org_users."<scope>"."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urljoin
from urllib.request import urlopen

from psycopg import sql

from syncworker import SyncContext

SCHEMA = "org_users"


async def sync_users(ctx: SyncContext) -> None:
    assert ctx.scope is not None  # the job's scopes come from scopes_sql
    table = (SCHEMA, ctx.scope)
    async with ctx.connection() as conn:
        await conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING ALL)").format(
                sql.Identifier(*table), sql.Identifier(SCHEMA, "template")
            )
        )
    await ctx.mirror(
        table,
        users(ctx),
        key=["id"],
        delete_missing=True,
        changes_table=(SCHEMA, "changes"),
    )


async def users(ctx: SyncContext) -> AsyncIterator[dict[str, Any]]:
    """The rows to mirror, one API page at a time."""
    base = os.environ.get("EXAMPLE_API_URL", "http://127.0.0.1:8765")
    url: str | None = f"{base}/orgs/{quote(ctx.scope or '')}/users?page=1"
    while url is not None:
        if ctx.stopping.is_set():
            # Returning would hand mirror a source cut short, and delete_missing
            # would delete every user on the pages not read yet. Raising rolls
            # the mirror back, and the run goes back to pending (drain rule).
            raise RuntimeError("worker stopping: mirror abandoned before the last page")
        page = await asyncio.to_thread(_get_json, url)
        ctx.total(page["total"])
        for user in page["users"]:
            yield {
                "id": user["id"],
                "name": user["name"],
                "email": user.get("email"),
                "role": user.get("role"),
                "updated_at": user.get("updated_at"),  # ISO text; PostgreSQL parses it
            }
        url = urljoin(url, page["next"]) if page["next"] else None


def _get_json(url: str) -> dict[str, Any]:
    with urlopen(
        url, timeout=30
    ) as response:  # a plain HTTP client keeps the example dependency-free
        body: dict[str, Any] = json.load(response)
        return body
