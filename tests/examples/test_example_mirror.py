"""examples/mirror end to end: its API server, its setup SQL and its config,
run by a real daemon; the tables must match the API, and a second sync after
the API's data changed must count and log exactly those changes."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from tests.harness import REPO, execute, query, wait_until

sys.path.insert(0, str(REPO / "examples" / "mirror"))
from api_server import serve

EXAMPLE = REPO / "examples" / "mirror"


@pytest.fixture
def api_data(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    data = tmp_path / "users.json"
    shutil.copy(EXAMPLE / "users.json", data)
    server = serve(data, port=0)
    yield data, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def sync(url: str) -> dict[str, dict[str, Any]]:
    """Trigger every organisation and wait for the runs; by scope."""
    ids = [r[0] for r in query(url, "SELECT run_id FROM syncworker.trigger('org_users')")]

    def finished() -> list[dict[str, Any]] | None:
        runs = [
            r[0]
            for r in query(
                url,
                "SELECT row_to_json(r) FROM syncworker.runs r WHERE id = ANY(%s)"
                " AND status NOT IN ('pending', 'running')",
                (ids,),
            )
        ]
        return runs if len(runs) == len(ids) else None

    return {run["scope"]: run for run in wait_until(finished, timeout=120, what=f"runs {ids}")}


def table(url: str, scope: str) -> list[dict[str, Any]]:
    rows = query(
        url,
        f'SELECT id, name, email, role, updated_at FROM org_users."{scope}" ORDER BY id',
    )
    return [
        {
            "id": i,
            "name": n,
            "email": e,
            "role": r,
            "updated_at": u and u.astimezone(UTC).isoformat(),
        }
        for i, n, e, r, u in rows
    ]


def api_view(users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def stamp(value: str | None) -> str | None:
        return value.replace("Z", "+00:00") if value else None

    return sorted(
        ({**u, "updated_at": stamp(u.get("updated_at"))} for u in users), key=lambda u: u["id"]
    )


def test_the_mirror_example_end_to_end(database_url, api_data, start):
    data, api_url = api_data
    execute(database_url, (EXAMPLE / "setup.sql").read_text())
    env = {
        "SYNCWORKER_DATABASE_URL": database_url,
        "EXAMPLE_API_URL": api_url,
        "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(REPO)]),
        # No cron fires in the middle of the test: only its own triggers run.
        "SYNCWORKER_JOBS": json.dumps({"org_users": {"schedule": []}}),
        "SYNCWORKER_HEARTBEAT_INTERVAL": "1",
    }
    daemon = start(EXAMPLE / "syncworker.toml", env)
    users = json.loads(data.read_text())

    first = sync(database_url)
    assert sorted(first) == ["HOU", "RIO"]  # OSL is not active
    for scope, run in first.items():
        assert run["status"] == "succeeded", run["error"]
        assert (run["records_inserted"], run["records_updated"], run["records_deleted"]) == (
            len(users[scope]),
            0,
            0,
        )
        assert run["records_total"] == len(users[scope])
        assert table(database_url, scope) == api_view(users[scope])
    assert query(database_url, "SELECT to_regclass('org_users.\"OSL\"')") == [(None,)]

    users["RIO"][1]["role"] = "admin"
    removed = users["RIO"].pop(3)
    users["RIO"].append({"id": 6, "name": "Fábio Nunes", "email": None, "role": "member"})
    data.write_text(json.dumps(users))

    second = sync(database_url)
    rio, hou = second["RIO"], second["HOU"]
    assert rio["status"] == hou["status"] == "succeeded", (rio["error"], hou["error"])
    assert (rio["records_inserted"], rio["records_updated"], rio["records_deleted"]) == (1, 1, 1)
    assert rio["records_processed"] == 6  # 1 new, 1 changed, 3 unchanged, 1 deleted
    assert (hou["records_inserted"], hou["records_updated"], hou["records_deleted"]) == (0, 0, 0)
    assert hou["records_processed"] == 3
    for scope in ("RIO", "HOU"):
        assert table(database_url, scope) == api_view(users[scope])

    log = query(
        database_url,
        "SELECT table_name, scope, kind, key, old ->> 'role', new ->> 'role'"
        " FROM org_users.changes WHERE run_id = %s ORDER BY kind",
        (rio["id"],),
    )
    assert log == [
        ("org_users.RIO", "RIO", "delete", {"id": removed["id"]}, removed["role"], None),
        ("org_users.RIO", "RIO", "insert", {"id": 6}, None, "member"),
        ("org_users.RIO", "RIO", "update", {"id": 2}, "member", "admin"),
    ]
    assert query(
        database_url, "SELECT count(*) FROM org_users.changes WHERE run_id = %s", (hou["id"],)
    ) == [(0,)]
    daemon.wait_for("mirror_done", run_id=rio["id"], inserted=1, updated=1, unchanged=3, deleted=1)
