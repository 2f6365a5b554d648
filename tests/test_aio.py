"""The asyncio API (sharded_broker.aio) on every backend: the operations awaitable, with
the same checks and errors as Broker, waiting without blocking the event loop.

Each test is a plain function running its scenario with ``asyncio.run`` (no plugin).
tests/test_aio_conformance.py runs a part of the conformance suite through AsyncBroker too.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from typing import Any, Awaitable, Callable

import pytest

import sharded_broker
import sharded_broker.aio
from sharded_broker import Broker, ConfigurationError, InvalidURL, Lease, Message
from sharded_broker.aio import AsyncBroker, AsyncEventStream
from support.backends import FakeClock

Q = "q"


def run(scenario: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(scenario, 60))


def test_redis_is_served_natively_and_the_others_in_threads(backend_name: str, aconnect) -> None:
    async def scenario() -> None:
        async with aconnect() as broker:
            native = type(broker.backend).__name__ == "AsyncRedisBackend"
            assert native == (backend_name == "redis")

    run(scenario())


def test_per_key_order_and_one_message_of_a_key_at_a_time(aconnect) -> None:
    async def scenario() -> None:
        async with aconnect() as broker:
            ids = await broker.enqueue_many(Q, [Message(f"a{i}".encode(), key="a") for i in range(3)])
            await broker.enqueue(Q, b"b0", key="b")
            first = await broker.lease(Q, 10)
            assert [lease.payload for lease in first] == [b"a0", b"b0"]
            assert await broker.lease(Q, 10) == []  # a is held until a0 is settled
            assert await broker.ack_many(first) == [True, True]
            delivered = []
            while leases := await broker.lease(Q, 10):
                delivered += [lease.id for lease in leases]
                assert all(await broker.ack_many(leases))
            assert delivered == ids[1:]
            stats = await broker.stats(Q)
            assert (stats.ready, stats.leased, stats.keys) == (0, 0, 0)

    run(scenario())


def test_cancel_and_get_by_id(aconnect) -> None:
    async def scenario() -> None:
        async with aconnect() as broker:
            ids = await broker.enqueue_many(Q, [Message(f"a{i}".encode(), key="a") for i in range(3)])
            assert (await broker.get(Q, ids[0])).state == "waiting"
            result = await broker.cancel(Q, ids[0])
            assert result.cancelled and result.state == "waiting"
            assert await broker.get(Q, ids[0]) is None
            [lease] = await broker.lease(Q)
            assert lease.id == ids[1]  # its key moved on
            assert (await broker.cancel(Q, lease.id)).state == "leased"
            with pytest.raises(sharded_broker.InvalidArgumentType, match="message id must be a str"):
                await broker.cancel(Q, 42)

    run(scenario())


def test_cancel_and_get_by_ref(aconnect) -> None:
    async def scenario() -> None:
        async with aconnect() as producer, aconnect() as other:
            mid = await producer.enqueue(Q, b"x", key="a", ref="task-1")
            assert (await other.get(Q, ref="task-1")).id == mid
            result = await other.cancel(Q, ref="task-1")
            assert result.cancelled and (result.id, result.ref) == (mid, "task-1")
            assert await other.get(Q, ref="task-1") is None
            with pytest.raises(sharded_broker.InvalidArgument, match="exactly one of its id and its ref"):
                await other.cancel(Q, mid, ref="task-1")

    run(scenario())


def test_concurrent_consumer_tasks_keep_each_keys_order(aconnect) -> None:
    async def scenario() -> None:
        async with aconnect() as broker:
            keys = [f"k{k}" for k in range(4)]
            await broker.enqueue_many(Q, [Message(f"{key}:{i}".encode(), key=key) for i in range(10) for key in keys])
            seen: dict[str, list[int]] = {key: [] for key in keys}
            in_flight: set[str] = set()

            async def consume() -> None:
                while sum(map(len, seen.values())) < 40:
                    for lease in await broker.lease(Q, 2, wait=0.05):
                        assert lease.key not in in_flight
                        in_flight.add(lease.key)
                        await asyncio.sleep(0)  # let the other consumers in while it is held
                        key, index = lease.payload.decode().split(":")
                        seen[key].append(int(index))
                        in_flight.discard(lease.key)
                        assert await broker.ack(lease)

            await asyncio.gather(*(consume() for _ in range(3)))
            assert seen == {key: list(range(10)) for key in keys}

    run(scenario())


def test_lease_wait_wakes_on_an_enqueue_from_another_task_and_the_loop_keeps_running(aconnect) -> None:
    async def scenario() -> None:
        async with aconnect() as consumer, aconnect() as producer:
            assert await consumer.lease(Q, wait=0.05) == []  # the queue exists and is empty
            ticks = 0
            ticks_when_enqueued = -1

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            async def produce() -> None:
                nonlocal ticks_when_enqueued
                await asyncio.sleep(0.3)
                ticks_when_enqueued = ticks
                await producer.enqueue(Q, b"late", key="a")

            ticking = asyncio.create_task(ticker())
            started = time.monotonic()
            leases, _ = await asyncio.gather(consumer.lease(Q, wait=20), produce())
            waited = time.monotonic() - started
            ticking.cancel()
            assert [lease.payload for lease in leases] == [b"late"]
            # Woken by the enqueue, long before its wait would have run out ...
            assert waited < 10
            # ... and while it waited, other tasks ran: the ticker advanced and the
            # producer's task got to enqueue at all.
            assert ticks_when_enqueued > 5

    run(scenario())


def test_wait_for_work_returns_when_a_message_arrives(aconnect) -> None:
    async def scenario() -> None:
        async with aconnect() as broker:
            async def produce() -> None:
                await asyncio.sleep(0.2)
                await broker.enqueue("second", b"x")

            started = time.monotonic()
            await asyncio.gather(broker.wait_for_work(["first", "second"], 20), produce())
            assert time.monotonic() - started < 10
            assert [lease.payload for lease in await broker.lease("second")] == [b"x"]

    run(scenario())


def test_a_cancelled_lease_wait_takes_nothing(aconnect) -> None:
    async def scenario() -> None:
        async with aconnect() as consumer, aconnect() as producer:
            waiting = asyncio.create_task(consumer.lease(Q, wait=20))
            await asyncio.sleep(0.1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await producer.enqueue(Q, b"x", key="a")
            await asyncio.sleep(0.5)  # time for a thread still waiting to notice (it must not lease)
            [lease] = await producer.lease(Q)
            assert (lease.payload, lease.attempts) == (b"x", 1)

    run(scenario())


def test_close_ends_a_pending_wait_promptly(aconnect) -> None:
    async def scenario() -> None:
        broker = aconnect()
        waiting = asyncio.create_task(broker.lease(Q, wait=30))
        await asyncio.sleep(0.1)
        waiting.cancel()
        started = time.monotonic()
        await broker.close()
        await asyncio.wait([waiting], timeout=5)  # its cancel is taken at its next step
        assert time.monotonic() - started < 5
        assert waiting.cancelled()

    run(scenario())


def test_async_with_closes_the_backend(backend_name: str, aconnect) -> None:
    async def scenario() -> AsyncBroker:
        async with aconnect() as broker:
            await broker.enqueue(Q, b"x")
        return broker

    broker = run(scenario())
    if backend_name == "redis":
        # The connection the enqueue used went back to its pool and was closed.
        connections = broker.backend._client.connection_pool._available_connections
        assert connections and not any(connection.is_connected for connection in connections)
    elif backend_name == "redis-cluster":
        # Every node's connections were closed with the cluster client.
        nodes = broker.backend._client.nodes_manager.nodes_cache.values()
        connections = [connection for node in nodes for connection in node._connections]
        assert connections and not any(connection.is_connected for connection in connections)
    else:
        with pytest.raises(RuntimeError, match="shutdown"):
            broker._threads._calls.submit(print)


# -- the same checks and errors as Broker ------------------------------------------------------

def _a_lease() -> Lease:
    return Lease(
        queue=Q, id="m", key="k", payload=b"", priority=0, attempts=1, headers={}, token="t", deadline=0.0,
        enqueued_at=0.0, batch_id="m",
    )


BAD_CALLS: dict[str, Callable[[Any], Any]] = {
    "bad key type": lambda b: b.enqueue(Q, b"x", key=42),
    "bad queue name": lambda b: b.enqueue("no spaces", b"x"),
    "payload not bytes": lambda b: b.enqueue(Q, "text"),
    "bad message in a batch": lambda b: b.enqueue_many(Q, [Message(b"ok"), "not a message"]),
    "zero limit": lambda b: b.lease(Q, 0),
    "negative wait": lambda b: b.lease(Q, wait=-1),
    "not a lease": lambda b: b.ack("lease"),
    "bad nack reason": lambda b: b.nack(_a_lease(), reason=3),
    "zero visibility timeout": lambda b: b.extend(_a_lease(), 0),
    "interval without a key": lambda b: b.set_interval(Q, None, 1.0),
    "bad pause key": lambda b: b.pause(Q, key=b"bytes"),
    "negative offset": lambda b: b.dead_letters(Q, offset=-1),
    "bad replay position": lambda b: b.replay(Q, position="middle"),
    "replay ids as one str": lambda b: b.replay(Q, "abc"),
    "too many minutes": lambda b: b.metrics(Q, 10**9),
    "bad key sort": lambda b: b.keys(Q, sort="random"),
    "why without a key": lambda b: b.why(Q, None),
    "bad stuck age": lambda b: b.stuck_keys(Q, older_than=-5),
    "wait_for_work on one str": lambda b: b.wait_for_work("q", 1),
    "empty release token": lambda b: b.release_lease(Q, "m", "", key="k"),
    "bad exchange name": lambda b: b.bind("no spaces", Q),
    "bad events timeout": lambda b: b.events(Q, timeout=-1),
}


def _outcome(call: Callable[[], Any]) -> tuple[type[BaseException], str]:
    try:
        call()
    except Exception as exc:
        return type(exc), str(exc)
    raise AssertionError("no error raised")


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_errors_are_those_of_broker(case: str, broker: Broker, aconnect) -> None:
    expected = _outcome(lambda: BAD_CALLS[case](broker))

    async def scenario() -> tuple[type[BaseException], str]:
        async with aconnect() as abroker:
            async def call() -> None:
                answer = BAD_CALLS[case](abroker)
                if inspect.isawaitable(answer):
                    await answer

            try:
                await call()
            except Exception as exc:
                return type(exc), str(exc)
            raise AssertionError("no error raised")

    assert run(scenario()) == expected


def test_connect_refuses_what_connect_refuses(broker_url: str) -> None:
    for url, options in (("nosuch://x", {}), (broker_url, {"max_deliveries": 0}), (broker_url, {"no_such_option": 1})):
        expected = _outcome(lambda: sharded_broker.connect(url, **options))
        assert _outcome(lambda: sharded_broker.aio.connect(url, **options)) == expected
    with pytest.raises(InvalidURL):
        sharded_broker.aio.connect("sqlite:////no/such/directory/q.db")


# -- events -----------------------------------------------------------------------------------

def test_events_are_an_async_iterator(aconnect) -> None:
    async def scenario() -> None:
        async with aconnect(events=True) as broker:
            async with broker.events(Q, timeout=5) as stream:
                mid = await broker.enqueue(Q, b"x", key="k")
                [lease] = await broker.lease(Q)
                await broker.ack(lease)
                seen = []
                async for event in stream:
                    seen.append((event.type, event.id, event.key))
                    if len(seen) == 3:
                        break
            assert seen == [("enqueued", mid, "k"), ("delivered", mid, "k"), ("acked", mid, "k")]
            # Awaited, a stream is subscribed at once; it ends after its timeout without events.
            stream = await broker.events(Q, timeout=0.2)
            assert [event async for event in stream] == []
            await stream.close()

    run(scenario())


def test_events_off_is_refused_on_subscribing(aconnect) -> None:
    async def scenario() -> None:
        async with aconnect(events=False) as broker:
            stream = broker.events(Q)
            assert isinstance(stream, AsyncEventStream)
            with pytest.raises(ConfigurationError, match="events are off"):
                await stream

    run(scenario())


# -- the whole API --------------------------------------------------------------------------

# Broker's public names that are not operations on a backend, each AsyncBroker's own way.
# Not awaitable operations: attributes, settings kept in this process, and feed (a thread
# over the blocking Broker: docs/asyncio.md says what to use in asyncio code).
NOT_STEPS = {"backend", "defaults", "max_payload_size", "configure_queue", "settings", "events", "close", "feed"}


def test_every_broker_operation_is_awaitable_with_the_same_signature() -> None:
    public = {name for name in dir(Broker) if not name.startswith("_")} - NOT_STEPS
    assert public <= set(dir(AsyncBroker)), sorted(public - set(dir(AsyncBroker)))
    for name in sorted(public):
        method = getattr(AsyncBroker, name)
        assert inspect.iscoroutinefunction(method), name
        assert inspect.signature(method) == inspect.signature(getattr(Broker, name)), name
        assert method.__doc__ == getattr(Broker, name).__doc__, name
    assert inspect.signature(AsyncBroker.events) == inspect.signature(Broker.events).replace(
        return_annotation="'AsyncEventStream'"
    )


def test_settings_and_queue_overrides_apply(aconnect, clock: FakeClock) -> None:
    async def scenario() -> None:
        async with aconnect(max_deliveries=1, queues={"tail": {"retry_position": "tail"}}) as broker:
            assert broker.settings("tail").retry_position == "tail"
            await broker.enqueue(Q, b"x", key="k")
            [lease] = await broker.lease(Q, visibility_timeout=5)
            assert await broker.nack(lease, reason="boom")
            [dead] = await broker.dead_letters(Q)
            assert (dead.reason, dead.attempts) == ("boom after 1 deliveries (max_deliveries=1)", 1)
            assert await broker.replay(Q) == 1
            assert (await broker.why(Q, "k")).reason == "ready"
            clock.advance(120)
            assert [d.key for d in await broker.stuck_keys(Q, older_than=60)] == ["k"]
            assert [info.key for info in await broker.lagging_keys(Q)] == ["k"]
            assert await broker.purge(Q) == 1

    run(scenario())


def test_a_lease_cancelled_while_the_backend_hands_out_messages_gives_them_back(aconnect) -> None:
    async def scenario() -> None:
        async with aconnect() as broker:
            await broker.enqueue(Q, b"x", key="a")
            backend = broker.backend
            real_lease = backend.lease
            # Native asyncio backends (Redis, Redis Cluster) are gated on the event loop;
            # a gate that blocked a thread would block the loop there.
            if inspect.iscoroutinefunction(real_lease):
                gate = asyncio.Event()

                async def held_lease(*args: Any) -> Any:
                    await gate.wait()
                    return await real_lease(*args)

                open_gate = gate.set
            else:
                thread_gate = threading.Event()

                def held_lease(*args: Any) -> Any:
                    thread_gate.wait(10)
                    return real_lease(*args)

                open_gate = thread_gate.set
            backend.lease = held_lease
            leasing = asyncio.create_task(broker.lease(Q))
            await asyncio.sleep(0.1)
            leasing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leasing
            open_gate()  # the backend's lease now runs and hands the message out to nobody
            backend.lease = real_lease
            for _ in range(100):
                await asyncio.sleep(0.02)
                if (await broker.stats(Q)).ready:
                    break
            [lease] = await broker.lease(Q)
            # Given back by a release: its first delivery is not counted.
            assert (lease.payload, lease.attempts) == (b"x", 1)

    run(scenario())


def test_schedules_through_the_asyncio_api_and_the_lease_fires_them(aconnect, clock: FakeClock) -> None:
    async def scenario() -> None:
        async with aconnect() as broker:
            broker.schedule_check_interval = 0.0
            stored = await broker.schedule(Q, "tick", b"t", every=5, key="k")
            assert (stored.name, stored.every, stored.key) == ("tick", 5.0, "k")
            assert [s.name for s in await broker.schedules(Q)] == ["tick"]
            assert await broker.lease(Q) == []  # not due yet
            clock.advance(5)
            [lease] = await broker.lease(Q)  # the look fires it and the same call delivers it
            assert (lease.payload, lease.key, lease.headers["schedule"]) == (b"t", "k", "tick")
            assert await broker.ack(lease)
            await broker.pause_schedule(Q, "tick")
            clock.advance(5)
            assert await broker.fire_due_schedules(Q) == []
            await broker.resume_schedule(Q, "tick")
            clock.advance(5)
            assert len(await broker.fire_due_schedules(Q)) == 1
            with pytest.raises(sharded_broker.InvalidArgument, match="has no schedule named 'nope'"):
                await broker.pause_schedule(Q, "nope")
            assert await broker.unschedule(Q, "tick") is True
            assert await broker.schedules(Q) == []

    run(scenario())


def test_a_failing_look_at_the_schedules_never_fails_an_asyncio_lease(
    backend_name: str, aconnect, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The native asyncio runner throws the look's backend error into the steps too (a
    Redis at maxmemory refuses the firing): the lease keeps its message."""
    refusal = sharded_broker.BackendUnavailable("OOM command not allowed when used memory > 'maxmemory'")
    caplog.set_level(logging.WARNING, logger="sharded_broker")  # an in-process Celery worker leaves the root at ERROR

    def refuse(*args: object) -> None:
        raise refusal

    async def refuse_async(*args: object) -> None:
        raise refusal

    async def scenario() -> None:
        async with aconnect() as broker:
            broker.schedule_check_interval = 0.0
            await broker.schedule(Q, "s", b"tick", every=5)
            await broker.enqueue(Q, b"work")
            clock.advance(5)
            monkeypatch.setattr(broker.backend, "fire_schedule", refuse_async if backend_name == "redis" else refuse)
            [lease] = await broker.lease(Q)
            assert lease.payload == b"work"
            assert f"Could not fire the due schedules of queue {Q!r}" in caplog.text
            monkeypatch.undo()
            assert await broker.ack(lease)
            assert [lease.payload for lease in await broker.lease(Q)] == [b"tick"]  # fired at the next look

    run(scenario())


def test_an_unreachable_redis_is_backend_unavailable_naming_the_url_without_its_password() -> None:
    from support.redis_server import free_port

    url = f"redis://:secret@127.0.0.1:{free_port()}/0"

    async def scenario() -> None:
        async with sharded_broker.aio.connect(url, socket_connect_timeout=2) as broker:
            with pytest.raises(sharded_broker.BackendUnavailable) as raised:
                await broker.enqueue(Q, b"x")
            assert "127.0.0.1" in str(raised.value) and "secret" not in str(raised.value)
            with pytest.raises(sharded_broker.BackendUnavailable):
                await broker.lease(Q, wait=0.5)

    run(scenario())
