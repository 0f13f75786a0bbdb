"""The example's one step: it only counts, so the example needs no tables."""

from __future__ import annotations

from syncworker import SyncContext


async def greet(ctx: SyncContext) -> None:
    ctx.log.info("hello from the worker inside the web app", source=ctx.source)
    ctx.count(processed=1)
