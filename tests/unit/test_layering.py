"""The package's layers, held by reading its imports (ast, no import runs):

- `syncworker/db/` never imports the daemon, the CLI or the HTTP server
  (http.py and what it serves, web/);
- no daemon service imports another: they are wired in daemon/worker.py
  (the shared records lifecycle, catalog, slots and connsettings may be
  imported by any);
- pure modules never import psycopg (nor psycopg_pool).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "syncworker"

SERVICES = {
    "executor",
    "intake",
    "listener",
    "liveness",
    "maintenance",
    "pool",
    "reloader",
    "reservations",
    "scheduler",
    "startup",
}
SHARED = {"lifecycle", "catalog", "slots", "connsettings"}
PURE = {
    "config",
    "schedule",
    "triggers",
    "reload",
    "counters",
    "events",
    "daemon/slots",
    "daemon/catalog",
    "daemon/lifecycle",
    "daemon/connsettings",
    "db/sqlfile",
}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute, whether at the top or inside
    a function (a late import is an import all the same)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def module(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").as_posix()


def test_every_daemon_module_is_placed() -> None:
    names = {p.stem for p in (PACKAGE / "daemon").glob("*.py")} - {"__init__", "worker"}
    assert names == SERVICES | SHARED, "a new daemon module: say whether it is a service"


def test_no_service_imports_another() -> None:
    for name in sorted(SERVICES | SHARED):
        path = PACKAGE / "daemon" / f"{name}.py"
        others = {f"syncworker.daemon.{s}" for s in SERVICES if s != name}
        if name in SHARED:  # a shared record imports no service at all
            others |= {f"syncworker.daemon.{s}" for s in SERVICES} | {"syncworker.daemon.worker"}
        bad = imports(path) & (others | {"syncworker.daemon.worker"})
        assert not bad, f"daemon/{name}.py imports {sorted(bad)}: pass it in from worker.py"


def test_db_imports_nothing_above_it() -> None:
    above = (
        "syncworker.daemon",
        "syncworker.cli",
        "syncworker.http",
        "syncworker.web",
        "syncworker.worker",
    )
    for path in sorted((PACKAGE / "db").rglob("*.py")) if (PACKAGE / "db").exists() else []:
        bad = {m for m in imports(path) if m.startswith(above)}
        assert not bad, f"{module(path)} imports {sorted(bad)}"


def test_pure_modules_do_no_database_io() -> None:
    for name in sorted(PURE):
        bad = {m for m in imports(PACKAGE / f"{name}.py") if m.split(".")[0].startswith("psycopg")}
        assert not bad, f"{name}.py is pure but imports {sorted(bad)}"


def test_the_rule_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from syncworker.daemon.executor import Executor\n")
    assert "syncworker.daemon.executor" in imports(bad)
