"""Security: least-privilege roles, SQL built only from literals and quoted
identifiers, and database passwords kept out of everything users see.

Roles are cluster-wide: each test makes its own (unique names) and drops them
at the end, with whatever they own or were granted (DROP OWNED).
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from syncworker.db import lock_namespace
from syncworker.db import migrations as migration_files
from syncworker.embedded import free_port
from tests.harness import REPO, Daemon, cli, execute, query, wait_until, write_config

JOBS = """
[jobs.sync]
scopes = ["RIO", "HOU"]
steps = ["sw_testjobs:record"]

[jobs.solo]
steps = ["sw_testjobs:record"]

[jobs.off]
steps = ["sw_testjobs:record"]
enabled = false
"""

TRIGGER_FN = "syncworker.trigger(text, text, text, text, jsonb, timestamptz, interval)"
# trigger() before run_after (schema versions 1 to 11).
TRIGGER_FN_BEFORE_12 = "syncworker.trigger(text, text, text, text, jsonb, timestamptz)"


# -- roles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    name: str
    password: str
    url: str  # a key=value conninfo that logs in as this role


class Roles:
    """Login roles made for one test, all dropped when it ends."""

    def __init__(self, database_url: str) -> None:
        self.admin_url = database_url  # a superuser, on the test's own database
        self.info = conninfo_to_dict(database_url)
        self.dbname = str(self.info["dbname"])
        self.tag = secrets.token_hex(4)
        self.names: list[str] = []

    def reserve(self, kind: str, password: str | None = None) -> Role:
        """A unique role name (dropped at the end) and its login URL; not created."""
        name = f"sw_{kind}_{self.tag}"
        assert name not in self.names
        self.names.append(name)
        password = password or f"pw-{secrets.token_hex(8)}"
        info = {**self.info, "user": name, "password": password}
        return Role(name, password, make_conninfo(**info))

    def create(self, kind: str, password: str | None = None) -> Role:
        role = self.reserve(kind, password)
        self.admin(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role.name), sql.Literal(role.password)
            )
        )
        return role

    def admin(self, statement: str | sql.Composable, params: Any = None) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(statement.encode() if isinstance(statement, str) else statement, params)

    def drop_all(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            cur = conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (self.names,)
            )
            existing = [row[0] for row in cur.fetchall()]
            if not existing:
                return
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE usename = ANY(%s) AND pid <> pg_backend_pid()",
                (existing,),
            )
            names = sql.SQL(", ").join(map(sql.Identifier, existing))
            # Drops what they own here (the worker's schema) and revokes their
            # grants here and on shared objects (CONNECT/CREATE on the database).
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(names))
            conn.execute(sql.SQL("DROP ROLE {}").format(names))


@pytest.fixture
def roles(database_url: str) -> Iterator[Roles]:
    made = Roles(database_url)
    try:
        yield made
    finally:
        made.drop_all()


def readme_sql_blocks() -> list[str]:
    """The SQL blocks of README's "Least-privilege roles": before migrate,
    after it, and one tenant's payloads."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("### Least-privilege roles")
    end = text.index("\n## ", start)
    blocks = re.findall(r"```sql\n(.*?)```", text[start:end], re.DOTALL)
    assert len(blocks) >= 3, "README 'Least-privilege roles' must keep its three SQL blocks"
    return blocks


def readme_role_sql() -> tuple[str, str]:
    """README's grants before and after migrate."""
    blocks = readme_sql_blocks()
    return blocks[0], blocks[1]


def adapt(block: str, worker: Role, app: Role, dbname: str) -> str:
    """README's SQL with this test's role names, passwords and database."""
    swaps = [
        (r"'change-me-too'", sql.quote(app.password)),
        (r"'change-me'", sql.quote(worker.password)),
        (r"\bsync_worker\b", worker.name),
        (r"\bapp_web\b", app.name),
        (r"\bDATABASE app\b", f"DATABASE {dbname}"),
        (r"'pfa'", "'sync'"),  # README's example job, this module's scoped job
    ]
    for pattern, value in swaps:
        block = re.sub(pattern, value, block)
    return block


@dataclass(frozen=True)
class Deployment:
    worker: Role
    app: Role
    config: Path  # the worker's config


@pytest.fixture
def deployment(roles: Roles, tmp_path: Path) -> Deployment:
    """README's recipe, pasted as is: roles, `syncworker migrate` as the worker, grants."""
    worker = roles.reserve("worker")
    app = roles.reserve("app")
    before, after = (adapt(b, worker, app, roles.dbname) for b in readme_role_sql())
    assert worker.name in before and app.name in before and roles.dbname in before
    assert app.name in after
    roles.admin(before)
    config = write_config(tmp_path / "worker.toml", worker.url, JOBS)
    migrated = cli("migrate", "--config", str(config))
    assert migrated.returncode == 0, migrated.stderr
    assert "migrations applied: 1, 2, 3" in migrated.stdout
    with psycopg.connect(worker.url, autocommit=True) as conn:  # the owner grants
        conn.execute(after.encode())
    return Deployment(worker, app, config)


def refuse(
    conn: psycopg.Connection[Any],
    statement: str,
    error: type[psycopg.Error] = errors.InsufficientPrivilege,
    match: str | None = None,
) -> None:
    with pytest.raises(error, match=match):
        conn.execute(statement.encode())


# -- 1. least privilege ---------------------------------------------------------------


def test_worker_role_owns_everything_it_migrated(deployment: Deployment, database_url: str):
    owners = query(
        database_url,
        "SELECT 'schema', nspowner::regrole::text FROM pg_namespace WHERE nspname = 'syncworker'"
        " UNION ALL SELECT relname, relowner::regrole::text FROM pg_class"
        "  WHERE relnamespace = 'syncworker'::regnamespace AND relkind IN ('r', 'S')"
        " UNION ALL SELECT proname, proowner::regrole::text FROM pg_proc"
        "  WHERE pronamespace = 'syncworker'::regnamespace",
    )
    assert {owner for _, owner in owners} == {deployment.worker.name}
    assert {"schema", "runs", "run_steps", "jobs", "workers", "migrations", "trigger"} <= {
        name for name, _ in owners
    }


