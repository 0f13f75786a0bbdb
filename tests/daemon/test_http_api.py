"""The HTTP API of a real daemon, as curl sees it: reads, writes behind
tokens, errors as JSON, and the event stream's latency, cost and limits."""

from __future__ import annotations

import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest

from syncworker.embedded import free_port
from tests.harness import execute, query, release, wait_until, write_config
from tests.webclient import EventStream, call

JOBS = """
[jobs.pfa]
schedule = "*/15 * * * *"
timezone = "America/Chicago"
scopes = ["RIO", "HOU"]
steps = ["sw_testjobs:record", "sw_testjobs:second"]

[jobs.block]
steps = ["sw_testjobs:wait_release"]

[jobs.off]
enabled = false
steps = ["sw_testjobs:record"]
"""
TOKEN = "anon-token-0123456789"
ALICE = "alice-token-0123456789"
TICKS = os.sysconf("SC_CLK_TCK")


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def worker(database_url, tmp_path, start, port):  # type: ignore[no-untyped-def]
    """A worker whose API takes writes, with an anonymous and a named token."""
    config = write_config(
        tmp_path / "c.toml",
        database_url,
        f'[http_tokens]\nalice = "{ALICE}"\n\n' + JOBS,
        http=f"127.0.0.1:{port}",
        http_token=TOKEN,
    )
    return start(config)


def runs(database_url: str, where: str = "true") -> list[tuple]:
    return query(
        database_url,
        f"SELECT id, job, scope, status, source, triggered_by FROM syncworker.runs WHERE {where} ORDER BY id",
    )


def test_writes_without_a_configured_token_are_403_and_change_nothing(
    database_url, tmp_path, start, port
) -> None:
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS, http=f"127.0.0.1:{port}"))
    for path in (
        "/api/jobs/pfa/trigger",
        "/api/jobs/pfa/pause",
        "/api/jobs/pfa/resume",
        "/api/runs/1/cancel",
    ):
        status, headers, body = call(port, "POST", path, {}, token=TOKEN)
        assert status == 403, path
        assert headers["Content-Type"] == "application/json"
        assert "read-only" in body["error"]
    assert runs(database_url) == []
    assert query(database_url, "SELECT count(*) FROM syncworker.pauses") == [(0,)]
    # Reads still answer.
    assert call(port, "GET", "/api/status")[0] == 200
    assert daemon.events("http_listening")[0]["writes"] is False
    assert not daemon.events("http_exposed_without_token")  # loopback: no warning


def test_a_wrong_or_missing_token_is_401_and_no_token_is_logged(worker, database_url, port) -> None:
    for token in (None, "wrong-token-0123456789", TOKEN + "x"):
        status, headers, body = call(port, "POST", "/api/jobs/pfa/trigger", {}, token=token)
        assert status == 401, token
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert "token" in body["error"] or "Bearer" in body["error"]
    assert runs(database_url) == []
    call(port, "POST", "/api/jobs/pfa/trigger", {"scope": "RIO"}, token=TOKEN)
    wait_until(lambda: runs(database_url, "status = 'succeeded'"), what="a run")
    text = worker.log_text()
    assert TOKEN not in text and ALICE not in text and "wrong-token" not in text
    assert worker.events("http_request", path="/api/jobs/pfa/trigger", status=401)


