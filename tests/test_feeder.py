"""The feeder (sharded_broker/feeder.py: Broker.feed, and AsyncBroker.feed's AsyncFeeder)
on every backend: it refills below low water up to high water, never enqueues a dedup id
seen within the dedup window, and stops when told."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import threading
import time
from typing import Any, AsyncIterator, Iterable, Iterator

import pytest

import sharded_broker
from sharded_broker import InvalidArgument, InvalidArgumentType, Message
from sharded_broker.aio import AsyncBroker, AsyncFeeder
from sharded_broker.feeder import Feeder, FillResult


class Source:
    """A writer over rows 0, 1, 2, ...: each call yields the next rows not yet handed out,
    and records how much room it was offered."""

    def __init__(self) -> None:
        self.next_row = 0
        self.rooms: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, room: int) -> Iterator[Message]:
        with self.lock:
            self.rooms.append(room)
        for _ in range(room):
            with self.lock:
                row, self.next_row = self.next_row, self.next_row + 1
            yield Message(f"row-{row}".encode(), key=f"k{row % 3}", dedup_id=f"row-{row}")


def drain(broker: sharded_broker.Broker, queue: str, count: int) -> list[bytes]:
    """Lease and ack ``count`` messages (per key, one at a time)."""
    payloads: list[bytes] = []
    while len(payloads) < count:
        leases = broker.lease(queue, limit=count - len(payloads))
        assert leases, f"only {len(payloads)} of {count} messages could be leased"
        broker.ack_many(leases)
        payloads.extend(lease.payload for lease in leases)
    return payloads


def test_fills_up_to_high_water_only_when_below_low_water(broker: sharded_broker.Broker) -> None:
    source = Source()
    feeder = Feeder(broker, "jobs", source, low_water=4, high_water=10)

    assert feeder.fill_once() == FillResult(waiting=0, written=10)
    assert broker.stats("jobs").ready == 10
    drain(broker, "jobs", 6)  # 4 left: not below low water
    assert feeder.fill_once() == FillResult(waiting=4, written=0)
    drain(broker, "jobs", 1)  # 3 left: refilled by high_water - 3
    assert feeder.fill_once() == FillResult(waiting=3, written=7)
    assert broker.stats("jobs").ready == 10
    assert source.rooms == [10, 7]
    assert source.next_row == 17  # the writer was never asked for more than the room


def test_delayed_messages_count_as_waiting(broker: sharded_broker.Broker) -> None:
    for n in range(5):
        broker.enqueue("jobs", b"later", delay=60, dedup_id=f"later-{n}")
    source = Source()
    assert Feeder(broker, "jobs", source, low_water=5, high_water=8).fill_once() == FillResult(5, 0)
    assert Feeder(broker, "jobs", source, low_water=6, high_water=8).fill_once() == FillResult(5, 3)
    stats = broker.stats("jobs")
    assert (stats.ready, stats.delayed) == (3, 5)


def test_a_dedup_id_seen_within_the_window_is_never_enqueued_again(broker: sharded_broker.Broker, clock) -> None:
    broker.configure_queue("jobs", dedup_window=60.0)
    rows = ["a", "b", "c"]

    def same_rows(room: int) -> Iterable[Message]:
        return [Message(row.encode(), key=row, dedup_id=row) for row in rows[:room]]

    feeder = Feeder(broker, "jobs", same_rows, low_water=1, high_water=3)
    feeder.fill_once()
    assert sorted(drain(broker, "jobs", 3)) == [b"a", b"b", b"c"]

    # Still pending in the source, so yielded again: within the window the engine drops them.
    feeder.fill_once()
    clock.advance(59)
    feeder.fill_once()
    stats = broker.stats("jobs")
    assert (stats.ready, stats.delayed, stats.leased) == (0, 0, 0)

    clock.advance(2)  # the window has passed: the same ids are new messages again
    feeder.fill_once()
    assert sorted(drain(broker, "jobs", 3)) == [b"a", b"b", b"c"]


def test_two_feeders_over_overlapping_rows_enqueue_each_row_once(connect) -> None:
    first, second = connect(), connect()

    def rows_from(start: int):
        return lambda room: [Message(f"row-{n}".encode(), dedup_id=f"row-{n}") for n in range(start, start + room)]

    Feeder(first, "jobs", rows_from(0), low_water=5, high_water=5).fill_once()  # rows 0-4
    assert Feeder(second, "jobs", rows_from(3), low_water=10, high_water=10).fill_once() == FillResult(5, 5)  # rows 3-7
    assert sorted(drain(first, "jobs", 8)) == sorted(f"row-{n}".encode() for n in range(8))
    assert first.stats("jobs").ready == 0


def test_feed_runs_in_a_thread_until_stopped(broker: sharded_broker.Broker) -> None:
    source = Source()
    feeder = broker.feed("jobs", source, low_water=3, high_water=6, interval=0.02)
    try:
        consumed: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(consumed) < 30 and time.monotonic() < deadline:
            leases = broker.lease("jobs", limit=3, wait=0.5)
            broker.ack_many(leases)
            consumed.extend(lease.payload for lease in leases)
            assert broker.stats("jobs").ready <= 6
    finally:
        feeder.stop()
    assert not feeder.is_alive()
    assert len(consumed) >= 30
    assert len(set(consumed)) == len(consumed)  # no row delivered twice
    written = source.next_row
    time.sleep(0.1)  # several intervals: a stopped feeder asks the writer nothing more
    assert source.next_row == written


def test_run_feeds_in_the_callers_thread_until_stop(broker: sharded_broker.Broker) -> None:
    source = Source()
    feeder = Feeder(broker, "jobs", source, low_water=1, high_water=2, interval=0.01)
    stopper = threading.Timer(0.2, feeder.stop)
    stopper.start()
    started = time.monotonic()
    feeder.run()  # returns once stop() was called
    assert time.monotonic() - started < 5
    assert broker.stats("jobs").ready == 2


def test_a_failing_writer_is_logged_and_the_feeder_goes_on(broker: sharded_broker.Broker, caplog) -> None:
    calls = []

    def flaky(room: int) -> list[Message]:
        calls.append(room)
        if len(calls) == 1:
            raise RuntimeError("source database is down")
        return [Message(b"x", dedup_id="x")]

    with caplog.at_level(logging.ERROR, logger="sharded_broker.feeder"):
        feeder = broker.feed("jobs", flaky, low_water=1, high_water=1, interval=0.01)
        deadline = time.monotonic() + 10
        while broker.stats("jobs").ready == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        feeder.stop()
    assert broker.stats("jobs").ready == 1
    assert "source database is down" in caplog.text


def test_a_message_without_a_dedup_id_refuses_the_whole_fill(broker: sharded_broker.Broker) -> None:
    def careless(room: int) -> list[Message]:
        return [Message(b"ok", dedup_id="ok"), Message(b"no id")]

    with pytest.raises(InvalidArgument, match="without a dedup_id"):
        Feeder(broker, "jobs", careless, low_water=1, high_water=5).fill_once()
    with pytest.raises(InvalidArgumentType, match="must yield sharded_broker.Message values, not bytes"):
        Feeder(broker, "jobs", lambda room: [b"raw"], low_water=1, high_water=5).fill_once()
    assert broker.stats("jobs").ready == 0


@pytest.mark.parametrize(
    "options, error, text",
    [
        ({"low_water": 5, "high_water": 2}, InvalidArgument, "low_water \\(5\\) must not exceed high_water \\(2\\)"),
        ({"low_water": -1, "high_water": 2}, InvalidArgument, "low_water must be >= 0"),
        ({"low_water": 0, "high_water": 0}, InvalidArgument, "high_water must be >= 1"),
        ({"low_water": 1.5, "high_water": 2}, InvalidArgumentType, "low_water must be an int, not float"),
        ({"low_water": 1, "high_water": 2, "interval": 0}, InvalidArgument, "interval must be > 0"),
    ],
)
def test_bad_settings_are_refused(broker: sharded_broker.Broker, options, error, text) -> None:
    with pytest.raises(error, match=text):
        broker.feed("jobs", Source(), **options)


def test_a_writer_must_be_callable(broker: sharded_broker.Broker) -> None:
    with pytest.raises(InvalidArgumentType, match="writer must be a callable"):
        broker.feed("jobs", [Message(b"x", dedup_id="x")], low_water=1, high_water=1)  # type: ignore[arg-type]


# -- AsyncFeeder (AsyncBroker.feed): the same looks and checks, as a task of the loop ------


def run(scenario: Any) -> Any:
    return asyncio.run(asyncio.wait_for(scenario, 60))


def test_async_feeder_takes_every_kind_of_writer_and_asks_no_more_than_room(aconnect) -> None:
    closed: list[int] = []

    async def rows_later(room: int) -> list[Message]:  # an async def
        await asyncio.sleep(0)
        return [Message(f"a{n}".encode(), dedup_id=f"a{n}") for n in range(room)]

    async def endless(room: int) -> AsyncIterator[Message]:  # an async generator, never exhausted
        try:
            for n in itertools.count():
                yield Message(f"g{n}".encode(), dedup_id=f"g{n}")
        finally:
            closed.append(room)

    async def scenario() -> None:
        async with aconnect() as broker:
            assert await AsyncFeeder(broker, "a", rows_later, low_water=2, high_water=4).fill_once() == FillResult(0, 4)
            assert await AsyncFeeder(broker, "a", rows_later, low_water=2, high_water=4).fill_once() == FillResult(4, 0)
            assert await AsyncFeeder(broker, "g", endless, low_water=5, high_water=5).fill_once() == FillResult(0, 5)
            assert closed == [5]  # left early, and cleaned up at once
            plain = AsyncFeeder(broker, "s", Source(), low_water=3, high_water=3)
            assert await plain.fill_once() == FillResult(0, 3)
            assert [(await broker.stats(q)).ready for q in ("a", "g", "s")] == [4, 5, 3]

    run(scenario())


def test_async_feed_refills_as_a_task_until_stopped(aconnect) -> None:
    source = Source()

    async def scenario() -> None:
        async with aconnect() as broker:
            feeder = broker.feed("jobs", source, low_water=3, high_water=6, interval=0.02)
            assert isinstance(feeder, AsyncFeeder) and feeder.task is not None
            consumed: list[bytes] = []
            deadline = time.monotonic() + 20
            while len(consumed) < 30 and time.monotonic() < deadline:
                leases = await broker.lease("jobs", limit=3)
                if not leases:
                    await asyncio.sleep(0.01)  # the feeder task runs meanwhile
                await broker.ack_many(leases)
                consumed.extend(lease.payload for lease in leases)
                assert (await broker.stats("jobs")).ready <= 6
            await feeder.stop()
            assert feeder.task.done()
            assert len(consumed) >= 30
            assert len(set(consumed)) == len(consumed)  # no row delivered twice
            written = source.next_row
            await asyncio.sleep(0.1)  # several intervals: a stopped feeder asks the writer nothing more
            assert source.next_row == written

    run(scenario())


def test_async_feeder_logs_a_failing_writer_and_goes_on(aconnect, caplog) -> None:
    calls: list[int] = []

    async def flaky(room: int) -> list[Message]:
        calls.append(room)
        if len(calls) == 1:
            raise RuntimeError("source database is down")
        return [Message(b"x", dedup_id="x")]

    async def scenario() -> None:
        async with aconnect() as broker:
            feeder = broker.feed("jobs", flaky, low_water=1, high_water=1, interval=0.01)
            deadline = time.monotonic() + 10
            while (await broker.stats("jobs")).ready == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await feeder.stop()
            assert (await broker.stats("jobs")).ready == 1

    with caplog.at_level(logging.ERROR, logger="sharded_broker.feeder"):
        run(scenario())
    assert "source database is down" in caplog.text


def test_async_feeder_refuses_what_feeder_refuses(aconnect) -> None:
    async def careless(room: int) -> list[Message]:
        return [Message(b"ok", dedup_id="ok"), Message(b"no id")]

    async def scenario() -> None:
        async with aconnect() as broker:
            with pytest.raises(InvalidArgument, match="without a dedup_id"):
                await AsyncFeeder(broker, "jobs", careless, low_water=1, high_water=5).fill_once()
            with pytest.raises(InvalidArgument, match="low_water \\(5\\) must not exceed high_water \\(2\\)"):
                broker.feed("jobs", careless, low_water=5, high_water=2)
            with pytest.raises(InvalidArgumentType, match="writer must be a callable"):
                broker.feed("jobs", [Message(b"x", dedup_id="x")], low_water=1, high_water=1)  # type: ignore[arg-type]
            assert (await broker.stats("jobs")).ready == 0

    run(scenario())


def test_async_feed_takes_the_arguments_of_broker_feed() -> None:
    sync, aio = inspect.signature(sharded_broker.Broker.feed), inspect.signature(AsyncBroker.feed)
    assert list(sync.parameters) == list(aio.parameters)
    for name in ("low_water", "high_water", "interval"):
        assert sync.parameters[name] == aio.parameters[name]