def test_app_role_can_trigger_and_read_but_not_write(deployment: Deployment):
    with psycopg.connect(deployment.app.url, autocommit=True) as app:
        rows = app.execute("SELECT * FROM syncworker.trigger('sync')").fetchall()
        assert [created for _, created in rows] == [True, True]
        [(solo, created)] = app.execute(
            "SELECT * FROM syncworker.trigger('solo', source => 'api')"
        ).fetchall()
        assert created is True
        ids = sorted([run_id for run_id, _ in rows] + [solo])

        runs = app.execute(
            "SELECT id, job, scope, status, source, triggered_by FROM syncworker.runs ORDER BY id"
        ).fetchall()
        assert [r[0] for r in runs] == ids
        assert {(r[1], r[2]) for r in runs} == {("sync", "RIO"), ("sync", "HOU"), ("solo", None)}
        assert {r[3] for r in runs} == {"pending"}
        # triggered_by defaults to the caller, not to the function's owner.
        assert {r[5] for r in runs} == {deployment.app.name}
        assert app.execute("SELECT count(*) FROM syncworker.run_steps").fetchone() == (0,)
        jobs = app.execute("SELECT name FROM syncworker.jobs ORDER BY name").fetchall()
        assert jobs == [("off",), ("solo",), ("sync",)]

        # Writes, locks, sequences, DDL: all refused, each with SQLSTATE 42501.
        for statement in [
            "UPDATE syncworker.runs SET status = 'succeeded'",
            "DELETE FROM syncworker.runs",
            "INSERT INTO syncworker.runs (job, status, source) VALUES ('solo', 'pending', 'x')",
            "TRUNCATE syncworker.runs",
            "SELECT id FROM syncworker.runs FOR UPDATE",
            "SELECT setval('syncworker.runs_id_seq', 1)",
            "UPDATE syncworker.run_steps SET status = 'failed'",
            "INSERT INTO syncworker.jobs (name) VALUES ('mine')",
            "UPDATE syncworker.jobs SET enabled = true WHERE name = 'off'",
            "UPDATE syncworker.jobs SET scopes = scopes || '{EVIL}' WHERE name = 'sync'",
            "DELETE FROM syncworker.jobs",
            "SELECT * FROM syncworker.workers",
            "SELECT * FROM syncworker.migrations",
            # Payloads are granted per scope, through run_payloads (sql/007).
            "SELECT * FROM syncworker.runs",
            "SELECT payload FROM syncworker.runs",
            "SELECT * FROM syncworker.payload_grants",
            "INSERT INTO syncworker.payload_grants (grantee, job) VALUES (current_user, 'sync')",
            "CREATE TABLE syncworker.mine (x int)",
            "CREATE VIEW syncworker.mine AS SELECT 1",
            "CREATE FUNCTION syncworker.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "ALTER TABLE syncworker.runs ADD COLUMN mine int",
            "DROP TABLE syncworker.runs",
            f"ALTER FUNCTION {TRIGGER_FN} SECURITY INVOKER",
        ]:
            refuse(app, statement)

        # trigger() writes only configured, enabled jobs and their scopes.
        invalid = errors.InvalidParameterValue
        refuse(app, "SELECT * FROM syncworker.trigger('mine')", invalid, "unknown job 'mine'")
        refuse(app, "SELECT * FROM syncworker.trigger('off')", invalid, "job 'off' is disabled")
        refuse(
            app,
            "SELECT * FROM syncworker.trigger('sync', scope => 'EVIL')",
            invalid,
            "unknown scope 'EVIL' for job 'sync'",
        )
        refuse(app, "SELECT * FROM syncworker.trigger('solo', 'RIO')", invalid, "has no scopes")
        refuse(
            app,
            "SELECT * FROM syncworker.trigger('solo', payload => '[1]')",
            invalid,
            "payload must be a JSON object",
        )
        refuse(
            app,
            "SELECT * FROM syncworker.trigger(NULL)",
            errors.NullValueNotAllowed,
            "job must not be NULL",
        )

        after = app.execute("SELECT id, status FROM syncworker.runs ORDER BY id").fetchall()
        assert after == [(run_id, "pending") for run_id in ids]

    # The CLI works under the app role too: it only calls trigger().
    joined = cli(
        "trigger", "solo", "--json",
        "--config", str(deployment.config), "--database-url", deployment.app.url,
    )  # fmt: skip
    assert joined.returncode == 0, joined.stderr
    assert json.loads(joined.stdout) == {"runs": [solo]}  # coalesced into the pending run


