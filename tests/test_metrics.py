"""Per-minute metrics, per-key listings and key details, on every backend.

The memory backend is the reference model: every backend must give the same answers.
Time is the FakeClock of tests/conftest.py, so minutes pass by moving it.
"""

from __future__ import annotations

import pytest

from sharded_broker import Broker, InvalidArgument, InvalidArgumentType, Message, MinuteMetrics
from support.backends import CLOCK_START, FakeClock

Q = "q"
# CLOCK_START is 20 seconds into a minute.
MINUTE = CLOCK_START - CLOCK_START % 60


def counts(rows: list[MinuteMetrics]) -> list[tuple[int, int, int, int, int]]:
    return [(r.enqueued, r.delivered, r.acked, r.retried, r.dead) for r in rows]


def test_each_lifecycle_step_is_counted_per_queue_and_per_key(broker: Broker, clock: FakeClock) -> None:
    broker.configure_queue(Q, max_deliveries=2)
    broker.enqueue(Q, b"a1", key="a")
    broker.enqueue(Q, b"a2", key="a")
    broker.enqueue(Q, b"b1", key="b")
    broker.enqueue(Q, b"u1")
    broker.enqueue(Q, b"dup", key="a", dedup_id="d")
    broker.enqueue(Q, b"dup", key="a", dedup_id="d")  # dropped: not counted
    leases = broker.lease(Q, 10)
    assert sorted(lease.payload for lease in leases) == [b"a1", b"b1", b"u1"]
    by_payload = {lease.payload: lease for lease in leases}
    assert broker.ack(by_payload[b"a1"])
    assert broker.nack(by_payload[b"b1"])  # retried
    assert broker.nack(by_payload[b"u1"], dead=True)  # dead
    [b1] = [lease for lease in broker.lease(Q, 10) if lease.key == "b"]
    assert broker.nack(b1)  # second delivery of two: dead-lettered, not retried

    [now] = broker.metrics(Q, 1)
    assert now.minute == MINUTE
    # enqueued a1 a2 b1 u1 dup; delivered a1 b1 u1, then a2 b1; acked a1; retried b1 once;
    # dead u1 and b1.
    assert counts([now]) == [(5, 5, 1, 1, 2)]
    assert counts(broker.metrics(Q, 1, key="a")) == [(3, 2, 1, 0, 0)]
    assert counts(broker.metrics(Q, 1, key="b")) == [(1, 2, 0, 1, 1)]
    assert counts(broker.metrics(Q, 1, key="nobody")) == [(0, 0, 0, 0, 0)]
    assert counts(broker.metrics("other", 1)) == [(0, 0, 0, 0, 0)]


