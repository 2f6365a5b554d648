"""When a recurrent message (a schedule, :meth:`Broker.schedule`) is due next.

Computed here, in Python, for every backend: a backend stores each schedule's next due
time and fires it with a compare-and-set (``Backend.fire_schedule``), so the three
backends share one meaning of ``every=`` and ``cron=``.

* ``every=N`` seconds (or a ``timedelta``): first due N seconds after the schedule is
  created; after a firing, the next due time stays on that grid (first due + k * N), the
  first point of it after the firing. Periods missed while nothing ran are not made up:
  the schedule fires once and goes on from the next point.
* ``cron="m h dom mon dow"``: the five fields of crontab(5), in UTC: numbers, ``*``,
  ranges ``a-b``, lists ``a,b``, steps ``*/n`` and ``a-b/n``, month and weekday names
  (``jan``, ``mon``), weekday 0 or 7 for Sunday, and the aliases ``@hourly``, ``@daily``
  (``@midnight``), ``@weekly``, ``@monthly``, ``@yearly`` (``@annually``). As in Vixie
  cron, when both day fields are restricted a day matching either one matches. The next
  due time is the first matching minute after now.

A spec that is wrong raises :class:`~sharded_broker.errors.InvalidArgument` naming the
field and what is wrong with it.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from .errors import InvalidArgument, InvalidArgumentType

# Shortest and longest period of an every= schedule (seconds).
MIN_EVERY = 1.0
MAX_EVERY = 366 * 24 * 3600.0
# A cron spec that matches no minute in this many years never will (every day-of-month,
# month and weekday combination recurs within the 28-year cycle of the calendar; leap
# days within 8 years): refused when it is given.
CRON_HORIZON_DAYS = 8 * 366

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {name: n for n, name in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), start=1)}
_WEEKDAYS = {name: n for n, name in enumerate("sun mon tue wed thu fri sat".split())}


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int]


_FIELDS = (
    _Field("minute", 0, 59, {}),
    _Field("hour", 0, 23, {}),
    _Field("day of month", 1, 31, {}),
    _Field("month", 1, 12, _MONTHS),
    _Field("day of week", 0, 7, _WEEKDAYS),
)


@dataclass(frozen=True)
class Cron:
    """A parsed cron spec: the matching values of each field."""

    spec: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    def matches_day(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        in_days = day.day in self.days
        in_weekdays = day.isoweekday() % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return in_days or in_weekdays
        return in_days and in_weekdays

    def next_after(self, t: float) -> float | None:
        """The first matching minute strictly after ``t`` (seconds since the epoch, UTC),
        or None when there is none within ``CRON_HORIZON_DAYS``."""
        start = dt.datetime.fromtimestamp(math.floor(t / 60) * 60 + 60, dt.timezone.utc)
        day = start.date()
        hours, minutes = sorted(self.hours), sorted(self.minutes)
        for offset in range(CRON_HORIZON_DAYS):
            date = day + dt.timedelta(days=offset)
            if not self.matches_day(date):
                continue
            for hour in hours:
                if offset == 0 and hour < start.hour:
                    continue
                for minute in minutes:
                    if offset == 0 and hour == start.hour and minute < start.minute:
                        continue
                    return dt.datetime(date.year, date.month, date.day, hour, minute, tzinfo=dt.timezone.utc).timestamp()
        return None


def parse_cron(spec: object) -> Cron:
    """A checked cron spec (see the module's docstring)."""
    if not isinstance(spec, str):
        raise InvalidArgumentType(f"cron must be a str such as '*/5 * * * *', not {type(spec).__name__}")
    text = " ".join(spec.split())
    fields_text = ALIASES.get(text.lower(), text)
    if fields_text.startswith("@"):
        raise InvalidArgument(f"cron {spec!r}: unknown alias; known: {', '.join(ALIASES)}")
    parts = fields_text.split(" ")
    if len(parts) != 5:
        raise InvalidArgument(
            f"cron {spec!r} has {len(parts)} field{'s' * (len(parts) != 1)}; it needs 5: "
            "minute hour day-of-month month day-of-week (such as '*/5 * * * *')"
        )
    values = [_parse_field(spec, field, part) for field, part in zip(_FIELDS, parts)]
    weekdays = frozenset(v % 7 for v in values[4])  # 7 is Sunday too
    cron = Cron(
        spec=text,
        minutes=values[0], hours=values[1], days=values[2], months=values[3], weekdays=weekdays,
        days_restricted=not parts[2].startswith("*"), weekdays_restricted=not parts[4].startswith("*"),
    )
    if cron.next_after(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc).timestamp()) is None:
        raise InvalidArgument(f"cron {spec!r} never matches a date (day {parts[2]} of month {parts[3]})")
    return cron


def _parse_field(spec: str, field: _Field, text: str) -> frozenset[int]:
    where = f"cron {spec!r}: {field.name} field {text!r}"
    found: set[int] = set()
    for item in text.split(","):
        if not item:
            raise InvalidArgument(f"{where}: empty item in a list")
        body, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise InvalidArgument(f"{where}: step {step_text!r} must be a whole number >= 1")
            step = int(step_text)
        if body == "*":
            low, high = field.low, field.high
        elif "-" in body:
            first, _, last = body.partition("-")
            low, high = _value(where, field, first), _value(where, field, last)
            if low > high:
                raise InvalidArgument(f"{where}: range {body!r} runs backwards")
        else:
            low = _value(where, field, body)
            high = field.high if slash else low
        found.update(range(low, high + 1, step))
    return frozenset(found)


def _value(where: str, field: _Field, text: str) -> int:
    named = field.names.get(text.lower())
    if named is not None:
        return named
    if not text.isdigit():
        known = f" or a name ({', '.join(field.names)})" if field.names else ""
        raise InvalidArgument(f"{where}: {text!r} is not a number{known}")
    value = int(text)
    if not field.low <= value <= field.high:
        raise InvalidArgument(f"{where}: {value} is out of range {field.low}-{field.high}")
    return value


def every_seconds(every: object) -> float:
    """A checked ``every=``: seconds (int or float) or a ``datetime.timedelta``."""
    if isinstance(every, dt.timedelta):
        seconds = every.total_seconds()
    elif isinstance(every, (int, float)) and not isinstance(every, bool):
        seconds = float(every)
    else:
        raise InvalidArgumentType(f"every must be seconds (int or float) or a timedelta, not {type(every).__name__}")
    if not math.isfinite(seconds) or not MIN_EVERY <= seconds <= MAX_EVERY:
        raise InvalidArgument(f"every must be from {MIN_EVERY:g} to {MAX_EVERY:g} seconds, not {seconds:g}")
    return seconds


def first_due(every: float | None, cron: str | None, now: float) -> float:
    """When a schedule created (or given a new spec) at ``now`` is first due."""
    if every is not None:
        return now + every
    assert cron is not None, "a schedule has every or cron"
    due = parse_cron(cron).next_after(now)
    assert due is not None, "parse_cron refuses a spec that never matches"
    return due


def next_due(every: float | None, cron: str | None, due: float, now: float) -> float:
    """After a firing at ``now`` of a schedule that was due at ``due``: its next due time,
    always after ``now`` (missed periods are skipped, not made up)."""
    if every is not None:
        return due + every * (math.floor(max(0.0, now - due) / every) + 1)
    return first_due(None, cron, max(now, due))
