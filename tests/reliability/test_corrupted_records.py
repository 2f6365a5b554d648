"""Corrupted data found in the backend: a consumer dead-letters what it cannot read, with
a reason, and carries on; it never crashes, and the key behind the bad message moves on."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

import dramatiq
import pytest
import redis
from kombu import Connection

import sharded_broker
from sharded_broker import Message
from sharded_broker.integrations.dramatiq import ShardedBroker

pytestmark = pytest.mark.reliability

Q = "jobs"


def _redis_hash(queue: str, structure: str) -> str:
    return f"sb:{{{queue}}}:{structure}"


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# -- engine records ---------------------------------------------------------------------

GARBAGE_RECORDS = [b"\xc1garbage", b"", b"\x05", b"\x80"]  # bad msgpack, empty, an int, an empty map


@pytest.mark.parametrize("garbage", GARBAGE_RECORDS, ids=["bad-msgpack", "empty", "not-a-map", "empty-map"])
def test_a_corrupted_redis_record_is_dead_lettered_and_its_key_moves_on(
    redis_url: str, admin: redis.Redis, garbage: bytes
) -> None:
    with sharded_broker.connect(redis_url) as broker:
        bad, _, _, _ = broker.enqueue_many(Q, [
            Message(b"a1", key="a"), Message(b"a2", key="a"), Message(b"b1", key="b"), Message(b"u1"),
        ])
        admin.hset(_redis_hash(Q, "msgs"), bad, garbage)
        delivered = []
        for _ in range(5):  # never raises; the bad record goes to the dead letters
            leases = broker.lease(Q, 10)
            delivered += [lease.payload for lease in leases]
            assert all(broker.ack_many(leases))
        assert sorted(delivered) == [b"a2", b"b1", b"u1"]
        [dead] = broker.dead_letters(Q)
        assert (dead.id, dead.key) == (bad, "a")
        assert "corrupt" in dead.reason
        stats = broker.stats(Q)
        assert (stats.ready, stats.leased, stats.delayed, stats.dead, stats.keys) == (0, 0, 0, 1, 0)
        assert broker.purge(Q, dead=True) == 1


def test_a_corrupted_unkeyed_redis_record_does_not_block_the_unkeyed_lane(redis_url: str, admin: redis.Redis) -> None:
    with sharded_broker.connect(redis_url) as broker:
        bad, _ = broker.enqueue_many(Q, [Message(b"u1"), Message(b"u2")])
        admin.hset(_redis_hash(Q, "msgs"), bad, b"\xc1")
        assert [lease.payload for lease in broker.lease(Q, 10)] == [b"u2"]
        [dead] = broker.dead_letters(Q)
        assert dead.id == bad and dead.key is None and "corrupt" in dead.reason


def test_corrupted_delayed_and_leased_redis_records_are_dead_lettered_without_failing_calls(
    redis_url: str, admin: redis.Redis
) -> None:
    """A delayed record is dead-lettered when due, a leased one when its lease expires; the
    key of each is named in its index entry too, so what the key holds is released: its
    live count, and the leased one's slot (its next message is delivered)."""
    now = [1_700_000_000.0]
    with sharded_broker.connect(redis_url, clock=lambda: now[0]) as broker:
        delayed, _ = broker.enqueue_many(Q, [Message(b"d", key="d", delay=10), Message(b"e", key="e")])
        [leased] = broker.lease(Q, visibility_timeout=5)
        broker.enqueue(Q, b"e2", key="e")  # waits behind the leased message of its key
        for mid in (delayed, leased.id):
            admin.hset(_redis_hash(Q, "msgs"), mid, b"\xc1")
        now[0] += 11
        # Both destroyed records are dead-lettered and key "e" is free again: its next one comes.
        [after] = broker.lease(Q, 10)
        assert after.payload == b"e2" and after.key == "e"
        assert broker.ack(leased) is False and broker.extend(leased) is False
        assert {d.id for d in broker.dead_letters(Q)} == {delayed, leased.id}
        assert all("corrupt" in d.reason for d in broker.dead_letters(Q))
        assert {d.key for d in broker.dead_letters(Q)} == {"d", "e"}
        assert broker.ack(after)
        stats = broker.stats(Q)
        assert (stats.ready, stats.leased, stats.delayed, stats.dead, stats.keys) == (0, 0, 0, 2, 0)
        broker.enqueue(Q, b"f", key="f")
        assert [lease.payload for lease in broker.lease(Q, 10)] == [b"f"]
        assert broker.purge(Q, dead=True) == 2


