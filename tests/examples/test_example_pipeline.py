"""examples/pipeline: snapshot, history and change detection as three steps
of one job, run by a real daemon from the example's own files."""

from __future__ import annotations

import json
import os

from tests.harness import REPO, execute, query, wait_until

EXAMPLE = REPO / "examples" / "pipeline"
BUTTON = json.dumps({"job": "employees", "triggered_by": "hr-button"})
WAIT = 90.0


def press_button(url: str, previous: int) -> dict:
    """NOTIFY as the HR app's button would, and wait for the run it starts."""
    execute(url, "SELECT pg_notify('sync_trigger', %s)", (BUTTON,))

    def done() -> dict | None:
        rows = query(
            url,
            "SELECT row_to_json(r) FROM syncworker.runs r"
            " WHERE id > %s AND status NOT IN ('pending', 'running')",
            (previous,),
        )
        return rows[0][0] if rows else None

    run = wait_until(done, timeout=WAIT, what="the employees run")
    assert run["status"] == "succeeded", run
    return run


def changes(url: str, run_id: int) -> list[tuple]:
    return query(
        url,
        "SELECT employee_id, change, fields FROM employee_changes"
        " WHERE run_id = %s ORDER BY employee_id",
        (run_id,),
    )


def test_the_pipeline_example_snapshots_keeps_history_and_detects_changes(database_url, start):
    execute(database_url, (EXAMPLE / "setup.sql").read_text())
    env = {
        "SYNCWORKER_DATABASE_URL": database_url,
        "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(REPO)]),
    }
    daemon = start(EXAMPLE / "syncworker.toml", env)
    [(schedule,)] = query(
        database_url, "SELECT schedule FROM syncworker.jobs WHERE name = 'employees'"
    )
    assert schedule == ["0 */6 * * *"]
    wait_until(
        lambda: query(database_url, "SELECT next_fire_at FROM syncworker.jobs")[0][0],
        timeout=WAIT,
        what="the next 6-hourly fire",
    )

    first = press_button(database_url, 0)
    assert (first["source"], first["triggered_by"]) == ("notify", "hr-button")
    assert [
        name
        for (name,) in query(
            database_url,
            "SELECT name FROM syncworker.run_steps WHERE run_id = %s ORDER BY position",
            (first["id"],),
        )
    ] == [
        "employee_sync:snapshot",
        "employee_sync:record_history",
        "employee_sync:detect_changes",
    ]
    assert query(database_url, "SELECT count(*) FROM employee_staging") == [(3,)]
    assert query(database_url, "SELECT count(*) FROM employee_history WHERE valid_to IS NULL") == [
        (3,)
    ]
    assert [c[1] for c in changes(database_url, first["id"])] == ["hired"] * 3
    assert (first["records_total"], first["records_processed"]) == (3, 3)
    assert (first["records_inserted"], first["records_updated"], first["records_deleted"]) == (
        3,
        0,
        0,
    )

    # The outside world moves on: one hire, one leaver, one promotion.
    execute(
        database_url,
        "INSERT INTO hr_employees VALUES ('E004', 'Alan Turing', 'Research', 'Analyst');"
        "DELETE FROM hr_employees WHERE employee_id = 'E003';"
        "UPDATE hr_employees SET title = 'Staff Engineer' WHERE employee_id = 'E001'",
    )
    second = press_button(database_url, first["id"])
    assert changes(database_url, second["id"]) == [
        ("E001", "changed", {"title": ["Engineer", "Staff Engineer"]}),
        ("E003", "left", {}),
        ("E004", "hired", {}),
    ]
    assert (second["records_total"], second["records_processed"]) == (3, 3)
    assert (second["records_inserted"], second["records_updated"], second["records_deleted"]) == (
        1,
        1,
        1,
    )
    history = query(
        database_url,
        "SELECT employee_id, title, valid_to IS NULL, opened_by, closed_by"
        " FROM employee_history ORDER BY employee_id, id",
    )
    assert history == [
        ("E001", "Engineer", False, first["id"], second["id"]),
        ("E001", "Staff Engineer", True, second["id"], None),
        ("E002", "Lead Engineer", True, first["id"], None),
        ("E003", "Analyst", False, first["id"], second["id"]),
        ("E004", "Analyst", True, second["id"], None),
    ]
    # A version ends when the next begins: no gap, no overlap.
    [(gapless,)] = query(
        database_url,
        "SELECT bool_and(o.valid_to = n.valid_from) FROM employee_history o"
        " JOIN employee_history n ON n.employee_id = o.employee_id AND n.opened_by = o.closed_by",
    )
    assert gapless is True

    # Nothing changed: a run that finds nothing to report.
    third = press_button(database_url, second["id"])
    assert changes(database_url, third["id"]) == []
    assert (third["records_inserted"], third["records_updated"], third["records_deleted"]) == (
        0,
        0,
        0,
    )
    daemon.wait_for("changes_detected", run_id=third["id"], hired=0, changed=0, left=0)
    assert daemon.stop() == 0
