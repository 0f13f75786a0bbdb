"""A real PgBouncer (Debian package `pgbouncer`, installed by `make test`)
in front of the test server, in transaction pooling mode by default."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from syncworker.embedded import free_port

BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class PgBouncer:
    def __init__(self, database_url: str, pool_mode: str = "transaction") -> None:
        if not os.path.exists(BINARY):
            raise AssertionError(
                f"{BINARY} is missing: `apt-get install pgbouncer` (make test does)"
            )
        info = conninfo_to_dict(database_url)
        self.server_url = database_url
        self.port = free_port()
        # PgBouncer will not run as root: as root it runs as `postgres`, in a
        # directory that user owns.
        self.dir = Path(tempfile.mkdtemp(prefix="sw-pgbouncer-"))
        user = str(info.get("user") or "postgres")
        (self.dir / "users.txt").write_text(f'"{user}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={info.get('host', '127.0.0.1')} port={info.get('port', 5432)}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir}/users.txt\n"
            f"pool_mode = {pool_mode}\n"
            f"logfile = {self.dir}/pgbouncer.log\n"
            f"pidfile = {self.dir}/pgbouncer.pid\n"
            "max_client_conn = 500\n"
            "default_pool_size = 20\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
        )
        argv = [BINARY, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, owner.pw_uid, owner.pw_gid)
            argv[1:1] = ["-u", "postgres"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = make_conninfo(**{**info, "host": "127.0.0.1", "port": str(self.port)})
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"pgbouncer did not start: {self.log()}") from None
                time.sleep(0.1)

    def log(self) -> str:
        path = self.dir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
