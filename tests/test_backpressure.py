"""Backpressure (issue 17, item 4): ``max_pending_per_key``, ``max_pending`` and ``on_full``
on every backend, through the public Broker API (docs/operations.md, "Backpressure").

"Waiting" is ready or delayed, never leased; a message that ``drop_oldest`` or ``replace``
drops goes to the dead letters with reason ``dropped: max_pending_per_key``.
"""

from __future__ import annotations

import pickle

import sharded_broker


import pytest

from sharded_broker import Broker, ConfigurationError, Message, QueueFull, ShardedBrokerError
from sharded_broker.models import DROPPED_REASON
from support.backends import FakeClock, partition_options

Q = "q"


def drain(broker: Broker, queue: str = Q) -> list[bytes]:
    delivered: list[bytes] = []
    while leases := broker.lease(queue, 10):
        delivered.extend(lease.payload for lease in leases)
        assert all(broker.ack_many(leases))
    return delivered


def counts(broker: Broker, queue: str = Q) -> tuple[int, int, int, int, int]:
    s = broker.stats(queue)
    return s.ready, s.delayed, s.leased, s.dead, s.keys


def enqueued_count(broker: Broker, queue: str = Q) -> int:
    return sum(minute.enqueued for minute in broker.metrics(queue, 5))


# -- reject --------------------------------------------------------------------------------


def test_reject_refuses_beyond_the_limit_with_a_clear_error(connect) -> None:
    broker = connect(max_pending_per_key=2)
    broker.enqueue(Q, b"1", key="a")
    broker.enqueue(Q, b"2", key="a")
    with pytest.raises(QueueFull) as refused:
        broker.enqueue(Q, b"3", key="a")
    error = refused.value
    assert (error.queue, error.key, error.setting, error.limit) == (Q, "a", "max_pending_per_key", 2)
    assert "'a'" in str(error) and "max_pending_per_key=2" in str(error)
    # Other keys and unkeyed messages are not limited by another key's backlog.
    broker.enqueue(Q, b"b1", key="b")
    broker.enqueue(Q, b"u1")
    broker.enqueue(Q, b"u2")
    broker.enqueue(Q, b"u3")
    assert counts(broker) == (6, 0, 0, 0, 2)
    assert enqueued_count(broker) == 6
    assert sorted(drain(broker)) == sorted([b"1", b"2", b"b1", b"u1", b"u2", b"u3"])


def test_leased_messages_do_not_count_retries_do(connect, clock: FakeClock) -> None:
    broker = connect(max_pending_per_key=1)
    broker.enqueue(Q, b"1", key="a")
    [running] = broker.lease(Q)
    broker.enqueue(Q, b"2", key="a")  # one may wait behind the running one
    with pytest.raises(QueueFull):
        broker.enqueue(Q, b"3", key="a")
    assert broker.ack(running)
    [second] = broker.lease(Q)
    assert broker.nack(second, delay=5)  # a retry waits again (holding its key): it counts
    with pytest.raises(QueueFull):
        broker.enqueue(Q, b"3", key="a")
    clock.advance(6)
    [retried] = broker.lease(Q)
    assert (retried.payload, retried.attempts) == (b"2", 2)
    broker.enqueue(Q, b"3", key="a")
    assert broker.ack(retried)
    assert drain(broker) == [b"3"]


def test_delayed_messages_count_as_waiting(connect, clock: FakeClock) -> None:
    broker = connect(max_pending_per_key=2)
    broker.enqueue(Q, b"later", key="a", delay=30)
    broker.enqueue(Q, b"now", key="a")
    with pytest.raises(QueueFull):
        broker.enqueue(Q, b"x", key="a", delay=10)
    assert counts(broker) == (1, 1, 0, 0, 1)
    assert drain(broker) == [b"now"]
    broker.enqueue(Q, b"x", key="a", delay=10)
    with pytest.raises(QueueFull):
        broker.enqueue(Q, b"y", key="a")
    clock.advance(31)  # both came due: still waiting, still counted
    with pytest.raises(QueueFull):
        broker.enqueue(Q, b"y", key="a")
    assert drain(broker) == [b"x", b"later"]  # each entered its key's order when due
    broker.enqueue(Q, b"y", key="a")
    assert drain(broker) == [b"y"]


