"""A stalled network (packets dropped, no RST) is noticed within a bound
(issue 13): /healthz turns 503 and the worker reconnects once the network
is back. The stall is a real TCP proxy that stops forwarding."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from syncworker.embedded import free_port
from tests.harness import write_config
from tests.invariants import assert_invariants, trigger
from tests.stallproxy import StallProxy

JOBS = '[jobs.solo]\nsteps = ["sw_testjobs:record"]\n'
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _health(port: int) -> int:
    try:
        with _opener.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def proxy(database_url):  # type: ignore[no-untyped-def]
    info = conninfo_to_dict(database_url)
    made = StallProxy(str(info.get("host", "127.0.0.1")), int(info.get("port", 5432)))
    yield made
    made.close()


def _wait_health(port: int, want: int, within: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < within:
        if _health(port) == want:
            return time.monotonic() - began
        time.sleep(0.1)
    raise AssertionError(f"/healthz not {want} within {within} s")


def test_a_stalled_network_turns_healthz_503_within_the_bound(database_url, tmp_path, start, proxy):
    port = free_port()
    info = conninfo_to_dict(database_url)
    through = make_conninfo(**{**info, "host": "127.0.0.1", "port": str(proxy.port)})
    daemon = start(write_config(tmp_path / "c.toml", through, JOBS, http=f"127.0.0.1:{port}"))
    assert _health(port) == 200
    proxy.stall()
    # heartbeat_interval 1: quiet for 3 s, then a ping with a 2 s deadline.
    took = _wait_health(port, 503, within=15)
    assert took < 8, took
    said = daemon.wait_for("db_disconnected")
    assert "did not answer" in said["error"] or "timeout" in said["error"].lower()
    assert daemon.proc.poll() is None
    proxy.resume()
    _wait_health(port, 200, within=30)
    daemon.wait_for("db_reconnected")
    run_id = trigger(database_url, "solo")
    daemon.wait_for("run_succeeded", run_id=run_id, timeout=30)
    assert daemon.stop() == 0
    assert_invariants(database_url)
