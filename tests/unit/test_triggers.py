"""parse_notification: NOTIFY payload -> trigger requests, or a Rejected with a reason."""

from __future__ import annotations

import json

import pytest

from syncworker.triggers import (
    MAX_PAYLOAD_BYTES,
    JobInfo,
    Rejected,
    TriggerRequest,
    parse_notification,
)

JOBS = {
    "pfa": JobInfo(enabled=True, scopes=("RIO", "HOU")),
    "plain": JobInfo(enabled=True, scopes=None),
    "off": JobInfo(enabled=False, scopes=None),
    "off_scoped": JobInfo(enabled=False, scopes=("RIO",)),
}

EVERY_ENABLED = [("pfa", "RIO"), ("pfa", "HOU"), ("plain", None)]


def keys(result: list[TriggerRequest] | Rejected) -> list[tuple[str, str | None]]:
    assert isinstance(result, list), result
    return [(r.job, r.scope) for r in result]


# -- accepted payloads ------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["", "   ", "\n", "{}", "  {}  ", "{ }"])
def test_empty_payload_means_every_enabled_job_and_scope(raw: str) -> None:
    result = parse_notification(raw, JOBS)
    assert keys(result) == EVERY_ENABLED
    assert isinstance(result, list)
    for req in result:
        assert req.source == "notify"
        assert req.triggered_by is None
        assert dict(req.payload) == {}


def test_empty_payload_with_no_enabled_jobs_requests_nothing() -> None:
    jobs = {"off": JobInfo(enabled=False, scopes=("A",))}
    assert parse_notification("", jobs) == []
    assert parse_notification("{}", jobs) == []


def test_bare_job_name_runs_every_scope_of_that_job() -> None:
    result = parse_notification("pfa", JOBS)
    assert result == [
        TriggerRequest(job="pfa", scope="RIO"),
        TriggerRequest(job="pfa", scope="HOU"),
    ]


def test_bare_job_name_is_stripped() -> None:
    assert keys(parse_notification("  plain\n", JOBS)) == [("plain", None)]


def test_bare_name_of_job_without_scopes_gives_one_unscoped_run() -> None:
    assert parse_notification("plain", JOBS) == [TriggerRequest(job="plain", scope=None)]


def test_bare_job_name_starting_with_a_digit() -> None:
    jobs = {"2fa": JobInfo(enabled=True, scopes=None)}
    assert parse_notification("2fa", jobs) == [TriggerRequest(job="2fa", scope=None)]


def test_bare_name_with_punctuation_allowed_in_job_names() -> None:
    jobs = {"crm.sync:v2-full": JobInfo(enabled=True, scopes=None)}
    assert keys(parse_notification("crm.sync:v2-full", jobs)) == [("crm.sync:v2-full", None)]


def test_full_json_trigger() -> None:
    raw = json.dumps(
        {"job": "pfa", "scope": "RIO", "source": "api", "triggered_by": "admin", "extra": 1}
    )
    result = parse_notification(raw, JOBS)
    assert result == [
        TriggerRequest(
            job="pfa", scope="RIO", source="api", triggered_by="admin", payload={"extra": 1}
        )
    ]


def test_json_job_only_defaults() -> None:
    result = parse_notification('{"job": "plain"}', JOBS)
    assert result == [TriggerRequest(job="plain", scope=None, source="notify")]


def test_scoped_job_without_scope_means_every_scope() -> None:
    result = parse_notification('{"job": "pfa", "source": "api"}', JOBS)
    assert keys(result) == [("pfa", "RIO"), ("pfa", "HOU")]
    assert isinstance(result, list)
    assert {r.source for r in result} == {"api"}


def test_scope_null_means_every_scope() -> None:
    assert keys(parse_notification('{"job": "pfa", "scope": null}', JOBS)) == [
        ("pfa", "RIO"),
        ("pfa", "HOU"),
    ]


def test_scopes_list_selects_several() -> None:
    result = parse_notification('{"job": "pfa", "scopes": ["HOU", "RIO"]}', JOBS)
    assert keys(result) == [("pfa", "HOU"), ("pfa", "RIO")]


def test_scopes_list_is_deduplicated_keeping_order() -> None:
    result = parse_notification('{"job": "pfa", "scopes": ["HOU", "RIO", "HOU", "RIO"]}', JOBS)
    assert keys(result) == [("pfa", "HOU"), ("pfa", "RIO")]


def test_extra_keys_become_the_payload_for_every_run() -> None:
    raw = json.dumps({"job": "pfa", "since": "2026-01-01", "full": True, "ids": [1, 2]})
    result = parse_notification(raw, JOBS)
    assert isinstance(result, list)
    assert len(result) == 2
    for req in result:
        assert dict(req.payload) == {"since": "2026-01-01", "full": True, "ids": [1, 2]}


def test_empty_source_falls_back_to_notify() -> None:
    result = parse_notification('{"job": "plain", "source": ""}', JOBS)
    assert isinstance(result, list)
    assert result[0].source == "notify"


