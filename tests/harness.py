"""Running real `syncworker run` processes and reading what users see."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg

T = TypeVar("T")
JOBS_DIR = Path(__file__).parent / "jobs"
REPO = Path(__file__).parent.parent


def wait_until(check: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncworker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_base_env(), **(env or {})},
        check=False,
    )


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCWORKER_")}
    env.pop("DATABASE_URL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(JOBS_DIR), str(REPO)])
    env["SYNCWORKER_LOG_FORMAT"] = "json"
    env["SYNCWORKER_LOG_LEVEL"] = "debug"
    return env


def write_config(path: Path, database_url: str, jobs_toml: str, **top: Any) -> Path:
    lines = [f"database_url = {json.dumps(database_url)}"]
    defaults = {"heartbeat_interval": 1, "drain_timeout": 30}
    for key, value in {**defaults, **top}.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n\n" + jobs_toml)
    return path


class Daemon:
    """A `syncworker run` subprocess whose JSON log lines are collected."""

    def __init__(
        self, config: Path, env: dict[str, str] | None = None, extra_args: list[str] | None = None
    ) -> None:
        self.config = config
        self.records: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "syncworker",
                "run",
                "--config",
                str(config),
                *(extra_args or []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**_base_env(), **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.raw.append(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    self.records.append(record)
                self._cond.notify_all()
        with self._cond:
            self._eof = True  # set under the lock: waiters see it with the notify
            self._cond.notify_all()

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.records if r.get("event") == name and _matches(r, match)]

    def wait_for(
        self, name: str, timeout: float = 30.0, count: int = 1, **match: Any
    ) -> dict[str, Any]:
        """Wait until `count` log events named `name` (matching fields) were seen."""

        def found(records: list[dict[str, Any]]) -> dict[str, Any] | None:
            hits = [r for r in records if r.get("event") == name and _matches(r, match)]
            return hits[count - 1] if len(hits) >= count else None

        return self.wait_records(found, timeout, f"{name} {match}")

    def wait_records(
        self, check: Callable[[list[dict[str, Any]]], T | None], timeout: float, what: str
    ) -> T:
        """Wait until `check(records)` returns something, woken by each new
        log line; fails at once if the daemon exits first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = check(self.records)
                if value is not None:
                    return value
                if self._eof:
                    raise AssertionError(
                        f"daemon exited ({self.proc.returncode}) before {what}:\n"
                        + "".join(self.raw[-30:])
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no {what} within {timeout}s; last lines:\n" + "".join(self.raw[-30:])
                    )
                self._cond.wait(remaining)

    def ready(self, timeout: float = 30.0) -> Daemon:
        self.wait_for("worker_started", timeout=timeout)
        return self

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                return self.wait_exit(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def log_text(self) -> str:
        with self._cond:
            return "".join(self.raw)


def _matches(record: dict[str, Any], match: dict[str, Any]) -> bool:
    return all(record.get(k) == v for k, v in match.items())


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql.encode(), params)
        return cur.fetchall() if cur.description else []


def execute(url: str, sql: str, params: Any = None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.encode(), params)


def release(url: str, name: str = "all") -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO test_release VALUES (%s) ON CONFLICT DO NOTHING", (name,))
        conn.execute("NOTIFY test_release")
