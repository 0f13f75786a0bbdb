"""sd_notify over $NOTIFY_SOCKET and the watchdog interval; the shipped
systemd units and PM2 process file against the daemon's defaults."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncworker.config import Settings
from syncworker.systemd import notify, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def test_notify_without_socket_returns_false() -> None:
    assert notify("READY=1", environ={}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


def test_notify_without_socket_in_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_notify_delivers_the_exact_message(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    assert notify("READY=1", environ={"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1"


def test_notify_multiline_message_is_one_datagram(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    message = "READY=1\nSTATUS=listening on sync_trigger"
    assert notify(message, environ={"NOTIFY_SOCKET": path}) is True
    assert notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == message.encode()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_uses_process_environment(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("STOPPING=1") is True
    assert sock.recv(4096) == b"STOPPING=1"


def test_notify_abstract_namespace_socket() -> None:
    name = f"syncworker-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"


def test_notify_to_missing_socket_returns_false(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone.sock")
    assert notify("READY=1", environ={"NOTIFY_SOCKET": missing}) is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0


def test_watchdog_interval_for_this_pid() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 1.0


def test_watchdog_interval_for_another_pid_is_none() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert watchdog_interval(env) is None


@pytest.mark.parametrize("env", [{}, {"WATCHDOG_USEC": ""}, {"WATCHDOG_USEC": "soon"}])
def test_watchdog_interval_off(env: dict[str, str]) -> None:
    assert watchdog_interval(env) is None


def test_watchdog_interval_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 2.0


# --- the shipped units and PM2 file ------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "syncworker.service"
TEMPLATE = ROOT / "systemd" / "syncworker@.service"
ECOSYSTEM = ROOT / "ecosystem.config.js"
VENV_SYNCWORKER = ROOT / ".venv" / "bin" / "syncworker"
INSTALLED_SYNCWORKER = "/opt/syncworker/.venv/bin/syncworker"
DRAIN_TIMEOUT = float(Settings.model_fields["drain_timeout"].default)

# What systemd prints when it drops or distrusts part of a unit. Its parser
# never fails on these: `verify` still exits 0, so only the output tells.
VERIFY_COMPLAINTS = re.compile(
    r"unknown key|unknown section|unknown lvalue|invalid|failed to|ignoring"
    r"|not executable|no such file|deprecated|obsolete|missing|bad ",
    re.IGNORECASE,
)


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file; every key keeps all its values, in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}:{lineno}: continuation lines not expected"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}:{lineno}: key before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{lineno}: not KEY=value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service_value(unit: dict[str, dict[str, list[str]]], key: str) -> str:
    values = unit["Service"].get(key)
    assert values, f"[Service] {key}= is not set"
    return values[-1]  # the last assignment wins in systemd


_TIME_UNITS = {
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "ms": 1e-3,
    "msec": 1e-3,
    "us": 1e-6,
    "usec": 1e-6,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
}


def timespan(value: str) -> float:
    """A systemd time span ("330", "5min 30s", "infinity") in seconds."""
    if value == "infinity":
        return float("inf")
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    assert re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*[a-z]*)+\s*", value), f"not a time span: {value!r}"
    return sum(float(n) * _TIME_UNITS[u] for n, u in parts)


def test_timespan_parser() -> None:
    assert timespan("330") == 330
    assert timespan("5min 30s") == 330
    assert timespan("5min30s") == 330
    assert timespan("500ms") == 0.5
    assert timespan("infinity") == float("inf")


UNITS = pytest.mark.parametrize("unit_path", [UNIT, TEMPLATE], ids=lambda p: p.name)


@UNITS
def test_unit_stops_after_the_default_drain(unit_path: Path) -> None:
    unit = parse_unit(unit_path)
    stop = timespan(service_value(unit, "TimeoutStopSec"))
    # Some seconds on top of the drain to put cancelled runs back to pending.
    assert stop > DRAIN_TIMEOUT, (stop, DRAIN_TIMEOUT)
    assert stop != float("inf")


@UNITS
def test_unit_service_semantics(unit_path: Path) -> None:
    unit = parse_unit(unit_path)
    assert service_value(unit, "Type") == "notify"
    assert service_value(unit, "NotifyAccess") == "main"
    assert service_value(unit, "KillMode") == "mixed"
    assert service_value(unit, "KillSignal") in ("SIGTERM", "TERM", "15")
    # Any exit but a config error is restarted, a step's sys.exit(0) included.
    assert service_value(unit, "Restart") == "always"
    prevent = " ".join(unit["Service"].get("RestartPreventExitStatus", [])).split()
    assert "78" in prevent, prevent
    watchdog = timespan(service_value(unit, "WatchdogSec"))
    assert 0 < watchdog < float("inf")
    assert service_value(unit, "User") == "syncworker"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service_value(unit, key) == "yes", key
    assert service_value(unit, "ProtectSystem") == "strict"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_template_selects_per_instance_files() -> None:
    unit = parse_unit(TEMPLATE)
    exec_start = service_value(unit, "ExecStart").split()
    assert exec_start[:2] == [INSTALLED_SYNCWORKER, "run"]
    assert exec_start[exec_start.index("--config") + 1] == "/etc/syncworker/%i.toml"
    # Optional ("-"): an instance may carry everything in its TOML file.
    assert unit["Service"]["EnvironmentFile"] == ["-/etc/syncworker/%i.env"]


def test_template_matches_the_single_unit() -> None:
    """Same semantics and hardening; only what names the instance differs."""
    single = parse_unit(UNIT)
    template = parse_unit(TEMPLATE)
    per_instance = {"ExecStart", "EnvironmentFile", "SyslogIdentifier"}
    assert set(template) == set(single)
    for section in single:
        if section == "Unit":
            continue  # Description= names the instance
        mine = {k: v for k, v in template[section].items() if k not in per_instance}
        theirs = {k: v for k, v in single[section].items() if k not in per_instance}
        assert mine == theirs, section
    assert template["Unit"]["After"] == single["Unit"]["After"]
    assert template["Unit"]["Wants"] == single["Unit"]["Wants"]


def _verify(tmp_path: Path, unit_path: Path, verify_name: str) -> str:
    """Run `systemd-analyze verify` on a copy of the unit that points at this
    checkout's syncworker (verify checks that ExecStart is executable), and
    return its combined output."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not on PATH (install systemd to verify the units)")
    assert VENV_SYNCWORKER.is_file(), f"{VENV_SYNCWORKER} missing: run `make install` first"
    text = unit_path.read_text()
    assert text.count(f"ExecStart={INSTALLED_SYNCWORKER} ") == 1
    text = text.replace(f"ExecStart={INSTALLED_SYNCWORKER} ", f"ExecStart={VENV_SYNCWORKER} ")
    (tmp_path / unit_path.name).write_text(text)
    env = {
        **os.environ,
        # An inherited quieter level would hide the parser's warnings.
        "SYSTEMD_LOG_LEVEL": "info",
        "SYSTEMD_LOG_COLOR": "0",
        "SYSTEMD_LOG_LOCATION": "0",
    }
    proc = subprocess.run(
        [exe, "verify", "--man=no", f"./{verify_name}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"systemd-analyze verify exited {proc.returncode}:\n{output}"
    complaints = [ln for ln in output.splitlines() if VERIFY_COMPLAINTS.search(ln)]
    assert not complaints, "systemd-analyze verify complained:\n" + output
    return output


def test_systemd_analyze_verify_unit(tmp_path: Path) -> None:
    _verify(tmp_path, UNIT, "syncworker.service")


def test_systemd_analyze_verify_template_instance(tmp_path: Path) -> None:
    # Only the template is on disk: verify instantiates it as "eu", the way
    # systemd does for `systemctl start syncworker@eu`.
    _verify(tmp_path, TEMPLATE, "syncworker@eu.service")
    assert not (tmp_path / "syncworker@eu.service").exists()


def _exposure(tmp_path: Path, unit_path: Path) -> float:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not on PATH (install systemd to score the units)")
    name = unit_path.name.replace("@.service", "@eu.service")
    (tmp_path / unit_path.name).write_text(
        unit_path.read_text().replace(INSTALLED_SYNCWORKER, str(VENV_SYNCWORKER))
    )
    proc = subprocess.run(
        [exe, "security", "--offline=yes", "--no-pager", f"./{name}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


@UNITS
def test_systemd_analyze_security_exposure_is_at_most_4(tmp_path: Path, unit_path: Path) -> None:
    assert _exposure(tmp_path, unit_path) <= 4.0


def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above would pass vacuously if verify read nothing."""
    broken = tmp_path / "src" / "syncworker.service"
    broken.parent.mkdir()
    broken.write_text(
        UNIT.read_text().replace("KillMode=mixed", "KillMode=mixed\nKillModee=mixed")
        + "\n[Servce]\nType=simple\n"
    )
    with pytest.raises(AssertionError) as failed:
        _verify(tmp_path, broken, "syncworker.service")
    message = str(failed.value)
    assert "Unknown key" in message or "Unknown lvalue" in message, message
    assert "Unknown section" in message, message


def _node_config() -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH (install Node.js to load ecosystem.config.js)")
    proc = subprocess.run(
        [
            node,
            "-e",
            "const c = require(process.argv[1]); console.log(JSON.stringify(c))",
            str(ECOSYSTEM),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_pm2_ecosystem_matches_the_daemon() -> None:
    config = _node_config()
    (app,) = config["apps"]
    assert app["interpreter"] == "none"
    assert app["kill_timeout"] > DRAIN_TIMEOUT * 1000, (app["kill_timeout"], DRAIN_TIMEOUT)
    # Restart on any exit but a config error; the worker owns its children.
    assert app["stop_exit_codes"] == [78]
    assert app["autorestart"] is True
    assert app["treekill"] is False
    # With a restart delay PM2 7 shows an exit-78 app as "waiting restart".
    assert "exp_backoff_restart_delay" not in app and "restart_delay" not in app
    assert app["env"]["SYNCWORKER_LOG_STREAM"] == "stdout"
    # script is resolved against cwd, which is the file's own directory.
    script = Path(app.get("cwd", ROOT)) / app["script"]
    assert script.resolve() == VENV_SYNCWORKER.resolve(), script
    args = app["args"].split() if isinstance(app["args"], str) else app["args"]
    assert args[0] == "run", args