@pytest.mark.one_partition
def test_enqueue_many_is_all_or_nothing(connect, clock: FakeClock) -> None:
    broker = connect(max_pending_per_key=2)
    broker.enqueue(Q, b"a1", key="a")
    before = (counts(broker), enqueued_count(broker))
    batch = [Message(b"b1", key="b"), Message(b"u"), Message(b"a2", key="a"), Message(b"a3", key="a")]
    with pytest.raises(QueueFull) as refused:
        broker.enqueue_many(Q, batch)
    assert refused.value.key == "a"
    assert (counts(broker), enqueued_count(broker)) == before
    assert len(broker.enqueue_many(Q, batch[:3])) == 3
    assert sorted(drain(broker)) == [b"a1", b"a2", b"b1", b"u"]


def test_a_duplicate_adds_nothing_and_is_not_refused(connect) -> None:
    broker = connect(max_pending_per_key=1)
    first = broker.enqueue(Q, b"1", key="a", dedup_id="d")
    assert broker.enqueue(Q, b"again", key="a", dedup_id="d") == first
    ids = broker.enqueue_many(Q, [Message(b"x", key="b", dedup_id="e"), Message(b"y", key="b", dedup_id="e")])
    assert ids[0] == ids[1]
    assert counts(broker) == (2, 0, 0, 0, 2)


def test_at_head_messages_are_never_refused_but_count(connect) -> None:
    """Framework retries enqueue at the head of their key: a full key still takes them."""
    broker = connect(max_pending_per_key=1)
    broker.enqueue(Q, b"queued", key="a")
    broker.enqueue(Q, b"retry", key="a", at_head=True)
    with pytest.raises(QueueFull):
        broker.enqueue(Q, b"more", key="a")
    assert drain(broker) == [b"retry", b"queued"]


# -- drop_oldest and replace -----------------------------------------------------------------


def test_drop_oldest_keeps_the_newest(connect, clock: FakeClock) -> None:
    broker = connect(max_pending_per_key=2, on_full="drop_oldest")
    for n in range(5):
        broker.enqueue(Q, b"%d" % n, key="a")
        clock.advance(0.001)
    assert counts(broker) == (2, 0, 0, 3, 1)
    dead = broker.dead_letters(Q)
    assert [(d.payload, d.reason, d.key) for d in dead] == [(b"%d" % n, DROPPED_REASON, "a") for n in range(3)]
    assert sum(minute.dead for minute in broker.metrics(Q, 5, key="a")) == 3
    assert drain(broker) == [b"3", b"4"]


def test_replace_is_latest_wins_behind_the_running_one(connect, clock: FakeClock) -> None:
    broker = connect(queues={"debounce": {"max_pending_per_key": 1, "on_full": "replace"}})
    broker.enqueue("debounce", b"v0", key="doc")
    [running] = broker.lease("debounce")
    for n in range(1, 6):
        broker.enqueue("debounce", b"v%d" % n, key="doc")
        clock.advance(0.001)
    assert counts(broker, "debounce") == (1, 0, 1, 4, 1)
    assert broker.lease("debounce") == []  # the key is held by the running one
    assert broker.ack(running)
    assert drain(broker, "debounce") == [b"v5"]
    assert [d.payload for d in broker.dead_letters("debounce")] == [b"v1", b"v2", b"v3", b"v4"]
    # The queue without settings of its own is not limited.
    for n in range(3):
        broker.enqueue(Q, b"%d" % n, key="doc")
    assert counts(broker) == (3, 0, 0, 0, 1)


def test_replace_takes_the_place_of_the_newest_waiting(connect, clock: FakeClock) -> None:
    broker = connect(max_pending_per_key=3, on_full="replace")
    for payload in (b"a", b"b", b"c", b"d"):
        broker.enqueue(Q, payload, key="k")
        clock.advance(0.001)
    assert [d.payload for d in broker.dead_letters(Q)] == [b"c"]
    assert drain(broker) == [b"a", b"b", b"d"]


