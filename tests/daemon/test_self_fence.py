"""A worker that cannot confirm its ownership stops its runs' steps itself,
before a peer may take them over (lease.py; README "Self-fencing").

Each test freezes (SIGSTOP) the worker running a long step past the takeover
time, lets the other worker take the run over and start its next attempt,
then thaws (SIGCONT) the frozen one, whose step code could run again before
its loop notices anything. The step records when it executes: no two
executions of the key may overlap."""

from __future__ import annotations

import itertools
import signal
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from syncworker.lease import Lease, LeaseTiming
from tests.harness import JOBS_DIR, Daemon, query, wait_until, write_config
from tests.invariants import assert_invariants, trigger

JOBS = f"""
[jobs.async_step]
steps = ["sw_fencejobs:ticking_async"]
retries = 3

[jobs.plain_step]
steps = ["sw_fencejobs:ticking_plain"]
retries = 3

[jobs.command_step]
steps = [{{ command = [{str(sys.executable)!r}, {str(JOBS_DIR / "sw_fencejobs.py")!r}] }}]
retries = 3
"""


def intervals(path: Path) -> dict[tuple[int, int], tuple[float, float]]:
    spans: dict[tuple[int, int], tuple[float, float]] = {}
    for line in path.read_text().splitlines():
        pid, attempt, at = line.split()
        key = (int(pid), int(attempt))
        lo, hi = spans.get(key, (float(at), float(at)))
        spans[key] = (min(lo, float(at)), max(hi, float(at)))
    return spans


def assert_no_overlap(spans: dict[tuple[int, int], tuple[float, float]]) -> None:
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    for (key_a, (_, end_a)), (key_b, (start_b, _)) in itertools.pairwise(ordered):
        assert end_a < start_b, f"{key_a} ran until {end_a}, {key_b} started at {start_b}"


def runner(daemons: list[Daemon], url: str, run_id: int) -> Daemon:
    [(pid,)] = query(
        url,
        "SELECT w.pid FROM syncworker.runs r JOIN syncworker.workers w ON w.id = r.worker_id"
        " WHERE r.id = %s",
        (run_id,),
    )
    [daemon] = [d for d in daemons if d.proc.pid == pid]
    return daemon


@pytest.mark.parametrize("job", ["async_step", "plain_step", "command_step"])
def test_a_frozen_worker_never_executes_alongside_the_new_owner(
    database_url: str, tmp_path: Path, start, job: str
) -> None:
    config = write_config(tmp_path / "c.toml", database_url, JOBS, concurrency=1)
    workers = [start(config), start(config)]
    ticks = tmp_path / "ticks"
    payload = {"file": str(ticks), "first": 30, "then": 2.5}
    run_id = trigger(database_url, job, None, **payload)
    wait_until(lambda: ticks.exists() and ticks.stat().st_size > 0, what="the step ticking")
    frozen = runner(workers, database_url, run_id)
    [peer] = [w for w in workers if w is not frozen]
    frozen.signal(signal.SIGSTOP)
    try:
        # Takeover: the frozen worker still holds its liveness lock (its TCP
        # session is alive), so its heartbeat must go stale (3 s).
        peer.wait_for("run_recovered", run_id=run_id, timeout=15)
        wait_until(
            lambda: any(attempt == 2 for _, attempt in intervals(ticks)),
            timeout=15,
            what="the next attempt executing on the peer",
        )
        time.sleep(0.3)
    finally:
        frozen.signal(signal.SIGCONT)
    frozen.wait_for("run_self_fenced", run_id=run_id, timeout=10)
    wait_until(
        lambda: (
            query(database_url, "SELECT status FROM syncworker.runs WHERE id = %s", (run_id,))
            == [("succeeded",)]
        ),
        timeout=20,
        what="the run succeeding on the peer",
    )
    spans = intervals(ticks)
    assert {attempt for _, attempt in spans} == {1, 2}, spans
    assert_no_overlap(spans)
    # The frozen worker stopped its step long before the peer took over.
    assert frozen.events("lease_lapsed")
    assert frozen.events("run_succeeded") == []
    assert frozen.proc.poll() is None  # and it serves on
    assert query(database_url, "SELECT count(*) FROM syncworker.runs WHERE status = 'running'") == [
        (0,)
    ]
    for w in workers:
        assert w.stop() == 0
    assert_invariants(database_url)


