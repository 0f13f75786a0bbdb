"""The one concurrency ledger: every run and every claim that holds one of
the worker's `concurrency` slots, by what holds it.

A slot is taken from the moment a claim is decided (so two claims in
flight cannot both take the last one) until the run's step work really
ends (an abandoned thread keeps it: runtime.py). Nothing here does I/O:
the executor, reservations and intake change it, liveness reads it.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

from syncworker import runtime
from syncworker.aio import InFlight

E = TypeVar("E")


class Slots(Generic[E]):
    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.runs: dict[int, asyncio.Task[str]] = {}  # running: their tasks
        self.envs: dict[int, E] = {}  # and what each runs with
        # Each run's step work beyond its task; a run whose task ended with
        # steps abandoned but still running stays in `lingering`, holding
        # its slot, until they end.
        self.work: dict[int, runtime.RunWork] = {}
        self.lingering: dict[int, runtime.RunWork] = {}
        # Reserved runs being claimed, or waiting for the claim in flight.
        self.deciding: set[int] = set()
        # trigger_and_claim() calls in flight that may claim a run for us.
        self.starting = 0
        # The executor's claim in flight.
        self.claiming: asyncio.Future[bool] | None = None
        # Every claim from the moment it is decided until its run (if any)
        # is in `runs`: a stop waits for them before the drain looks.
        self.claims = InFlight()

    def claim_in_flight(self) -> bool:
        return self.claiming is not None and not self.claiming.done()

    def held_by_others(self) -> int:
        """Slots taken, but for the executor's own claim."""
        return len(self.runs) + len(self.lingering) + len(self.deciding) + self.starting

    def taken(self) -> int:
        return self.held_by_others() + self.claim_in_flight()

    def room(self) -> bool:
        return self.taken() < self.concurrency

    def busy(self) -> bool:
        """Some step work is under way (the worker's state is "running")."""
        return bool(self.runs or self.lingering)

    def abandoned(self) -> list[runtime.Leftover]:
        """Step work given up on but still running, of every run."""
        return [left for work in self.work.values() for left in work.leftovers]

    def stuck_tasks(self) -> list[runtime.Leftover]:
        """Abandoned async steps still on the loop."""
        return [left for left in self.abandoned() if left.kind == "task"]