def test_drop_and_replace_inside_one_batch(connect) -> None:
    broker = connect(max_pending_per_key=2, on_full="drop_oldest")
    broker.enqueue_many(Q, [Message(b"%d" % n, key="a") for n in range(5)])
    assert [d.payload for d in broker.dead_letters(Q)] == [b"0", b"1", b"2"]
    assert drain(broker) == [b"3", b"4"]
    broker.configure_queue("r", max_pending_per_key=1, on_full="replace")
    broker.enqueue_many("r", [Message(b"%d" % n, key="a", headers={"n": n}) for n in range(4)])
    assert [(d.payload, d.headers) for d in broker.dead_letters("r")] == [(b"%d" % n, {"n": n}) for n in range(3)]
    [last] = broker.lease("r")
    assert (last.payload, last.headers) == (b"3", {"n": 3})


@pytest.mark.parametrize("on_full", ["drop_oldest", "replace"])
def test_a_key_whose_waiting_messages_are_all_delayed_is_full(connect, on_full: str) -> None:
    broker = connect(max_pending_per_key=1, on_full=on_full)
    broker.enqueue(Q, b"later", key="a", delay=60)
    with pytest.raises(QueueFull) as refused:
        broker.enqueue(Q, b"now", key="a")
    assert "delayed" in str(refused.value)
    assert counts(broker) == (0, 1, 0, 0, 1)


def test_stats_keys_and_why_agree_after_drops(connect, clock: FakeClock) -> None:
    broker = connect(max_pending_per_key=2, on_full="drop_oldest")
    broker.enqueue(Q, b"x0", key="x")
    [running] = broker.lease(Q)
    ids = {}
    for n in range(1, 6):
        ids[b"x%d" % n] = broker.enqueue(Q, b"x%d" % n, key="x")
        ids[b"y%d" % n] = broker.enqueue(Q, b"y%d" % n, key="y")
        clock.advance(0.001)
    assert counts(broker) == (4, 0, 1, 6, 2)
    by_key = {info.key: info.backlog for info in broker.keys(Q)}
    assert by_key == {"x": 3, "y": 2}  # backlog counts the leased one too
    assert broker.key_info(Q, "x").head.id == ids[b"x4"]
    assert broker.key_info(Q, "y").head.id == ids[b"y4"]
    assert broker.why(Q, "x").reason == "leased"
    assert broker.why(Q, "y").reason == "ready"
    assert broker.ack(running)
    assert sorted(drain(broker)) == [b"x4", b"x5", b"y4", b"y5"]
    assert counts(broker) == (0, 0, 0, 6, 0)
    assert broker.keys(Q) == []


# -- max_pending (the whole queue) ---------------------------------------------------------------


@pytest.mark.one_partition
def test_max_pending_counts_every_waiting_message_of_the_queue(connect, clock: FakeClock) -> None:
    broker = connect(max_pending=3, on_full="drop_oldest")  # on_full is for per-key limits only
    broker.enqueue(Q, b"u")
    broker.enqueue(Q, b"a", key="a")
    broker.enqueue(Q, b"b", key="b", delay=5)
    with pytest.raises(QueueFull) as refused:
        broker.enqueue(Q, b"c", key="c")
    assert (refused.value.key, refused.value.setting, refused.value.limit) == (None, "max_pending", 3)
    with pytest.raises(QueueFull):
        broker.enqueue_many(Q, [Message(b"c", key="c")])
    [leased] = broker.lease(Q)
    broker.enqueue(Q, b"c", key="c")  # a leased message does not count
    assert counts(broker) == (2, 1, 1, 0, 3)
    assert broker.ack(leased)


@pytest.mark.one_partition
def test_both_limits_at_once(connect) -> None:
    broker = connect(max_pending=3, max_pending_per_key=1, on_full="replace")
    broker.enqueue(Q, b"a1", key="a")
    broker.enqueue(Q, b"a2", key="a")  # replaces a1: the queue does not grow
    broker.enqueue(Q, b"b1", key="b")
    broker.enqueue(Q, b"c1", key="c")
    broker.enqueue(Q, b"c2", key="c")
    with pytest.raises(QueueFull) as refused:
        broker.enqueue(Q, b"d1", key="d")
    assert refused.value.setting == "max_pending"
    assert sorted(drain(broker)) == [b"a2", b"b1", b"c2"]


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"max_pending_per_key": 0}, {"max_pending_per_key": "3"}, {"max_pending": -1}, {"on_full": "drop_newest"}],
)
def test_bad_settings_are_refused_by_name(connect, options: dict) -> None:
    with pytest.raises(ShardedBrokerError, match=next(iter(options))):
        connect(**options)