def test_the_lease_is_shorter_than_takeover_by_a_margin() -> None:
    for interval in (0.5, 1, 10, 60):
        timing = LeaseTiming(interval)
        assert timing.renew_every * 2 < timing.self_fence_after
        assert timing.self_fence_after < timing.takeover_after <= timing.stale_after
        # The margin dwarfs any clock-rate difference (NTP slews at most
        # 500 ppm) and leaves time to stop a step.
        assert timing.margin >= 0.199 * interval
        assert timing.self_fence_after * 1.001 < timing.takeover_after * 0.999


def test_a_late_answer_starts_a_new_epoch_whose_runs_stay_fenced() -> None:
    lease = Lease(LeaseTiming(1.0))
    now = time.monotonic()
    lease.renew(now, now)
    old = lease.token()
    assert old.valid()
    # Answered after the lease in force expired: a peer may have taken over
    # in the gap, so the old epoch's runs must not resume.
    lease.renew(now + 0.9, now + 0.9)  # (sent and answered in the future)
    assert lease.valid() and not old.valid()
    assert lease.token().valid()


def test_the_thread_hook_stops_a_step_and_costs_measured(capsys) -> None:
    from tests.jobs.sw_fencejobs import cpu_bound

    lease = Lease(LeaseTiming(1000.0))
    now = time.monotonic()
    lease.renew(now, now)
    token = lease.token()
    seconds: dict[str, float] = {}

    def timed(name: str, hooked: bool) -> None:
        if hooked:
            token.install_in_thread()
        began = time.perf_counter()
        cpu_bound(24)
        seconds[name] = time.perf_counter() - began

    for name, hooked in (("bare", False), ("hooked", True)):
        thread = threading.Thread(target=timed, args=(name, hooked))
        thread.start()
        thread.join()
    with capsys.disabled():
        print(
            f"\nprofile hook on a call-heavy CPU-bound step: {seconds['bare'] * 1000:.0f} ms"
            f" bare, {seconds['hooked'] * 1000:.0f} ms hooked"
            f" (x{seconds['hooked'] / seconds['bare']:.1f})"
        )
    # Lapsed (a new epoch): the thread stops at its next call.
    later = time.monotonic() + 2000
    lease.renew(later, later)
    stopped: list[BaseException] = []

    def victim() -> None:
        try:
            token.install_in_thread()  # lapsed: raises on its way out already
            cpu_bound(30)
        except BaseException as exc:
            stopped.append(exc)

    thread = threading.Thread(target=victim)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert [type(e).__name__ for e in stopped] == ["LeaseLapsed"]


def test_a_worker_whose_heartbeat_write_stalls_stops_its_step_and_recovers(
    database_url: str, tmp_path: Path, start
) -> None:
    """A stalled heartbeat (its row locked by another session, as a stalled
    network would hold the write): the worker fences itself within its
    lease, the other worker runs the next attempt, and once the write goes
    through again the first worker serves on."""
    config = write_config(tmp_path / "c.toml", database_url, JOBS, concurrency=1)
    workers = [start(config), start(config)]
    ticks = tmp_path / "ticks"
    run_id = trigger(database_url, "async_step", None, file=str(ticks), first=30, then=1.5)
    wait_until(lambda: ticks.exists() and ticks.stat().st_size > 0, what="the step ticking")
    stalled = runner(workers, database_url, run_id)
    [peer] = [w for w in workers if w is not stalled]
    with psycopg.connect(database_url) as blocker:  # a transaction held open
        blocker.execute(
            "SELECT 1 FROM syncworker.workers WHERE pid = %s FOR UPDATE", (stalled.proc.pid,)
        )
        stalled.wait_for("run_self_fenced", run_id=run_id, timeout=10)
        stalled.wait_for("heartbeat_failed", timeout=10)  # the stuck write given up
        wait_until(
            lambda: (
                query(database_url, "SELECT status FROM syncworker.runs WHERE id = %s", (run_id,))
                == [("succeeded",)]
            ),
            timeout=20,
            what="the next attempt succeeding on the peer",
        )
    assert_no_overlap(intervals(ticks))
    assert peer.events("run_succeeded", run_id=run_id)
    # Its heartbeat goes through again: its lease is back, it takes work.
    stalled.wait_for("lease_renewed", after_lapse=True, timeout=10)
    again = trigger(database_url, "async_step", None, file=str(ticks), first=0.1, then=0.1)
    wait_until(
        lambda: (
            query(database_url, "SELECT status FROM syncworker.runs WHERE id = %s", (again,))
            == [("succeeded",)]
        ),
        timeout=20,
        what="a later run succeeding",
    )
    assert stalled.proc.poll() is None
    for w in workers:
        assert w.stop() == 0
    assert_invariants(database_url)


