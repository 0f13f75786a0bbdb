"""Everything the `http` server answers, wired over one worker."""

from __future__ import annotations

from collections.abc import Callable

from syncworker.config import Settings
from syncworker.db import Store
from syncworker.metrics import Metrics
from syncworker.web import auth
from syncworker.web.api import Api, Connect
from syncworker.web.probes import add_probes
from syncworker.web.router import Router
from syncworker.web.sse import EventHub
from syncworker.web.static import add_static


def worker_app(
    *,
    settings: Callable[[], Settings],
    health: Callable[[], str | None],
    db_up: Callable[[], bool],
    connect: Connect,
    store: Store,
    metrics: Metrics,
    events: EventHub,
) -> Router:
    """The probes, the API, the event stream and the dashboard."""
    router = Router()
    api = Api(
        settings=settings,
        db_up=db_up,
        connect=connect,
        store=store,
        writer=auth.writer(settings),
    )
    add_probes(
        router,
        health=health,
        db_up=db_up,
        connect=connect,
        schema=store.schema,
        metrics=metrics,
        api=api,
    )
    api.add_routes(router)
    router.add("GET", "/api/events", events.handle)
    add_static(router)
    return router
