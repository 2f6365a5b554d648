"""The due times of schedules (sharded_broker/recurrence.py): the cron parser, its errors,
and the every= grid."""

from __future__ import annotations

import datetime as dt

import pytest

from sharded_broker import InvalidArgument, InvalidArgumentType
from sharded_broker.recurrence import every_seconds, first_due, next_due, parse_cron


def at(text: str) -> float:
    """'2024-03-01 12:34' (UTC) as seconds since the epoch."""
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=dt.timezone.utc).timestamp()


def following(spec: str, start: str, count: int = 3) -> list[str]:
    """The next ``count`` matching minutes after ``start``."""
    cron = parse_cron(spec)
    times, t = [], at(start)
    for _ in range(count):
        found = cron.next_after(t)
        assert found is not None
        times.append(dt.datetime.fromtimestamp(found, dt.timezone.utc).strftime("%Y-%m-%d %H:%M %a"))
        t = found
    return times


@pytest.mark.parametrize(
    ("spec", "start", "expected"),
    [
        ("*/5 * * * *", "2024-03-01 12:34", ["2024-03-01 12:35 Fri", "2024-03-01 12:40 Fri", "2024-03-01 12:45 Fri"]),
        ("0 9 * * mon-fri", "2024-03-01 10:00", ["2024-03-04 09:00 Mon", "2024-03-05 09:00 Tue", "2024-03-06 09:00 Wed"]),
        ("30 2 1 * *", "2024-01-15 00:00", ["2024-02-01 02:30 Thu", "2024-03-01 02:30 Fri", "2024-04-01 02:30 Mon"]),
        ("0 0 29 feb *", "2024-03-01 00:00", ["2028-02-29 00:00 Tue", "2032-02-29 00:00 Sun", "2036-02-29 00:00 Fri"]),
        # Both day fields restricted: a day matching either (Vixie cron).
        ("0 12 13 * fri", "2024-09-10 00:00", ["2024-09-13 12:00 Fri", "2024-09-20 12:00 Fri", "2024-09-27 12:00 Fri"]),
        ("0 12 1 * 7", "2024-09-28 00:00", ["2024-09-29 12:00 Sun", "2024-10-01 12:00 Tue", "2024-10-06 12:00 Sun"]),
        ("15,45 8-10/2 * * *", "2024-03-01 08:20", ["2024-03-01 08:45 Fri", "2024-03-01 10:15 Fri", "2024-03-01 10:45 Fri"]),
        ("5/20 * * * *", "2024-03-01 08:00", ["2024-03-01 08:05 Fri", "2024-03-01 08:25 Fri", "2024-03-01 08:45 Fri"]),
        ("@hourly", "2024-03-01 08:00", ["2024-03-01 09:00 Fri", "2024-03-01 10:00 Fri", "2024-03-01 11:00 Fri"]),
        ("@weekly", "2024-03-01 08:00", ["2024-03-03 00:00 Sun", "2024-03-10 00:00 Sun", "2024-03-17 00:00 Sun"]),
        ("@yearly", "2024-03-01 08:00", ["2025-01-01 00:00 Wed", "2026-01-01 00:00 Thu", "2027-01-01 00:00 Fri"]),
        ("59 23 31 dec *", "2024-12-31 23:59", ["2025-12-31 23:59 Wed", "2026-12-31 23:59 Thu", "2027-12-31 23:59 Fri"]),
    ],
)
def test_cron_next_times(spec: str, start: str, expected: list[str]) -> None:
    assert following(spec, start) == expected


def test_cron_next_is_strictly_after_and_ignores_seconds() -> None:
    cron = parse_cron("* * * * *")
    assert cron.next_after(at("2024-03-01 12:34")) == at("2024-03-01 12:35")
    assert cron.next_after(at("2024-03-01 12:34") + 59.9) == at("2024-03-01 12:35")
    assert parse_cron("  */5   *  * * *  ").spec == "*/5 * * * *"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("* * * *", "has 4 fields; it needs 5: minute hour day-of-month month day-of-week"),
        ("* * * * * *", "has 6 fields"),
        ("", "has 1 field; it needs 5"),
        ("60 * * * *", "minute field '60': 60 is out of range 0-59"),
        ("* 24 * * *", "hour field '24': 24 is out of range 0-23"),
        ("* * 0 * *", "day of month field '0': 0 is out of range 1-31"),
        ("* * * 13 *", "month field '13': 13 is out of range 1-12"),
        ("* * * * 8", "day of week field '8': 8 is out of range 0-7"),
        ("* * * foo *", "month field 'foo': 'foo' is not a number or a name \\(jan, feb"),
        ("*/0 * * * *", "step '0' must be a whole number >= 1"),
        ("*/x * * * *", "step 'x' must be a whole number >= 1"),
        ("10-5 * * * *", "range '10-5' runs backwards"),
        ("1,,2 * * * *", "empty item in a list"),
        ("-1 * * * *", "'' is not a number"),
        ("0 0 30 feb *", "never matches a date"),
        ("@often", "unknown alias; known: @yearly"),
    ],
)
def test_cron_errors_name_the_field_and_the_fault(spec: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_cron(spec)


def test_cron_must_be_text() -> None:
    with pytest.raises(InvalidArgumentType, match="cron must be a str"):
        parse_cron(None)


def test_every_grid_skips_missed_periods() -> None:
    assert first_due(60, None, 1000.0) == 1060.0
    assert next_due(60, None, 1060.0, 1060.0) == 1120.0  # fired on time
    assert next_due(60, None, 1060.0, 1061.5) == 1120.0  # fired a little late: same grid
    assert next_due(60, None, 1060.0, 1060.0 + 60 * 9 + 1) == 1060.0 + 60 * 10  # nine missed: not made up


def test_cron_next_due_after_a_late_firing_is_after_now() -> None:
    due = at("2024-03-01 12:35")
    assert next_due(None, "*/5 * * * *", due, at("2024-03-01 13:02")) == at("2024-03-01 13:05")


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, InvalidArgument), (0.5, InvalidArgument), (float("inf"), InvalidArgument), (10**9, InvalidArgument),
     (True, InvalidArgumentType), ("60", InvalidArgumentType), (dt.timedelta(0), InvalidArgument)],
)
def test_every_must_be_a_sensible_period(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="every must be"):
        every_seconds(value)


def test_every_takes_seconds_or_a_timedelta() -> None:
    assert every_seconds(90) == 90.0
    assert every_seconds(dt.timedelta(hours=1, seconds=1)) == 3601.0