def test_a_corrupted_sqlite_row_is_dead_lettered_and_its_key_moves_on(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with sharded_broker.connect(f"sqlite:///{path}") as broker:
        bad, _, _ = broker.enqueue_many(Q, [Message(b"a1", key="a"), Message(b"a2", key="a"), Message(b"b1", key="b")])
        with sqlite3.connect(path) as db:
            db.execute("UPDATE messages SET headers = '{garbage' WHERE id = ?", (bad,))
        db.close()
        delivered = []
        for _ in range(4):
            leases = broker.lease(Q, 10)
            delivered += [lease.payload for lease in leases]
            assert all(broker.ack_many(leases))
        assert sorted(delivered) == [b"a2", b"b1"]
        [dead] = broker.dead_letters(Q)
        assert (dead.id, dead.key) == (bad, "a") and "corrupt" in dead.reason


# -- message bodies, through the adapters -----------------------------------------------

# A record is its fields as consecutive MessagePack values, the payload sixth (see load()
# in _common.lua): rewrite only that value, with the server's own MessagePack.
_REPLACE_PAYLOAD = """
local function with_payload(...)
  local count = select('#', ...)
  local values = { ... }
  values[6] = ARGV[2]
  return cmsgpack.pack(unpack(values, 1, count))
end
return redis.call('HSET', KEYS[1], ARGV[1], with_payload(cmsgpack.unpack(redis.call('HGET', KEYS[1], ARGV[1]))))
"""


def _replace_payload(admin: redis.Redis, mid: str, body: bytes) -> None:
    admin.eval(_REPLACE_PAYLOAD, 1, _redis_hash(Q, "msgs"), mid, body)


BAD_BODIES = [b"\xff\xfe not utf-8", b"{not json", b"[1, 2]", b"null"]


@pytest.mark.parametrize("body", BAD_BODIES, ids=["not-utf8", "not-json", "a-list", "null"])
def test_dramatiq_dead_letters_a_corrupted_body_and_runs_the_rest_of_its_key(
    redis_url: str, admin: redis.Redis, body: bytes
) -> None:
    broker = ShardedBroker(url=redis_url)
    ran = []

    @dramatiq.actor(broker=broker, shard_key="user", queue_name=Q)
    def notify(user: str, n: int) -> None:
        ran.append(n)

    try:
        notify.send("u", 1)
        notify.send("u", 2)
        with sharded_broker.connect(redis_url) as engine:
            [first, _] = engine.lease(Q, 2, per_key=2)
            _replace_payload(admin, first.id, body)  # corrupted where it is stored
            engine.nack(first)
            engine.nack(_)
            worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
            worker.start()
            try:
                broker.join(Q, timeout=10_000, fail_fast=False)  # the corrupted body is a dead letter
            finally:
                worker.stop()
            [dead] = engine.dead_letters(Q)
        assert ran == [2]
        assert dead.id == first.id and "undecodable" in dead.reason
    finally:
        broker.close()


@pytest.mark.parametrize("body", BAD_BODIES, ids=["not-utf8", "not-json", "a-list", "null"])
def test_celery_transport_dead_letters_a_corrupted_body_and_delivers_the_rest(redis_url: str, body: bytes) -> None:
    with sharded_broker.connect(redis_url) as engine:
        bad = engine.enqueue("celery", body, key="a")
        with Connection(f"sharded+{redis_url}") as connection:
            queue = connection.SimpleQueue("celery")
            queue.put({"n": 2}, headers={"shard_key": "a"})
            message = queue.get(timeout=5)  # the corrupted one is skipped, not raised
            assert message.payload == {"n": 2}
            message.ack()
            queue.close()
        [dead] = engine.dead_letters("celery")
        assert dead.id == bad and "undecodable" in dead.reason
        stats = engine.stats("celery")
        assert (stats.ready, stats.leased) == (0, 0)
