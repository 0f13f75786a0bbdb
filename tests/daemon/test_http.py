"""The `http` endpoint of real daemons: /healthz, /status and /metrics."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from syncworker.config import ConfigError, validate_config
from syncworker.embedded import free_port
from tests.harness import Daemon, cli, execute, query, release, wait_until, write_config

JOBS = """
[jobs.sync]
scopes = ["RIO", "HOU"]
steps = ["sw_testjobs:record"]

[jobs.multi]
scopes = ["A", "BAD"]
steps = ["sw_testjobs:record"]

[jobs.block]
steps = ["sw_testjobs:wait_release"]
"""
NO_DATABASE = "postgresql://nobody@127.0.0.1:1/none"

# Straight to 127.0.0.1, whatever proxy the environment names.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with _opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def health(port: int) -> tuple[int, str]:
    status, _, body = get(port, "/healthz")
    return status, body.decode().strip()


def samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, headers, body = get(port, "/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str):
    return found.get((name, frozenset(labels.items())))


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def refuse(database_url, pg_server):
    """Switch new connections to the test database off (and end the ones open)
    from the admin database; switched back on at the end whatever happens."""
    admin = psycopg.connect(pg_server.admin_url, autocommit=True)
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]

    def switch(on: bool) -> None:
        admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                sql.Identifier(name), sql.SQL("false" if on else "true")
            )
        )
        if on:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )

    yield switch
    switch(False)
    admin.close()


# -- the `http` key --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address", ["127.0.0.1:9187", "0.0.0.0:1", "localhost:65535", "[::1]:9187", "[::]:80"]
)
def test_good_addresses(address: str) -> None:
    assert validate_config({"http": address}).http == address


def test_http_is_off_by_default() -> None:
    assert validate_config({}).http == ""


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("9187", "must be host:port"),
        (":9187", "must be host:port"),
        ("127.0.0.1:", "port must be 1 to 65535"),
        ("127.0.0.1:0", "port must be 1 to 65535"),
        ("127.0.0.1:65536", "port must be 1 to 65535"),
        ("127.0.0.1:http", "port must be 1 to 65535"),
        ("127.0.0.1:\u0663", "port must be 1 to 65535"),
        ("::1:9187", "IPv6 address in brackets"),
        ("[::g]:9187", "not an IPv6 address"),
        ("[]:9187", "not an IPv6 address"),
        ("256.0.0.1:9187", "not an IPv4 address"),
        ("my host:9187", "not a host name"),
        ("-x:9187", "not a host name"),
        ("http://127.0.0.1:9187", "no scheme or path"),
        ("127.0.0.1:9187/metrics", "no scheme or path"),
        ("a:b:9187", "not a host name"),
    ],
)
def test_bad_addresses_name_the_key(address: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"http": address}, "c.toml")
    assert info.value.key == "http"
    assert reason in info.value.reason
    assert str(info.value).startswith("c.toml: http: ")


def test_bad_value_exits_78_naming_http(tmp_path) -> None:
    config = write_config(tmp_path / "c.toml", NO_DATABASE, JOBS, http="127.0.0.1:99999")
    proc = cli("run", "--config", str(config), timeout=30)
    assert proc.returncode == 78, proc.stderr
    assert f"config error: {config}: http: '127.0.0.1:99999': the port must be 1" in proc.stderr


def test_a_taken_port_exits_78_naming_http_and_the_address(tmp_path, port) -> None:
    address = f"127.0.0.1:{port}"
    config = write_config(tmp_path / "c.toml", NO_DATABASE, JOBS, http=address)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        daemon = Daemon(config)
        try:
            assert daemon.wait_exit(30) == 78
        finally:
            if daemon.proc.poll() is None:
                daemon.kill()
    [event] = daemon.events("http_bind_failed")
    assert event["address"] == address
    assert event["level"] == "error"
    assert f"config error: {config}: http: cannot listen on {address}:" in daemon.log_text()
    assert not daemon.events("worker_started")


def test_each_worker_has_a_registry_of_its_own() -> None:
    from prometheus_client import REGISTRY

    from syncworker.daemon.worker import Worker

    settings = validate_config({"jobs": {"j": {"steps": ["sw_testjobs:record"]}}})
    one, two = Worker(settings), Worker(settings)  # no "Duplicated timeseries"
    one.metrics.count_trigger("received")
    assert one.metrics.registry.get_sample_value("syncworker_triggers_received_total") == 1
    assert two.metrics.registry.get_sample_value("syncworker_triggers_received_total") == 0
    assert REGISTRY.get_sample_value("syncworker_triggers_received_total") is None


def test_run_durations_fall_in_the_buckets_prometheus_would_put_them_in() -> None:
    from syncworker.metrics import Metrics

    metrics = Metrics("v", "w", ["j"])
    for seconds in (0.05, 0.1, 0.2, 7200, 9000):  # a bound counts in its own bucket
        metrics.run_started("j")
        metrics.run_finished("j", "succeeded", seconds)
    registry = metrics.registry

    def bucket(le: str) -> float | None:
        return registry.get_sample_value(
            "syncworker_run_duration_seconds_bucket", {"job": "j", "le": le}
        )

    assert [bucket(le) for le in ("0.1", "0.5", "3600.0", "7200.0", "+Inf")] == [2, 3, 3, 4, 5]
    assert registry.get_sample_value("syncworker_run_duration_seconds_count", {"job": "j"}) == 5
    assert registry.get_sample_value(
        "syncworker_run_duration_seconds_sum", {"job": "j"}
    ) == pytest.approx(16200.35)
    assert registry.get_sample_value("syncworker_runs_running", {"job": "j"}) == 0


def test_a_worker_without_http_never_imports_prometheus_client() -> None:
    """Some 1.4 MiB of every idle worker that serves no /metrics."""
    import subprocess
    import sys

    from tests.harness import _base_env

    code = (
        "import sys\n"
        "import syncworker.cli\n"
        "from syncworker.config import validate_config\n"
        "from syncworker import Worker\n"
        "w = Worker(validate_config({'jobs': {'j': {'steps': ['sw_testjobs:record']}}}))\n"
        "w.metrics.count_trigger('received')\n"
        "w.metrics.run_started('j')\n"
        "w.metrics.run_finished('j', 'succeeded', 0.5)\n"
        "print(sorted(m for m in sys.modules if m.startswith('prometheus_client')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_base_env()
    )
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr


# -- /healthz --------------------------------------------------------------------------------


def test_healthz_follows_the_database(database_url, tmp_path, start, port, refuse) -> None:
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS, http=f"127.0.0.1:{port}"))
    assert daemon.events("http_listening", address=f"127.0.0.1:{port}")
    status, headers, body = get(port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["Connection"] == "close"
    assert headers["Content-Type"] == "text/plain; charset=utf-8"

    refuse(True)
    daemon.wait_for("db_disconnected")
    assert wait_until(lambda: health(port) == (503, "database down"), what="503")
    status, headers, body = get(port, "/status")
    assert (status, json.loads(body)) == (503, {"error": "database down"})
    assert headers["Content-Type"] == "application/json"
    down = samples(port)  # still answers, with what the process knows
    assert value(down, "syncworker_database_up") == 0
    assert not any(name == "syncworker_runs_pending" for name, _ in down)
    assert not any(name == "syncworker_last_success_timestamp_seconds" for name, _ in down)
    assert any(name == "process_cpu_seconds_total" for name, _ in down)

    refuse(False)
    daemon.wait_for("db_reconnected")
    assert wait_until(lambda: health(port) == (200, "ok"), what="200 again")
    up = samples(port)
    assert value(up, "syncworker_database_up") == 1
    assert value(up, "syncworker_database_reconnects_total") == 1
    assert value(up, "syncworker_runs_pending", job="sync") == 0


def test_healthz_says_starting_until_the_database_answers(
    database_url, tmp_path, start, port, refuse
) -> None:
    refuse(True)
    daemon = start(
        write_config(tmp_path / "c.toml", database_url, JOBS, http=f"127.0.0.1:{port}"),
        wait_ready=False,
    )
    daemon.wait_for("http_listening")
    daemon.wait_for("db_disconnected")
    assert health(port) == (503, "starting")
    refuse(False)
    daemon.ready()
    assert wait_until(lambda: health(port) == (200, "ok"), what="ready")
    # The first connection is no reconnect.
    assert value(samples(port), "syncworker_database_reconnects_total") == 0


def test_healthz_says_draining_during_a_drain(database_url, tmp_path, start, port) -> None:
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS, http=f"127.0.0.1:{port}"))
    execute(database_url, "SELECT syncworker.trigger('block')")
    wait_until(lambda: query(database_url, "SELECT 1 FROM test_log"), what="block running")
    daemon.signal()
    daemon.wait_for("drain_started")
    assert health(port) == (503, "draining")
    release(database_url)
    assert daemon.wait_exit() == 0
    with pytest.raises(OSError):  # closed with the worker
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# -- /status ---------------------------------------------------------------------------------


def test_status_is_what_status_json_prints(database_url, tmp_path, start, port) -> None:
    config = write_config(tmp_path / "c.toml", database_url, JOBS, http=f"127.0.0.1:{port}")
    daemon = start(config)
    execute(database_url, "NOTIFY sync_trigger, 'sync'")
    wait_until(
        lambda: (
            query(database_url, "SELECT count(*) FROM syncworker.runs WHERE status = 'succeeded'")
            == [(2,)]
        ),
        what="2 runs",
    )
    status, headers, body = get(port, "/status")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    served = json.loads(body)
    printed = json.loads(cli("status", "--json", "--config", str(config)).stdout)
    assert set(served) == set(printed) == {"workers", "jobs", "runs", "summary", "actions"}
    # Nothing changes the runs or jobs between the two reads; heartbeats do.
    assert served["jobs"] == printed["jobs"]
    assert served["runs"] == printed["runs"]
    assert served["summary"] == printed["summary"]
    assert [set(w) for w in served["workers"]] == [set(w) for w in printed["workers"]]
    worker_id = daemon.events("worker_started")[0]["worker_id"]
    assert [w["id"] for w in served["workers"]] == [worker_id]
    assert served["summary"]["succeeded"] == 2


# -- /metrics --------------------------------------------------------------------------------


def test_metrics_count_triggers_and_runs(database_url, tmp_path, start, port) -> None:
    config = write_config(
        tmp_path / "c.toml", database_url, JOBS, http=f"127.0.0.1:{port}", concurrency=1
    )
    daemon = start(config)
    worker_id = daemon.events("worker_started")[0]["worker_id"]
    first = samples(port)
    assert value(first, "syncworker_up", version=_version(), worker_id=worker_id) == 1
    assert value(first, "syncworker_runs_finished_total", job="sync", status="succeeded") == 0
    assert value(first, "syncworker_triggers_received_total") == 0

    # The one slot is held, so what comes next waits as pending.
    execute(database_url, "SELECT syncworker.trigger('block')")
    wait_until(lambda: query(database_url, "SELECT 1 FROM test_log"), what="block running")
    execute(database_url, "NOTIFY sync_trigger, 'sync'")
    daemon.wait_for("trigger_enqueued")
    execute(database_url, "NOTIFY sync_trigger, 'nosuchjob'")
    daemon.wait_for("trigger_rejected")
    held = samples(port)
    assert value(held, "syncworker_runs_pending", job="sync") == 2
    assert value(held, "syncworker_runs_pending", job="block") == 0
    assert value(held, "syncworker_runs_running", job="block") == 1
    assert value(held, "syncworker_triggers_received_total") == 2
    assert value(held, "syncworker_triggers_rejected_total") == 1

    release(database_url)
    execute(database_url, "SELECT syncworker.trigger('multi')")

    def settled() -> dict[Any, float] | None:
        found = samples(port)
        done = value(found, "syncworker_run_duration_seconds_count", job="multi")
        return (
            found if done == 2 and not value(found, "syncworker_runs_pending", job="sync") else None
        )

    found = wait_until(settled, what="every run counted")
    finished = {
        (labels["job"], labels["status"]): v
        for (name, fs), v in found.items()
        if name == "syncworker_runs_finished_total" and v
        for labels in [dict(fs)]
    }
    assert finished == {
        ("block", "succeeded"): 1,
        ("sync", "succeeded"): 2,
        ("multi", "succeeded"): 1,
        ("multi", "failed"): 1,
    }
    for job, count in (("block", 1), ("sync", 2), ("multi", 2)):
        assert value(found, "syncworker_run_duration_seconds_count", job=job) == count
        assert value(found, "syncworker_run_duration_seconds_sum", job=job) > 0
    assert value(found, "syncworker_triggers_received_total") == 2  # SQL triggers are not NOTIFYs
    assert value(found, "syncworker_triggers_rejected_total") == 1
    assert value(found, "syncworker_triggers_failed_total") == 0
    for job in ("sync", "multi", "block"):
        assert value(found, "syncworker_runs_pending", job=job) == 0
        assert value(found, "syncworker_runs_running", job=job) == 0

    last = {
        (labels["job"], labels["scope"]): v
        for (name, fs), v in found.items()
        if name == "syncworker_last_success_timestamp_seconds"
        for labels in [dict(fs)]
    }
    expected = query(
        database_url,
        "SELECT job, coalesce(scope, ''), extract(epoch FROM max(finished_at))::float8"
        " FROM syncworker.runs WHERE status = 'succeeded' GROUP BY 1, 2",
    )
    assert last == {(job, scope): ts for job, scope, ts in expected}
    assert set(last) == {("sync", "RIO"), ("sync", "HOU"), ("multi", "A"), ("block", "")}


def _version() -> str:
    from syncworker.version import VERSION

    return VERSION


# -- the protocol ----------------------------------------------------------------------------


def test_unknown_paths_methods_and_bad_requests(database_url, tmp_path, start, port) -> None:
    start(write_config(tmp_path / "c.toml", database_url, JOBS, http=f"127.0.0.1:{port}"))
    assert get(port, "/nope")[0] == 404
    assert get(port, "/healthz/")[0] == 404
    assert get(port, "/healthz?verbose=1")[0] == 200
    status, headers, _ = get(port, "/healthz", method="POST")
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    # HEAD answers as GET would, without the body (curl -I, load balancers).
    for path in ("/healthz", "/metrics", "/status"):
        got = raw(port, f"HEAD {path} HTTP/1.1\r\n\r\n".encode())
        head, _, body = got.partition(b"\r\n\r\n")
        full = get(port, path)
        assert head.startswith(b"HTTP/1.1 200 "), (path, got)
        assert body == b"", (path, body)
        length = next(ln for ln in head.split(b"\r\n") if ln.startswith(b"Content-Length: "))
        assert int(length.split(b": ")[1]) > 0 and full[0] == 200
    missing = raw(port, b"HEAD /nope HTTP/1.1\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 404 ") and missing.endswith(b"\r\n\r\n")
    assert raw(port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(port, b"GET /" + b"x" * 10000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 431 ")
    many = b"".join(b"X-%d: y\r\n" % i for i in range(200))
    assert raw(port, b"GET /healthz HTTP/1.1\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 431 ")
    # HTTP/1.0 clients are served too.
    assert raw(port, b"GET /healthz HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nok\n")


def test_a_silent_client_holds_nothing_and_is_timed_out(
    database_url, tmp_path, start, port
) -> None:
    start(write_config(tmp_path / "c.toml", database_url, JOBS, http=f"127.0.0.1:{port}"))
    with socket.create_connection(("127.0.0.1", port), timeout=15) as silent:
        silent.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        assert health(port) == (200, "ok")
        assert silent.recv(65536).startswith(b"HTTP/1.1 408 ")
