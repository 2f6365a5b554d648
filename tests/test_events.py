"""Lifecycle events on every backend: each step of a message reaches a subscriber, in order."""

from __future__ import annotations

import threading

import pytest

from sharded_broker import Broker, ConfigurationError, Event
from support.backends import CLOCK_START, FakeClock

Q = "q"


def collect(stream, count: int) -> list[Event]:
    events = []
    for event in stream:
        events.append(event)
        if len(events) == count:
            break
    return events


@pytest.mark.one_partition
def test_every_lifecycle_step_is_published_in_order(connect, clock: FakeClock) -> None:
    broker = connect(events=True, max_deliveries=2)
    with broker.events(Q, timeout=5) as stream:
        mid = broker.enqueue(Q, b"x", key="k")
        other = broker.enqueue(Q, b"y")
        [lease] = [lease for lease in broker.lease(Q, 2) if lease.id == mid]
        broker.nack(lease)  # retried
        clock.advance(1)
        [lease] = broker.lease(Q)
        broker.nack(lease)  # second delivery of two: dead
        events = collect(stream, 7)
    assert [(e.type, e.id) for e in events] == [
        ("enqueued", mid), ("enqueued", other), ("delivered", mid), ("delivered", other), ("retried", mid),
        ("delivered", mid), ("dead", mid),
    ]
    assert all(e.queue == Q for e in events)
    assert [e.key for e in events[:2]] == ["k", None]
    assert events[0].at == pytest.approx(CLOCK_START)
    assert events[-1].at == pytest.approx(CLOCK_START + 1)


def test_acks_are_published_and_other_queues_are_not(connect) -> None:
    broker = connect(events=True)
    with broker.events(Q, timeout=5) as stream:
        broker.enqueue("elsewhere", b"not mine")
        mid = broker.enqueue(Q, b"x", key="k")
        broker.ack(broker.lease(Q)[0])
        events = collect(stream, 3)
    assert [(e.type, e.id) for e in events] == [("enqueued", mid), ("delivered", mid), ("acked", mid)]


@pytest.mark.one_partition  # events of different partitions come in no defined order
def test_a_subscriber_in_another_thread_receives_events(connect) -> None:
    broker = connect(events=True)
    stream = broker.events(Q, timeout=10)
    received: list[Event] = []
    reader = threading.Thread(target=lambda: received.extend(collect(stream, 3)))
    reader.start()
    ids = [broker.enqueue(Q, b"%d" % i, key=f"k{i}") for i in range(3)]
    reader.join(15)
    stream.close()
    assert [e.id for e in received] == ids


def test_iteration_ends_after_the_timeout_without_events(connect) -> None:
    broker = connect(events=True)
    with broker.events(Q, timeout=0.05) as stream:
        assert list(stream) == []


def test_events_can_be_turned_off(connect) -> None:
    broker = connect(events=False)
    broker.enqueue(Q, b"x")
    with pytest.raises(ConfigurationError, match="events"):
        broker.events(Q)
