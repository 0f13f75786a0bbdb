"""Steps borrow connections from a pool of their own, reset on return
(issue 13, steppool.py): a step cannot poison the worker's connections or
the next step's, nor wedge the worker by hoarding them."""

from __future__ import annotations

from tests.harness import query, write_config
from tests.invariants import assert_invariants, trigger

JOBS = """
[jobs.poison]
steps = ["sw_poison:poison"]

[jobs.inspect]
steps = ["sw_poison:inspect"]

[jobs.hoard]
steps = ["sw_poison:hoard"]

[jobs.solo]
steps = ["sw_testjobs:record"]
"""


def test_a_step_that_poisons_its_connection_harms_no_one(database_url, tmp_path, start):
    # One step connection: the next borrower gets the very one poisoned.
    config = write_config(tmp_path / "c.toml", database_url, JOBS, step_pool_size=1)
    daemon = start(config)
    poisoned = trigger(database_url, "poison")
    daemon.wait_for("run_succeeded", run_id=poisoned)
    looked = trigger(database_url, "inspect")
    daemon.wait_for("run_succeeded", run_id=looked)
    [(seen,)] = query(database_url, "SELECT payload FROM test_log WHERE run_id = %s", (looked,))
    assert seen == ["off", '"$user", public', "0", True, True]
    # The worker's own writes go on as ever (they never shared a connection).
    after = trigger(database_url, "solo")
    daemon.wait_for("run_succeeded", run_id=after)
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_a_step_that_hoards_connections_fails_and_the_worker_goes_on(database_url, tmp_path, start):
    config = write_config(
        tmp_path / "c.toml", database_url, JOBS, step_pool_size=1, step_connect_timeout=1
    )
    daemon = start(config)
    hoarder = trigger(database_url, "hoard")
    failed = daemon.wait_for("run_failed", run_id=hoarder)
    assert "PoolTimeout" in failed["error"] or "connection" in failed["error"]
    after = trigger(database_url, "solo")
    daemon.wait_for("run_succeeded", run_id=after)
    assert daemon.stop() == 0
    assert_invariants(database_url)
