"""What only the memory backend promises, beyond the conformance suite: stats read the
oldest ready age from a heap, never by visiting every message, and that heap stays
bounded however many messages pass through."""

from __future__ import annotations

import itertools

import pytest

import sharded_broker
from sharded_broker import Message

_names = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def broker(clock: Clock) -> sharded_broker.Broker:
    return sharded_broker.connect(f"memory://memory-backend-{next(_names)}", clock=clock, visibility_timeout=10)


def scanned_oldest_age(broker: sharded_broker.Broker, clock: Clock) -> float:
    """The oldest ready age found by visiting every record (what stats must not do)."""
    ready = [rec.enqueued_at for rec in broker.backend._store.queues["q"].messages.values() if rec.state == "ready"]
    return clock.now - min(ready) if ready else 0.0


def test_the_oldest_ready_age_follows_leases_returns_and_acks(broker: sharded_broker.Broker, clock: Clock) -> None:
    broker.enqueue("q", b"a", key="k")  # enqueued at t
    clock.now += 1
    broker.enqueue("q", b"b", key="j")  # t + 1
    clock.now += 1
    broker.enqueue("q", b"c")  # t + 2, unkeyed
    clock.now += 1
    assert broker.stats("q").oldest_age == 3.0  # a
    [first] = broker.lease("q", 1)
    assert first.payload == b"a"
    assert broker.stats("q").oldest_age == 2.0  # b: a is leased, not ready
    clock.now += 20  # a's lease expires: it is ready again, with its own enqueue time
    leases = broker.lease("q", 3)
    assert sorted(lease.payload for lease in leases) == [b"a", b"b", b"c"]
    assert broker.stats("q").oldest_age == 0.0  # all three leased
    [again] = [lease for lease in leases if lease.payload == b"a"]
    assert broker.release(again)
    assert broker.stats("q").oldest_age == 23.0  # a is back
    assert broker.ack_many(broker.lease("q", 3)) == [True]  # a again (b and c are still leased)
    assert broker.stats("q").oldest_age == 0.0
    assert broker.ack_many([lease for lease in leases if lease.payload != b"a"]) == [True, True]
    assert broker.stats("q").ready == 0 and broker.stats("q").leased == 0


def test_the_oldest_age_heap_stays_bounded_under_a_steady_flow(broker: sharded_broker.Broker, clock: Clock) -> None:
    broker.enqueue_many("q", [Message(b"backlog", key=f"k{i}") for i in range(100)])
    queue = broker.backend._store.queues["q"]
    largest = 0
    for step in range(5_000):
        clock.now += 0.001
        broker.enqueue("q", b"more", key=f"k{step % 100}")
        [lease] = broker.lease("q")
        broker.ack(lease)
        largest = max(largest, len(queue.ready_ages))
        if step % 500 == 0:
            assert broker.stats("q").oldest_age == pytest.approx(scanned_oldest_age(broker, clock))
    assert broker.stats("q").ready == 100
    # Stale entries (records leased or acked since) are dropped before they outnumber the
    # valid ones: at most twice the ready messages, plus a fixed slack.
    assert largest <= 2 * 101 + 64
    assert broker.stats("q").oldest_age == pytest.approx(scanned_oldest_age(broker, clock))


