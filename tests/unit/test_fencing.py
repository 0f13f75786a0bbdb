"""Fencing, with fake queries: a heartbeat whose answer no longer lists a
run of ours stops that run (run_fenced, the run's `lost` set, its task
cancelled with its processes), leaves alone a run writing its own outcome,
and renews the lease from the write's send time. No database."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from structlog.testing import capture_logs

from syncworker.daemon.lifecycle import Lifecycle
from syncworker.daemon.liveness import Liveness
from syncworker.daemon.slots import Slots
from syncworker.lease import Lease, LeaseTiming
from syncworker.orchestrator import RunEnv


class FakeStore:
    """heartbeat() answers with the runs the database still has as ours."""

    def __init__(self, owned: set[int]) -> None:
        self.owned = owned
        self.beats: list[str] = []

    async def heartbeat(self, conn: Any, worker_id: str, state: str) -> set[int]:
        self.beats.append(state)
        return set(self.owned)


def liveness(owned: set[int]) -> tuple[Liveness, Slots[RunEnv], list[tuple[int, str]], Lease]:
    slots: Slots[RunEnv] = Slots(concurrency=4)
    lease = Lease(LeaseTiming(heartbeat_interval=10))
    cancelled: list[tuple[int, str]] = []
    live = Liveness(
        worker_id="w-test",
        store=FakeStore(owned),  # type: ignore[arg-type]
        slots=slots,
        lease=lease,
        life=Lifecycle(lambda: 30.0),
        connect=None,  # type: ignore[arg-type]
        log=structlog.get_logger(),
        cancel_run=lambda run_id, reason: cancelled.append((run_id, reason)),
        on_reserved=lambda run_id: None,
        wake=lambda: None,
        sd_status=lambda state: None,
    )
    return live, slots, cancelled, lease


def add_run(slots: Slots[RunEnv], run_id: int) -> RunEnv:
    env = RunEnv(
        store=None,  # type: ignore[arg-type]
        connect=None,  # type: ignore[arg-type]
        step_connect=None,  # type: ignore[arg-type]
        log=structlog.get_logger(),
        stopping=asyncio.Event(),
    )
    slots.runs[run_id] = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
    slots.envs[run_id] = env
    return env


def test_a_run_the_database_no_longer_has_as_ours_is_fenced() -> None:
    async def go() -> None:
        live, slots, cancelled, lease = liveness(owned={1})
        ours, taken = add_run(slots, 1), add_run(slots, 2)
        assert not lease.valid()
        with capture_logs() as logs:
            await live._beat(None, "running", recheck=False, last_state="running")  # type: ignore[arg-type]
        assert cancelled == [(2, "fenced")]
        assert taken.lost.is_set() and not ours.lost.is_set()
        assert [e["run_id"] for e in logs if e["event"] == "run_fenced"] == [2]
        assert lease.valid()  # the write renewed it

    asyncio.run(go())


def test_a_run_writing_its_own_outcome_is_left_alone() -> None:
    async def go() -> None:
        live, slots, cancelled, _ = liveness(owned=set())
        env = add_run(slots, 3)
        env.settling.set()  # its finish is being written, fenced itself
        await live._beat(None, "running", recheck=False, last_state="running")  # type: ignore[arg-type]
        assert cancelled == []
        assert not env.lost.is_set()

    asyncio.run(go())


def test_a_lapsed_lease_stops_every_run_whose_token_it_voids() -> None:
    async def go() -> None:
        live, slots, cancelled, lease = liveness(owned={4})
        env = add_run(slots, 4)
        object.__setattr__(env, "token", lease.token())  # claimed before any renewal
        live.on_lease_lapsed()
        assert cancelled == [(4, "self-fenced")]

    asyncio.run(go())
