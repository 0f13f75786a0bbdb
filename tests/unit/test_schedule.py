"""Cron maths: validate_expression, next_fire, latest_fire, upcoming, time zones and DST.

Datetimes that share a tzinfo compare by wall time and ignore `fold`, so every
comparison of instants here is made after converting to UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from syncworker.schedule import (
    ScheduleError,
    fires_between,
    latest_fire,
    latest_fires,
    load_zone,
    next_fire,
    upcoming,
    validate_expression,
)

UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def as_utc(values: list[datetime]) -> list[datetime]:
    return [v.astimezone(UTC) for v in values]


def strictly_increasing(instants: list[datetime]) -> bool:
    return all(a < b for a, b in pairwise(instants))


# -- validate_expression -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "cleaned"),
    [
        ("* * * * *", "* * * * *"),
        ("*/15 * * * *", "*/15 * * * *"),
        ("0 2 * * 1-5", "0 2 * * 1-5"),
        ("  */15   *\t* * * ", "*/15 * * * *"),
        ("*/5 * * * * *", "*/5 * * * * *"),
        ("0 0 * * * 30", "0 0 * * * 30"),
        ("@daily", "@daily"),
        ("@hourly", "@hourly"),
    ],
)
def test_valid_expressions(expr: str, cleaned: str) -> None:
    assert validate_expression(expr) == cleaned


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("* * *", "3 fields"),
        ("* * * *", "4 fields"),
        ("* * * * * * *", "7 fields"),
        ("0 0 1 1 * 0 2026", "7 fields"),
        ("", "fields"),
        ("garbage", "1 fields"),
        ("a b c d e", "invalid cron expression"),
        ("61 * * * *", "invalid cron expression"),
        ("* 24 * * *", "invalid cron expression"),
        ("* * 32 * *", "invalid cron expression"),
        ("* * * 13 *", "invalid cron expression"),
        ("* * * * * 61", "invalid cron expression"),
        ("@sometimes", "invalid cron expression"),
    ],
)
def test_invalid_expressions(expr: str, fragment: str) -> None:
    with pytest.raises(ScheduleError) as info:
        validate_expression(expr)
    assert fragment in str(info.value)
    assert repr(expr) in str(info.value)


def test_schedule_error_is_a_value_error() -> None:
    assert issubclass(ScheduleError, ValueError)


def test_load_zone() -> None:
    assert load_zone("Europe/Berlin") == BERLIN
    for bad in ("Mars/Olympus", "", "../etc/passwd"):
        with pytest.raises(ScheduleError, match="unknown time zone"):
            load_zone(bad)


# -- next_fire / latest_fire ---------------------------------------------------------------


def test_next_fire_is_strictly_after() -> None:
    at = utc(2026, 1, 1, 12, 0)
    assert next_fire(["0 12 * * *"], UTC_ZONE, at) == utc(2026, 1, 2, 12, 0)
    assert next_fire(["0 12 * * *"], UTC_ZONE, at - timedelta(microseconds=1)) == at


def test_next_fire_every_15_minutes() -> None:
    assert next_fire(["*/15 * * * *"], UTC_ZONE, utc(2026, 5, 1, 10, 7, 30)) == utc(
        2026, 5, 1, 10, 15
    )
    assert next_fire(["*/15 * * * *"], UTC_ZONE, utc(2026, 5, 1, 10, 45)) == utc(2026, 5, 1, 11, 0)


def test_latest_fire_counts_a_fire_exactly_at_now() -> None:
    at = utc(2026, 1, 1, 12, 0)
    assert latest_fire(["0 12 * * *"], UTC_ZONE, at) == at


def test_latest_fire_is_at_or_before() -> None:
    at = utc(2026, 1, 1, 12, 0)
    assert latest_fire(["0 12 * * *"], UTC_ZONE, at - timedelta(microseconds=1)) == utc(
        2025, 12, 31, 12, 0
    )
    assert latest_fire(["0 12 * * *"], UTC_ZONE, at + timedelta(hours=5)) == at
    assert latest_fire(["*/15 * * * *"], UTC_ZONE, utc(2026, 5, 1, 10, 14, 59)) == utc(
        2026, 5, 1, 10, 0
    )


def test_results_are_utc_for_a_wall_clock_time_in_the_job_zone() -> None:
    fire = next_fire(["0 2 * * *"], BERLIN, utc(2026, 1, 15))
    assert fire is not None
    assert fire.utcoffset() == timedelta(0)
    assert (fire.hour, fire.minute) == (1, 0)  # 02:00 in Berlin in winter
    assert fire.astimezone(BERLIN).hour == 2


def test_input_in_another_zone_is_the_same_instant() -> None:
    new_york = ZoneInfo("America/New_York")
    at = utc(2026, 1, 1, 12, 0).astimezone(new_york)  # 07:00 in New York
    assert next_fire(["0 12 * * *"], UTC_ZONE, at) == utc(2026, 1, 2, 12, 0)
    assert latest_fire(["0 12 * * *"], UTC_ZONE, at) == utc(2026, 1, 1, 12, 0)


def test_no_expressions_means_no_fires() -> None:
    at = utc(2026, 1, 1)
    assert next_fire([], UTC_ZONE, at) is None
    assert latest_fire([], UTC_ZONE, at) is None
    assert upcoming([], UTC_ZONE, at, 3) == []


def test_list_of_expressions_next_is_the_minimum() -> None:
    exprs = ["0 12 * * *", "30 9 * * *", "0 18 * * *"]
    assert next_fire(exprs, UTC_ZONE, utc(2026, 1, 1, 8, 0)) == utc(2026, 1, 1, 9, 30)
    assert next_fire(exprs, UTC_ZONE, utc(2026, 1, 1, 9, 30)) == utc(2026, 1, 1, 12, 0)
    assert next_fire(exprs, UTC_ZONE, utc(2026, 1, 1, 18, 0)) == utc(2026, 1, 2, 9, 30)


def test_list_of_expressions_latest_is_the_maximum() -> None:
    exprs = ["0 12 * * *", "30 9 * * *", "0 18 * * *"]
    assert latest_fire(exprs, UTC_ZONE, utc(2026, 1, 1, 11, 0)) == utc(2026, 1, 1, 9, 30)
    assert latest_fire(exprs, UTC_ZONE, utc(2026, 1, 1, 12, 0)) == utc(2026, 1, 1, 12, 0)
    assert latest_fire(exprs, UTC_ZONE, utc(2026, 1, 1, 8, 0)) == utc(2025, 12, 31, 18, 0)


def test_list_order_does_not_matter() -> None:
    at = utc(2026, 1, 1, 10, 0)
    a = ["0 12 * * *", "30 9 * * *"]
    assert next_fire(a, UTC_ZONE, at) == next_fire(a[::-1], UTC_ZONE, at)
    assert latest_fire(a, UTC_ZONE, at) == latest_fire(a[::-1], UTC_ZONE, at)


# -- six fields: seconds last --------------------------------------------------------------


def test_six_fields_seconds_last_matches_croniter() -> None:
    start = utc(2026, 1, 1, 12, 0, 0)
    expected = []
    it = croniter("0 0 * * * 30", start)
    for _ in range(3):
        expected.append(it.get_next(datetime))
    assert upcoming(["0 0 * * * 30"], UTC_ZONE, start, 3) == expected
    # croniter reads the sixth field as seconds: 00:00:30 every day.
    assert expected == [
        utc(2026, 1, 2, 0, 0, 30),
        utc(2026, 1, 3, 0, 0, 30),
        utc(2026, 1, 4, 0, 0, 30),
    ]


def test_six_fields_latest_fire_at_the_second() -> None:
    fire = utc(2026, 1, 2, 0, 0, 30)
    assert latest_fire(["0 0 * * * 30"], UTC_ZONE, fire) == fire
    assert latest_fire(["0 0 * * * 30"], UTC_ZONE, fire - timedelta(seconds=1)) == utc(
        2026, 1, 1, 0, 0, 30
    )


def test_six_fields_star_seconds_is_every_second_of_every_fifth_minute() -> None:
    # "*/5 * * * * *": minute */5, seconds *. Not "every five seconds".
    start = utc(2026, 1, 1, 12, 0, 0)
    reference = croniter("*/5 * * * * *", start)
    expected = [reference.get_next(datetime) for _ in range(5)]
    assert expected == [utc(2026, 1, 1, 12, 0, s) for s in range(1, 6)]
    assert upcoming(["*/5 * * * * *"], UTC_ZONE, start, 5) == expected
    # Once minute 12:00 is over, the next fire is at 12:05:00.
    assert next_fire(["*/5 * * * * *"], UTC_ZONE, utc(2026, 1, 1, 12, 0, 59)) == utc(
        2026, 1, 1, 12, 5, 0
    )
    assert latest_fire(["*/5 * * * * *"], UTC_ZONE, utc(2026, 1, 1, 12, 3)) == utc(
        2026, 1, 1, 12, 0, 59
    )


# -- time zones and DST --------------------------------------------------------------------


def test_berlin_2am_is_01z_in_winter() -> None:
    fire = next_fire(["0 2 * * *"], BERLIN, utc(2026, 1, 15))
    assert fire is not None
    assert fire.astimezone(UTC) == utc(2026, 1, 15, 1, 0)


def test_berlin_2am_is_00z_in_summer() -> None:
    fire = next_fire(["0 2 * * *"], BERLIN, utc(2026, 7, 14, 12))
    assert fire is not None
    assert fire.astimezone(UTC) == utc(2026, 7, 15, 0, 0)


def test_spring_forward_skipped_time_fires_once_at_3am() -> None:
    # 2026-03-29 in Berlin: 02:00 CET jumps to 03:00 CEST; 02:30 never happens.
    fires = as_utc(upcoming(["30 2 * * *"], BERLIN, utc(2026, 3, 27, 12), 4))
    assert fires == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # moved to 03:00 CEST
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
        utc(2026, 3, 31, 0, 30),
    ]
    on_the_day = [f for f in fires if f.astimezone(BERLIN).date().isoformat() == "2026-03-29"]
    assert len(on_the_day) == 1
    assert on_the_day[0].astimezone(BERLIN).strftime("%H:%M %Z") == "03:00 CEST"


def test_spring_forward_latest_fire_during_the_day() -> None:
    for now in (utc(2026, 3, 29, 1, 0), utc(2026, 3, 29, 12, 0)):
        latest = latest_fire(["30 2 * * *"], BERLIN, now)
        assert latest is not None
        assert latest.astimezone(UTC) == utc(2026, 3, 29, 1, 0)
    before = latest_fire(["30 2 * * *"], BERLIN, utc(2026, 3, 29, 0, 59))
    assert before is not None
    assert before.astimezone(UTC) == utc(2026, 3, 28, 1, 30)


def test_spring_forward_hourly_has_no_duplicate() -> None:
    fires = as_utc(upcoming(["0 * * * *"], BERLIN, utc(2026, 3, 28, 23), 4))
    assert fires == [utc(2026, 3, 29, h) for h in range(0, 4)]


def test_fall_back_hourly_fires_once_per_real_hour() -> None:
    # 2026-10-25 in Berlin: 03:00 CEST falls back to 02:00 CET; 02:xx happens twice.
    fires = as_utc(upcoming(["0 * * * *"], BERLIN, utc(2026, 10, 24, 21, 30), 8))
    assert fires == [utc(2026, 10, 24, 22) + timedelta(hours=i) for i in range(8)]
    assert strictly_increasing(fires)
    assert {b - a for a, b in pairwise(fires)} == {timedelta(hours=1)}


def test_fall_back_latest_fire_inside_the_repeated_hour() -> None:
    # 01:15Z is 02:15 CET, the second 02:15 of the day.
    latest = latest_fire(["0 * * * *"], BERLIN, utc(2026, 10, 25, 1, 15))
    assert latest is not None
    assert latest.astimezone(UTC) == utc(2026, 10, 25, 1, 0)
    nxt = next_fire(["0 * * * *"], BERLIN, utc(2026, 10, 25, 1, 15))
    assert nxt is not None
    assert nxt.astimezone(UTC) == utc(2026, 10, 25, 2, 0)


def test_fall_back_daily_at_repeated_time_observed_behaviour() -> None:
    # croniter fires a daily 02:30 job at both 02:30 CEST and 02:30 CET on the
    # fall-back day. What must hold: one fire per distinct UTC instant, increasing.
    fires = as_utc(upcoming(["30 2 * * *"], BERLIN, utc(2026, 10, 23, 12), 4))
    assert strictly_increasing(fires)
    assert len(set(fires)) == len(fires)
    assert fires == [
        utc(2026, 10, 24, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 1, 30),  # 02:30 CET, one real hour later
        utc(2026, 10, 26, 1, 30),  # 02:30 CET
    ]


@pytest.mark.parametrize("expr", ["0 * * * *", "30 2 * * *", "0 2 * * *", "*/15 * * * *"])
@pytest.mark.parametrize("start", [utc(2026, 3, 28, 20), utc(2026, 10, 24, 20)])
def test_dst_days_next_after_and_latest_at_or_before(expr: str, start: datetime) -> None:
    # Every 5 minutes over the DST change: next is strictly after, latest at or
    # before, and a fire is its own latest fire.
    now = start
    while now < start + timedelta(hours=10):
        nxt = next_fire([expr], BERLIN, now)
        latest = latest_fire([expr], BERLIN, now)
        assert nxt is not None
        assert latest is not None
        assert nxt.astimezone(UTC) > now
        assert latest.astimezone(UTC) <= now
        own = latest_fire([expr], BERLIN, nxt.astimezone(UTC))
        assert own is not None
        assert own.astimezone(UTC) == nxt.astimezone(UTC)
        now += timedelta(minutes=5)


def test_fall_back_list_next_fire_is_the_earliest_instant() -> None:
    fire = next_fire(["0 2 * * *", "30 2 * * *"], BERLIN, utc(2026, 10, 25, 0, 0))
    assert fire is not None
    assert fire.astimezone(UTC) == utc(2026, 10, 25, 0, 30)


def test_fall_back_list_latest_fire_is_the_latest_instant() -> None:
    fire = latest_fire(["30 2 * * *", "0 2 * * *"], BERLIN, utc(2026, 10, 25, 1, 15))
    assert fire is not None
    assert fire.astimezone(UTC) == utc(2026, 10, 25, 1, 0)


def test_fall_back_list_upcoming_misses_no_fire() -> None:
    fires = as_utc(upcoming(["0 * * * *", "30 * * * *"], BERLIN, utc(2026, 10, 24, 23), 8))
    assert fires == [utc(2026, 10, 24, 23, 30) + timedelta(minutes=30 * i) for i in range(8)]


# -- upcoming ------------------------------------------------------------------------------


def test_upcoming_returns_count_fires_strictly_increasing() -> None:
    fires = upcoming(["*/15 * * * *"], UTC_ZONE, utc(2026, 5, 1, 10, 7), 5)
    assert fires == [
        utc(2026, 5, 1, 10, 15),
        utc(2026, 5, 1, 10, 30),
        utc(2026, 5, 1, 10, 45),
        utc(2026, 5, 1, 11, 0),
        utc(2026, 5, 1, 11, 15),
    ]
    assert strictly_increasing(as_utc(fires))


def test_upcoming_merges_a_list_without_duplicates() -> None:
    # 12:00 is matched by both expressions but is one fire.
    fires = upcoming(["0 12 * * *", "0 */6 * * *"], UTC_ZONE, utc(2026, 1, 1, 7), 4)
    assert fires == [
        utc(2026, 1, 1, 12),
        utc(2026, 1, 1, 18),
        utc(2026, 1, 2, 0),
        utc(2026, 1, 2, 6),
    ]


def test_upcoming_zero_count() -> None:
    assert upcoming(["* * * * *"], UTC_ZONE, utc(2026, 1, 1), 0) == []


def test_fires_between_takes_both_ends_and_stops_past_the_limit() -> None:
    start = utc(2026, 12, 1, 0, 0)
    window = fires_between(
        ["*/10 * * * *"], UTC_ZONE, start - timedelta(microseconds=1), utc(2026, 12, 1, 0, 50), 100
    )
    assert window == [utc(2026, 12, 1, 0, m) for m in range(0, 60, 10)]
    # One more than the limit, never the whole window.
    assert len(fires_between(["* * * * * *"], UTC_ZONE, start, start + timedelta(days=30), 5)) == 6


def test_latest_fires_walks_back_from_the_end_and_says_when_it_capped() -> None:
    after, end = utc(2026, 12, 1, 0, 0), utc(2026, 12, 1, 0, 10)
    fires, more = latest_fires(["* * * * *"], UTC_ZONE, after, end, 100)
    assert fires == [utc(2026, 12, 1, 0, m) for m in range(1, 11)] and more is False
    fires, more = latest_fires(["* * * * *"], UTC_ZONE, after, end, 3)
    assert fires == [utc(2026, 12, 1, 0, m) for m in (8, 9, 10)] and more is True
    # A month of per-second fires missed: as quick as three.
    fires, more = latest_fires(["* * * * * *"], UTC_ZONE, after - timedelta(days=30), end, 3)
    assert len(fires) == 3 and more is True
    # Several expressions merge, each fire once.
    fires, _ = latest_fires(["*/5 * * * *", "*/2 * * * *"], UTC_ZONE, after, end, 100)
    assert fires == [utc(2026, 12, 1, 0, m) for m in (2, 4, 5, 6, 8, 10)]
