"""The slot ledger under any interleaving of what takes and frees slots, as
the executor, reservations and intake use it (each takes a slot only when
`room()` says so; the executor's loop only while `held_by_others()` leaves
one): never more holders than `concurrency`, and `busy()` exactly while a
run's task or its abandoned work is under way. No database, no loop runs."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from syncworker import runtime
from syncworker.daemon.slots import Slots


class Ledger(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.slots: Slots[Any] = Slots(concurrency=3)
        self.next_id = 1
        # The model: how many slots are held, counted by the rules themselves.
        self.held = 0

    def teardown(self) -> None:
        self.loop.close()

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _start(self, run_id: int) -> None:
        self.slots.runs[run_id] = self.loop.create_future()  # type: ignore[assignment]
        self.slots.work[run_id] = runtime.RunWork(run_id, "job")

    @precondition(lambda self: self.slots.room())
    @rule()
    def reservation_decided(self) -> None:
        self.slots.deciding.add(self._new_id())
        self.held += 1

    @precondition(lambda self: bool(self.slots.deciding))
    @rule(claimed=st.booleans())
    def reservation_answered(self, claimed: bool) -> None:
        run_id = sorted(self.slots.deciding)[0]
        if claimed:
            self._start(run_id)  # in runs before it leaves deciding
        else:
            self.held -= 1
        self.slots.deciding.discard(run_id)

    @precondition(lambda self: self.slots.room())
    @rule()
    def trigger_claim_sent(self) -> None:
        self.slots.starting += 1
        self.held += 1

    @precondition(lambda self: self.slots.starting > 0)
    @rule(claimed=st.booleans())
    def trigger_claim_answered(self, claimed: bool) -> None:
        if claimed:
            self._start(self._new_id())
        else:
            self.held -= 1
        self.slots.starting -= 1

    @precondition(
        lambda self: (
            not self.slots.claim_in_flight()
            and self.slots.held_by_others() < self.slots.concurrency
        )
    )
    @rule()
    def executor_claim_sent(self) -> None:
        self.slots.claiming = self.loop.create_future()
        self.held += 1

    @precondition(lambda self: self.slots.claim_in_flight())
    @rule(claimed=st.booleans())
    def executor_claim_answered(self, claimed: bool) -> None:
        assert self.slots.claiming is not None
        if claimed:
            self._start(self._new_id())
        else:
            self.held -= 1
        self.slots.claiming.set_result(claimed)

    @precondition(lambda self: bool(self.slots.runs))
    @rule(abandoned=st.booleans())
    def run_ended(self, abandoned: bool) -> None:
        run_id = sorted(self.slots.runs)[0]
        del self.slots.runs[run_id]
        work = self.slots.work[run_id]
        if abandoned:
            self.slots.lingering[run_id] = work  # its thread still runs
        else:
            del self.slots.work[run_id]
            self.held -= 1

    @precondition(lambda self: bool(self.slots.lingering))
    @rule()
    def abandoned_work_ended(self) -> None:
        run_id = sorted(self.slots.lingering)[0]
        del self.slots.lingering[run_id]
        del self.slots.work[run_id]
        self.held -= 1

    @invariant()
    def never_over_concurrency(self) -> None:
        assert self.slots.taken() == self.held  # every holder counted
        assert self.held <= self.slots.concurrency

    @invariant()
    def busy_while_step_work_runs(self) -> None:
        assert self.slots.busy() == bool(self.slots.runs or self.slots.lingering)


TestLedger = Ledger.TestCase
TestLedger.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
