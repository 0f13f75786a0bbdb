"""Store: the one face the rest of syncworker talks to the database through.

Each concern's statements have a small class of their own (db/schema.py,
enqueue.py, fires.py, runs.py, reservations.py, workers.py, history.py,
reads.py, pauses.py, cancels.py); Store is all of them at once, so callers keep one object and
the method names and signatures they always had. Every instance of one
schema shares that schema's statements, composed once (db/queries.py).
"""

from __future__ import annotations

from syncworker.db.cancels import CancelQueries
from syncworker.db.enqueue import EnqueueQueries
from syncworker.db.fires import FireQueries
from syncworker.db.history import HistoryQueries
from syncworker.db.pauses import PauseQueries
from syncworker.db.reads import ReadQueries
from syncworker.db.reservations import ReservationQueries
from syncworker.db.runs import RunQueries
from syncworker.db.schema import SchemaQueries
from syncworker.db.workers import WorkerQueries


class Store(
    SchemaQueries,
    EnqueueQueries,
    FireQueries,
    RunQueries,
    ReservationQueries,
    WorkerQueries,
    HistoryQueries,
    ReadQueries,
    PauseQueries,
    CancelQueries,
):
    """The SQL of one schema, composed once, run on connections given to it."""