def test_trigger_needs_execute_not_just_schema_usage(deployment: Deployment, roles: Roles):
    nobody = roles.create("nobody")
    reader = roles.create("reader")
    with psycopg.connect(deployment.worker.url, autocommit=True) as owner:
        owner.execute(
            sql.SQL(
                "GRANT USAGE ON SCHEMA syncworker TO {0}; GRANT SELECT ON syncworker.runs TO {0}"
            ).format(sql.Identifier(reader.name))
        )
        [(acl,)] = owner.execute(
            "SELECT proacl::text[] FROM pg_proc WHERE oid = %s::regprocedure", (TRIGGER_FN,)
        ).fetchall()
    assert not [entry for entry in acl if entry.startswith("=")], f"PUBLIC may execute: {acl}"

    with psycopg.connect(nobody.url, autocommit=True) as conn:
        refuse(conn, "SELECT * FROM syncworker.trigger('solo')", match="for schema syncworker")
    with psycopg.connect(reader.url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM syncworker.runs").fetchone() == (0,)
        refuse(conn, "SELECT * FROM syncworker.trigger('solo')", match="for function trigger")
    refused = cli(
        "trigger", "solo", "--config", str(deployment.config), "--database-url", reader.url
    )
    assert refused.returncode != 0
    assert "permission denied for function trigger" in refused.stderr


def test_security_definer_function_is_pinned(deployment: Deployment):
    with psycopg.connect(deployment.app.url, autocommit=True) as app:
        [(definer, config)] = app.execute(
            "SELECT prosecdef, proconfig FROM pg_proc WHERE oid = %s::regprocedure",
            (TRIGGER_FN,),
        ).fetchall()
        assert definer is True
        assert config == ["search_path=pg_catalog, pg_temp"]

        # The caller's temporary tables cannot stand in for the real ones.
        app.execute(
            "CREATE TEMP TABLE jobs AS SELECT * FROM syncworker.jobs;"
            " UPDATE pg_temp.jobs SET enabled = true, scopes = NULL;"
            " INSERT INTO pg_temp.jobs (name) VALUES ('mine');"
            " CREATE TEMP TABLE runs AS SELECT * FROM syncworker.runs WITH NO DATA"
        )
        refuse(app, "SELECT * FROM syncworker.trigger('mine')", errors.InvalidParameterValue)
        refuse(app, "SELECT * FROM syncworker.trigger('off')", errors.InvalidParameterValue)
        [(run_id, _)] = app.execute("SELECT * FROM syncworker.trigger('solo')").fetchall()
        assert app.execute("SELECT count(*) FROM pg_temp.runs").fetchone() == (0,)
        assert app.execute("SELECT id FROM syncworker.runs").fetchall() == [(run_id,)]


def test_least_privilege_deployment_runs_end_to_end(deployment: Deployment, roles: Roles, start):
    # What the worker's steps write in the app's own tables is granted to it separately.
    roles.admin(
        sql.SQL(
            "GRANT INSERT ON test_log TO {0}; GRANT USAGE ON SEQUENCE test_log_id_seq TO {0}"
        ).format(sql.Identifier(deployment.worker.name))
    )
    daemon = start(deployment.config)
    done = cli(
        "trigger", "sync", "--wait", "--json", "--timeout", "60",
        "--config", str(deployment.config), "--database-url", deployment.app.url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + daemon.log_text()
    finished = json.loads(done.stdout)["runs"]
    assert {(r["scope"], r["status"]) for r in finished} == {
        ("RIO", "succeeded"),
        ("HOU", "succeeded"),
    }
    assert {r["triggered_by"] for r in finished} == {deployment.app.name}
    status = cli("status", "--json", "--config", str(deployment.config))
    assert status.returncode == 0, status.stderr
    assert len(json.loads(status.stdout)["workers"]) == 1
    assert daemon.stop() == 0


def test_a_missing_privilege_exits_77_with_a_pointer_not_a_traceback(deployment: Deployment):
    app = ["--config", str(deployment.config), "--database-url", deployment.app.url]
    for command in (["status"], ["migrate"]):
        denied = cli(*command, *app)
        assert denied.returncode == 77, (command, denied.stdout, denied.stderr)
        assert denied.stderr.startswith("syncworker: permission denied: "), denied.stderr
        assert "Least-privilege roles" in denied.stderr
        assert "Traceback" not in denied.stderr and deployment.app.password not in denied.stderr


# -- 1b. what the app role reads: payloads per scope, no worker hosts (sql/007) -------

RUN_EVENT_KEYS = {"event", "run_id", "job", "scope", "status"}
PROGRESS_KEYS = RUN_EVENT_KEYS | {"step", "records_processed", "records_total"}
WORKER_ID = re.compile(r"w-[0-9a-f]{12}")


def _columns(url: str, table: str) -> list[str]:
    return [
        name
        for (name,) in query(
            url,
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass"
            " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (table,),
        )
    ]


def _may_select(url: str, role: str, table: str, columns: list[str]) -> dict[str, bool]:
    return dict(
        query(
            url,
            "SELECT c, has_column_privilege(%s, %s, c, 'SELECT') FROM unnest(%s::text[]) AS c",
            (role, table, columns),
        )
    )


def test_app_role_may_read_every_run_column_but_payload(deployment: Deployment, database_url):
    """README's column list is every column of runs but payload: none forgotten."""
    app = deployment.app.name
    columns = _columns(database_url, "syncworker.runs")
    assert {"payload", "worker_id", "reserved_for"} <= set(columns)
    assert _may_select(database_url, app, "syncworker.runs", columns) == {
        c: c != "payload" for c in columns
    }
    workers = _columns(database_url, "syncworker.workers")
    assert not any(_may_select(database_url, app, "syncworker.workers", workers).values())
    for table in (
        "syncworker.run_steps",
        "syncworker.jobs",
        "syncworker.run_payloads",
        "syncworker.pauses",
    ):
        assert query(
            database_url, "SELECT has_table_privilege(%s, %s, 'SELECT')", (app, table)
        ) == [(True,)]
    [(grants,)] = query(
        database_url,
        "SELECT has_table_privilege(%s, 'syncworker.payload_grants',"
        " 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')",
        (app,),
    )
    assert grants is False


def test_payloads_are_read_only_for_granted_scopes(deployment: Deployment, roles: Roles):
    with psycopg.connect(deployment.app.url, autocommit=True) as app:
        made = {}
        for job, scope in [("sync", "RIO"), ("sync", "HOU"), ("solo", None)]:
            token = f"{job}-{scope}-secret"
            [(made[job, scope], _)] = app.execute(
                "SELECT * FROM syncworker.trigger(%s, %s, payload => %s::jsonb)",
                (job, scope, json.dumps({"token": token})),
            ).fetchall()
        payloads = "SELECT run_id, job, scope, payload FROM syncworker.run_payloads ORDER BY run_id"
        assert app.execute(payloads).fetchall() == []  # nothing granted yet

        # README's third block, as the worker role: job pfa (here sync), scope RIO.
        with psycopg.connect(deployment.worker.url, autocommit=True) as owner:
            grant = adapt(readme_sql_blocks()[2], deployment.worker, deployment.app, roles.dbname)
            assert deployment.app.name in grant
            owner.execute(grant.encode())
            # A row naming a role that does not exist matches nobody, and breaks nothing.
            owner.execute(
                "INSERT INTO syncworker.payload_grants (grantee, job, scope)"
                " VALUES ('sw_no_such_role', 'sync', 'HOU')"
            )
        rio = (made["sync", "RIO"], "sync", "RIO", {"token": "sync-RIO-secret"})
        assert app.execute(payloads).fetchall() == [rio]

        # The grant filter runs before any condition of the caller's: a
        # function that leaks its argument sees the granted rows only.
        app.execute(
            "CREATE FUNCTION pg_temp.leak(p jsonb) RETURNS boolean LANGUAGE plpgsql"
            " COST 0.0000001 AS $$ BEGIN RAISE NOTICE 'leak: %', p; RETURN true; END $$"
        )
        leaked: list[str] = []
        app.add_notice_handler(lambda notice: leaked.append(str(notice.message_primary)))
        rows = app.execute(
            "SELECT run_id FROM syncworker.run_payloads WHERE pg_temp.leak(payload)"
        ).fetchall()
        assert rows == [(rio[0],)]
        assert leaked and all("sync-RIO-secret" in line for line in leaked), leaked

        # A group role, every scope (NULL): its members inherit the grant,
        # and an unscoped job's runs are covered by it.
        tenant = roles.create("tenant")
        roles.admin(
            sql.SQL("GRANT {} TO {}").format(
                sql.Identifier(tenant.name), sql.Identifier(deployment.app.name)
            )
        )
        with psycopg.connect(deployment.worker.url, autocommit=True) as owner:
            owner.execute(
                "INSERT INTO syncworker.payload_grants (grantee, job, scope) VALUES (%s, 'solo', NULL)",
                (tenant.name,),
            )
        solo = (made["solo", None], "solo", None, {"token": "solo-None-secret"})
        assert app.execute(payloads).fetchall() == [rio, solo]
        refuse(app, "SELECT payload FROM syncworker.runs")  # the table itself: still not

    # The owner reads every payload, in the table.
    owned = query(
        deployment.worker.url, "SELECT count(*) FROM syncworker.runs WHERE payload ? 'token'"
    )
    assert owned == [(3,)]


def _drain(conn: psycopg.Connection[Any], quiet: float = 1.0) -> list[psycopg.Notify]:
    heard: list[psycopg.Notify] = []
    while batch := list(conn.notifies(timeout=quiet)):
        heard.extend(batch)
    return heard


def _assert_channels_carry_no_run_data(heard: list[psycopg.Notify], *secrets: str) -> None:
    for notify in heard:
        for secret in secrets:
            assert secret not in notify.payload, (notify.channel, notify.payload)
        if notify.channel == "syncworker_wake":
            if notify.payload.startswith("{"):
                assert set(json.loads(notify.payload)) == {"reserved_for", "id"}, notify.payload
            else:
                assert notify.payload in {"sync", "solo"}, notify.payload
        else:
            event = json.loads(notify.payload)
            keys = PROGRESS_KEYS if event["event"] == "run_progress" else RUN_EVENT_KEYS
            assert set(event) == keys, notify.payload


def test_app_role_sees_no_worker_host_and_no_payload_on_any_channel(
    deployment: Deployment, roles: Roles, database_url: str, start
):
    roles.admin(
        sql.SQL(
            "GRANT INSERT ON test_log TO {0}; GRANT USAGE ON SEQUENCE test_log_id_seq TO {0}"
        ).format(sql.Identifier(deployment.worker.name))
    )
    daemon = start(deployment.config)
    app_cli = ["--config", str(deployment.config), "--database-url", deployment.app.url]
    token = f"tok-{secrets.token_hex(6)}"
    with psycopg.connect(deployment.app.url, autocommit=True) as app:
        app.execute("LISTEN syncworker_wake")
        app.execute("LISTEN sync_events")
        [(with_payload, _)] = app.execute(
            "SELECT * FROM syncworker.trigger('sync', 'RIO', payload => %s::jsonb)",
            (json.dumps({"token": token}),),
        ).fetchall()
        # trigger --wait as the app role: the runs, without the payload it may not read.
        done = cli("trigger", "solo", "--wait", "--json", "--timeout", "60", *app_cli)
        assert done.returncode == 0, done.stderr + daemon.log_text()
        [run] = json.loads(done.stdout)["runs"]
        assert run["status"] == "succeeded" and "payload" not in run
        wait_until(
            lambda: app.execute(
                "SELECT 1 FROM syncworker.runs WHERE id = %s AND status = 'succeeded'",
                (with_payload,),
            ).fetchall(),
            what="the run with a payload succeeded",
        )
        heard = _drain(app)

        rows = app.execute("SELECT DISTINCT worker_id FROM syncworker.runs").fetchall()
        refuse(app, "SELECT hostname, pid FROM syncworker.workers")
        refuse(app, "SELECT count(*) FROM syncworker.workers")
    [(hostname, pid)] = query(database_url, "SELECT hostname, pid FROM syncworker.workers")
    assert [r[0] for r in rows] == [daemon.events("worker_started")[0]["worker_id"]]
    [worker_id] = [r[0] for r in rows]
    assert WORKER_ID.fullmatch(worker_id), worker_id
    assert hostname not in worker_id and str(pid) not in worker_id
    assert {n.channel for n in heard} == {"syncworker_wake", "sync_events"}
    _assert_channels_carry_no_run_data(heard, token, hostname, f":{pid}")

    # status: the workers grant README gives for a dashboard, and no payload.
    assert cli("status", "--json", *app_cli).returncode == 77
    roles.admin(
        sql.SQL("GRANT SELECT ON syncworker.workers TO {}").format(
            sql.Identifier(deployment.app.name)
        )
    )
    shown = cli("status", "--json", *app_cli)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert [(w["id"], w["hostname"], w["pid"]) for w in status["workers"]] == [
        (worker_id, hostname, pid)
    ]
    assert status["runs"] and not any("payload" in r for r in status["runs"])
    assert token not in shown.stdout
    table = cli("status", *app_cli)
    assert table.returncode == 0 and "RECENT RUNS" in table.stdout, table.stderr
    # The worker role still sees the payloads.
    owner = cli("status", "--json", "--config", str(deployment.config))
    assert owner.returncode == 0 and token in owner.stdout, owner.stderr
    assert daemon.stop() == 0


def test_a_reservation_wake_names_only_the_worker_and_the_run(
    deployment: Deployment, database_url: str
):
    """What the app role hears when trigger() reserves a run: whom for and
    which run, none of the run's fields (a worker claims by id, sql/007)."""
    [(lock_key,)] = query(
        database_url,
        "INSERT INTO syncworker.workers (id, hostname, pid, version, state, concurrency,"
        " first_steps, reserve_by_id) VALUES ('w-0123456789ab', 'secret-host', 4242, 'v',"
        " 'idle', 4, '{\"solo\": \"s\"}', true) RETURNING lock_key",
    )
    with (
        psycopg.connect(database_url, autocommit=True) as session,
        psycopg.connect(deployment.app.url, autocommit=True) as app,
    ):
        # Alive as a worker is: its session holds the liveness lock.
        session.execute("SELECT pg_advisory_lock(%s, %s)", (lock_namespace("syncworker"), lock_key))
        app.execute("LISTEN syncworker_wake")
        [(reserved, _)] = app.execute(
            "SELECT * FROM syncworker.trigger('solo', source => 'web', triggered_by => 'alice')"
        ).fetchall()
        app.execute("SELECT * FROM syncworker.trigger('sync')")  # two runs: not reserved
        heard = _drain(app)
    assert [n.payload for n in heard][1:] == ["sync"]
    assert json.loads(heard[0].payload) == {"reserved_for": "w-0123456789ab", "id": reserved}
    _assert_channels_carry_no_run_data(heard, "web", "alice", "secret-host", "4242")
    assert query(
        database_url, "SELECT reserved_for FROM syncworker.runs WHERE id = %s", (reserved,)
    ) == [("w-0123456789ab",)]


def _migrate_to(url: str, version: int) -> None:
    """The schema as `migrate` of an older release left it: files up to `version`."""
    schema, wake, ns = '"syncworker"', "'syncworker_wake'", str(lock_namespace("syncworker"))
    with psycopg.connect(url) as conn:
        conn.execute(
            "CREATE SCHEMA syncworker; CREATE TABLE syncworker.migrations ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for number, text in migration_files():
            if number > version:
                break
            body = text.replace("__SCHEMA__", schema).replace("__WAKE__", wake)
            conn.execute(body.replace("__LOCK_NS__", ns).encode())
            conn.execute("INSERT INTO syncworker.migrations (version) VALUES (%s)", (number,))


def test_upgrade_to_version_7_takes_payloads_from_existing_readers(
    database_url: str, roles: Roles, tmp_path: Path
):
    _migrate_to(database_url, 6)
    legacy = roles.create("legacy")  # an app set up by version 6's README
    delegate = roles.create("delegate")  # may pass its SELECT on
    sub = roles.create("sub")  # got SELECT from delegate
    anyone = roles.create("anyone")  # reads through PUBLIC's grant
    names = {r: sql.Identifier(r.name) for r in (legacy, delegate, sub, anyone)}
    roles.admin(
        sql.SQL(
            "GRANT USAGE ON SCHEMA syncworker TO PUBLIC;"
            " GRANT SELECT ON syncworker.runs, syncworker.run_steps, syncworker.jobs TO {legacy};"
            " GRANT EXECUTE ON FUNCTION {fn} TO {legacy};"
            " GRANT SELECT ON syncworker.runs TO {delegate} WITH GRANT OPTION;"
            " GRANT SELECT ON syncworker.runs TO PUBLIC"
        ).format(legacy=names[legacy], delegate=names[delegate], fn=sql.SQL(TRIGGER_FN_BEFORE_12))
    )
    with psycopg.connect(delegate.url, autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT SELECT ON syncworker.runs TO {}").format(names[sub]))
    # History written by workers of version 6: ids with the host and pid.
    old = "oldhost.example:31337:a1b2c3"
    live = "livehost.example:4242:d4e5f6"
    execute(
        database_url,
        "INSERT INTO syncworker.workers (id, hostname, pid, version, state) VALUES"
        " (%(old)s, 'oldhost.example', 31337, '6', 'stopped'),"
        " (%(live)s, 'livehost.example', 4242, '6', 'running')",
        {"old": old, "live": live},
    )
    execute(
        database_url,
        "INSERT INTO syncworker.runs (job, scope, status, source, payload, worker_id) VALUES"
        " ('sync', 'RIO', 'succeeded', 'test', '{\"token\": \"t1\"}', %(old)s),"
        " ('sync', 'HOU', 'failed', 'test', '{}', %(old)s),"
        " ('solo', NULL, 'running', 'test', '{}', %(live)s)",
        {"old": old, "live": live},
    )

    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    upgraded = cli("migrate", "--config", str(config))
    assert upgraded.returncode == 0, upgraded.stderr
    assert re.search(r"migrations applied: 7, 8(, \d+)*;", upgraded.stdout), upgraded.stdout

    columns = _columns(database_url, "syncworker.runs")
    every_but_payload = {c: c != "payload" for c in columns}
    for role in (legacy, delegate, sub, anyone):
        assert _may_select(database_url, role.name, "syncworker.runs", columns) == (
            every_but_payload
        ), role.name
        with psycopg.connect(role.url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM syncworker.runs").fetchone() == (3,)
            refuse(conn, "SELECT payload FROM syncworker.runs")
            refuse(conn, "SELECT * FROM syncworker.runs")
    with psycopg.connect(legacy.url, autocommit=True) as conn:  # the rest as it was
        assert conn.execute("SELECT count(*) FROM syncworker.jobs").fetchone() == (3,)
        assert len(conn.execute("SELECT * FROM syncworker.trigger('solo')").fetchall()) == 1
    # The grant option kept, on the same columns.
    [(may_pass_on,)] = query(
        database_url,
        "SELECT array_agg(c ORDER BY c) FROM unnest(%s::text[]) AS c"
        " WHERE has_column_privilege(%s, 'syncworker.runs', c, 'SELECT WITH GRANT OPTION')",
        (columns, delegate.name),
    )
    assert may_pass_on == sorted(c for c in columns if c != "payload")
    [(table_acl,)] = query(
        database_url, "SELECT relacl::text[] FROM pg_class WHERE oid = 'syncworker.runs'::regclass"
    )
    [(owner,)] = query(
        database_url,
        "SELECT relowner::regrole::text FROM pg_class WHERE oid = 'syncworker.runs'::regclass",
    )
    # No table-level grant left but the owner's.
    assert [e for e in table_acl if not e.startswith(f"{owner}=")] == [], table_acl

    # Finished runs and stopped workers: a pseudonym, the same one for one worker.
    ids = query(
        database_url,
        "SELECT status, worker_id FROM syncworker.runs WHERE source = 'test' ORDER BY id",
    )
    [(_, rio), (_, hou), (_, running)] = ids
    assert rio == hou and WORKER_ID.fullmatch(rio), ids
    assert running == live  # a live worker of version 6 fences on its id
    workers = dict(query(database_url, "SELECT id, pid FROM syncworker.workers"))
    assert workers == {rio: 31337, live: 4242}


def test_worker_owning_a_precreated_schema_needs_no_database_create(roles: Roles, tmp_path: Path):
    worker = roles.create("worker")
    # A DBA made the schema for the worker; PUBLIC has no CREATE on databases.
    roles.admin(
        sql.SQL("CREATE SCHEMA syncworker AUTHORIZATION {}").format(sql.Identifier(worker.name))
    )
    config = write_config(tmp_path / "worker.toml", worker.url, JOBS)
    migrated = cli("migrate", "--config", str(config))
    assert migrated.returncode == 0, migrated.stderr


@pytest.mark.parametrize("public_usage", [False, True], ids=["usage-granted", "usage-public"])
def test_upgrade_to_version_2_keeps_existing_callers(
    database_url: str, roles: Roles, tmp_path: Path, public_usage: bool
):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    _migrate_to(database_url, 1)  # EXECUTE for PUBLIC, as version 1 left it
    legacy = roles.create("legacy")  # an app set up under version 1: USAGE only
    other = roles.create("other")
    roles.admin(
        sql.SQL("GRANT USAGE ON SCHEMA syncworker TO {legacy}").format(
            legacy=sql.Identifier(legacy.name)
        )
    )
    if public_usage:
        roles.admin("GRANT USAGE ON SCHEMA syncworker TO PUBLIC")

    upgraded = cli("migrate", "--config", str(config))
    assert upgraded.returncode == 0, upgraded.stderr
    assert re.search(r"migrations applied: 2(, \d+)*;", upgraded.stdout), upgraded.stdout

    def may_execute(role: str) -> bool:
        [(allowed,)] = query(
            database_url, "SELECT has_function_privilege(%s, %s, 'EXECUTE')", (role, TRIGGER_FN)
        )
        return bool(allowed)

    assert may_execute(legacy.name)
    assert may_execute(other.name) is public_usage
    with psycopg.connect(legacy.url, autocommit=True) as conn:
        assert len(conn.execute("SELECT * FROM syncworker.trigger('sync')").fetchall()) == 2


# -- 2. SQL composition -----------------------------------------------------------------

SQL_METHODS = frozenset({"execute", "executemany", "copy"})
PSYCOPG_SQL = frozenset({"SQL", "Composed", "Identifier", "Literal", "Placeholder"})
PASS_THROUGH = frozenset({"encode", "strip", "rstrip", "lstrip"})


class SqlAudit:
    """Finds SQL handed to psycopg that was built by string formatting.

    Flagged: an f-string with placeholders, `%` formatting, `+` with a part
    that is not a literal or a module constant, `str.format()`, also when
    reached through a local variable, a `self.<attr>`, `.encode()` or a
    function of the module that returns it; and psycopg.sql.SQL() or
    self._compose() given such text. Allowed: literals and module constants
    (and `+`, `.replace()` of them), psycopg.sql objects, self._compose(...),
    `.replace()` inserting rendered composables (`.as_string()`), and values
    that arrive as parameters or config (not built here).
    """

    def __init__(self, source: str, filename: str = "<source>") -> None:
        self.filename = filename
        self.tree = ast.parse(source, filename)
        self.findings: list[str] = []
        self.calls = 0
        self.module_values: dict[str, list[ast.expr]] = {}
        self.functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
        self.self_attrs: dict[str, list[ast.expr]] = {}
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self.functions[node.name] = node
            for name, value in _bindings(node):
                self.module_values.setdefault(name, []).append(value)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if (
                        isinstance(target, ast.Attribute)
                        and isinstance(target.value, ast.Name)
                        and target.value.id == "self"
                    ):
                        self.self_attrs.setdefault(target.attr, []).append(node.value)
        self._visit(self.tree, [])

    # -- walking ---------------------------------------------------------------------

    def _visit(self, node: ast.AST, stack: list[ast.FunctionDef | ast.AsyncFunctionDef]) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            stack = [*stack, node]
        if isinstance(node, ast.Call):
            self._check_call(node, stack)
        for child in ast.iter_child_nodes(node):
            self._visit(child, stack)

    def _check_call(self, call: ast.Call, stack: list[Any]) -> None:
        func = call.func
        if isinstance(func, ast.Attribute) and func.attr in SQL_METHODS:
            query = call.args[0] if call.args else _keyword(call, "query")
            if query is not None:
                self.calls += 1
                reason = self._unsafe(query, stack, 0)
                if reason:
                    self._report(call, f".{func.attr}() of {reason}")
        if _is_psycopg_sql(call, {"SQL"}) or self._is_compose(call, stack):
            text = call.args[0] if call.args else None
            if text is not None and not self._literal_or_parameter(text, stack):
                what = "sql.SQL()" if _is_psycopg_sql(call, {"SQL"}) else "_compose()"
                self._report(call, f"{what} of text that is not a literal or module constant")

    def _report(self, node: ast.AST, reason: str) -> None:
        self.findings.append(f"{self.filename}:{getattr(node, 'lineno', '?')}: {reason}")

    # -- judging ---------------------------------------------------------------------

    def _unsafe(self, node: ast.expr, stack: list[Any], depth: int) -> str | None:
        """Why this SQL is built unsafely, or None."""
        if depth > 10:
            return None
        if isinstance(node, ast.Constant):
            return None
        if isinstance(node, ast.JoinedStr):
            has_fields = any(isinstance(v, ast.FormattedValue) for v in node.values)
            return "an f-string" if has_fields else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            return None if self._literal(node.right, stack) else "a %-formatted string"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return None if self._literal(node, stack) else "a concatenation with non-literal parts"
        if isinstance(node, ast.IfExp):
            return self._unsafe(node.body, stack, depth + 1) or self._unsafe(
                node.orelse, stack, depth + 1
            )
        if isinstance(node, ast.Call):
            return self._unsafe_call(node, stack, depth)
        if isinstance(node, ast.Name):
            for value in self._values(node.id, stack):
                reason = self._unsafe(value, stack, depth + 1)
                if reason:
                    return f"{reason} (via {node.id!r})"
            return None
        if isinstance(node, ast.Attribute) and _is_self(node.value):
            for value in self.self_attrs.get(node.attr, []):
                reason = self._unsafe(value, [], depth + 1)
                if reason:
                    return f"{reason} (via self.{node.attr})"
        return None  # parameters, config values, other objects: not built here

    def _unsafe_call(self, call: ast.Call, stack: list[Any], depth: int) -> str | None:
        func = call.func
        if _is_psycopg_sql(call, PSYCOPG_SQL) or self._is_compose(call, stack):
            return None  # its text is checked where the call is visited
        if isinstance(func, ast.Attribute):
            if func.attr == "format":
                return None if _is_psycopg_sql(func.value, {"SQL"}) else "str.format()"
            if func.attr in PASS_THROUGH:
                return self._unsafe(func.value, stack, depth + 1)
            if func.attr == "as_string":
                return None  # a composable, rendered with its quoting
            if func.attr == "replace":
                inserted = call.args[1:2] or [_keyword(call, "new")]
                if not all(v is not None and self._rendered(v, stack) for v in inserted):
                    return "str.replace() inserting non-literal text"
                return self._unsafe(func.value, stack, depth + 1)
        if isinstance(func, ast.Name) and func.id in self.functions:
            fn = self.functions[func.id]
            for ret in ast.walk(fn):
                if isinstance(ret, ast.Return) and ret.value is not None:
                    reason = self._unsafe(ret.value, [fn], depth + 1)
                    if reason:
                        return f"{reason} (returned by {func.id}())"
        return None

    def _literal(self, node: ast.expr, stack: list[Any], depth: int = 0) -> bool:
        """Text fixed in the source: literals, module constants, + and .replace() of them."""
        if depth > 10:
            return False
        if isinstance(node, ast.Constant):
            return True
        if isinstance(node, ast.JoinedStr):
            return not any(isinstance(v, ast.FormattedValue) for v in node.values)
        if isinstance(node, ast.Tuple):
            return all(self._literal(e, stack, depth + 1) for e in node.elts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self._literal(node.left, stack, depth + 1) and self._literal(
                node.right, stack, depth + 1
            )
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "replace":
                return self._literal(node.func.value, stack, depth + 1) and all(
                    self._literal(a, stack, depth + 1) for a in node.args
                )
            if node.func.attr in PASS_THROUGH:
                return self._literal(node.func.value, stack, depth + 1)
        if isinstance(node, ast.Name):
            values = self._values(node.id, stack)
            return bool(values) and all(self._literal(v, stack, depth + 1) for v in values)
        return False

    def _literal_or_parameter(self, node: ast.expr, stack: list[Any]) -> bool:
        if isinstance(node, ast.Name) and stack and node.id in _parameters(stack[-1]):
            return True  # passed through (as in _compose(self, text)): callers are checked
        return self._literal(node, stack)

    def _rendered(self, node: ast.expr, stack: list[Any]) -> bool:
        """A literal, or a psycopg composable rendered with as_string()."""
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "as_string"
        ):
            return True
        if isinstance(node, ast.Name):
            values = self._values(node.id, stack)
            if values and all(self._rendered(v, stack) for v in values):
                return True
        return self._literal(node, stack)

    def _is_compose(self, call: ast.Call, stack: list[Any]) -> bool:
        """self._compose(...), or a local alias of it (q = self._compose)."""
        func = call.func
        if isinstance(func, ast.Attribute) and func.attr == "_compose" and _is_self(func.value):
            return True
        if isinstance(func, ast.Name):
            values = self._values(func.id, stack)
            return bool(values) and all(
                isinstance(v, ast.Attribute) and v.attr == "_compose" and _is_self(v.value)
                for v in values
            )
        return False

    def _values(self, name: str, stack: list[Any]) -> list[ast.expr]:
        """What `name` is assigned in the innermost function binding it, else the module.
        Empty for parameters and other bindings (loops, with, imports)."""
        for fn in reversed(stack):
            if name in _parameters(fn):
                return []
            values = [v for node in ast.walk(fn) for n, v in _bindings(node) if n == name]
            if values:
                return values
        return self.module_values.get(name, [])


def _bindings(node: ast.AST) -> list[tuple[str, ast.expr]]:
    if isinstance(node, ast.Assign):
        return [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and node.value is not None:
        return [(node.target.id, node.value)] if isinstance(node.target, ast.Name) else []
    return []


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    args = fn.args
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    return {a.arg for a in every if a is not None}


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _is_psycopg_sql(node: ast.expr, names: set[str] | frozenset[str]) -> bool:
    """sql.X(...) or psycopg.sql.X(...) for X in names."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return False
    owner = node.func.value
    from_sql = (isinstance(owner, ast.Name) and owner.id == "sql") or (
        isinstance(owner, ast.Attribute)
        and owner.attr == "sql"
        and isinstance(owner.value, ast.Name)
        and owner.value.id == "psycopg"
    )
    return from_sql and node.func.attr in names


# The one module that hands psycopg.sql.SQL() text it did not write itself:
# the statements of syncworker/db/sql/queries/, read from the package's own
# files (test_named_queries_* below check those).
COMPOSES_LOADED_SQL = "syncworker/db/queries.py"


def test_syncworker_sql_is_composed_not_formatted():
    findings: list[str] = []
    calls = 0
    files = sorted((REPO / "syncworker").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        name = str(path.relative_to(REPO))
        audit = SqlAudit(path.read_text(encoding="utf-8"), name)
        findings += [
            f
            for f in audit.findings
            if not (name == COMPOSES_LOADED_SQL and "sql.SQL() of text" in f)
        ]
        calls += audit.calls
    assert findings == []
    assert calls >= 20, f"the audit saw only {calls} execute/copy calls: is it still looking?"


# Statements live in syncworker/db/sql/queries/ and nowhere else in Python,
# but for these modules, which build theirs from what they are given.
DYNAMIC_SQL = {
    "syncworker/mirror_sql.py": "statements built per user table from its columns",
}
# A statement: a keyword and more after it, not a sentence (prose ends in a
# full stop: "NOTIFY payloads received."); or anything naming `{s}.`.
SQL_LITERAL = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|LISTEN|NOTIFY|UNLISTEN|DISCARD|CREATE|ALTER|DROP"
    r"|TRUNCATE|COPY|CALL|SET|RESET|BEGIN|COMMIT|ROLLBACK|GRANT|REVOKE|VACUUM|EXPLAIN)\s+\S"
    r"(?:.*[^.\s])?\s*$"
    r"|\{s\}\.",
    re.S,
)


def sql_literals(source: str) -> list[int]:
    """Lines of string constants that read as SQL statements, docstrings aside."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in docstrings:
            value = node.value
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            if isinstance(text, str) and SQL_LITERAL.search(text):
                found.append(node.lineno)
    return sorted(found)


def test_no_sql_statement_in_python_outside_the_db_package():
    found = []
    for path in sorted((REPO / "syncworker").rglob("*.py")):
        name = str(path.relative_to(REPO))
        if name.startswith("syncworker/db/") or name in DYNAMIC_SQL:
            continue
        found += [f"{name}:{line}" for line in sql_literals(path.read_text(encoding="utf-8"))]
    assert found == []


def test_the_sql_literal_check_sees_a_planted_statement():
    planted = 'conn.execute("SELECT 1")\nx = b"LISTEN c"\ny = "UPDATE {s}.runs SET a = 1"\n'
    assert sql_literals(planted) == [1, 2, 3]
    prose = '"""SELECT in a docstring."""\nx = "select the job"\ny = "NOTIFY payloads seen."\n'
    assert sql_literals(prose + 'z = {"INSERT", "DELETE"}\n') == []


def _query_files() -> list[Path]:
    return sorted((REPO / "syncworker/db/sql/queries").glob("*.sql"))


def test_named_queries_have_unique_names():
    names = [
        m.group(1)
        for path in _query_files()
        for m in re.finditer(r"^--\s*(?:name|fragment):\s*(\w+)", path.read_text("utf-8"), re.M)
    ]
    assert len(names) > 40
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_named_queries_are_each_used_and_only_known_ones_asked_for():
    from syncworker.db.queries import statements

    known = set(statements())
    code = "\n".join(p.read_text("utf-8") for p in sorted((REPO / "syncworker").rglob("*.py")))
    # Every lookup is q["name"] or session_query("name") with a literal name.
    asked = set(re.findall(r'(?:q\[|session_query\()"(\w+)"', code))
    assert sorted(known - asked) == [], "named queries nothing runs"
    assert sorted(asked - known) == [], "names asked for that no file defines"


PLANTED_BAD = {
    "f-string": ("conn.execute(f'SELECT * FROM {table}')", "of an f-string"),
    "percent": ("conn.execute('SELECT * FROM %s' % table)", "%-formatted"),
    "percent-tuple": ("conn.execute('SELECT %s FROM %s' % (col, table))", "%-formatted"),
    "concat": ("conn.execute('SELECT * FROM ' + table)", "concatenation"),
    "concat-const": ("conn.execute(PREFIX + table)", "concatenation"),
    "str-format": ("conn.execute('SELECT * FROM {}'.format(table))", "str.format()"),
    "executemany": (
        "cur.executemany(f'INSERT INTO {table} VALUES (%s)', rows)",
        ".executemany() of an f-string",
    ),
    "copy": ("cur.copy(f'COPY {table} FROM STDIN')", ".copy() of an f-string"),
    "keyword": ("conn.execute(query=f'SELECT {col}')", "f-string"),
    "encoded": ("conn.execute(f'SELECT {col}'.encode())", "f-string"),
    "local-variable": ("q = f'DELETE FROM {table}'\nconn.execute(q, ())", "via 'q'"),
    "conditional": ("conn.execute('SELECT 1' if ok else 'SELECT ' + col)", "concatenation"),
    "sql-of-fstring": ("conn.execute(sql.SQL(f'SELECT * FROM {table}'))", "sql.SQL() of text"),
    "psycopg-sql-of-concat": (
        "conn.execute(psycopg.sql.SQL('SELECT ' + col).format())",
        "sql.SQL() of text",
    ),
    "compose-of-concat": (
        "conn.execute(self._compose('SELECT * FROM {s}.runs WHERE ' + col))",
        "_compose() of text",
    ),
    "compose-alias": ("q = self._compose\nconn.execute(q(f'SELECT {col}'))", "_compose() of text"),
    "helper-function": ("conn.execute(build(table))", "returned by build()"),
    "module-constant": ("conn.execute(BAD)", "via 'BAD'"),
    "self-attribute": ("conn.execute(self.q_bad)", "via self.q_bad"),
    "replace-raw-text": ("conn.execute(TEMPLATE.replace('__T__', table))", "str.replace()"),
}

PLANTED_GOOD = {
    "literal": "conn.execute('SELECT 1')",
    "bytes": "conn.execute(b'SELECT 1')",
    "params": "conn.execute('SELECT * FROM t WHERE a = %s AND b = %(b)s', (x,))",
    "constant": "conn.execute(PREFIX)",
    "constant-concat": "conn.execute(PREFIX + ' WHERE true')",
    "sql-format": "conn.execute(sql.SQL('LISTEN {}').format(sql.Identifier(channel)))",
    "psycopg-sql": "conn.execute(psycopg.sql.SQL('SELECT {}').format(psycopg.sql.Literal(x)))",
    "composed": "conn.execute(sql.Composed([sql.SQL('SELECT '), sql.Literal(x)]))",
    "compose": "conn.execute(self._compose('SELECT * FROM {s}.runs WHERE id = %s'), (x,))",
    "compose-const": "conn.execute(self._compose('SELECT ' + PREFIX + ' FROM {s}.runs'))",
    "q-attribute": "conn.execute(self.q_good, (x,))",
    "parameter": "conn.execute(query.encode(), params)",
    "helper-composes": "conn.execute(good(table))",
    "rendered-replace": (
        "text = TEMPLATE.replace('__T__', sql.Identifier(t).as_string(conn))\n"
        "conn.execute(text.encode())"
    ),
    "other-copy": "d = settings.copy()",
}

PLANTED_MODULE = """
import psycopg
from psycopg import sql

PREFIX = "SELECT a, b"
TEMPLATE = "SELECT * FROM __T__"
BAD = f"SELECT * FROM {PREFIX}"


def build(table):
    return f"SELECT * FROM {table}"


def good(table):
    return sql.SQL("SELECT * FROM {}").format(sql.Identifier(table))


class Store:
    def __init__(self, schema):
        self.q_good = self._compose("SELECT * FROM {s}.runs")
        self.q_bad = "SELECT * FROM " + schema

    def _compose(self, text):
        return sql.SQL(text).format(s=sql.Identifier("x"))

    def run(self, conn, cur, query, params, table, col, rows, x, ok, channel, t, settings):
        CALL
"""


def audit_planted(call: str) -> list[str]:
    body = textwrap.indent(call, " " * 8)
    return SqlAudit(PLANTED_MODULE.replace("        CALL", body), "planted.py").findings


def test_sql_audit_passes_the_planted_module_without_a_bad_call():
    assert audit_planted("pass") == []


@pytest.mark.parametrize(("call", "reason"), PLANTED_BAD.values(), ids=PLANTED_BAD.keys())
def test_sql_audit_catches_a_planted_bad_call(call: str, reason: str):
    findings = audit_planted(call)
    assert len(findings) == 1, f"{call}: {findings}"
    assert findings[0].startswith("planted.py:2")
    assert reason in findings[0]


@pytest.mark.parametrize("call", PLANTED_GOOD.values(), ids=PLANTED_GOOD.keys())
def test_sql_audit_accepts_composed_sql(call: str):
    assert audit_planted(call) == []


MIXED_CASE = {"schema": "Sync_Audit", "channel": "Sync_Now", "events_channel": "Sync_Events"}


def test_mixed_case_schema_and_channels_are_quoted_identifiers(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, JOBS, **MIXED_CASE)
    daemon = start(config)
    names = query(
        database_url,
        "SELECT nspname FROM pg_namespace WHERE lower(nspname) = 'sync_audit'",
    )
    assert names == [("Sync_Audit",)]
    tables = query(
        database_url,
        "SELECT relname FROM pg_class WHERE relnamespace = '\"Sync_Audit\"'::regnamespace"
        " AND relkind = 'r' ORDER BY relname",
    )
    assert tables == [
        ("actions",),
        ("cancels",),
        ("jobs",),
        ("migrations",),
        ("pauses",),
        ("payload_grants",),
        ("run_steps",),
        ("runs",),
        ("workers",),
    ]
    views = query(
        database_url,
        "SELECT relname FROM pg_class WHERE relnamespace = '\"Sync_Audit\"'::regnamespace"
        " AND relkind = 'v'",
    )
    assert views == [("run_payloads",)]

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute('LISTEN "Sync_Events"')
        # Unquoted, the channel folds to sync_now, which nobody listens to; it is
        # sent first, so had it been heard it would be received first.
        conn.execute("NOTIFY Sync_Now, 'solo'")
        conn.execute("""NOTIFY "Sync_Now", 'solo'""")
        run = daemon.wait_for("run_succeeded", job="solo")
        assert len(daemon.events("trigger_received")) == 1
        events = [json.loads(n.payload) for n in conn.notifies(timeout=10, stop_after=2)]
        assert [(e["event"], e["run_id"]) for e in events] == [
            ("run_started", run["run_id"]),
            ("run_succeeded", run["run_id"]),
        ]
        rows = conn.execute("SELECT * FROM \"Sync_Audit\".trigger('solo')").fetchall()
        assert len(rows) == 1
    done = cli("trigger", "solo", "--wait", "--json", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert [r["status"] for r in json.loads(done.stdout)["runs"]] == ["succeeded"]
    assert daemon.stop() == 0


HOSTILE = [
    ("schema", "x; DROP TABLE test_log"),
    ("schema", "Weird Schema"),
    ("schema", 'syncworker"; DROP TABLE test_log; --'),
    ("schema", "sync-worker"),
    ("schema", ""),
    ("channel", "sync_trigger; DROP TABLE test_log"),
    ("channel", "sync trigger"),
    ("events_channel", "ev'); DROP TABLE test_log; --"),
]


@pytest.mark.parametrize(("key", "value"), HOSTILE, ids=[f"{k}={v}" for k, v in HOSTILE])
def test_hostile_identifiers_are_refused_as_config_errors(database_url, tmp_path, key, value):
    config = write_config(tmp_path / "c.toml", database_url, JOBS, **{key: value})
    refused = cli("migrate", "--config", str(config))
    assert refused.returncode == 78, refused.stdout + refused.stderr
    assert f": {key}: " in refused.stderr
    assert "Traceback" not in refused.stderr
    from_env = cli(
        "migrate",
        "--config",
        str(write_config(tmp_path / "ok.toml", database_url, JOBS)),
        env={f"SYNCWORKER_{key.upper()}": value},
    )
    assert from_env.returncode == 78, from_env.stdout + from_env.stderr
    assert f"SYNCWORKER_{key.upper()}: {key}: " in from_env.stderr
    schemas = query(
        database_url, "SELECT nspname FROM pg_namespace WHERE nspname !~ '^(pg_|information_)'"
    )
    assert schemas == [("public",)]  # nothing was created, nothing dropped:
    assert query(database_url, "SELECT count(*) FROM test_log") == [(0,)]


def test_every_schema_name_the_config_accepts_works(database_url, tmp_path):
    for length in (58, 59, 63):
        schema = "s" * length
        config = write_config(tmp_path / f"c{length}.toml", database_url, JOBS, schema=schema)
        migrated = cli("migrate", "--config", str(config))
        if migrated.returncode == 78:  # refused with a reason: fine too
            assert ": schema: " in migrated.stderr
            continue
        assert migrated.returncode == 0, migrated.stderr
        triggered = cli("trigger", "solo", "--config", str(config))
        assert triggered.returncode == 0, f"schema of {length} chars: {triggered.stderr}"


def test_only_the_worker_names_a_cron_fire(deployment: Deployment):
    """scheduled_for takes a cron fire's one slot: an app passing a future
    fire's time would have the real fire refused (migration 3)."""
    forged = "SELECT * FROM syncworker.trigger('solo', scheduled_for => '2031-01-01 00:00Z')"
    with psycopg.connect(deployment.app.url, autocommit=True) as app:
        refuse(app, forged, match="reserved for the worker's cron fires")
    with psycopg.connect(deployment.worker.url, autocommit=True) as worker:
        [(fire_run, created)] = worker.execute(forged.encode()).fetchall()
        assert created
    # An app's trigger still joins the pending run of a real fire.
    with psycopg.connect(deployment.app.url, autocommit=True) as app:
        [(joined, created)] = app.execute("SELECT * FROM syncworker.trigger('solo')").fetchall()
    assert (joined, created) == (fire_run, False)
    assert query(
        deployment.worker.url,
        "SELECT triggers, scheduled_for = '2031-01-01 00:00Z' FROM syncworker.runs WHERE id = %s",
        (fire_run,),
    ) == [(2, True)]


# -- 3. secrets ---------------------------------------------------------------------------


def hidden(password: str, text: str) -> bool:
    """True if the password is nowhere in text, also across wrapped or boxed lines."""
    flat = re.sub(r"[^A-Za-z0-9-]", "", text)
    return password not in text and password not in flat


@dataclass(frozen=True)
class Secret:
    role: Role
    host: str
    port: str
    dbname: str

    @property
    def password(self) -> str:
        return self.role.password

    def url(self, dbname: str | None = None, port: str | int | None = None) -> str:
        return (
            f"postgresql://{self.role.name}:{self.password}"
            f"@{self.host}:{port or self.port}/{dbname or self.dbname}"
        )

    def keywords(self, dbname: str | None = None, port: str | int | None = None) -> str:
        return (
            f"host={self.host} port={port or self.port} dbname={dbname or self.dbname}"
            f" user={self.role.name} password={self.password}"
        )


@pytest.fixture
def secret(roles: Roles) -> Secret:
    role = roles.create("secret", password=f"s3cr3t-{secrets.token_hex(8)}")
    roles.admin(
        sql.SQL(
            "GRANT CONNECT, CREATE ON DATABASE {db} TO {r};"
            " GRANT INSERT ON test_log TO {r}; GRANT USAGE ON SEQUENCE test_log_id_seq TO {r}"
        ).format(db=sql.Identifier(roles.dbname), r=sql.Identifier(role.name))
    )
    info = roles.info
    return Secret(role, str(info["host"]), str(info["port"]), roles.dbname)


def run_all(*calls: tuple[str, ...], env: dict[str, str] | None = None) -> list[Any]:
    """Several CLI invocations at once (each is a process of its own)."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda args: cli(*args, env=env), calls))


@pytest.mark.parametrize("form", ["url", "keywords"])
def test_password_never_reaches_output(secret: Secret, tmp_path: Path, start, form: str):
    dsn = secret.url() if form == "url" else secret.keywords()
    config = write_config(tmp_path / "c.toml", dsn, JOBS)
    bare = tmp_path / "bare.toml"  # no database_url: it comes from the environment
    bare.write_text(JOBS)

    def shown(result: subprocess.CompletedProcess[str], what: str) -> None:
        text = result.stdout + result.stderr
        assert hidden(secret.password, text), f"{what} printed the password:\n{text}"

    migrated = cli("migrate", "--config", str(config))
    assert migrated.returncode == 0, migrated.stderr
    shown(migrated, "migrate")
    checked = cli("check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    shown(checked, "check")
    triggered = cli("trigger", "sync", "--database-url", dsn)
    assert triggered.returncode == 0, triggered.stderr
    shown(triggered, "trigger")

    daemon = start(config)
    waited = cli(
        "trigger", "solo", "--wait", "--json", "--config", str(bare), env={"DATABASE_URL": dsn}
    )
    assert waited.returncode == 0, waited.stderr
    shown(waited, "trigger --wait")
    wait_until(lambda: len(daemon.events("run_succeeded")) == 3, what="three runs succeeded")
    status = cli("status", "--config", str(bare), "--database-url", dsn)
    assert status.returncode == 0, status.stderr
    assert "RECENT RUNS" in status.stdout
    shown(status, "status")
    status = cli("status", "--json", "--config", str(bare), env={"SYNCWORKER_DATABASE_URL": dsn})
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["runs"][0]["triggered_by"] == secret.role.name
    shown(status, "status --json")
    assert daemon.stop() == 0
    assert hidden(secret.password, daemon.log_text()), daemon.log_text()
    assert daemon.events("worker_stopped")


@pytest.mark.parametrize("form", ["url", "keywords"])
def test_password_never_reaches_output_when_the_database_fails(
    secret: Secret, tmp_path: Path, start, form: str
):
    build = secret.url if form == "url" else secret.keywords
    missing = build(dbname=f"sw_missing_{secrets.token_hex(4)}")
    closed = build(port=free_port())
    daemons: list[Daemon] = [
        start(write_config(tmp_path / f"d{i}.toml", dsn, JOBS), None, False)
        for i, dsn in enumerate((missing, closed))
    ]
    bare = str(write_config(tmp_path / "bare.toml", "", JOBS))
    results = run_all(
        *[
            (*command, "--config", bare, "--database-url", dsn)
            for dsn in (missing, closed)
            for command in [
                ("check",),
                ("migrate",),
                ("status",),
                ("status", "--json"),
                ("trigger", "sync", "--wait"),
            ]
        ]
    )
    for result in results:
        text = result.stdout + result.stderr
        # A database that does not exist is a config error (the server says
        # so); a closed port is an outage.
        refused = missing in result.args
        assert result.returncode == (78 if refused else 69), f"{result.args}: {text}"
        said = "the server refused it" if refused else "cannot reach the database"
        assert said in result.stderr, f"{result.args}: {text}"
        assert hidden(secret.password, text), f"{result.args} printed the password:\n{text}"
    refused_daemon, outage_daemon = daemons
    assert refused_daemon.wait_exit(60) == 78
    outage_daemon.wait_for("db_disconnected", timeout=60)
    outage_daemon.signal(signal.SIGTERM)
    assert outage_daemon.wait_exit(60) == 0
    assert outage_daemon.events("worker_stopped")
    for daemon in daemons:
        assert hidden(secret.password, daemon.log_text()), daemon.log_text()


MALFORMED = "postgresql://{user}:{password}@[::1/{db}"  # unterminated IPv6 host


def test_malformed_url_is_a_config_error_without_the_password(secret: Secret, tmp_path: Path):
    dsn = MALFORMED.format(user=secret.role.name, password=secret.password, db=secret.dbname)
    config = write_config(tmp_path / "c.toml", dsn, JOBS)
    for result in run_all(
        ("check", "--config", str(config)),
        ("migrate", "--config", str(config)),
        ("status", "--database-url", dsn),
        ("trigger", "sync", "--database-url", dsn),
    ):
        text = result.stdout + result.stderr
        assert hidden(secret.password, text), f"{result.args} printed the password:\n{text}"
        assert result.returncode == 78, f"{result.args}: {text}"
        assert "database_url" in result.stderr


def test_daemon_with_malformed_url_exits_78_without_the_password(
    secret: Secret, tmp_path: Path, start
):
    dsn = MALFORMED.format(user=secret.role.name, password=secret.password, db=secret.dbname)
    daemon = start(write_config(tmp_path / "c.toml", dsn, JOBS), None, False)
    wait_until(
        lambda: daemon.proc.poll() is not None or "error connecting" in daemon.log_text(),
        what="the daemon to exit or to fail connecting",
    )
    assert hidden(secret.password, daemon.log_text()), daemon.log_text()
    assert daemon.wait_exit(30) == 78