def _fresh_lease(interval: float) -> Lease:
    lease = Lease(LeaseTiming(interval))
    now = time.monotonic()
    lease.renew(now, now)
    return lease


def test_the_async_guard_throws_into_a_step_that_swallows_cancellation() -> None:
    import asyncio

    from syncworker.lease import guard

    resumed_after_lapse: list[str] = []

    async def stubborn() -> str:
        for _ in range(5):
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                resumed_after_lapse.append("swallowed")
        return "finished anyway"

    async def main() -> None:
        lease = _fresh_lease(0.2)  # lapses after 0.12 s
        with pytest.raises(asyncio.CancelledError):
            await guard(stubborn(), lease.token())

    asyncio.run(main())
    # Every resumption after the lapse got a cancellation, and returning
    # after swallowing them still ends the step as cancelled.
    assert resumed_after_lapse and set(resumed_after_lapse) == {"swallowed"}


def test_the_watchdog_kills_a_process_group_while_its_worker_does_nothing() -> None:
    import subprocess

    lease = _fresh_lease(0.5)  # lapses after 0.3 s; nobody renews it
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        watch = lease.token().watch(proc.pid)
        began = time.monotonic()
        # Only the watchdog process can end it: this process just waits.
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert time.monotonic() - began < 2
        watch.release()
    finally:
        proc.kill()
        lease.close()


def test_the_watchdog_kills_what_it_watches_when_its_worker_goes_away() -> None:
    import subprocess

    lease = _fresh_lease(1000.0)
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        lease.token().watch(proc.pid)
        time.sleep(0.2)
        assert proc.poll() is None  # the lease holds
        lease.close()  # its pipe closes, as when the worker dies
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        proc.kill()


def test_a_peer_with_a_shorter_interval_waits_for_the_frozen_workers_own_lease(
    database_url: str, tmp_path: Path, start
) -> None:
    """A 0.5 s worker beside a 6 s one: the slow one's lease is 3.6 s, so a
    1.5 s freeze must not let the fast one take its run (by its own interval
    it would after 1.5 s of silence), and the slow one finishes it alone."""
    slow = start(write_config(tmp_path / "slow.toml", database_url, JOBS, heartbeat_interval=6))
    ticks = tmp_path / "ticks"
    run_id = trigger(database_url, "plain_step", None, file=str(ticks), first=4, then=1)
    wait_until(lambda: ticks.exists() and ticks.stat().st_size > 0, what="the step ticking")
    fast = start(write_config(tmp_path / "fast.toml", database_url, JOBS, heartbeat_interval=0.5))
    fast.wait_for("worker_started", timeout=15)
    slow.signal(signal.SIGSTOP)
    try:
        time.sleep(1.5)
    finally:
        slow.signal(signal.SIGCONT)
    slow.wait_for("run_succeeded", run_id=run_id, timeout=15)
    assert fast.events("run_recovered") == []
    spans = intervals(ticks)
    assert {attempt for _, attempt in spans} == {1}, spans
    assert slow.events("lease_lapsed") == []
    for w in (fast, slow):
        assert w.stop() == 0
    assert_invariants(database_url)
