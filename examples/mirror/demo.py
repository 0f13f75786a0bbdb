"""The whole example in one command, on a throwaway PostgreSQL:

    .venv/bin/python examples/mirror/demo.py

It applies setup.sql, serves a copy of users.json with api_server.py, starts
`syncworker run` with this folder's config, and syncs twice: once from
scratch, then after changing the API's data. Each time it prints the runs'
counters, and at the end the change log. Set DATABASE_URL to use your own
database instead (the example's tables are created in it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import psycopg
from api_server import serve  # next to this file, so on sys.path when run as a script

HERE = Path(__file__).parent


def syncworker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncworker", *args], env=env, text=True, capture_output=True
    )


def sync_and_report(env: dict[str, str]) -> list[int]:
    done = syncworker("trigger", "org_users", "--wait", "--json", "--timeout", "120", env=env)
    if done.returncode != 0:
        raise SystemExit(f"sync failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    for run in json.loads(done.stdout)["runs"]:
        print(
            f"  run {run['id']} {run['scope']}: {run['status']}, +{run['records_inserted']}"
            f" ~{run['records_updated']} -{run['records_deleted']}"
            f" ({run['records_processed']} processed)"
        )
    return [run["id"] for run in json.loads(done.stdout)["runs"]]


def main() -> None:
    with ExitStack() as stack:
        url = os.environ.get("DATABASE_URL")
        if not url:
            from syncworker.embedded import EmbeddedPostgres

            url = stack.enter_context(EmbeddedPostgres()).url
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute((HERE / "setup.sql").read_bytes())

        data = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "users.json"
        shutil.copy(HERE / "users.json", data)
        api = serve(data, port=0)
        stack.callback(api.shutdown)

        env = {
            **os.environ,
            "SYNCWORKER_DATABASE_URL": url,
            "SYNCWORKER_LOG_FORMAT": "json",
            "EXAMPLE_API_URL": f"http://127.0.0.1:{api.server_address[1]}",
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent.parent)]),
        }
        config = str(HERE / "syncworker.toml")
        env["SYNCWORKER_CONFIG"] = config
        migrated = syncworker("migrate", "--config", config, env=env)
        if migrated.returncode != 0:  # registers the job, so triggers work from now on
            raise SystemExit(migrated.stderr)
        worker = subprocess.Popen(
            [sys.executable, "-m", "syncworker", "run", "--config", config],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(worker.wait, 60)
        stack.callback(worker.terminate)

        print("first sync (empty tables):")
        sync_and_report(env)

        users = json.loads(data.read_text())
        users["RIO"][1]["role"] = "admin"  # changed
        del users["RIO"][3]  # gone
        users["RIO"].append({"id": 6, "name": "Fábio Nunes", "email": None, "role": "member"})
        data.write_text(json.dumps(users))
        print("second sync (RIO: one user changed, one gone, one new):")
        second = sync_and_report(env)

        with psycopg.connect(url) as conn:
            print("change log of the second sync (scope, kind, key, old role, new role):")
            for row in conn.execute(
                "SELECT scope, kind, key, old ->> 'role', new ->> 'role' FROM org_users.changes"
                " WHERE run_id = ANY(%s) ORDER BY id",
                (second,),
            ):
                print("  ", *row)


if __name__ == "__main__":
    main()
