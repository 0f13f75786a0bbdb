"""Large payloads (issue 13): a command step gets any payload through
SYNCWORKER_PAYLOAD_FILE (the environment cannot hold 1 MB), and a payload
past the documented 1 MiB limit is refused with a message that says so."""

from __future__ import annotations

import json

import psycopg
import pytest

import syncworker
from tests.harness import query, write_config
from tests.invariants import assert_invariants, trigger

# The size of the payload file, its mode, and whether the payload came in
# the environment too.
JOBS = """
[jobs.cmd]
steps = [{ command = ["sh", "-c", "wc -c < \\"$SYNCWORKER_PAYLOAD_FILE\\" > \\"$OUT\\"; stat -c %a \\"$SYNCWORKER_PAYLOAD_FILE\\" >> \\"$OUT\\"; echo ${SYNCWORKER_PAYLOAD:+inline} >> \\"$OUT\\""] }]
"""


def test_a_command_step_reads_a_large_payload_from_its_file(database_url, tmp_path, start):
    out = tmp_path / "out"
    payloads = tmp_path / "tmp"
    payloads.mkdir()
    env = {"OUT": str(out), "TMPDIR": str(payloads)}
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS), env=env)
    big = "x" * 1_000_000
    run_id = trigger(database_url, "cmd", doc=big)
    daemon.wait_for("run_succeeded", run_id=run_id, timeout=60)
    size, mode, *inline = out.read_text().split()
    assert int(size) == len(json.dumps({"doc": big}))
    assert mode == "600"
    assert inline == []  # too big for the environment: the file only
    small = trigger(database_url, "cmd", doc="y")
    daemon.wait_for("run_succeeded", run_id=small)
    assert out.read_text().split()[2:] == ["inline"]
    # The files are gone once their steps ended.
    assert list(payloads.iterdir()) == []
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_a_payload_over_the_limit_is_refused_naming_it(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    too_big = {"doc": "z" * (1024 * 1024 + 1)}
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="over the limit of 1048576"):
        query(
            database_url,
            "SELECT * FROM syncworker.trigger('cmd', payload => %s::jsonb)",
            (json.dumps(too_big),),
        )
    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        pytest.raises(syncworker.TriggerError, match="1 MiB"),
    ):
        syncworker.trigger_sync_blocking(conn, "cmd", payload=too_big)
    assert query(database_url, "SELECT count(*) FROM syncworker.runs") == [(0,)]
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