def test_source_of_exactly_200_characters_is_accepted() -> None:
    raw = json.dumps({"job": "plain", "source": "s" * 200, "triggered_by": "b" * 200})
    result = parse_notification(raw, JOBS)
    assert isinstance(result, list)
    assert result[0].source == "s" * 200
    assert result[0].triggered_by == "b" * 200


def test_json_without_job_means_every_enabled_job_with_that_source() -> None:
    raw = json.dumps({"source": "api", "timestamp": "2026-05-01T12:00:00Z"})
    result = parse_notification(raw, JOBS)
    assert keys(result) == EVERY_ENABLED
    assert isinstance(result, list)
    for req in result:
        assert req.source == "api"
        assert dict(req.payload) == {"timestamp": "2026-05-01T12:00:00Z"}


def test_json_without_job_keeps_triggered_by() -> None:
    result = parse_notification('{"triggered_by": "cron-host"}', JOBS)
    assert keys(result) == EVERY_ENABLED
    assert isinstance(result, list)
    assert {r.triggered_by for r in result} == {"cron-host"}
    assert {r.source for r in result} == {"notify"}


def test_payload_just_under_the_limit_is_accepted() -> None:
    head = '{"job": "plain", "x": "'
    tail = '"}'
    raw = head + "a" * (MAX_PAYLOAD_BYTES - 1 - len(head) - len(tail)) + tail
    assert len(raw.encode()) == MAX_PAYLOAD_BYTES - 1
    assert keys(parse_notification(raw, JOBS)) == [("plain", None)]


def test_payload_limit_counts_bytes_not_characters() -> None:
    head = '{"job": "plain", "x": "'
    tail = '"}'
    # 4000 two-byte characters: well under 8000 characters, but 8000+ bytes.
    raw = head + "é" * 4000 + tail
    assert len(raw) < MAX_PAYLOAD_BYTES
    result = parse_notification(raw, JOBS)
    assert isinstance(result, Rejected)
    assert "large" in result.reason


# -- rejections --------------------------------------------------------------------------

REJECTIONS = [
    pytest.param("{not json", "JSON", id="invalid-json"),
    pytest.param('{"job": "pfa",}', "JSON", id="trailing-comma"),
    pytest.param("[1, 2]", "object", id="json-array"),
    pytest.param('["pfa"]', "object", id="json-array-of-name"),
    pytest.param("42", "unknown job", id="digits-are-a-job-name"),
    pytest.param('"pfa"', "object", id="json-string"),
    pytest.param("true", "object", id="json-true"),
    pytest.param("false", "object", id="json-false"),
    pytest.param("null", "object", id="json-null"),
    pytest.param("nosuch", "unknown job", id="unknown-job-bare"),
    pytest.param('{"job": "nosuch"}', "unknown job", id="unknown-job-json"),
    pytest.param("off", "disabled", id="disabled-job-bare"),
    pytest.param('{"job": "off"}', "disabled", id="disabled-job-json"),
    pytest.param('{"job": "off_scoped", "scope": "RIO"}', "disabled", id="disabled-scoped"),
    pytest.param('{"job": "pfa", "scope": "NYC"}', "unknown scope", id="scope-not-of-job"),
    pytest.param('{"job": "pfa", "scopes": ["RIO", "NYC"]}', "unknown scope", id="scopes-one-bad"),
    pytest.param('{"job": "plain", "scope": "RIO"}', "no scopes", id="scope-to-unscoped"),
    pytest.param('{"job": "plain", "scopes": ["RIO"]}', "no scopes", id="scopes-to-unscoped"),
    pytest.param('{"job": "pfa", "scope": "RIO", "scopes": ["HOU"]}', "either", id="both"),
    pytest.param('{"job": "pfa", "scope": "RIO", "scopes": null}', "either", id="both-one-null"),
    pytest.param('{"scope": "RIO"}', "without 'job'", id="scope-without-job"),
    pytest.param('{"scopes": ["RIO"]}', "without 'job'", id="scopes-without-job"),
    pytest.param('{"job": 5}', "'job'", id="job-number"),
    pytest.param('{"job": ""}', "'job'", id="job-empty"),
    pytest.param('{"job": ["pfa"]}', "'job'", id="job-list"),
    pytest.param('{"job": "pfa", "scope": 5}', "'scope'", id="scope-number"),
    pytest.param('{"job": "pfa", "scope": ""}', "'scope'", id="scope-empty"),
    pytest.param('{"job": "pfa", "scopes": "RIO"}', "'scopes'", id="scopes-string"),
    pytest.param('{"job": "pfa", "scopes": []}', "'scopes'", id="scopes-empty"),
    pytest.param('{"job": "pfa", "scopes": ["RIO", 5]}', "'scopes'", id="scopes-non-string"),
    pytest.param('{"job": "pfa", "scopes": ["RIO", ""]}', "'scopes'", id="scopes-empty-string"),
    pytest.param('{"job": "pfa", "source": 5}', "'source'", id="source-number"),
    pytest.param('{"job": "pfa", "source": ["api"]}', "'source'", id="source-list"),
    pytest.param(json.dumps({"job": "pfa", "source": "s" * 201}), "'source'", id="source-201"),
    pytest.param('{"job": "pfa", "triggered_by": 7}', "'triggered_by'", id="by-number"),
    pytest.param(
        json.dumps({"job": "pfa", "triggered_by": "b" * 201}), "'triggered_by'", id="by-201"
    ),
    pytest.param('{"source": 5}', "'source'", id="source-number-without-job"),
    pytest.param("drop table x; --", "neither JSON nor a job name", id="sql-text"),
    pytest.param("pfa RIO", "neither JSON nor a job name", id="name-with-space"),
    pytest.param("-pfa", "neither JSON nor a job name", id="leading-dash"),
    pytest.param("x" * 129, "neither JSON nor a job name", id="name-too-long"),
    pytest.param(
        '{"job": "pfa", "x": "' + "a" * MAX_PAYLOAD_BYTES + '"}', "large", id="too-large-json"
    ),
    pytest.param("a" * MAX_PAYLOAD_BYTES, "large", id="too-large-exactly-limit"),
    pytest.param('{"a":' * 100000, "large", id="deep-nesting-oversized"),
    # Under the size limit, but deep enough to exhaust the JSON decoder's recursion.
    pytest.param('{"a":' * 1599, "JSON", id="deep-nesting-objects"),
    pytest.param('{"a":' + "[" * 7990, "JSON", id="deep-nesting-arrays"),
]


