"""What every scenario shares: the PostgreSQL server, a fresh database per
scenario, worker processes of both systems, the probe that steps stamp their
start into, and the statistics."""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


@dataclass
class Config:
    """Counts and durations of one bench run: the full one, or QUICK's smoke run."""

    quick: bool
    latency_n: int = 1000
    # Triggers after a long pause: the pool's connections have idled past
    # syncworker's CHECK_IDLE_AFTER, as on a worker that waits for hours.
    cold_latency_n: int = 20
    idle_seconds: float = 60.0
    cron_seconds: float = 45.0
    burst_n: int = 10_000
    burst_keys: int = 1000
    scale_runs: int = 1000
    failovers: int = 20

    @classmethod
    def make(cls, quick: bool) -> Config:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            latency_n=100,
            cold_latency_n=3,
            idle_seconds=8.0,
            cron_seconds=6.0,
            burst_n=1000,
            burst_keys=100,
            scale_runs=200,
            failovers=3,
        )


# -- the server ----------------------------------------------------------------


class Server:
    """$SYNCWORKER_BENCH_DATABASE_URL (its role needs CREATEDB), else a
    throwaway EmbeddedPostgres. Each scenario gets a database of its own, so
    one's leftovers never slow the next."""

    def __init__(self) -> None:
        self._embedded: Any = None
        external = os.environ.get("SYNCWORKER_BENCH_DATABASE_URL")
        if external:
            self.url = external
        else:
            from syncworker.embedded import EmbeddedPostgres

            self._embedded = EmbeddedPostgres().start()
            self.url = self._embedded.url

    def version(self) -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    def fresh(self, name: str) -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            ident = sql.Identifier(name)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
        return _with_dbname(self.url, name)

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.close()


def _with_dbname(url: str, name: str) -> str:
    if "://" in url:
        parts = urlsplit(url)
        return urlunsplit(parts._replace(path="/" + name))
    return psycopg.conninfo.make_conninfo(url, dbname=name)


# -- the probe -------------------------------------------------------------------


@dataclass(frozen=True)
class Stamp:
    tag: str
    ident: int
    ns: int
    pid: int


class Probe:
    """A FIFO that steps write one line to at their first line (bench/stamp.py):
    the step's own time.time_ns(), taken on the same clock as the bench's."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "probe.fifo"
        os.mkfifo(self.path)
        # O_RDWR: opening never blocks, and workers coming and going never
        # make the reader see end-of-file.
        self._fd = os.open(self.path, os.O_RDWR)
        self._queue: queue.Queue[Stamp] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._fd, 65536)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                tag, ident, ns, pid = line.decode().split()
                if tag == "quit":
                    return
                self._queue.put(Stamp(tag, int(ident), int(ns), int(pid)))

    def get(self, timeout: float = 30.0) -> Stamp:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no step started within {timeout} s") from None

    def drain(self) -> list[Stamp]:
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._queue.get_nowait())
        return out

    def close(self) -> None:
        os.write(self._fd, b"quit 0 0 0\n")
        self._thread.join(5)
        os.close(self._fd)


# -- worker processes ------------------------------------------------------------------


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SYNCWORKER_", "PROCRASTINATE_")) and k != "DATABASE_URL"
    }
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


class Process:
    """A worker subprocess whose stderr goes to a file, measured with psutil."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str], cwd: Path = REPO) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=_env(env), cwd=cwd
            )
        self.pid = self.proc.pid
        self.ps = psutil.Process(self.pid)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 60.0) -> None:
        wait_until(lambda: needle in self.log_text(), timeout, f"{needle!r} in {self.log}", self)

    def cpu_seconds(self) -> float:
        """CPU time of all the process's threads: from the scheduler's own
        nanosecond count where Linux has it (psutil's clock ticks are 10 ms,
        as much as a minute of an idle worker)."""
        total, tasks = 0, Path(f"/proc/{self.pid}/task")
        with contextlib.suppress(OSError):
            for task in tasks.iterdir():
                with contextlib.suppress(OSError):
                    total += int((task / "schedstat").read_text().split()[0])
        if total:
            return total / 1e9
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss_mb(self) -> float:
        return float(self.ps.memory_info().rss) / 1e6

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def syncworker_config(path: Path, url: str, jobs: str, **top: Any) -> Path:
    import json

    lines = [f"database_url = {json.dumps(url)}"]
    for key, value in top.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n\n" + jobs)
    return path