def test_trigger_says_who_and_refuses_what_is_wrong(worker, database_url, port) -> None:
    status, _, body = call(port, "POST", "/api/jobs/pfa/trigger", {"scope": "RIO"}, token=ALICE)
    assert status == 202
    assert body["triggered_by"] == "alice" and body["job"] == "pfa" and len(body["run_ids"]) == 1
    # Finished before the next trigger, which would otherwise join it (coalescing).
    wait_until(lambda: runs(database_url, "status = 'succeeded'"), what="alice's run")
    status, _, body = call(
        port, "POST", "/api/jobs/pfa/trigger", {"payload": {"k": 1}}, token=TOKEN
    )
    assert status == 202 and len(body["run_ids"]) == 2  # every scope
    wait_until(lambda: len(runs(database_url, "status = 'succeeded'")) == 3, what="3 runs")
    assert {(r[2], r[4], r[5]) for r in runs(database_url)} == {
        ("RIO", "http", "alice"),
        ("RIO", "http", "http"),
        ("HOU", "http", "http"),
    }

    def refused(path: str, body=None, raw_body=None) -> tuple[int, str]:  # type: ignore[no-untyped-def]
        status, headers, answer = call(port, "POST", path, body, token=TOKEN, raw_body=raw_body)
        assert headers["Content-Type"] == "application/json", (path, answer)
        return status, answer["error"]

    assert refused("/api/jobs/nope/trigger", {}) == (
        404,
        "unknown job 'nope' (known jobs: block, off, pfa)",
    )
    assert refused("/api/jobs/pfa/trigger", {"scope": "XXX"})[0] == 400
    assert refused("/api/jobs/off/trigger", {})[0] == 409
    assert refused("/api/jobs/pfa/trigger", raw_body=b"{not json")[0] == 400
    assert refused("/api/jobs/pfa/trigger", {"run_after": -5}) == (
        400,
        "run_after must be a non-negative number of seconds",
    )
    assert refused("/api/jobs/pfa/trigger", {"scope": "RIO", "bogus": 1})[0] == 400
    assert refused("/api/runs/999999/cancel", {})[0] == 404
    assert refused("/api/nothing", {})[0] == 404
    status, headers, _ = call(port, "GET", "/api/jobs/pfa/trigger")
    assert (status, headers["Allow"]) == (405, "POST")
    # Too large: refused from its Content-Length, before a byte is read.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/jobs/pfa/trigger HTTP/1.1\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Length: 1000000\r\n\r\n"
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'{"error": "body over 65536 bytes"}' in answer
    assert len(runs(database_url)) == 3  # nothing refused was written


def test_run_after_is_validated_and_passed_on(worker, database_url, port) -> None:
    status, _, _ = call(
        port, "POST", "/api/jobs/pfa/trigger", {"scope": "HOU", "run_after": 0}, token=TOKEN
    )
    assert status == 202
    status, _, _ = call(port, "POST", "/api/jobs/block/trigger", {"run_after": 60}, token=TOKEN)
    assert status == 202
    (not_before,) = query(
        database_url,
        "SELECT not_before > now() + interval '50 s' FROM syncworker.runs WHERE job = 'block'",
    )[0]
    assert not_before


def test_reads_filter_and_page_runs_and_show_steps(worker, database_url, port) -> None:
    for _ in range(3):
        for scope in ("RIO", "HOU"):
            call(port, "POST", "/api/jobs/pfa/trigger", {"scope": scope}, token=TOKEN)
            wait_until(
                lambda: not runs(database_url, "status IN ('pending', 'running')"), what="idle"
            )
    status, _, page = call(port, "GET", "/api/runs?job=pfa&limit=4")
    assert status == 200 and len(page["runs"]) == 4 and page["next_cursor"]
    ids = [r["id"] for r in page["runs"]]
    assert ids == sorted(ids, reverse=True)
    _, _, rest = call(port, "GET", f"/api/runs?job=pfa&limit=4&before={page['next_cursor']}")
    assert len(rest["runs"]) == 2 and rest["next_cursor"] is None
    assert max(r["id"] for r in rest["runs"]) < min(ids)
    _, _, rio = call(port, "GET", "/api/runs?scope=RIO&status=succeeded")
    assert len(rio["runs"]) == 3 and {r["scope"] for r in rio["runs"]} == {"RIO"}
    assert call(port, "GET", "/api/runs?status=bogus")[0] == 400
    assert call(port, "GET", "/api/runs?limit=0")[0] == 400
    assert call(port, "GET", "/api/runs?before=x")[0] == 400

    status, _, run = call(port, "GET", f"/api/runs/{ids[0]}")
    assert status == 200 and run["status"] == "succeeded" and run["records_inserted"] == 3
    assert [(s["name"], s["status"]) for s in run["steps"]] == [
        ("sw_testjobs:record", "succeeded"),
        ("sw_testjobs:second", "succeeded"),
    ]
    assert call(port, "GET", "/api/runs/424242")[0] == 404
    assert call(port, "GET", "/api/runs/abc")[0] == 404

    status, _, data = call(port, "GET", "/api/status")
    assert set(data) >= {"workers", "jobs", "runs", "summary"}
    pfa = next(j for j in data["jobs"] if j["name"] == "pfa")
    assert pfa["schedule_words"] == ["every 15 minutes"] and pfa["timezone"] == "America/Chicago"
    assert data["summary"]["succeeded"] == 6


