"""The configuration: a TOML file, `SYNCWORKER_<KEY>` overrides, validated.

Every error becomes one ConfigError naming the file (or environment
variable), the key and the reason; the CLI turns it into exit code 78.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from syncworker.durations import MAX_DURATION
from syncworker.schedule import ScheduleError, load_zone, validate_expression

ENV_PREFIX = "SYNCWORKER_"
DEFAULT_PATH = Path("syncworker.toml")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_JOB_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}")
_CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")
# A named token's name is what runs it triggers say in triggered_by.
_TOKEN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")
# Long enough that guessing one over HTTP is hopeless (`openssl rand -hex 16`
# gives 32 characters); printable ASCII, so a header can carry it.
MIN_TOKEN_LENGTH = 16
_TOKEN_TEXT = re.compile(r"[\x21-\x7e]+")
# Keys whose values are never echoed in a config error.
_SECRET_FIELDS = ("http_token", "http_tokens")


_STEP_TAGS = ("callable", "command", "sql")


class ConfigError(Exception):
    """A configuration problem: where it is, which key, and why."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


class CommandStep(BaseModel):
    """A subprocess; `{scope}`, `{job}` and `{run_id}` are replaced in its arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    command: list[str] = Field(min_length=1)


class SqlStep(BaseModel):
    """SQL run in one transaction with %(scope)s, %(job)s, %(run_id)s, %(payload)s."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sql: str = Field(min_length=1)


def _step_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "callable"
    if isinstance(value, CommandStep) or (isinstance(value, dict) and "command" in value):
        return "command"
    if isinstance(value, SqlStep) or (isinstance(value, dict) and "sql" in value):
        return "sql"
    return None


StepSpec = Annotated[
    Annotated[str, Tag("callable")]
    | Annotated[CommandStep, Tag("command")]
    | Annotated[SqlStep, Tag("sql")],
    Discriminator(
        _step_kind,
        custom_error_type="step_kind",
        custom_error_message=(
            "a step must be 'module:function', {command = [...]} or {sql = \"...\"}"
        ),
    ),
]


class JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schedule: tuple[str, ...] = ()
    timezone: str = "UTC"
    scopes: tuple[str, ...] | None = None
    scopes_sql: str | None = Field(default=None, min_length=1)
    steps: tuple[StepSpec, ...] = Field(min_length=1)
    timeout: float = Field(default=3600, gt=0)
    retries: int = Field(default=0, ge=0, le=100)
    retry_backoff: float = Field(default=5, ge=0)
    on_overlap: Literal["queue", "skip"] = "queue"
    misfire: Literal["run_once", "skip", "all"] = "run_once"
    # misfire = "all" queues at most this many missed fires, the latest;
    # `syncworker backfill` refuses a window of more without --force.
    misfire_limit: int = Field(default=100, ge=1, le=10000)
    # Seconds every trigger but a cron fire waits before its run may start;
    # a trigger that joins the pending run moves its start (trigger() in
    # db/sql/schema/11_trigger.sql).
    debounce: float = Field(default=0, ge=0, le=MAX_DURATION.total_seconds())
    enabled: bool = True
    # Where a callable step runs: "thread" (the worker's process: its loop
    # for async functions, a thread for plain ones) or "process" (a child
    # process the worker can kill, for steps that must be stoppable).
    isolation: Literal["thread", "process"] = "thread"

    @field_validator("schedule", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        try:
            return tuple(validate_expression(e) for e in value)
        except ScheduleError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("timezone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        try:
            load_zone(value)
        except ScheduleError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("scopes")
    @classmethod
    def _valid_scopes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one scope (or be left out)")
        for scope in value:
            if not scope or len(scope) > 200:
                raise ValueError(f"scope {scope!r} must be 1 to 200 characters")
        if len(set(value)) != len(value):
            raise ValueError("scopes must be unique")
        return value

    @field_validator("steps")
    @classmethod
    def _valid_callables(cls, value: tuple[StepSpec, ...]) -> tuple[StepSpec, ...]:
        for step in value:
            if isinstance(step, str) and not _CALLABLE.fullmatch(step):
                raise ValueError(f"step {step!r} must look like 'package.module:function'")
        return value

    @model_validator(mode="after")
    def _scopes_or_sql(self) -> JobConfig:
        if self.scopes is not None and self.scopes_sql is not None:
            raise ValueError("give either 'scopes' or 'scopes_sql', not both")
        return self

    @property
    def zone(self) -> Any:
        return load_zone(self.timezone)


with warnings.catch_warnings():
    # `schema` is the documented key; pydantic warns that it shadows the
    # deprecated BaseModel.schema() classmethod, which we never call.
    warnings.simplefilter("ignore", UserWarning)

    class _SchemaField(BaseSettings):
        schema: str = "syncworker"  # type: ignore[assignment]


class Settings(_SchemaField):
    """The whole configuration, after the file and the environment are merged."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, allow_inf_nan=False
    )

    database_url: str = ""
    channel: str = "sync_trigger"
    events_channel: str = "sync_events"
    concurrency: int = Field(default=1, ge=1, le=1000)
    drain_timeout: float = Field(default=300, ge=0)
    # A cancelled run's step gets this long after ctx.stopping (and SIGTERM
    # for a command) before it is cancelled (a command's group SIGKILLed).
    cancel_grace: float = Field(default=10, ge=0)
    heartbeat_interval: float = Field(default=10, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    # stdout for supervisors that file stderr as errors (PM2's error log).
    log_stream: Literal["stderr", "stdout"] = "stderr"
    # Finished runs older than this are deleted (0 keeps them forever).
    history_days: float = Field(default=30, ge=0)
    http: str = ""
    # Bearer tokens for the HTTP API's writes (README "Dashboard"): one
    # anonymous token (runs say triggered_by "http") and/or named ones (runs
    # say the name). None set: the API is read-only. SecretStr keeps them out
    # of every repr; a reload (SIGHUP) may rotate them.
    http_token: SecretStr | None = None
    http_tokens: dict[str, SecretStr] = Field(default_factory=dict)
    # Steps' connections (ctx.connection()) come from a pool of their own:
    # at most this many at once (None: 2 per concurrency slot), each waited
    # for at most step_connect_timeout seconds.
    step_pool_size: int | None = Field(default=None, ge=1, le=10_000)
    step_connect_timeout: float = Field(default=30, gt=0)
    # Behind a pooler (README, "Production databases"): the listening
    # session's own URL (a direct connection; empty: database_url), whether
    # pooled connections may keep server-side state ("transaction": they do
    # not), and the poll mode for when no session can LISTEN.
    listen_url: str = ""
    pooler: Literal["none", "transaction"] = "none"
    listen: bool = True
    poll_interval: float = Field(default=5, gt=0)
    jobs: dict[str, JobConfig] = Field(default_factory=dict)

    @property
    def step_pool_max(self) -> int:
        return self.step_pool_size or 2 * self.concurrency

    @property
    def listen_conninfo(self) -> str:
        return self.listen_url or self.database_url

    @model_validator(mode="after")
    def _pooler_needs_a_direct_listener(self) -> Settings:
        if self.pooler == "transaction" and self.listen and not self.listen_url:
            raise ValueError(
                'pooler = "transaction" needs listen_url, a direct connection (not'
                " through the pooler) for LISTEN, or listen = false (poll mode)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init kwargs; the environment wins over it.
        return (env_settings, init_settings)

    @field_validator("channel", "events_channel", "schema")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENT.fullmatch(value):
            raise ValueError(
                f"{value!r} must be a letter or underscore followed by up to 62 "
                "letters, digits or underscores"
            )
        return value

    @field_validator("schema")
    @classmethod
    def _schema_fits_wake_channel(cls, value: str) -> str:
        # trigger() notifies "<schema>_wake", and channel names stop at 63 bytes.
        if len(value) > 58:
            raise ValueError(f"{value!r} is longer than 58 characters")
        return value

    @field_validator("http")
    @classmethod
    def _http_address(cls, value: str) -> str:
        if value:
            http_address(value)
        return value

    @field_validator("http_token")
    @classmethod
    def _token_text(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_token(value.get_secret_value(), "the token")
        return value

    @field_validator("http_tokens")
    @classmethod
    def _named_tokens(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        seen: set[str] = set()
        for name, token in value.items():
            if not _TOKEN_NAME.fullmatch(name):
                raise ValueError(
                    f"token name {name[:64]!r} must be 1 to 64 letters, digits or _ . @ -"
                )
            text = token.get_secret_value()
            _check_token(text, f"the token of {name!r}")
            if text in seen:
                raise ValueError(f"the token of {name!r} is also another name's token")
            seen.add(text)
        return value

    @model_validator(mode="after")
    def _channels_distinct(self) -> Settings:
        # The worker would read its own run events as triggers (and, with
        # `http`, triggers as run events).
        if self.events_channel == self.channel:
            raise ValueError(f"events_channel and channel are both {self.channel!r}")
        return self

    @model_validator(mode="after")
    def _tokens_distinct(self) -> Settings:
        if self.http_token is not None and self.http_token in self.http_tokens.values():
            raise ValueError("http_token is also one of http_tokens: give each token one name")
        return self

    @field_validator("jobs")
    @classmethod
    def _job_names(cls, value: dict[str, JobConfig]) -> dict[str, JobConfig]:
        for name in value:
            if not _JOB_NAME.fullmatch(name):
                raise ValueError(
                    f"job name {name!r} must be 1 to 128 letters, digits or _ . : - "
                    "(not starting with a punctuation mark)"
                )
        return value


def http_is_loopback(address: str) -> bool:
    """Whether an `http` address is reachable from this machine only."""
    host, _ = http_address(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, assume the network


def _check_token(text: str, what: str) -> None:
    """A token fit to compare: never quoted in the message."""
    if len(text) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"{what} is shorter than {MIN_TOKEN_LENGTH} characters"
            " (make one with `openssl rand -hex 16`)"
        )
    if not _TOKEN_TEXT.fullmatch(text):
        raise ValueError(f"{what} must be printable ASCII without spaces")


def http_address(value: str) -> tuple[str, int]:
    """Split an `http` value, "host:port" or "[ipv6]:port", into what bind() takes."""
    example = "e.g. 127.0.0.1:9187 or [::1]:9187"
    host, sep, port = value.rpartition(":")
    if not sep or not host or "/" in value:
        raise ValueError(f"{value!r} must be host:port (no scheme or path), {example}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not a host name or IP address") from None
        raise ValueError(f"{value!r}: put an IPv6 address in brackets, {example}")
    elif len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{value!r}: {host!r} is not a host name or IP address")
    elif re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv4 address") from None
    # isascii: str.isdigit() also takes other scripts' digits, which int() reads.
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise ValueError(f"{value!r}: the port must be 1 to 65535")
    return host, int(port)


def config_path(explicit: str | Path | None, environ: Mapping[str, str] | None = None) -> Path:
    """--config PATH, else $SYNCWORKER_CONFIG, else ./syncworker.toml."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get(f"{ENV_PREFIX}CONFIG"):
        return Path(env[f"{ENV_PREFIX}CONFIG"])
    return DEFAULT_PATH


def load_config(
    path: str | Path | None = None,
    *,
    required: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read, merge and validate the configuration, or raise ConfigError.

    `required=False` lets commands that only need the database (status,
    trigger) run without a file when the environment says enough.
    """
    file = config_path(path)
    data: dict[str, Any] = {}
    if file.exists():
        try:
            with file.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(file), "", f"invalid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(str(file), "", f"invalid TOML: not UTF-8 ({exc.reason})") from None
        except RecursionError:
            raise ConfigError(str(file), "", "invalid TOML: nested too deeply") from None
        except OSError as exc:
            raise ConfigError(str(file), "", f"cannot read: {exc.strerror}") from None
    elif required or path is not None:
        raise ConfigError(
            str(file), "", "file not found (pass --config, set SYNCWORKER_CONFIG or create it)"
        )
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validate_config(data, str(file))


def validate_config(data: Mapping[str, Any], source: str = "<config>") -> Settings:
    """Validate already-parsed settings (and the environment) into Settings."""
    for key in data:
        # Exact names only: pydantic-settings would take `_env_prefix` and the
        # like as its own options, and match other keys ignoring case.
        if key not in Settings.model_fields:
            raise ConfigError(source, key, _unknown_key([key]))
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise _first_error(exc, data, source) from None
    except SettingsError as exc:
        # pydantic-settings raises this for an env value it cannot decode as JSON.
        match = re.search(r'field "(\w+)"', str(exc))
        field = match.group(1) if match else ""
        where = f"{ENV_PREFIX}{field.upper()}" if field else "environment"
        raise ConfigError(where, field, "not valid JSON") from None
    # Empty means unset, however it came (README: "When it is empty").
    if not settings.database_url:
        fallback = os.environ.get("DATABASE_URL", "")
        if fallback:
            settings = settings.model_copy(update={"database_url": fallback})
    return settings


def _first_error(exc: ValidationError, data: Mapping[str, Any], source: str) -> ConfigError:
    err = exc.errors(include_url=False)[0]
    loc = [str(part) for part in err["loc"]]
    # The step union adds its tag after the step's index; the user only
    # knows the index.
    loc = [
        p
        for i, p in enumerate(loc)
        if not (i >= 2 and loc[i - 2] == "steps" and loc[i - 1].isdigit() and p in _STEP_TAGS)
    ]
    key = _dotted(loc)
    top = loc[0] if loc else ""
    env_name = f"{ENV_PREFIX}{top.upper()}"
    # The environment wins over the file, so a set variable is where the value came from.
    where = env_name if top and env_name in os.environ else source
    if err["type"] == "extra_forbidden":
        return ConfigError(where, key, _unknown_key(loc))
    if err["type"] == "missing":
        return ConfigError(where, key, "required key is missing")
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "step_kind" and isinstance(err.get("input"), dict):
        # {comand = [...]}: the table's keys say which kind was meant.
        for name in err["input"]:
            close = difflib.get_close_matches(str(name), ["command", "sql"], n=1, cutoff=0.6)
            if close:
                return ConfigError(
                    where, key, f"{message}; unknown key {str(name)!r} (did you mean {close[0]!r}?)"
                )
    shown = err.get("input")
    if (
        err["type"] not in ("value_error",)
        and top not in _SECRET_FIELDS
        and isinstance(shown, str | int | float | bool)
    ):
        message = f"{message} (got {json.dumps(shown)})"
    return ConfigError(where, key, message)


def _unknown_key(loc: list[str]) -> str:
    """ "unknown key", with the nearest known key at that place when one is close."""
    if len(loc) == 1:
        known: Iterable[str] = Settings.model_fields
    elif len(loc) == 3 and loc[0] == "jobs":
        known = JobConfig.model_fields
    elif len(loc) == 5 and loc[2] == "steps":
        known = (*CommandStep.model_fields, *SqlStep.model_fields)
    else:
        known = ()
    close = difflib.get_close_matches(loc[-1], list(known), n=1, cutoff=0.6) if loc else []
    return f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"


def _dotted(loc: list[str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out
