"""The shipped ecosystem.config.js under a real PM2 (installed once with npm
into .cache/node): stop drains with the step commands left to the worker,
logs land in PM2's out log, exit 78 stays stopped, any other exit restarts."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import REPO, cli, query, wait_until, write_config

# Pinned: the checks below read PM2's own status names and log files.
NODE_PACKAGES = ("pm2@7.0.4", "pg@8.16.3")
NODE_DIR = REPO / ".cache" / "node"
PM2_BIN = NODE_DIR / "node_modules" / ".bin" / "pm2"


def install_node_packages() -> Path:
    """npm-install the pinned packages into .cache/node once (a lock keeps
    concurrent sessions from installing over each other)."""
    npm = shutil.which("npm")
    assert npm, "npm is needed for the PM2 and Node tests (Debian: apt-get install npm)"
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    stamp = NODE_DIR / ("installed-" + "-".join(NODE_PACKAGES).replace("/", "_"))
    with open(NODE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            # Its own package.json, so npm installs here and not in a parent.
            manifest = NODE_DIR / "package.json"
            if not manifest.exists():
                manifest.write_text('{"name": "syncworker-test-node", "private": true}\n')
            subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--no-save", *NODE_PACKAGES],
                cwd=NODE_DIR,
                check=True,
                capture_output=True,
                timeout=600,
            )
            stamp.touch()
    return NODE_DIR


class PM2:
    """One private PM2 daemon (its own PM2_HOME), killed at the end."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "PM2"))}
        self.env.pop("DATABASE_URL", None)
        self.env["PM2_HOME"] = str(home)

    def __call__(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(PM2_BIN), *args],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def app(self) -> dict[str, Any]:
        listed = self("jlist")
        assert listed.returncode == 0, listed.stderr
        (app,) = json.loads(listed.stdout)
        env = app["pm2_env"]
        return {
            "status": env["status"],
            "restarts": env["restart_time"],
            "exit_code": env.get("exit_code"),
            "pid": app["pid"],
        }

    def out_log(self) -> list[str]:
        path = self.home / "logs" / "syncworker-out.log"
        return path.read_text().splitlines() if path.exists() else []

    def error_log(self) -> list[str]:
        path = self.home / "logs" / "syncworker-error.log"
        return path.read_text().splitlines() if path.exists() else []

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out_log() if line.startswith("{")]


@pytest.fixture(scope="session")
def node_packages() -> Path:
    return install_node_packages()


@pytest.fixture
def pm2(node_packages: Path, tmp_path: Path) -> Iterator[PM2]:
    daemon = PM2(tmp_path / "pm2home")
    try:
        yield daemon
    finally:
        daemon("kill")


def app_dir(tmp_path: Path, database_url: str, jobs: str, **top: Any) -> Path:
    """A deploy directory as the README lays it out: the ecosystem file, the
    venv and syncworker.toml side by side."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(REPO / "ecosystem.config.js", app)
    (app / ".venv").symlink_to(REPO / ".venv")
    write_config(app / "syncworker.toml", database_url, jobs, **top)
    return app


TRAPS_TERM = """
[jobs.trapper]
steps = [{ command = ["sh", "-c", "trap 'echo trapped; exit 0' TERM; echo started; sleep 60 & wait"] }]
"""


def test_pm2_stop_leaves_step_commands_to_the_worker_and_logs_to_stdout(
    pm2: PM2, database_url: str, tmp_path: Path
) -> None:
    app = app_dir(tmp_path, database_url, TRAPS_TERM)
    started = pm2("start", "ecosystem.config.js", cwd=app)
    assert started.returncode == 0, started.stdout + started.stderr
    wait_until(
        lambda: any(e["event"] == "worker_started" for e in pm2.events()),
        what="worker_started in PM2's out log",
    )
    made = cli("trigger", "trapper", "--database-url", database_url)
    assert made.returncode == 0, made.stderr
    wait_until(
        lambda: any(e.get("line") == "started" for e in pm2.events()), what="the step under way"
    )

    stopped = pm2("stop", "syncworker")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    wait_until(lambda: pm2.app()["status"] == "stopped", what="PM2 to report stopped")
    # The step got the worker's SIGTERM, not PM2's tree-wide SIGINT: its trap ran.
    assert any(e.get("line") == "trapped" for e in pm2.events()), pm2.out_log()
    events = [e["event"] for e in pm2.events()]
    assert events.index("drain_started") < events.index("worker_stopped")
    assert query(database_url, "SELECT status FROM syncworker.runs") == [("pending",)]
    # Every log line went to stdout: PM2's error log has nothing.
    assert pm2.error_log() == []
    assert pm2.app()["restarts"] == 0


def test_pm2_keeps_a_config_error_stopped_with_the_reason_in_its_logs(
    pm2: PM2, tmp_path: Path, database_url: str
) -> None:
    app = app_dir(tmp_path, database_url, '[jobs.x]\nsteps = ["a:b"]\nschedule = "every day"\n')
    assert pm2("start", "ecosystem.config.js", cwd=app).returncode == 0
    wait_until(lambda: pm2.app()["exit_code"] == 78, what="exit 78")
    # Not "waiting restart": stopped, and it stays so.
    assert pm2.app()["status"] == "stopped"
    shown = pm2("logs", "syncworker", "--nostream", "--lines", "20")
    assert "config error" in shown.stdout and "jobs.x.schedule" in shown.stdout, shown.stdout
    assert pm2.app() == {"status": "stopped", "restarts": 0, "exit_code": 78, "pid": 0}


def test_pm2_restarts_a_worker_that_exited_without_being_asked(
    pm2: PM2, tmp_path: Path, database_url: str
) -> None:
    app = app_dir(tmp_path, database_url, '[jobs.x]\nsteps = ["sw_testjobs:record"]\n')
    # PM2 passes its caller's environment to the app, as the README says.
    pm2.env["PYTHONPATH"] = str(REPO / "tests" / "jobs")
    assert pm2("start", "ecosystem.config.js", cwd=app).returncode == 0
    first = wait_until(lambda: pm2.app()["pid"], what="a worker pid")
    wait_until(
        lambda: any(e["event"] == "worker_started" for e in pm2.events()), what="worker_started"
    )
    # A signal from outside PM2 (as a step ending the process would be): the
    # worker drains and exits 0, and PM2 starts it again.
    os.kill(first, signal.SIGTERM)
    wait_until(
        lambda: (a := pm2.app())["restarts"] == 1 and a["status"] == "online" and a["pid"] != first,
        what="PM2 to restart the worker",
    )
    wait_until(
        lambda: sum(e["event"] == "worker_started" for e in pm2.events()) == 2,
        what="the second worker to start",
    )
