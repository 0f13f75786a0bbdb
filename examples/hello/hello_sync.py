"""An example sync: pretend to page through a remote API, then summarise."""

import asyncio

from syncworker import SyncContext


async def fetch(ctx: SyncContext) -> None:
    ctx.total(300)
    for page in range(3):
        if ctx.stopping.is_set():
            return  # draining: stop at a page boundary; the run is redone later
        await asyncio.sleep(0.2)  # stands in for an HTTP request
        ctx.count(inserted=40, updated=60)
        ctx.log.info("page_fetched", page=page + 1)


def summarise(ctx: SyncContext) -> None:
    # A plain function runs in a thread of its own.
    ctx.log.info("summary", scope=ctx.scope, source=ctx.source, payload=ctx.payload)
