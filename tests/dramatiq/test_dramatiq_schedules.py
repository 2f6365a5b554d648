"""Scheduled actors: ``@dramatiq.actor(every=...)``/``cron=`` and ShardedBroker.schedule_actor,
with real Workers."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any, Callable

import dramatiq
import pytest
from dramatiq.middleware import CurrentMessage

from sharded_broker.integrations.dramatiq import ScheduleError, ShardedBroker


def test_two_workers_run_a_scheduled_actor_once_per_period(run_worker, make_broker: Callable[..., ShardedBroker]) -> None:
    """Two brokers (two connections, as two worker processes have), each with a running
    Worker and the actor declared with every=1: each period's message runs once, in one of
    them, with a message id and timestamp of its own."""
    runs: list[tuple[str, str, int]] = []
    lock = threading.Lock()
    brokers = [make_broker(), make_broker()]
    for broker in brokers:
        broker.add_middleware(CurrentMessage())
        broker.engine.schedule_check_interval = 0.2  # look often: the test spans a few periods

        def tick(broker: ShardedBroker = broker) -> None:
            message = CurrentMessage.get_current_message()
            with lock:
                runs.append((str(id(broker)), message.message_id, message.message_timestamp))

        dramatiq.actor(tick, broker=broker, actor_name="tick", every=1)
    queue = "default"
    first_due = brokers[0].engine.schedules(queue)[0].next_due
    assert brokers[1].engine.schedules(queue)[0].next_due == first_due  # the second declaration kept it
    with run_worker(brokers[0], threads=2), run_worker(brokers[1], threads=2):
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and len(runs) < 3:
            time.sleep(0.05)
        # Stop the firings, then let what was fired run: every firing is counted below.
        brokers[0].engine.pause_schedule(queue, "tick")
        brokers[0].join(queue, timeout=5_000)
        time.sleep(0.3)  # a duplicate of a period would run by now
    [schedule] = brokers[0].engine.schedules(queue)
    assert len(runs) >= 3
    assert len(runs) == schedule.fired
    assert len({message_id for _, message_id, _ in runs}) == len(runs)
    # One message per period: each firing falls in a period of its own.
    periods = [int((timestamp / 1000 - first_due) // 1) for _, _, timestamp in runs]
    assert len(set(periods)) == len(periods) and min(periods) >= 0


def test_the_actor_option_stores_the_schedule_and_redeclaring_keeps_its_next_due(
    make_broker: Callable[..., ShardedBroker],
) -> None:
    broker = make_broker()

    @dramatiq.actor(broker=broker, queue_name="reports", every=dt.timedelta(minutes=5))
    def report() -> None: ...

    [schedule] = broker.engine.schedules("reports")
    assert (schedule.name, schedule.spec, schedule.key) == ("report", "every 300s", None)
    assert schedule.headers == {"actor_name": "report"}
    assert dramatiq.Message.decode(schedule.payload).actor_name == "report"
    again = make_broker()  # another process starting: declares the same actor
    dramatiq.actor(report.fn, broker=again, actor_name="report", queue_name="reports", every=300)
    assert again.engine.schedules("reports")[0].next_due == schedule.next_due

    @dramatiq.actor(broker=broker, queue_name="reports", cron="0 6 * * mon")
    def weekly() -> None: ...

    assert [s.spec for s in broker.engine.schedules("reports")] == ["every 300s", "cron 0 6 * * mon"]


def test_schedule_actor_with_arguments_and_a_shard_key(run_worker, make_broker: Callable[..., ShardedBroker]) -> None:
    broker = make_broker()
    broker.engine.schedule_check_interval = 0.2
    seen: list[Any] = []
    done = threading.Event()

    @dramatiq.actor(broker=broker, shard_key="account")
    def sync(account: str, full: bool = False) -> None:
        seen.append((account, full))
        done.set()

    created = broker.schedule_actor(sync, every=1, args=("acct-7",), kwargs={"full": True}, name="sync acct-7")
    assert (created.name, created.key) == ("sync acct-7", "acct-7")
    with run_worker(broker, threads=1):
        assert done.wait(8)
    assert seen[0] == ("acct-7", True)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"cron": "*/5 * * *"}, "cannot schedule actor 'bad': cron '\\*/5 \\* \\* \\*' has 4 fields"),
        ({"every": 0}, "every must be from 1"),
        ({"every": 10, "cron": "* * * * *"}, "exactly one of every="),
    ],
)
def test_bad_schedules_fail_the_declaration(make_broker: Callable[..., ShardedBroker], options: dict, match: str) -> None:
    broker = make_broker()
    with pytest.raises(ScheduleError, match=match):
        dramatiq.actor(lambda: None, broker=broker, actor_name="bad", **options)
    assert broker.engine.schedules("default") == []


def test_a_keyed_actor_needs_its_key_argument(make_broker: Callable[..., ShardedBroker]) -> None:
    broker = make_broker()
    with pytest.raises(ScheduleError, match="cannot schedule actor 'notify'.*'user_id'"):

        @dramatiq.actor(broker=broker, shard_key="user_id", every=60)
        def notify(user_id: int) -> None: ...