def test_pause_resume_and_cancel(worker, database_url, port) -> None:
    status, _, hold = call(
        port,
        "POST",
        "/api/jobs/pfa/pause",
        {"scope": "RIO", "reason": "vendor down", "until": "2099-01-01T00:00:00Z"},
        token=ALICE,
    )
    assert status == 200 and hold["paused_by"] == "alice" and hold["reason"] == "vendor down"
    _, _, data = call(port, "GET", "/api/status")
    pfa = next(j for j in data["jobs"] if j["name"] == "pfa")
    assert [(s["scope"], s["paused_reason"]) for s in pfa["paused_scopes"]] == [
        ("RIO", "vendor down")
    ]
    assert call(port, "POST", "/api/jobs/pfa/pause", {"until": "soon"}, token=TOKEN)[0] == 400
    assert call(port, "POST", "/api/jobs/pfa/pause", {"scope": "NOPE"}, token=TOKEN)[0] == 400
    # A trigger while paused waits as pending; cancel it at once.
    _, _, body = call(port, "POST", "/api/jobs/pfa/trigger", {"scope": "RIO"}, token=TOKEN)
    (pending,) = body["run_ids"]
    status, _, answer = call(
        port, "POST", f"/api/runs/{pending}/cancel", {"reason": "not now"}, token=TOKEN
    )
    assert (status, answer) == (200, {"id": pending, "status": "cancelled"})
    status, _, answer = call(port, "POST", "/api/jobs/pfa/resume", {"scope": "RIO"}, token=TOKEN)
    assert (status, answer["lifted"]) == (200, True)
    assert (
        call(port, "POST", "/api/jobs/pfa/resume", {"scope": "RIO"}, token=TOKEN)[2]["lifted"]
        is False
    )

    # A running run: its worker stops it; a finished one is a conflict.
    _, _, body = call(port, "POST", "/api/jobs/block/trigger", {}, token=TOKEN)
    (running,) = body["run_ids"]
    wait_until(lambda: runs(database_url, f"id = {running} AND status = 'running'"), what="running")
    status, _, answer = call(port, "POST", f"/api/runs/{running}/cancel", {}, token=ALICE)
    assert (status, answer["status"]) == (202, "running")
    wait_until(
        lambda: runs(database_url, f"id = {running} AND status = 'cancelled'"), what="cancelled"
    )
    (error,) = query(database_url, f"SELECT error FROM syncworker.runs WHERE id = {running}")[0]
    assert "alice" in error
    status, _, answer = call(port, "POST", f"/api/runs/{running}/cancel", {}, token=TOKEN)
    assert status == 200 and answer["status"] == "cancelled"  # asked twice: as it is
    call(port, "POST", "/api/jobs/pfa/trigger", {"scope": "HOU"}, token=TOKEN)
    done = wait_until(
        lambda: runs(database_url, "scope = 'HOU' AND status = 'succeeded'"), what="done"
    )
    status, _, answer = call(port, "POST", f"/api/runs/{done[0][0]}/cancel", {}, token=TOKEN)
    assert status == 409 and answer["run_status"] == "succeeded"
    release(database_url)


# -- the event stream ------------------------------------------------------------------


