"""redact() and make_logger(): JSON lines with event/level/timestamp, secrets hidden."""

from __future__ import annotations

import io
import json
from datetime import datetime
from typing import Any

import pytest

from syncworker.logs import make_logger, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://app:s3cret@db/app", "postgresql://app:***@db/app"),
        ("host=db password=s3cret user=app", "host=db password=*** user=app"),
        ("host=db password='s3 cret' user=app", "host=db password=*** user=app"),
        ("host=db PASSWORD = s3cret", "host=db PASSWORD = ***"),
        (
            "postgres://app:p%40ss@db.example:5432/app?sslmode=require",
            "postgres://app:***@db.example:5432/app?sslmode=require",
        ),
        ("postgresql://db/app?password=s3cret", "postgresql://db/app?password=***"),
        (
            "cannot reach postgresql://a:one@h1/d nor postgresql://b:two@h2/d",
            "cannot reach postgresql://a:***@h1/d nor postgresql://b:***@h2/d",
        ),
    ],
)
def test_redact_hides_passwords(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert "s3cret" not in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://app@db/app",
        "postgresql://db:5432/app",
        "host=db user=app dbname=app",
        "nothing to see here",
        "",
    ],
)
def test_redact_leaves_text_without_password_untouched(text: str) -> None:
    assert redact(text) == text


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    out = stream.getvalue().splitlines()
    return [json.loads(line) for line in out]


def test_json_logger_writes_one_object_per_line() -> None:
    stream = io.StringIO()
    log = make_logger("info", "json", stream=stream)
    log.info("run_started", run_id=7, job="pfa", scope="RIO")
    log.warning("trigger_rejected", reason="unknown job 'x'")
    records = lines(stream)
    assert len(records) == 2
    first, second = records
    assert first["event"] == "run_started"
    assert first["level"] == "info"
    assert (first["run_id"], first["job"], first["scope"]) == (7, "pfa", "RIO")
    assert second["event"] == "trigger_rejected"
    assert second["level"] == "warning"
    assert second["reason"] == "unknown job 'x'"
    for record in records:
        assert {"event", "level", "timestamp"} <= set(record)
        stamp = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
        assert stamp.utcoffset() is not None
        assert stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_database_url_field_is_redacted() -> None:
    stream = io.StringIO()
    log = make_logger("info", "json", stream=stream)
    log.info("worker_started", database_url="postgresql://app:s3cret@db/app")
    raw = stream.getvalue()
    assert "s3cret" not in raw
    assert lines(stream)[0]["database_url"] == "postgresql://app:***@db/app"


def test_secret_named_fields_without_url_are_masked_entirely() -> None:
    stream = io.StringIO()
    log = make_logger("info", "json", stream=stream)
    log.info("x", token="abc123", api_secret="zzz", password="hunter2")
    record = lines(stream)[0]
    assert record["token"] == "***"
    assert record["api_secret"] == "***"
    assert record["password"] == "***"
    assert "hunter2" not in stream.getvalue()


def test_passwords_in_any_string_field_and_the_event_are_redacted() -> None:
    stream = io.StringIO()
    log = make_logger("info", "json", stream=stream)
    log.error(
        "connect failed to postgresql://app:s3cret@db/app",
        error="connection to host=db password=s3cret failed",
    )
    record = lines(stream)[0]
    assert "s3cret" not in stream.getvalue()
    assert record["event"] == "connect failed to postgresql://app:***@db/app"
    assert record["error"] == "connection to host=db password=*** failed"


def test_exception_text_is_redacted() -> None:
    stream = io.StringIO()
    log = make_logger("info", "json", stream=stream)
    try:
        raise RuntimeError("cannot reach postgresql://app:s3cret@db/app")
    except RuntimeError:
        log.exception("db_disconnected")
    record = lines(stream)[0]
    assert record["event"] == "db_disconnected"
    assert record["level"] == "error"
    assert "RuntimeError" in record["exception"]
    assert "s3cret" not in stream.getvalue()


def test_debug_is_not_written_at_info() -> None:
    stream = io.StringIO()
    log = make_logger("info", "json", stream=stream)
    log.debug("trigger_enqueued", job="pfa")
    assert stream.getvalue() == ""
    log.info("shown")
    assert [r["event"] for r in lines(stream)] == ["shown"]


def test_level_filtering_at_warning() -> None:
    stream = io.StringIO()
    log = make_logger("warning", "json", stream=stream)
    log.debug("a")
    log.info("b")
    log.warning("c")
    log.error("d")
    assert [(r["event"], r["level"]) for r in lines(stream)] == [
        ("c", "warning"),
        ("d", "error"),
    ]


def test_debug_level_writes_debug() -> None:
    stream = io.StringIO()
    log = make_logger("debug", "json", stream=stream)
    log.debug("d")
    assert [(r["event"], r["level"]) for r in lines(stream)] == [("d", "debug")]


def test_auto_format_is_json_when_not_a_tty() -> None:
    stream = io.StringIO()  # isatty() is False
    log = make_logger("info", "auto", stream=stream)
    log.info("hello", a=1)
    record = lines(stream)[0]
    assert (record["event"], record["a"]) == ("hello", 1)


def test_console_format_is_not_json() -> None:
    stream = io.StringIO()
    log = make_logger("info", "console", stream=stream)
    log.info("hello", database_url="postgresql://app:s3cret@db/app")
    text = stream.getvalue()
    assert "hello" in text
    assert "s3cret" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_bound_context_is_logged_and_redacted() -> None:
    stream = io.StringIO()
    log = make_logger("info", "json", stream=stream).bind(run_id=3, dsn="postgresql://u:pw@h/d")
    log.info("run_succeeded")
    record = lines(stream)[0]
    assert record["run_id"] == 3
    assert record["dsn"] == "postgresql://u:***@h/d"


# -- a stderr that goes away -------------------------------------------------------------


def test_a_closed_stderr_loses_lines_not_runs(database_url, tmp_path) -> None:
    """`syncworker run | tee` and Ctrl-C on tee, or a log shipper that died:
    the worker's stderr is a pipe nobody reads. Runs still run to their end,
    the lost lines are counted, and a stop still exits 0."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from syncworker.embedded import free_port
    from tests.harness import _base_env, query, wait_until, write_config
    from tests.invariants import assert_invariants, trigger

    port = free_port()
    config = write_config(
        tmp_path / "c.toml",
        database_url,
        '[jobs.solo]\nsteps = ["sw_testjobs:record"]\n',
        http=f"127.0.0.1:{port}",
    )
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncworker", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=write_end,
        env=_base_env(),
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as reader:
            for line in reader:
                if b'"worker_started"' in line:
                    break
        # The reader is gone: every write to the pipe now fails with EPIPE.
        # Triggers of one key may join a pending run: count distinct runs.
        run_ids = sorted({trigger(database_url, "solo") for _ in range(3)})
        wait_until(
            lambda: (
                query(
                    database_url,
                    "SELECT count(*) FROM syncworker.runs WHERE id = ANY(%s) AND status = 'succeeded'",
                    (run_ids,),
                )
                == [(len(run_ids),)]
            ),
            what="every run succeeded with nobody reading the logs",
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        [lost] = [
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("syncworker_log_lines_lost_total ")
        ]
        assert lost > 0
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_invariants(database_url)