@pytest.mark.parametrize(("raw", "word"), REJECTIONS)
def test_rejections(raw: str, word: str) -> None:
    result = parse_notification(raw, JOBS)
    assert isinstance(result, Rejected), result
    assert word in result.reason


def test_well_formed_deeply_nested_json_is_rejected_not_raised() -> None:
    # Valid JSON under the size limit whose nesting exceeds the decoder's recursion
    # limit: json.loads raises RecursionError, which must become a Rejected.
    raw = '{"a":' + "[" * 3995 + "]" * 3995 + "}"
    assert len(raw.encode()) < MAX_PAYLOAD_BYTES
    result = parse_notification(raw, JOBS)
    assert isinstance(result, Rejected)
    assert "invalid JSON" in result.reason
    assert "recursion" in result.reason


def test_moderately_nested_json_is_kept_as_payload() -> None:
    raw = '{"job": "plain", "a": ' + "[" * 50 + "]" * 50 + "}"
    result = parse_notification(raw, JOBS)
    assert isinstance(result, list)
    value = result[0].payload["a"]
    for _ in range(49):
        assert isinstance(value, list)
        assert len(value) == 1
        value = value[0]
    assert value == []


def test_deep_nesting_payloads_stay_under_the_size_limit() -> None:
    # Guard for the two parametrised cases above: they must reach the JSON
    # decoder, not be cut short by the size check.
    for raw in ('{"a":' * 1599, '{"a":' + "[" * 7990):
        assert len(raw.encode()) < MAX_PAYLOAD_BYTES


def test_rejection_reason_names_the_offending_job_and_scope() -> None:
    result = parse_notification('{"job": "pfa", "scope": "NYC"}', JOBS)
    assert isinstance(result, Rejected)
    assert "'NYC'" in result.reason
    assert "'pfa'" in result.reason


def test_rejection_reason_shortens_a_long_unknown_name() -> None:
    name = "j" * 120
    result = parse_notification(name, JOBS)
    assert isinstance(result, Rejected)
    assert "unknown job" in result.reason
    assert name not in result.reason
    assert "j" * 80 + "..." in result.reason


# -- delays and reserved sources ---------------------------------------------------------


@pytest.mark.parametrize(("raw", "seconds"), [("30", 30.0), ("1.5", 1.5), ("0", None)])
def test_run_after_is_read_in_seconds_and_kept_out_of_the_payload(
    raw: str, seconds: float | None
) -> None:
    result = parse_notification(f'{{"job": "plain", "run_after": {raw}, "k": 1}}', JOBS)
    assert isinstance(result, list)
    [req] = result
    assert (req.run_after, dict(req.payload)) == (seconds, {"k": 1})


def test_run_after_applies_to_every_scope_and_every_job() -> None:
    scoped = parse_notification('{"job": "pfa", "run_after": 5}', JOBS)
    every = parse_notification('{"source": "deploy", "run_after": 5}', JOBS)
    for result in (scoped, every):
        assert isinstance(result, list) and {r.run_after for r in result} == {5.0}


@pytest.mark.parametrize("raw", ["-1", '"30"', "true", "null0", "1e12", "[1]"])
def test_a_bad_run_after_is_rejected(raw: str) -> None:
    result = parse_notification(f'{{"job": "plain", "run_after": {raw}}}', JOBS)
    assert isinstance(result, Rejected)
    assert "run_after" in result.reason or "invalid JSON" in result.reason


def test_the_backfill_source_is_reserved() -> None:
    result = parse_notification('{"job": "plain", "source": "backfill"}', JOBS)
    assert isinstance(result, Rejected) and "reserved for backfill" in result.reason