def start_syncworker(config: Path, log: Path, probe: Probe | None = None) -> Process:
    env = {"SYNCWORKER_LOG_FORMAT": "json"}
    # Another tree's syncworker (`run.py --syncworker-src`): before/after
    # numbers. Its directory is the cwd too: `python -m` looks there first.
    other = os.environ.get("BENCH_SYNCWORKER_SRC")
    if other:
        env["PYTHONPATH"] = os.pathsep.join([other, str(REPO)])
    if probe is not None:
        env["BENCH_PROBE"] = str(probe.path)
    return Process(
        [sys.executable, "-m", "syncworker", "run", "--config", str(config)],
        log,
        env,
        cwd=Path(other) if other else REPO,
    )


def start_syncworkers(
    n: int, config: Path, directory: Path, probe: Probe | None = None, tag: str = "sw"
) -> list[Process]:
    workers = [start_syncworker(config, directory / f"{tag}-{i}.log", probe) for i in range(n)]
    for w in workers:
        w.wait_log('"worker_started"')
    return workers


def start_procrastinate(
    url: str, log: Path, probe: Probe | None = None, periodic: int = 0, concurrency: int = 1
) -> Process:
    env = {"BENCH_PROC_DSN": url, "BENCH_PROC_PERIODIC": str(periodic)}
    if probe is not None:
        env["BENCH_PROBE"] = str(probe.path)
    return Process(
        [
            sys.executable,
            "-m",
            "procrastinate",
            "--app=bench.proc_app.app",
            "worker",
            f"--concurrency={concurrency}",
        ],
        log,
        env,
    )


def start_procrastinates(
    n: int,
    url: str,
    directory: Path,
    probe: Probe | None = None,
    periodic: int = 0,
    tag: str = "pc",
) -> list[Process]:
    workers = [
        start_procrastinate(url, directory / f"{tag}-{i}.log", probe, periodic) for i in range(n)
    ]
    wait_listening(url, "LISTEN%procrastinate%", n, workers)
    return workers


def wait_listening(url: str, pattern: str, n: int, workers: list[Process]) -> None:
    """Ready means listening: the listener's session shows LISTEN as its last query."""

    def listening() -> bool:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE %s",
                (pattern,),
            ).fetchone()
        return bool(row and row[0] >= n)

    wait_until(listening, 60.0, f"{n} listeners", *workers)


def stop_all(workers: list[Process]) -> None:
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    for w in workers:
        w.stop()


def wait_until(
    check: Callable[[], T], timeout: float, what: str, *watch: Process, every: float = 0.02
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        for w in watch:
            if w.proc.poll() is not None:
                raise RuntimeError(
                    f"worker {w.pid} exited ({w.proc.returncode}) before {what}:\n"
                    + w.log_text()[-3000:]
                )
        if time.monotonic() > deadline:
            tails = "".join(w.log_text()[-1500:] for w in watch)
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{tails}")
        time.sleep(every)


@contextlib.contextmanager
def workdir(name: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        yield Path(tmp)


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


# -- numbers -------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was measured, never interpolated."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p95": pct(values, 95),
        "p99": pct(values, 99),
        "max": max(values),
    }


@dataclass
class Row:
    """One line of the table: a metric for syncworker and, where the scenario
    ran on it too, for procrastinate; `ratio` is syncworker / procrastinate."""

    scenario: str
    metric: str
    unit: str
    syncworker: float | str | None
    procrastinate: float | str | None = None
    target: str = ""
    met: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        s, p = self.syncworker, self.procrastinate
        if isinstance(s, int | float) and isinstance(p, int | float) and p:
            return s / p
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "metric": self.metric,
            "unit": self.unit,
            "syncworker": self.syncworker,
            "procrastinate": self.procrastinate,
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
            "detail": self.detail,
        }
