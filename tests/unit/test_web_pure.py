"""The HTTP API's pure parts: write bodies, tokens, routes, schedules in words."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from http import HTTPStatus

import pytest

from syncworker.config import ConfigError, http_is_loopback, validate_config
from syncworker.cronwords import describe
from syncworker.web import auth, bodies
from syncworker.web.replies import HttpError, Request, Response, text
from syncworker.web.router import Router

TOKEN = "t0ken-0123456789abcdef"


def refused(call, *args) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(HttpError) as info:
        call(*args)
    return info.value.status, info.value.message


# -- bodies ----------------------------------------------------------------------------


def test_a_trigger_body_takes_scope_payload_and_run_after() -> None:
    got = bodies.trigger(b'{"scope": "RIO", "payload": {"x": 1}, "run_after": 30}')
    assert got == bodies.TriggerBody("RIO", {"x": 1}, 30.0)
    assert bodies.trigger(b"") == bodies.TriggerBody(None, {}, None)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{bad", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b'{"scop": "RIO"}', "unknown field 'scop'"),
        (b'{"scope": 5}', "scope must be a string"),
        (b'{"scope": ""}', "scope must not be empty"),
        (b'{"payload": [1]}', "payload must be a JSON object"),
        (b'{"run_after": -1}', "non-negative"),
        (b'{"run_after": "30"}', "number of seconds"),
        (b'{"run_after": true}', "number of seconds"),
        (b'{"run_after": NaN}', "not valid JSON"),
        (b'{"payload": {"x": Infinity}}', "not valid JSON"),
        (b'{"run_after": 1e12}', "at most"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_a_bad_trigger_body_is_a_400_naming_the_field(body: bytes, says: str) -> None:
    status, message = refused(bodies.trigger, body)
    assert status == HTTPStatus.BAD_REQUEST
    assert says in message


def test_pause_until_needs_an_offset() -> None:
    got = bodies.pause(b'{"until": "2030-01-01T00:00:00Z", "reason": "maintenance"}')
    assert got.until == datetime(2030, 1, 1, tzinfo=UTC) and got.reason == "maintenance"
    assert "offset" in refused(bodies.pause, b'{"until": "2030-01-01T00:00:00"}')[1]
    assert "ISO 8601" in refused(bodies.pause, b'{"until": "tomorrow"}')[1]
    assert "longer than" in refused(bodies.cancel, b'{"reason": "%s"}' % (b"x" * 1001))[1]


# -- tokens ----------------------------------------------------------------------------


def request(authorization: str | None = None) -> Request:
    headers = {"authorization": authorization} if authorization is not None else {}
    return Request("POST", "/api/jobs/x/trigger", {}, headers)


def test_writes_are_refused_without_a_token_configured_and_with_a_wrong_one() -> None:
    none = auth.writer(lambda: validate_config({}))
    assert refused(none, request(f"Bearer {TOKEN}"))[0] == HTTPStatus.FORBIDDEN
    one = auth.writer(lambda: validate_config({"http_token": TOKEN}))
    assert refused(one, request())[0] == HTTPStatus.UNAUTHORIZED
    assert refused(one, request("Bearer " + TOKEN[:-1]))[0] == HTTPStatus.UNAUTHORIZED
    assert refused(one, request("Basic " + TOKEN))[0] == HTTPStatus.UNAUTHORIZED
    assert one(request(f"Bearer {TOKEN}")) == "http"
    assert one(request(f"bearer  {TOKEN} ")) == "http"


def test_a_named_token_writes_as_its_name() -> None:
    settings = validate_config(
        {"http_token": TOKEN, "http_tokens": {"alice": "alice-0123456789abcdef"}}
    )
    who = auth.writer(lambda: settings)
    assert who(request("Bearer alice-0123456789abcdef")) == "alice"
    assert who(request(f"Bearer {TOKEN}")) == "http"


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"http_token": "short"}, "shorter than 16"),
        ({"http_token": "has a space in it 0123"}, "printable ASCII"),
        ({"http_tokens": {"bad name": TOKEN}}, "token name"),
        ({"http_tokens": {"a": TOKEN, "b": TOKEN}}, "also another name's token"),
        ({"http_token": TOKEN, "http_tokens": {"a": TOKEN}}, "give each token one name"),
        ({"http_token": 12345678901234567890}, "string"),
    ],
)
def test_bad_tokens_are_config_errors_that_never_quote_the_token(data, says) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    assert says in str(info.value)
    assert TOKEN not in str(info.value) and "12345678901234567890" not in str(info.value)


def test_tokens_are_not_in_the_settings_repr() -> None:
    settings = validate_config({"http_token": TOKEN, "http_tokens": {"a": "a-0123456789abcdef0"}})
    assert TOKEN not in repr(settings) and "a-0123456789abcdef0" not in repr(settings)


def test_channels_must_differ() -> None:
    with pytest.raises(ConfigError, match="both 'x'"):
        validate_config({"channel": "x", "events_channel": "x"})


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("localhost:1", True),
        ("[::1]:1", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("example.org:1", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert http_is_loopback(address) is loopback


# -- routes ----------------------------------------------------------------------------


def test_routes_match_segments_and_answer_404_and_405_as_json() -> None:
    router = Router()

    async def run(req: Request) -> Response:
        return text(200, f"run {req.params['id']}")

    router.add("GET", "/api/runs/{id}", run)
    router.add("POST", "/api/runs/{id}/cancel", run)

    def call(method: str, path: str) -> Response:
        reply = asyncio.run(router(Request(method, path, {}, {})))
        assert isinstance(reply, Response)
        return reply

    assert call("GET", "/api/runs/7").body == b"run 7\n"
    assert call("HEAD", "/api/runs/7").status == 200
    assert call("GET", "/api/runs/").status == 404
    assert call("GET", "/api/runs/7/x").status == 404
    missing = call("GET", "/nope")
    assert (missing.status, missing.body) == (404, b'{"error": "not found"}\n')
    wrong = call("GET", "/api/runs/7/cancel")
    assert wrong.status == 405 and dict(wrong.headers)["Allow"] == "POST"


# -- schedules in words ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("* * * * *", "every minute"),
        ("*/15 * * * *", "every 15 minutes"),
        ("5 * * * *", "every hour at :05"),
        ("0 */6 * * *", "every 6 hours at :00"),
        ("30 2 * * *", "daily at 02:30"),
        ("0 9 * * 1-5", "Mon-Fri at 09:00"),
        ("0 9 * * 0,6", "Sun,Sat at 09:00"),
        ("0 3 1 * *", "monthly on day 1 at 03:00"),
        ("* * * * * */10", "every 10 seconds"),
        ("*/10 * * * * *", "*/10 * * * * *"),  # every second of every 10th minute
        ("0 3 * * * 0", "daily at 03:00"),
        ("@hourly", "every hour at :00"),
        ("0 9 * 1 *", "0 9 * 1 *"),  # unusual: the expression itself
        ("1-5 9 * * *", "1-5 9 * * *"),
        ("0 9 * * MON", "0 9 * * MON"),
    ],
)
def test_schedules_in_words(expression: str, words: str) -> None:
    assert describe(expression) == words