def test_an_expired_lease_counts_as_retried(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue(Q, b"x", key="k")
    broker.lease(Q, visibility_timeout=5)
    clock.advance(6)
    [again] = broker.lease(Q)
    assert again.attempts == 2
    assert counts(broker.metrics(Q, 1, key="k")) == [(1, 2, 0, 1, 0)]


def test_minutes_are_separate_oldest_first_and_zero_filled(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue(Q, b"1", key="k")
    clock.advance(60)
    clock.advance(60)
    broker.enqueue(Q, b"2", key="k")
    broker.enqueue(Q, b"3", key="k")
    rows = broker.metrics(Q, 4)
    assert [r.minute for r in rows] == [MINUTE - 60, MINUTE, MINUTE + 60, MINUTE + 120]
    assert [r.enqueued for r in rows] == [0, 1, 0, 2]
    assert [r.enqueued for r in broker.metrics(Q, 4, key="k")] == [0, 1, 0, 2]


def test_minutes_older_than_the_window_expire(connect, clock: FakeClock) -> None:
    broker = connect(metrics_window=120)
    broker.enqueue(Q, b"old", key="k")
    clock.advance(60)
    broker.enqueue(Q, b"newer", key="k")
    # The window keeps two minutes: asking for more answers only those.
    assert [r.enqueued for r in broker.metrics(Q, 60)] == [1, 1]
    clock.advance(60)
    assert [r.enqueued for r in broker.metrics(Q, 60)] == [1, 0]
    assert [r.enqueued for r in broker.metrics(Q, 60, key="k")] == [1, 0]
    clock.advance(3600)
    for _ in range(3):  # later operations forget what expired, a few entries each
        broker.enqueue(Q, b"now", key="j")
    assert [r.enqueued for r in broker.metrics(Q, 60)] == [0, 3]
    assert [r.enqueued for r in broker.metrics(Q, 60, key="k")] == [0, 0]


def test_per_key_minutes_keep_their_own_shorter_window(connect, clock: FakeClock) -> None:
    broker = connect(metrics_window=300, key_metrics_window=60)
    broker.enqueue(Q, b"old", key="k")
    clock.advance(60)
    broker.enqueue(Q, b"new", key="k")
    assert [r.enqueued for r in broker.metrics(Q, 60)] == [0, 0, 0, 1, 1]
    assert [r.enqueued for r in broker.metrics(Q, 60, key="k")] == [1]
    assert [r.minute for r in broker.metrics(Q, 60, key="k")] == [MINUTE + 60]
    clock.advance(60)
    broker.enqueue(Q, b"newest", key="j")  # creates entries, and so forgets expired ones
    # The queue's three minutes stay; of the keys' minutes only the current one ("j"). Redis
    # drops the keys' fields a span at a time (REDIS_KEY_SPANS spans of at least half the
    # key window each; here one minute): "k"'s two minutes are still stored there, unread.
    assert stored_metric_entries(broker) == (6 if is_redis(broker) else 4)
    assert [r.enqueued for r in broker.metrics(Q, 60)] == [0, 0, 1, 1, 1]


def test_keys_sorted_by_backlog_then_key(broker: Broker, clock: FakeClock) -> None:
    for key, n in (("small", 1), ("big", 3), ("mid-b", 2), ("mid-a", 2)):
        for i in range(n):
            broker.enqueue(Q, b"%d" % i, key=key)
    broker.enqueue(Q, b"unkeyed")
    listed = broker.keys(Q)
    assert [(k.key, k.backlog) for k in listed] == [("big", 3), ("mid-a", 2), ("mid-b", 2), ("small", 1)]
    assert [k.key for k in broker.keys(Q, 2)] == ["big", "mid-a"]
    assert broker.keys("unknown-queue") == []


def test_backlog_counts_ready_delayed_and_leased_until_settled(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue(Q, b"1", key="k")
    broker.enqueue(Q, b"2", key="k", delay=30)
    broker.enqueue(Q, b"3", key="k")
    [lease] = broker.lease(Q)
    info = broker.key_info(Q, "k")
    assert (info.backlog, info.leased) == (3, 1)
    broker.ack(lease)
    info = broker.key_info(Q, "k")
    assert (info.backlog, info.leased) == (2, 0)
    [lease] = broker.lease(Q)
    broker.nack(lease, dead=True)
    assert broker.key_info(Q, "k").backlog == 1
    assert [k.backlog for k in broker.keys(Q)] == [1]
    clock.advance(31)
    broker.ack(broker.lease(Q)[0])
    assert broker.keys(Q) == []
    assert broker.key_info(Q, "k").backlog == 0


@pytest.mark.one_partition
def test_keys_sorted_by_lag_of_their_head(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue(Q, b"a", key="young")
    clock.advance(5)
    broker.enqueue(Q, b"b", key="old")
    clock.advance(1)
    broker.enqueue(Q, b"c", key="young")
    clock.advance(10)
    broker.enqueue(Q, b"d", key="new")
    [lease] = broker.lease(Q)
    assert lease.payload == b"a"
    broker.ack(lease)
    # "young" had the oldest message, but its head is now "c".
    listed = broker.keys(Q, sort="lag")
    assert [(k.key, round(k.lag, 3)) for k in listed] == [("old", 11), ("young", 10), ("new", 0)]
    [lease] = broker.lease(Q)
    assert lease.payload == b"b"
    # A key whose messages are all leased has no head and no lag.
    assert (broker.key_info(Q, "old").lag, broker.key_info(Q, "old").head) == (0.0, None)


def test_lag_ranks_waiting_keys(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue(Q, b"1", key="k1")
    clock.advance(2)
    broker.enqueue(Q, b"2", key="k2")
    clock.advance(3)
    broker.enqueue(Q, b"3", key="k3")
    clock.advance(1)
    assert [(k.key, round(k.lag, 3)) for k in broker.keys(Q, sort="lag")] == [("k1", 6), ("k2", 4), ("k3", 1)]
    assert [k.key for k in broker.keys(Q, 1, sort="lag")] == ["k1"]


def test_key_info_shows_settings_and_head(broker: Broker, clock: FakeClock) -> None:
    mid = broker.enqueue(Q, b"first!", key="k", priority=-1)
    broker.enqueue(Q, b"second", key="k", priority=5)
    broker.set_interval(Q, "k", 2.5)
    broker.pause(Q, key="k")
    clock.advance(4)
    info = broker.key_info(Q, "k")
    assert (info.queue, info.key, info.backlog, info.leased) == (Q, "k", 2, 0)
    assert (info.paused, info.interval) == (True, 2.5)
    assert info.lag == pytest.approx(4)
    head = info.head
    assert (head.id, head.priority, head.attempts, head.size) == (mid, -1, 0, 6)
    assert head.enqueued_at == pytest.approx(CLOCK_START)
    assert head.not_before == pytest.approx(CLOCK_START)
    broker.resume(Q, key="k")
    [lease] = broker.lease(Q)
    broker.nack(lease, delay=7)  # back to the head, holding the key until due
    head = broker.key_info(Q, "k").head
    assert (head.id, head.attempts) == (mid, 1)
    assert head.not_before == pytest.approx(CLOCK_START + 4 + 7)


def test_key_info_of_an_unknown_key(broker: Broker) -> None:
    info = broker.key_info(Q, "nobody")
    assert (info.backlog, info.leased, info.lag, info.paused, info.interval, info.head) == (0, 0, 0.0, False, None, None)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda b: b.metrics(Q, 0), InvalidArgument),
        (lambda b: b.metrics(Q, "5"), InvalidArgumentType),
        (lambda b: b.metrics("bad queue", 5), InvalidArgument),
        (lambda b: b.metrics(Q, 5, key=3), InvalidArgumentType),
        (lambda b: b.keys(Q, sort="size"), InvalidArgument),
        (lambda b: b.keys(Q, 0), InvalidArgument),
        (lambda b: b.key_info(Q, None), InvalidArgument),
        (lambda b: b.key_info(Q, "a\x00b"), InvalidArgument),
        (lambda b: b.events(Q, timeout=-1), InvalidArgument),
    ],
)
def test_bad_arguments_are_refused(broker: Broker, call, error) -> None:
    with pytest.raises(error):
        call(broker)


def test_bad_connect_options_are_refused(connect) -> None:
    from sharded_broker import ConfigurationError

    for options in (
        {"metrics_window": 10}, {"metrics_window": "1h"}, {"events": "yes"}, {"key_metrics_window": 30},
        {"key_metrics_window": "1h"}, {"key_metrics_window": 7200},  # longer than metrics_window
    ):
        with pytest.raises(ConfigurationError, match=next(iter(options))):
            connect(**options)


def stored_metric_entries(broker: Broker) -> int:
    """How many per-minute entries the backend holds for queue Q (backend internals)."""
    backend = broker.backend
    kind = type(backend).__name__
    if kind == "MemoryBackend":
        return len(backend._store.queues[Q].metrics)
    if kind == "SQLiteBackend":
        # The metrics table's rows, and the counts of the open minute that the queue's row
        # (in the queues table) and each key's row (in the keys table) hold until a later
        # minute's first count.
        return backend._read(
            lambda tx: tx.db.execute("SELECT COUNT(*) FROM metrics WHERE queue = ?", (Q,)).fetchone()[0]
            + tx.db.execute("SELECT COUNT(*) FROM queues WHERE name = ? AND open_minute IS NOT NULL", (Q,)).fetchone()[0]
            + tx.db.execute("SELECT COUNT(*) FROM keys WHERE queue = ? AND open_minute IS NOT NULL", (Q,)).fetchone()[0]
        )
    from sharded_broker.backends.redis import QUEUE_KEYS

    hashes = ["metrics", *(f"kmetrics{n}" for n in range(REDIS_KEY_SPANS))]
    count = backend._drive(backend._ops.partition_count(Q))
    # Each hash also holds the field that keeps it in hashtable encoding.
    return sum(
        len([f for f in backend._client.hkeys(backend._keys(part)[QUEUE_KEYS.index(name)]) if f != b"#encoding"])
        for part in backend._ops.partitions(Q, count) for name in hashes
    )


# Redis keeps the keys' per-minute fields in this many hashes taking turns by span.
REDIS_KEY_SPANS = 3


def is_redis(broker: Broker) -> bool:
    """On one Redis server or a Redis Cluster (the same functions)."""
    return type(broker.backend).__name__ in ("RedisBackend", "RedisClusterBackend")


@pytest.mark.one_partition  # counts one queue structure's entries
def test_expired_minutes_are_deleted_a_few_at_a_time(connect, clock: FakeClock) -> None:
    broker = connect(metrics_window=60)
    broker.enqueue_many(Q, [Message(b"x", key=f"k{i}") for i in range(50)])
    assert stored_metric_entries(broker) == 51  # the queue's counts and each key's
    clock.advance(60)
    broker.enqueue(Q, b"y", key="new")  # creates entries, and so cleans a bounded few
    after_one = stored_metric_entries(broker)
    # At most 20 key minutes go per call (Redis also drops the queue's own old minute at
    # once when a new minute starts: one entry).
    assert 51 - 21 + 2 <= after_one < 51 + 2
    for _ in range(10):
        clock.advance(60)
        broker.enqueue(Q, b"z", key="new")
    # Only the current minute's two entries (the queue's and the key's) are left; on Redis
    # also the key's two minutes before it, the rest of its REDIS_KEY_SPANS one-minute spans.
    assert stored_metric_entries(broker) == (4 if is_redis(broker) else 2)


def test_a_version_1_sqlite_file_gains_the_metrics_tables(tmp_path) -> None:
    import sqlite3

    import sharded_broker

    url = f"sqlite:///{tmp_path}/old.db"
    with sharded_broker.connect(url) as broker:
        broker.enqueue(Q, b"kept", key="k")
    # Make it a file as version 1 wrote it: without the tables and index version 2 added,
    # nor the columns version 3 added (a queue's clock floor, the open minute's counts).
    from sharded_broker.backends.sqlite import ADDED_COLUMNS

    conn = sqlite3.connect(tmp_path / "old.db")
    conn.executescript(
        "DROP TABLE metrics; DROP TABLE events; DROP INDEX keys_backlog; PRAGMA user_version = 1;"
        + "DROP INDEX keys_open_minute; DROP INDEX messages_ref;"
        + "".join(f"ALTER TABLE {table} DROP COLUMN {column};" for table, columns in ADDED_COLUMNS.items() for column in columns)
    )
    conn.close()
    with sharded_broker.connect(url, events=True) as broker:
        assert [k.key for k in broker.keys(Q)] == ["k"]
        with broker.events(Q, timeout=5) as stream:
            broker.enqueue(Q, b"new", key="k")
            assert next(stream).type == "enqueued"
        assert broker.metrics(Q, 1)[0].enqueued == 1
        assert [lease.payload for lease in broker.lease(Q, 2, per_key=2)] == [b"kept", b"new"]
