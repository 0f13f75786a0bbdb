"""validate_config / load_config: types, errors naming file + key + reason, env overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from syncworker.config import (
    CommandStep,
    ConfigError,
    Settings,
    SqlStep,
    load_config,
    validate_config,
)

FULL_TOML = """\
database_url = "postgresql://app@localhost/app"
channel = "sync_trigger"
events_channel = "sync_events"
schema = "syncworker"
concurrency = 1
drain_timeout = 300
heartbeat_interval = 10
log_level = "info"
log_format = "auto"

[jobs.pfa]
schedule = "*/15 * * * *"
timezone = "UTC"
scopes = ["RIO", "HOU"]
steps = ["myapp.sync:fetch_pfa", "myapp.sync:refresh_views"]
timeout = 1800
retries = 3
retry_backoff = 5
on_overlap = "queue"
misfire = "run_once"
enabled = true
"""

MINIMAL_TOML = """\
[jobs.pfa]
schedule = "*/15 * * * *"
steps = ["myapp.sync:fetch_pfa"]
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SYNCWORKER_* or DATABASE_URL from the machine may leak into a test."""
    for name in list(os.environ):
        if name.startswith("SYNCWORKER_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "syncworker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def job(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"schedule": "*/15 * * * *", "steps": ["myapp.sync:fetch_pfa"]}
    base.update(overrides)
    return base


def config_error(data: dict[str, Any], source: str = "conf/sync.toml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate_config(data, source)
    return info.value


# -- valid configurations ------------------------------------------------------------------


def test_full_config_loads_with_the_right_types(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, FULL_TOML))
    assert isinstance(settings, Settings)
    assert settings.database_url == "postgresql://app@localhost/app"
    assert settings.channel == "sync_trigger"
    assert settings.events_channel == "sync_events"
    assert settings.schema == "syncworker"
    assert settings.concurrency == 1
    assert type(settings.concurrency) is int
    assert settings.drain_timeout == 300.0
    assert isinstance(settings.drain_timeout, float)
    assert settings.heartbeat_interval == 10.0
    assert isinstance(settings.heartbeat_interval, float)
    assert settings.log_level == "info"
    assert settings.log_format == "auto"
    assert list(settings.jobs) == ["pfa"]
    pfa = settings.jobs["pfa"]
    assert pfa.schedule == ("*/15 * * * *",)
    assert pfa.timezone == "UTC"
    assert str(pfa.zone) == "UTC"
    assert pfa.scopes == ("RIO", "HOU")
    assert pfa.scopes_sql is None
    assert pfa.steps == ("myapp.sync:fetch_pfa", "myapp.sync:refresh_views")
    assert pfa.timeout == 1800.0
    assert isinstance(pfa.timeout, float)
    assert pfa.retries == 3
    assert type(pfa.retries) is int
    assert pfa.retry_backoff == 5.0
    assert pfa.on_overlap == "queue"
    assert pfa.misfire == "run_once"
    assert pfa.enabled is True


def test_defaults() -> None:
    settings = validate_config({"jobs": {"pfa": job()}}, "x.toml")
    assert settings.database_url == ""
    assert settings.channel == "sync_trigger"
    assert settings.events_channel == "sync_events"
    assert settings.schema == "syncworker"
    assert settings.concurrency == 1
    assert settings.drain_timeout == 300
    assert settings.heartbeat_interval == 10
    assert settings.log_level == "info"
    assert settings.log_format == "auto"
    pfa = settings.jobs["pfa"]
    assert pfa.timezone == "UTC"
    assert pfa.scopes is None
    assert pfa.timeout == 3600
    assert pfa.retries == 0
    assert pfa.retry_backoff == 5
    assert pfa.on_overlap == "queue"
    assert pfa.misfire == "run_once"
    assert pfa.enabled is True


def test_schedule_as_a_string_becomes_a_one_element_tuple() -> None:
    settings = validate_config({"jobs": {"pfa": job(schedule="0 2 * * *")}})
    assert settings.jobs["pfa"].schedule == ("0 2 * * *",)


def test_schedule_as_a_list() -> None:
    settings = validate_config({"jobs": {"pfa": job(schedule=["0 2 * * *", "30 14 * * 1-5"])}})
    assert settings.jobs["pfa"].schedule == ("0 2 * * *", "30 14 * * 1-5")


def test_schedule_whitespace_is_normalised() -> None:
    settings = validate_config({"jobs": {"pfa": job(schedule="  */15   *  * * * ")}})
    assert settings.jobs["pfa"].schedule == ("*/15 * * * *",)


def test_schedule_can_be_left_out_for_a_trigger_only_job() -> None:
    settings = validate_config({"jobs": {"pfa": {"steps": ["myapp.sync:fetch_pfa"]}}})
    assert settings.jobs["pfa"].schedule == ()


def test_six_field_schedule_is_accepted() -> None:
    settings = validate_config({"jobs": {"pfa": job(schedule="0 0 * * * 30")}})
    assert settings.jobs["pfa"].schedule == ("0 0 * * * 30",)


def test_all_step_kinds() -> None:
    steps = [
        "myapp.sync:fetch_pfa",
        {"command": ["./bin/sync.sh", "{scope}"]},
        {"sql": "CALL refresh_pfa(%(scope)s)"},
    ]
    settings = validate_config({"jobs": {"pfa": job(steps=steps)}})
    got = settings.jobs["pfa"].steps
    assert got[0] == "myapp.sync:fetch_pfa"
    assert got[1] == CommandStep(command=["./bin/sync.sh", "{scope}"])
    assert got[2] == SqlStep(sql="CALL refresh_pfa(%(scope)s)")


def test_scopes_sql_instead_of_scopes() -> None:
    settings = validate_config(
        {"jobs": {"pfa": job(scopes_sql="SELECT code FROM orgs WHERE active")}}
    )
    assert settings.jobs["pfa"].scopes is None
    assert settings.jobs["pfa"].scopes_sql == "SELECT code FROM orgs WHERE active"


def test_job_names_may_start_with_a_digit_and_hold_punctuation() -> None:
    settings = validate_config({"jobs": {"2fa": job(), "crm.sync:v2-full": job()}})
    assert sorted(settings.jobs) == ["2fa", "crm.sync:v2-full"]


def test_non_utc_timezone() -> None:
    settings = validate_config({"jobs": {"pfa": job(timezone="Europe/Berlin")}})
    assert str(settings.jobs["pfa"].zone) == "Europe/Berlin"


def test_config_file_from_syncworker_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, FULL_TOML, "elsewhere.toml")
    monkeypatch.setenv("SYNCWORKER_CONFIG", str(path))
    settings = load_config()
    assert settings.jobs["pfa"].scopes == ("RIO", "HOU")


# -- errors: file, dotted key, reason ------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        pytest.param({"foo": 1}, "foo", "unknown key", id="unknown-top-level-key"),
        pytest.param(
            {"jobs": {"pfa": job(foo=1)}}, "jobs.pfa.foo", "unknown key", id="unknown-job-key"
        ),
        pytest.param(
            {"jobs": {"pfa": job(schedule="61 * * * *")}},
            "jobs.pfa.schedule",
            "invalid cron expression '61 * * * *'",
            id="bad-cron",
        ),
        pytest.param(
            {"jobs": {"pfa": job(schedule="* * *")}},
            "jobs.pfa.schedule",
            "3 fields",
            id="cron-3-fields",
        ),
        pytest.param(
            {"jobs": {"pfa": job(schedule=["* * * * *", "* * * * * * *"])}},
            "jobs.pfa.schedule",
            "7 fields",
            id="cron-list-one-bad",
        ),
        pytest.param(
            {"jobs": {"pfa": job(timezone="Mars/Olympus_Mons")}},
            "jobs.pfa.timezone",
            "unknown time zone 'Mars/Olympus_Mons'",
            id="unknown-timezone",
        ),
        pytest.param(
            {"concurrency": "x"}, "concurrency", "valid integer", id="concurrency-not-int"
        ),
        pytest.param({"concurrency": 0}, "concurrency", "greater than or equal to 1", id="conc-0"),
        pytest.param({"log_level": "verbose"}, "log_level", '"verbose"', id="bad-log-level"),
        pytest.param(
            {"jobs": {"pfa": job(on_overlap="drop")}},
            "jobs.pfa.on_overlap",
            "'queue' or 'skip'",
            id="bad-on-overlap",
        ),
        pytest.param(
            {"jobs": {"pfa": job(timeout=0)}}, "jobs.pfa.timeout", "greater than 0", id="timeout-0"
        ),
        pytest.param(
            {"jobs": {"pfa": job(steps=["not_a_callable"])}},
            "jobs.pfa.steps",
            "step 'not_a_callable' must look like 'package.module:function'",
            id="bad-step-string",
        ),
        pytest.param(
            {"jobs": {"pfa": job(steps=["myapp.sync:fetch_pfa", {"commnd": ["x"]}])}},
            "jobs.pfa.steps[1]",
            "a step must be 'module:function', {command = [...]} or {sql = \"...\"}",
            id="bad-step-table",
        ),
        pytest.param(
            {"jobs": {"pfa": job(steps=[{"command": []}])}},
            "jobs.pfa.steps[0].command",
            "at least 1 item",
            id="empty-command",
        ),
        pytest.param(
            {"jobs": {"pfa": job(steps=[{"sql": "select 1", "x": 1}])}},
            "jobs.pfa.steps[0].x",
            "unknown key",
            id="sql-step-extra-key",
        ),
        pytest.param(
            {"jobs": {"pfa": job(steps=[])}}, "jobs.pfa.steps", "at least 1", id="empty-steps"
        ),
        pytest.param(
            {"jobs": {"pfa": {"schedule": "* * * * *"}}},
            "jobs.pfa.steps",
            "required key is missing",
            id="missing-steps",
        ),
        pytest.param(
            {"jobs": {"pfa": job(scopes=["A"], scopes_sql="SELECT 'A'")}},
            "jobs.pfa",
            "give either 'scopes' or 'scopes_sql', not both",
            id="scopes-and-scopes-sql",
        ),
        pytest.param(
            {"jobs": {"pfa": job(scopes=["RIO", "HOU", "RIO"])}},
            "jobs.pfa.scopes",
            "scopes must be unique",
            id="duplicate-scopes",
        ),
        pytest.param(
            {"jobs": {"pfa": job(scopes=[])}},
            "jobs.pfa.scopes",
            "at least one scope",
            id="empty-scopes",
        ),
        pytest.param(
            {"schema": "bad-name"},
            "schema",
            "'bad-name' must be a letter or underscore",
            id="bad-schema-identifier",
        ),
        pytest.param(
            {"schema": "x" * 64}, "schema", "must be a letter or underscore", id="schema-too-long"
        ),
        pytest.param(
            {"channel": "1abc"}, "channel", "must be a letter or underscore", id="bad-channel"
        ),
        pytest.param({"jobs": {"-pfa": job()}}, "jobs", "job name '-pfa'", id="bad-job-name"),
    ],
)
def test_errors_name_source_key_and_reason(data: dict[str, Any], key: str, reason: str) -> None:
    err = config_error(data, "conf/sync.toml")
    assert err.source == "conf/sync.toml"
    assert err.key == key
    assert reason in err.reason
    assert str(err).startswith(f"conf/sync.toml: {key}: ")
    assert reason in str(err)


def test_unknown_job_key_message_is_exact() -> None:
    err = config_error({"jobs": {"pfa": job(foo=1)}}, "sync.toml")
    assert str(err) == "sync.toml: jobs.pfa.foo: unknown key"


def test_bad_step_table_message_is_exact() -> None:
    err = config_error({"jobs": {"pfa": job(steps=["a.b:c", {"commnd": ["x"]}])}}, "s.toml")
    assert str(err) == (
        "s.toml: jobs.pfa.steps[1]: "
        "a step must be 'module:function', {command = [...]} or {sql = \"...\"};"
        " unknown key 'commnd' (did you mean 'command'?)"
    )


def test_wrong_type_error_shows_the_bad_value(tmp_path: Path) -> None:
    path = write(tmp_path, 'concurrency = "x"\n' + MINIMAL_TOML)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.source == str(path)
    assert err.key == "concurrency"
    assert str(err).startswith(f"{path}: concurrency: ")
    assert '(got "x")' in str(err)


def test_load_config_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TOML.replace("*/15 * * * *", "*/15 * * *"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert info.value.key == "jobs.pfa.schedule"
    assert str(info.value).startswith(f"{path}: jobs.pfa.schedule: ")
    assert "4 fields" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert "file not found" in info.value.reason
    assert str(info.value).startswith(f"{path}: file not found")


def test_missing_explicit_file_is_an_error_even_when_not_required(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="file not found"):
        load_config(path, required=False)


def test_missing_default_file_is_fine_when_not_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYNCWORKER_DATABASE_URL", "postgresql://env@db/app")
    settings = load_config(None, required=False)
    assert settings.database_url == "postgresql://env@db/app"
    assert settings.jobs == {}


def test_invalid_toml_syntax_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "concurrency = \n[jobs.pfa\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert info.value.reason.startswith("invalid TOML")
    assert str(info.value).startswith(f"{path}: invalid TOML")
    assert "line 1" in str(info.value)


# -- environment overrides -----------------------------------------------------------------


def test_env_overrides_the_file_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, FULL_TOML)
    monkeypatch.setenv("SYNCWORKER_CONCURRENCY", "4")
    monkeypatch.setenv("SYNCWORKER_LOG_LEVEL", "debug")
    settings = load_config(path)
    assert settings.concurrency == 4
    assert settings.log_level == "debug"
    # Keys without an override keep the file's value.
    assert settings.channel == "sync_trigger"
    assert settings.jobs["pfa"].retries == 3


def test_env_sets_a_key_the_file_leaves_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, MINIMAL_TOML)
    monkeypatch.setenv("SYNCWORKER_CHANNEL", "other_channel")
    assert load_config(path).channel == "other_channel"


def test_bad_env_value_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL_TOML)
    monkeypatch.setenv("SYNCWORKER_CONCURRENCY", "x")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == "SYNCWORKER_CONCURRENCY"
    assert info.value.key == "concurrency"
    assert str(info.value).startswith("SYNCWORKER_CONCURRENCY: concurrency: ")
    assert '(got "x")' in str(info.value)


def test_bad_env_value_names_the_variable_even_when_the_file_sets_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, FULL_TOML)  # sets concurrency = 1
    monkeypatch.setenv("SYNCWORKER_CONCURRENCY", "x")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == "SYNCWORKER_CONCURRENCY"
    assert str(info.value).startswith("SYNCWORKER_CONCURRENCY: concurrency: ")


def test_undecodable_json_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCWORKER_JOBS", "not json")
    err = config_error({}, "sync.toml")
    assert "SYNCWORKER_JOBS" in str(err)
    assert err.key == "jobs"


def test_database_url_falls_back_to_database_url_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://fallback@db/app")
    assert validate_config({}).database_url == "postgresql://fallback@db/app"


def test_database_url_env_ignored_when_the_file_gives_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://fallback@db/app")
    settings = load_config(write(tmp_path, FULL_TOML))
    assert settings.database_url == "postgresql://app@localhost/app"


def test_database_url_env_ignored_when_syncworker_database_url_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://fallback@db/app")
    monkeypatch.setenv("SYNCWORKER_DATABASE_URL", "postgresql://sw@db/app")
    assert validate_config({}).database_url == "postgresql://sw@db/app"


def test_syncworker_database_url_wins_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCWORKER_DATABASE_URL", "postgresql://sw@db/app")
    monkeypatch.setenv("DATABASE_URL", "postgresql://fallback@db/app")
    settings = load_config(write(tmp_path, FULL_TOML))
    assert settings.database_url == "postgresql://sw@db/app"


def test_an_empty_database_url_in_the_file_falls_back_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://fallback@db/app")
    assert validate_config({"database_url": ""}).database_url == "postgresql://fallback@db/app"


def test_no_database_url_anywhere_is_empty() -> None:
    assert validate_config({}).database_url == ""


# -- the CLI turns a config error into exit code 78 ----------------------------------------


def _cli_env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("SYNCWORKER_") or k == "DATABASE_URL" or k.startswith("PG"))
    }
    # Should anything try to connect, make it fail fast instead of finding a server.
    env["PGHOST"] = str(tmp_path / "no-such-socket-dir")
    env["PGCONNECT_TIMEOUT"] = "1"
    return env


def test_cli_check_exits_78_on_a_config_error(tmp_path: Path) -> None:
    bad = write(tmp_path, MINIMAL_TOML + "foo = 1\n", "bad.toml")
    proc = subprocess.run(
        [sys.executable, "-m", "syncworker", "check", "--config", str(bad)],
        capture_output=True,
        text=True,
        env=_cli_env(tmp_path),
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 78, proc.stderr
    assert "jobs.pfa.foo: unknown key" in proc.stderr
    assert str(bad) in proc.stderr


def test_cli_check_exits_78_on_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "syncworker", "check", "--config", str(missing)],
        capture_output=True,
        text=True,
        env=_cli_env(tmp_path),
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 78, proc.stderr
    assert str(missing) in proc.stderr
    assert "file not found" in proc.stderr


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"concurency": 2}, "concurency: unknown key (did you mean 'concurrency'?)"),
        ({"log_formt": "json"}, "log_formt: unknown key (did you mean 'log_format'?)"),
        (
            {"jobs": {"pfa": job(schedul="* * * * *")}},
            "jobs.pfa.schedul: unknown key (did you mean 'schedule'?)",
        ),
        (
            {"jobs": {"pfa": job(steps=[{"sql": "select 1", "sq": 1}])}},
            "jobs.pfa.steps[0].sq: unknown key (did you mean 'sql'?)",
        ),
        (
            {"jobs": {"pfa": job(steps=[{"comand": ["true"]}])}},
            "jobs.pfa.steps[0]: a step must be 'module:function', {command = [...]} or"
            " {sql = \"...\"}; unknown key 'comand' (did you mean 'command'?)",
        ),
        # Nothing close: no guess.
        ({"colour": 1}, "colour: unknown key"),
    ],
)
def test_a_mistyped_key_gets_a_did_you_mean(data, message):
    with pytest.raises(ConfigError) as err:
        validate_config(data, "c.toml")
    assert str(err.value) == f"c.toml: {message}"
