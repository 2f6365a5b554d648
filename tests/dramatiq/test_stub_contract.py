"""ShardedBroker keeps StubBroker's test contract: join, dead letters, flushing."""

from __future__ import annotations

import time

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.errors import ActorNotFound
from dramatiq.middleware import SkipMessage, TimeLimitExceeded

from sharded_broker.integrations.dramatiq import DeadLetterMessage, MessageDeadLettered, ShardedBroker


DRAMATIQ_2 = int(dramatiq.__version__.split(".")[0]) >= 2


class CardDeclined(Exception):
    pass


def test_fail_fast_default_is_stub_brokers(broker) -> None:
    # Dramatiq 1.x's StubBroker has no fail_fast_default: its join(fail_fast=False).
    assert broker.fail_fast_default is getattr(StubBroker(), "fail_fast_default", False)


@pytest.mark.skipif(not DRAMATIQ_2, reason="Dramatiq 1.x joins quietly by default, and its proxies have no ==")
def test_join_re_raises_the_actors_own_exception_by_default_as_stub_broker_does(run_worker, broker) -> None:
    assert broker.fail_fast_default is True

    @dramatiq.actor(broker=broker, shard_key="key", max_retries=0)
    def charge(key: str) -> None:
        raise CardDeclined(f"declined for {key}")

    message = charge.send("alice")
    with run_worker(broker):
        with pytest.raises(CardDeclined, match="declined for alice") as raised:
            broker.join("default", timeout=10_000)
        with pytest.raises(CardDeclined) as again:  # every join until flush_all, as StubBroker
            broker.join("default", timeout=10_000)
        broker.join("default", timeout=10_000, fail_fast=False)
    assert again.value is raised.value
    assert raised.value.__traceback__ is not None  # the test shows where the actor failed

    assert broker.dead_letters == [message]
    assert broker.dead_letters[0].args == ("alice",)
    assert broker.dead_letters_by_queue["default"] == [message]
    assert broker.dead_letters_by_queue["other"] == []
    [proxy] = broker.dead_letters
    assert isinstance(proxy, dramatiq.MessageProxy) and isinstance(proxy, DeadLetterMessage)
    assert proxy.failed and proxy._exception is raised.value
    assert proxy.dead.reason.startswith("CardDeclined: declined for alice")

    broker.flush_all()
    assert broker._join_failures == {}  # no exception (nor its frames) kept past flush_all
    assert broker.dead_letters == [] and broker.dead_letters_by_queue["default"] == []
    broker.join("default", timeout=10_000)


def test_a_time_limit_is_re_raised_as_time_limit_exceeded(run_worker, broker) -> None:
    @dramatiq.actor(broker=broker, time_limit=50, max_retries=0)
    def slow() -> None:
        for _ in range(500):  # interruptible, unlike one long sleep
            time.sleep(0.01)

    broker.emit_after("process_boot")  # starts TimeLimit's timer, as the dramatiq command does
    slow.send()
    with run_worker(broker):
        with pytest.raises(TimeLimitExceeded):
            broker.join("default", timeout=10_000, fail_fast=True)


def test_one_exception_is_held_per_queue_whatever_the_number_of_failures(run_worker, broker) -> None:
    @dramatiq.actor(broker=broker, max_retries=0)
    def boom(n: int) -> None:
        raise CardDeclined(f"failure {n}")

    for n in range(20):
        boom.send(n)
    with run_worker(broker, threads=1):
        with pytest.raises(CardDeclined, match="failure 0"):  # the oldest dead letter's
            broker.join("default", timeout=20_000, fail_fast=True)
    assert len(broker.dead_letters) == 20
    assert list(broker._join_failures) == ["default"]
    assert [proxy._exception is not None for proxy in broker.dead_letters] == [True] + [False] * 19
    # Its dead letter purged: no join can want the exception any more, so it goes.
    broker.engine.purge("default", dead=True)
    broker.join("default", timeout=10_000, fail_fast=True)
    assert broker._join_failures == {}


def test_fail_fast_default_false_and_failures_without_an_exception(run_worker, make_broker) -> None:
    broker = make_broker(fail_fast_default=False)

    @dramatiq.actor(broker=broker, max_age=1)
    def stale() -> None: ...

    stale.send()
    time.sleep(0.05)
    with run_worker(broker):
        broker.join("default", timeout=10_000)  # fail_fast_default=False: quiet
        with pytest.raises(SkipMessage, match="age limit"):  # what AgeLimit raised, as on StubBroker
            broker.join("default", timeout=10_000, fail_fast=True)
        broker.flush_all()
        broker.enqueue(dramatiq.Message(queue_name="default", actor_name="gone", args=(), kwargs={}, options={}))
        with pytest.raises(ActorNotFound, match="gone"):  # what the worker rejected it with
            broker.join("default", timeout=10_000, fail_fast=True)
    # Another process sees only what the engine stored: the reason, named.
    other_process = ShardedBroker(url=broker.url)
    try:
        other_process.declare_queue("default")
        with pytest.raises(MessageDeadLettered, match="died: ActorNotFound: gone"):
            other_process.join("default", fail_fast=True)
    finally:
        other_process.close()


def test_a_bad_fail_fast_default_is_refused_by_name(memory_url: str) -> None:
    with pytest.raises(Exception, match="fail_fast_default must be True, False or None, not 'yes'"):
        ShardedBroker(url=memory_url, fail_fast_default="yes")