def test_events_arrive_within_100_ms_of_the_notify(worker, database_url, port) -> None:
    stream = EventStream(port)
    head = stream.head()
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head
    assert b"X-Accel-Buffering: no" in head
    try:
        # A real run's events, in order.
        _, _, body = call(port, "POST", "/api/jobs/pfa/trigger", {"scope": "RIO"}, token=TOKEN)
        (run_id,) = body["run_ids"]
        seen = []
        while not seen or seen[-1][0] != "run_succeeded":
            name, data = stream.next_event()
            if data["run_id"] == run_id:
                seen.append((name, data["status"]))
        assert seen[0] == ("run_started", "running") and seen[-1] == ("run_succeeded", "succeeded")

        # The latency: NOTIFY on a connection of our own, to the event read.
        import psycopg

        latencies = []
        with psycopg.connect(database_url, autocommit=True) as conn:
            for i in range(30):
                payload = json.dumps(
                    {
                        "event": "run_started",
                        "run_id": 100000 + i,
                        "job": "pfa",
                        "scope": "RIO",
                        "status": "running",
                        "secret": "not passed on",
                    }
                )
                sent = time.perf_counter()
                conn.execute("SELECT pg_notify('sync_events', %s)", (payload,))
                name, data = stream.next_event()
                latencies.append((time.perf_counter() - sent) * 1000)
                assert data["run_id"] == 100000 + i and "secret" not in data
        # Not a run event: nothing reaches the stream.
        execute(database_url, 'NOTIFY sync_events, \'{"event": "x"}\'')
        execute(
            database_url,
            "SELECT pg_notify('sync_events', %s)",
            (
                '{"event": "run_started", "run_id": 7, "job": "pfa", "scope": null, "status": "running"}',
            ),
        )
        assert stream.next_event()[1]["run_id"] == 7
    finally:
        stream.close()
    median, worst = statistics.median(latencies), max(latencies)
    print(f"\nNOTIFY -> SSE event: median {median:.2f} ms, max {worst:.2f} ms over 30")
    assert worst < 100, latencies


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def test_fifty_streams_cost_under_5_mb_and_no_cpu_while_idle(
    database_url, tmp_path, start, port
) -> None:
    # A long heartbeat, so the worker's own idle work does not blur the measure.
    config = write_config(
        tmp_path / "c.toml", database_url, JOBS, http=f"127.0.0.1:{port}", heartbeat_interval=30
    )
    daemon = start(config)
    pid = daemon.proc.pid
    # Warm the server's paths once, then settle.
    one = EventStream(port)
    one.head()
    one.close()
    time.sleep(1.0)
    before = _rss_kb(pid)
    streams = [EventStream(port) for _ in range(50)]
    try:
        for s in streams:
            s.head()
        time.sleep(1.0)
        after = _rss_kb(pid)
        cpu_start = _cpu_seconds(pid)
        time.sleep(5.0)
        idle_cpu = _cpu_seconds(pid) - cpu_start
        # Every stream still open and served.
        execute(
            database_url,
            "SELECT pg_notify('sync_events', %s)",
            (
                '{"event": "run_started", "run_id": 1, "job": "pfa", "scope": null, "status": "running"}',
            ),
        )
        assert all(s.next_event()[1]["run_id"] == 1 for s in streams)
    finally:
        for s in streams:
            s.close()
    grown = (after - before) / 1024
    print(
        f"\n50 streams: RSS {before} -> {after} kB (+{grown:.2f} MB); CPU over 5 s idle {idle_cpu:.3f} s"
    )
    assert grown < 5
    assert idle_cpu <= 0.05  # a tick or five: no per-stream timers


def test_a_client_that_stops_reading_is_dropped_and_others_keep_going(
    worker, database_url, port
) -> None:
    slow = EventStream(port, rcvbuf=4096)
    slow.head()
    fast = EventStream(port)
    fast.head()
    total = 6000
    got: list[int] = []

    def read_fast() -> None:
        while len(got) < total:
            got.append(fast.next_event(timeout=30)[1]["run_id"])

    reader = threading.Thread(target=read_fast)
    reader.start()
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        for batch in range(total // 100):
            conn.execute(
                "SELECT pg_notify('sync_events', json_build_object('event', 'run_progress',"
                " 'run_id', g, 'job', 'pfa', 'scope', 'RIO', 'status', 'running',"
                " 'records_processed', g, 'records_total', %s::int, 'step', repeat('s', 400))::text)"
                " FROM generate_series(%s::int, %s::int) g",
                (total, batch * 100 + 1, batch * 100 + 100),
            )
            time.sleep(0.02)
    reader.join(60)
    assert got == list(range(1, total + 1))  # the fast client missed nothing
    worker.wait_for("sse_client_dropped", timeout=10)
    assert len(worker.events("sse_client_dropped")) == 1
    # The slow client's stream ends once what was buffered is read.
    slow.sock.settimeout(10)
    with pytest.raises((EOFError, ConnectionError)):
        while True:
            slow._recv()
    slow.close()
    fast.close()


def test_a_reconnect_of_the_listening_session_tells_streams_to_read_again(
    worker, database_url, port
) -> None:
    stream = EventStream(port)
    stream.head()
    try:
        [(killed,)] = query(
            database_url,
            "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l"
            " JOIN syncworker.workers w ON l.objid = w.lock_key::bigint::oid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND w.pid = %s"
            "   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (worker.proc.pid,),
        )
        assert killed == 1
        worker.wait_for("db_reconnected")
        assert stream.next_event() == ("resync", {})
        # And the stream goes on with the new session.
        call(port, "POST", "/api/jobs/pfa/trigger", {"scope": "HOU"}, token=TOKEN)
        assert stream.next_event()[0] == "run_started"
    finally:
        stream.close()


def test_head_of_the_event_stream_is_headers_only(worker, port) -> None:
    from tests.daemon.test_http import raw

    got = raw(port, b"HEAD /api/events HTTP/1.1\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\n")
    assert b"text/event-stream" in got
