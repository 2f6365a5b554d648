"""Recurrent messages stored in the broker (``Broker.schedule``), on every backend.

Time is the FakeClock shared by the test and the backend, so periods pass by moving the
clock. ``fire_due_schedules`` is what a consumer's ``lease`` does about once a second;
the tests call it directly, except where they pin that ``lease`` does it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import Counter
from typing import Callable

import pytest
import redis

import sharded_broker
from sharded_broker import Broker, InvalidArgument, InvalidArgumentType, Message
from sharded_broker.backends.sqlite import sql
from support.backends import CLOCK_START, FakeClock

Q = "jobs"


def fired_payloads(broker: Broker, queue: str = Q) -> list[bytes]:
    """Lease and ack everything deliverable now; the payloads."""
    delivered = []
    while leases := broker.lease(queue, 100):
        delivered.extend(lease.payload for lease in leases)
        broker.ack_many(leases)
    return delivered


def test_an_every_schedule_enqueues_one_message_per_period(broker: Broker, clock: FakeClock) -> None:
    created = broker.schedule(Q, "report", b"run", every=60, key="acct-1", priority=2, headers={"kind": "daily"})
    assert (created.every, created.cron, created.spec) == (60.0, None, "every 60s")
    assert created.next_due == pytest.approx(CLOCK_START + 60)
    assert (created.paused, created.last_fired, created.fired) == (False, None, 0)
    clock.advance(59)
    assert broker.fire_due_schedules(Q) == []
    clock.advance(1)
    [mid] = broker.fire_due_schedules(Q)
    assert broker.fire_due_schedules(Q) == []  # this period is done
    [lease] = broker.lease(Q)
    assert (lease.id, lease.payload, lease.key, lease.priority) == (mid, b"run", "acct-1", 2)
    assert lease.headers == {"kind": "daily", "schedule": "report"}
    [listed] = broker.schedules(Q)
    assert listed.next_due == pytest.approx(CLOCK_START + 120)
    assert listed.last_fired == pytest.approx(CLOCK_START + 60)
    assert listed.fired == 1
    clock.advance(60)
    assert len(broker.fire_due_schedules(Q)) == 1
    assert broker.schedules(Q)[0].fired == 2


def test_a_timedelta_period_is_seconds(broker: Broker) -> None:
    assert broker.schedule(Q, "s", b"x", every=dt.timedelta(minutes=5)).every == 300.0


def test_periods_missed_while_nothing_ran_fire_once(broker: Broker, clock: FakeClock) -> None:
    broker.schedule(Q, "tick", b"t", every=10)
    clock.advance(10 * 7 + 3)  # seven periods passed unfired
    assert len(broker.fire_due_schedules(Q)) == 1
    assert broker.fire_due_schedules(Q) == []
    assert fired_payloads(broker) == [b"t"]
    # The next due time stays on the schedule's grid: the first point after now.
    assert broker.schedules(Q)[0].next_due == pytest.approx(CLOCK_START + 80)


def test_a_cron_schedule_fires_at_its_minutes_in_utc(broker: Broker, clock: FakeClock) -> None:
    start = dt.datetime.fromtimestamp(CLOCK_START, dt.timezone.utc)  # 2023-11-14 22:13:20 UTC
    created = broker.schedule(Q, "quarter", b"q", cron="*/15 * * * *")
    assert created.spec == "cron */15 * * * *"
    first = start.replace(minute=15, second=0).timestamp()
    assert created.next_due == pytest.approx(first)
    clock.advance(first - CLOCK_START - 1)
    assert broker.fire_due_schedules(Q) == []
    clock.advance(1)
    assert len(broker.fire_due_schedules(Q)) == 1
    assert broker.schedules(Q)[0].next_due == pytest.approx(first + 15 * 60)
    clock.advance(24 * 3600)  # a day of quarters missed: one message, then the next quarter
    assert len(broker.fire_due_schedules(Q)) == 1
    assert broker.schedules(Q)[0].next_due == pytest.approx(first + 24 * 3600 + 15 * 60)


def test_replacing_a_schedule_by_name(broker: Broker, clock: FakeClock) -> None:
    broker.schedule(Q, "s", b"old", every=60)
    clock.advance(30)
    # Same period: the next due time is kept (processes declaring it at start-up never
    # push it back), the message is the new one.
    again = broker.schedule(Q, "s", b"new", every=60, key="k")
    assert again.next_due == pytest.approx(CLOCK_START + 60)
    [listed] = broker.schedules(Q)
    assert (listed.payload, listed.key) == (b"new", "k")
    clock.advance(30)
    broker.fire_due_schedules(Q)
    assert fired_payloads(broker) == [b"new"]
    broker.pause_schedule(Q, "s")
    # A new period starts from now; the pause and the firing count stay.
    changed = broker.schedule(Q, "s", b"new", every=10)
    assert changed.next_due == pytest.approx(CLOCK_START + 70)
    assert (changed.paused, changed.fired) == (True, 1)
    assert [s.name for s in broker.schedules(Q)] == ["s"]


def test_a_paused_schedule_enqueues_nothing_and_resumes_without_catching_up(broker: Broker, clock: FakeClock) -> None:
    broker.schedule(Q, "s", b"x", every=10)
    broker.pause_schedule(Q, "s")
    assert broker.schedules(Q)[0].paused
    clock.advance(35)
    assert broker.fire_due_schedules(Q) == []
    broker.resume_schedule(Q, "s")
    resumed = broker.schedules(Q)[0]
    assert not resumed.paused
    assert resumed.next_due == pytest.approx(CLOCK_START + 40)  # the next period after now
    assert broker.fire_due_schedules(Q) == []
    clock.advance(5)
    assert len(broker.fire_due_schedules(Q)) == 1
    broker.resume_schedule(Q, "s")  # not paused: nothing changes
    assert broker.schedules(Q)[0].next_due == pytest.approx(CLOCK_START + 50)


def test_unschedule_and_unknown_names(broker: Broker, clock: FakeClock) -> None:
    broker.schedule(Q, "a", b"a", every=10)
    broker.schedule(Q, "b", b"b", every=10)
    assert [s.name for s in broker.schedules(Q)] == ["a", "b"]
    assert broker.unschedule(Q, "a") is True
    assert broker.unschedule(Q, "a") is False
    clock.advance(10)
    broker.fire_due_schedules(Q)
    assert fired_payloads(broker) == [b"b"]
    with pytest.raises(InvalidArgument, match="has no schedule named 'a'"):
        broker.pause_schedule(Q, "a")
    with pytest.raises(InvalidArgument, match="has no schedule named 'zz'"):
        broker.resume_schedule(Q, "zz")
    assert broker.schedules("other") == []


def test_schedules_of_one_queue_leave_other_queues_alone(broker: Broker, clock: FakeClock) -> None:
    broker.schedule(Q, "s", b"here", every=10)
    broker.schedule("elsewhere", "s", b"there", every=20)
    clock.advance(10)
    assert broker.fire_due_schedules("elsewhere") == []
    assert len(broker.fire_due_schedules(Q)) == 1
    assert fired_payloads(broker, "elsewhere") == [] and fired_payloads(broker) == [b"here"]


def test_a_stale_firing_is_refused(broker: Broker, clock: FakeClock) -> None:
    """The compare-and-set: a consumer that read an old next due time enqueues nothing."""
    created = broker.schedule(Q, "s", b"x", every=10)
    clock.advance(10)
    settings = broker.settings(Q)
    message = Message(b"x", headers={"schedule": "s"})
    first = broker.backend.fire_schedule(Q, "s", created.next_due, created.next_due + 10, message, settings)
    assert first is not None
    assert broker.backend.fire_schedule(Q, "s", created.next_due, created.next_due + 10, message, settings) is None
    assert broker.backend.fire_schedule(Q, "gone", created.next_due, created.next_due + 10, message, settings) is None
    assert broker.stats(Q).ready == 1


def test_fired_messages_are_counted_and_listed_like_any_enqueue(broker: Broker, clock: FakeClock) -> None:
    broker.schedule(Q, "s", b"x", every=10, key="k")
    clock.advance(10)
    broker.fire_due_schedules(Q)
    assert broker.stats(Q).ready == 1 and broker.stats(Q).keys == 1
    assert broker.metrics(Q, 1)[-1].enqueued == 1
    assert Q in broker.queues()


def test_lease_fires_due_schedules_so_a_running_consumer_is_enough(broker: Broker, clock: FakeClock) -> None:
    broker.schedule_check_interval = 0.0  # look at every lease call (real time does not pass here)
    broker.schedule(Q, "s", b"tick", every=5)
    assert broker.lease(Q) == []
    clock.advance(5)
    [lease] = broker.lease(Q)
    assert lease.payload == b"tick" and lease.headers["schedule"] == "s"


def test_lease_looks_at_most_once_per_interval(broker: Broker, clock: FakeClock) -> None:
    broker.schedule_check_interval = 3600.0
    broker.schedule(Q, "s", b"tick", every=5)
    assert broker.lease(Q) == []  # the look of this hour: nothing due yet
    clock.advance(5)
    assert broker.lease(Q) == []  # due, but the next look is an hour away
    assert len(broker.fire_due_schedules(Q)) == 1


def test_concurrent_consumers_enqueue_each_period_once(
    connect: Callable[..., Broker], clock: FakeClock
) -> None:
    """Several brokers (each its own connection, as processes have) race to fire every
    period at the same instant: one message per period."""
    brokers = [connect() for _ in range(4)]
    brokers[0].schedule(Q, "race", b"r", every=10)
    periods = 12
    fired: Counter[int] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    for period in range(periods):
        clock.advance(10)
        barrier = threading.Barrier(len(brokers))

        def fire(broker: Broker, period: int = period, barrier: threading.Barrier = barrier) -> None:
            try:
                barrier.wait(5)
                ids = broker.fire_due_schedules(Q)
                with lock:
                    fired[period] += len(ids)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=fire, args=(broker,)) for broker in brokers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert not errors
    assert fired == Counter({period: 1 for period in range(periods)})
    assert brokers[1].stats(Q).ready == periods
    assert brokers[2].schedules(Q)[0].fired == periods


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({}, InvalidArgument, "exactly one of every= .* and cron="),
        ({"every": 10, "cron": "* * * * *"}, InvalidArgument, "exactly one of"),
        ({"every": 0.5}, InvalidArgument, "every must be from 1 to"),
        ({"every": "10"}, InvalidArgumentType, "every must be seconds"),
        ({"cron": "*/5 * * *"}, InvalidArgument, "has 4 fields; it needs 5"),
        ({"cron": "0 25 * * *"}, InvalidArgument, "hour field '25': 25 is out of range 0-23"),
        ({"cron": 5}, InvalidArgumentType, "cron must be a str"),
    ],
)
def test_bad_schedules_are_refused_before_anything_is_stored(
    broker: Broker, arguments: dict, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        broker.schedule(Q, "bad", b"x", **arguments)
    assert broker.schedules(Q) == []


@pytest.mark.parametrize(
    ("name", "error"), [("", InvalidArgument), ("a\nb", InvalidArgument), ("x" * 201, InvalidArgument), (3, InvalidArgumentType)]
)
def test_bad_schedule_names_are_refused(broker: Broker, name: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="schedule name"):
        broker.schedule(Q, name, b"x", every=10)  # type: ignore[arg-type]


def test_bad_messages_are_refused_like_enqueue(broker: Broker) -> None:
    with pytest.raises(InvalidArgumentType):
        broker.schedule(Q, "s", "not bytes", every=10)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        broker.schedule(Q, "s", b"x", every=10, key="bad\x00key")
    assert broker.schedules(Q) == []


# -- per backend: where schedules live -------------------------------------------------------


def test_sqlite_schedule_statements_read_through_indexes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    broker = sharded_broker.connect(f"sqlite:///{tmp_path}/q.db", clock=clock)
    for i in range(50):
        broker.schedule(Q if i % 2 else "other", f"s{i}", b"x", every=10 + i)
    conn = broker.backend._connection()
    conn.execute("ANALYZE")
    statements: set[str] = set()
    conn.set_trace_callback(statements.add)
    try:
        broker.schedule(Q, "s1", b"y", every=11)
        clock.advance(30)
        broker.schedule_check_interval = 0.0
        broker.lease(Q)  # looks and fires
        broker.pause_schedule(Q, "s3")
        broker.resume_schedule(Q, "s3")
        broker.unschedule(Q, "s5")
    finally:
        conn.set_trace_callback(None)
    checked = [s for s in statements if "schedules" in s]
    assert len(checked) >= 5
    offenders = {}
    for statement in checked:
        plan = conn.execute(f"EXPLAIN QUERY PLAN {statement}").fetchall()
        scans = [d for *_, d in plan if (d.startswith("SCAN") and " INDEX " not in d) or "TEMP B-TREE" in d]
        if scans:
            offenders[statement] = scans
    assert offenders == {}
    broker.close()


def test_sqlite_a_schema_5_file_gains_the_schedules_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/old.db"
    old = sharded_broker.connect(url)
    old.enqueue(Q, b"kept", key="k")
    conn = old.backend._connection()
    conn.executescript("DROP TABLE schedules; PRAGMA user_version = 5;")
    old.close()
    upgraded = sharded_broker.connect(url)
    conn = upgraded.backend._connection()
    assert conn.execute("PRAGMA user_version").fetchone()[0] == sql.SCHEMA_VERSION
    upgraded.schedule(Q, "s", b"x", every=10)
    assert [s.name for s in upgraded.schedules(Q)] == ["s"]
    assert [lease.payload for lease in upgraded.lease(Q)] == [b"kept"]
    upgraded.close()


def test_redis_schedules_live_under_the_queue_hash_tag(redis_url: str) -> None:
    clock = FakeClock()
    broker = sharded_broker.connect(redis_url, clock=clock)
    broker.schedule(Q, "s", b"x", every=10, key="k")
    broker.schedule(Q, "t", b"y", cron="* * * * *")
    broker.pause_schedule(Q, "t")
    clock.advance(10)
    assert len(broker.fire_due_schedules(Q)) == 1
    admin = redis.Redis.from_url(redis_url)
    keys = {key.decode() for key in admin.scan_iter()}
    assert {"sb:{jobs}:schedules", "sb:{jobs}:schedq"} <= keys
    assert all(key.startswith("sb:{jobs}:") for key in keys - {"sb:queues"})
    # Only schedules not paused are in the due order.
    assert admin.zrange("sb:{jobs}:schedq", 0, -1) == [b"s"]
    admin.close()
    broker.close()


def test_a_failing_look_at_the_schedules_never_fails_the_lease(
    broker: Broker, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The lease's messages are taken before the look: a backend refusing the firing (a
    Redis at maxmemory refuses enqueues) must not lose them."""
    caplog.set_level(logging.WARNING, logger="sharded_broker")  # an in-process Celery worker leaves the root at ERROR
    broker.schedule_check_interval = 0.0
    broker.schedule(Q, "s", b"tick", every=5)
    broker.enqueue(Q, b"work")
    clock.advance(5)

    def refuse(*args: object, **kwargs: object) -> None:
        raise sharded_broker.BackendUnavailable("OOM command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(broker.backend, "fire_schedule", refuse)
    [lease] = broker.lease(Q)
    assert lease.payload == b"work"
    assert "Could not fire the due schedules of queue 'jobs'" in caplog.text
    monkeypatch.undo()
    assert broker.ack(lease)
    assert [lease.payload for lease in broker.lease(Q)] == [b"tick"]  # fired at the next look


def test_a_full_key_refuses_a_firing_and_the_period_fires_once_there_is_room(connect, clock: FakeClock, caplog) -> None:
    broker = connect(max_pending_per_key=1)
    created = broker.schedule(Q, "full", b"s", every=10, key="a")
    broker.schedule(Q, "other", b"o", every=10, key="b")
    [waiting] = broker.enqueue_many(Q, [Message(b"m", key="a")])
    clock.advance(10)
    with caplog.at_level(logging.WARNING, logger="sharded_broker"):
        fired = broker.fire_due_schedules(Q)
    assert len(fired) == 1 and broker.get(Q, fired[0]).key == "b"  # the other schedule fired
    assert "Schedule 'full' of queue 'jobs' not fired now" in caplog.text and "max_pending_per_key" in caplog.text
    full = {s.name: s for s in broker.schedules(Q)}["full"]
    assert (full.next_due, full.fired, full.last_fired) == (created.next_due, 0, None)  # nothing changed
    assert broker.stats(Q).ready == 2
    assert broker.cancel(Q, waiting).cancelled  # room in key a (no lease: it would look too)
    [refired] = broker.fire_due_schedules(Q)  # the same period, now that there is room
    assert broker.get(Q, refired).key == "a"
    assert {s.name: s for s in broker.schedules(Q)}["full"].fired == 1


@pytest.mark.parametrize("on_full", ["drop_oldest", "replace"])
def test_a_latest_wins_key_takes_the_firing_in_place_of_a_waiting_message(connect, clock: FakeClock, on_full) -> None:
    broker = connect(max_pending_per_key=1, on_full=on_full)
    broker.schedule(Q, "tick", b"new", every=10, key="a")
    [old] = broker.enqueue_many(Q, [Message(b"old", key="a")])
    clock.advance(10)
    [mid] = broker.fire_due_schedules(Q)
    assert [d.id for d in broker.dead_letters(Q)] == [old]
    assert broker.dead_letters(Q)[0].reason.startswith("dropped: max_pending_per_key")
    assert fired_payloads(broker) == [b"new"]
    assert broker.schedules(Q)[0].fired == 1