def test_settings_from_the_environment(connect, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_MAX_PENDING_PER_KEY", "1")
    monkeypatch.setenv("SHARDED_BROKER_ON_FULL", "replace")
    broker = connect()
    assert (broker.defaults.max_pending_per_key, broker.defaults.on_full, broker.defaults.max_pending) == (1, "replace", None)
    monkeypatch.setenv("SHARDED_BROKER_ON_FULL", "newest")
    with pytest.raises(ConfigurationError, match="SHARDED_BROKER_ON_FULL"):
        connect()
    monkeypatch.setenv("SHARDED_BROKER_ON_FULL", "reject")
    monkeypatch.setenv("SHARDED_BROKER_MAX_PENDING", "none")
    assert connect().defaults.max_pending is None


def test_queue_full_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(QueueFull("q", "k", "max_pending_per_key", 3)))
    assert (error.queue, error.key, error.setting, error.limit) == ("q", "k", "max_pending_per_key", 3)
    assert "max_pending_per_key=3" in str(error)


def test_a_refused_enqueue_still_promotes_what_came_due(connect, clock: FakeClock) -> None:
    """The sweeps an enqueue runs first are kept when it is refused (as on every backend)."""
    broker = connect(max_pending_per_key=1)
    broker.enqueue(Q, b"later", key="a", delay=2)
    clock.advance(2.5)
    with pytest.raises(QueueFull):
        broker.enqueue(Q, b"now", key="a")
    stats = broker.stats(Q)
    assert (stats.ready, stats.delayed) == (1, 0)
    assert stats.oldest_age == pytest.approx(2.5, abs=2e-3)


def test_redis_reads_the_limits_only_when_they_are_set(redis_url: str) -> None:
    """Unset (the default), an enqueue runs exactly the Redis commands it ran before the
    limits existed: none of the counting reads. Set, one count of the key's ready range
    per keyed message; delayed messages keep their per-key count in the state hash."""
    import redis

    client = redis.Redis.from_url(redis_url)

    def commands() -> dict[str, int]:
        return {name: stats["calls"] for name, stats in client.info("commandstats").items()}

    broker = sharded_broker.connect(redis_url, queues={"limited": {"max_pending_per_key": 5}})
    try:
        broker.enqueue("warm-up", b"")  # the server has the function library from here on
        client.config_resetstat()
        for n in range(10):
            broker.enqueue(Q, b"%d" % n, key=f"k{n}")
        unlimited = commands()
        client.config_resetstat()
        for n in range(10):
            broker.enqueue("limited", b"%d" % n, key=f"k{n}")
        limited = commands()
        # The same enqueues on a queue with a limit: the two reads per message, nothing else.
        extra = {name: limited[name] - unlimited.get(name, 0) for name in limited if limited[name] != unlimited.get(name, 0)}
        assert extra == {"cmdstat_zlexcount": 10, "cmdstat_hget": 10}
        broker.enqueue(Q, b"later", key="d", delay=60)
        state = client.keys("*{q}:state")
        assert [client.hget(k, "dl:d") for k in state] == [b"1"]
        broker.purge(Q)
        assert [client.hget(k, "dl:d") for k in state] == [None]  # gone with the last one
    finally:
        broker.close()
        client.close()


@pytest.mark.one_partition
def test_the_asyncio_api_raises_queue_full_too(broker_url: str, clock: FakeClock, request: pytest.FixtureRequest) -> None:
    import asyncio

    import sharded_broker.aio

    options = partition_options(broker_url, request)

    async def scenario() -> None:
        async with sharded_broker.aio.connect(
            broker_url, clock=clock, max_pending_per_key=1, on_full="reject", **options
        ) as broker:
            await broker.enqueue(Q, b"1", key="a")
            with pytest.raises(QueueFull) as refused:
                await broker.enqueue_many(Q, [Message(b"b", key="b"), Message(b"2", key="a")])
            assert refused.value.key == "a"
            assert (await broker.stats(Q)).ready == 1

    asyncio.run(asyncio.wait_for(scenario(), 60))
