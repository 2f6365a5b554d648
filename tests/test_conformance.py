"""The guarantees of docs/design.md, one test (or more) each, on every backend.

Written against the public Broker API only. Time is a FakeClock shared by the test and the
backend (``connect(url, clock=...)``), so lease expiry, intervals, delays and the dedup
window are exercised by moving the clock, never by sleeping. The memory backend is the
reference model: every expectation below is what it does.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

from sharded_broker import Broker, Lease, Message
from sharded_broker.models import DROPPED_REASON
from support.backends import CLOCK_START, FakeClock

Q = "q"


def payloads(leases: list[Lease]) -> list[bytes]:
    return [lease.payload for lease in leases]


def drain(broker: Broker, queue: str = Q, *, limit: int = 1, per_key: int = 1) -> list[bytes]:
    """Lease and ack until nothing is deliverable now; the payloads in delivery order."""
    delivered: list[bytes] = []
    while leases := broker.lease(queue, limit, per_key=per_key):
        delivered.extend(payloads(leases))
        assert all(broker.ack_many(leases))
    return delivered


def enqueue_each(broker: Broker, clock: FakeClock, items: list[tuple[str | None, bytes]]) -> list[str]:
    """Enqueue (key, payload) pairs one by one, a millisecond apart, so no two share a time."""
    ids = []
    for key, payload in items:
        ids.append(broker.enqueue(Q, payload, key=key))
        clock.advance(0.001)
    return ids


def stats_counts(broker: Broker, queue: str = Q) -> dict[str, int]:
    stats = broker.stats(queue)
    return {"ready": stats.ready, "leased": stats.leased, "delayed": stats.delayed, "dead": stats.dead, "keys": stats.keys}


# -- 1. per-key FIFO, key_concurrency -------------------------------------------------------


def test_lease_carries_the_message_and_its_lease(broker: Broker, clock: FakeClock) -> None:
    mid = broker.enqueue(Q, b"hello", key="user-1", priority=3, headers={"task": "sms"}, dedup_id="d-1")
    clock.advance(2)
    [lease] = broker.lease(Q, visibility_timeout=7)
    assert (lease.queue, lease.id, lease.key, lease.payload) == (Q, mid, "user-1", b"hello")
    assert (lease.priority, lease.attempts, lease.headers, lease.dedup_id) == (3, 1, {"task": "sms"}, "d-1")
    assert lease.enqueued_at == pytest.approx(CLOCK_START)
    assert lease.deadline == pytest.approx(CLOCK_START + 2 + 7)
    assert lease.token and lease.batch_id


def test_enqueue_many_keeps_order_and_gives_distinct_ids(broker: Broker) -> None:
    ids = broker.enqueue_many(Q, [Message(f"m{i}".encode(), key="a") for i in range(5)])
    assert len(set(ids)) == 5
    assert broker.enqueue_many(Q, []) == []
    delivered = []
    while leases := broker.lease(Q):
        delivered.extend((lease.id, lease.payload) for lease in leases)
        broker.ack_many(leases)
    assert delivered == [(ids[i], f"m{i}".encode()) for i in range(5)]


def test_per_key_fifo_with_interleaved_keys(broker: Broker, clock: FakeClock) -> None:
    items = [(key, f"{key}{i}".encode()) for i in range(5) for key in ("a", "b", "c")]
    enqueue_each(broker, clock, items)
    delivered = drain(broker, limit=2)
    assert sorted(delivered) == sorted(payload for _, payload in items)
    for key in ("a", "b", "c"):
        assert [p for p in delivered if p.startswith(key.encode())] == [f"{key}{i}".encode() for i in range(5)]


def test_per_key_fifo_under_concurrent_consumers(connect) -> None:
    keys = [f"k{k}" for k in range(5)]
    per_key = 20
    producer = connect()
    producer.enqueue_many(
        Q, [Message(f"{key}:{i}".encode(), key=key) for i in range(per_key) for key in keys]
    )
    lock = threading.Lock()
    in_flight: dict[str, int] = defaultdict(int)
    most_in_flight: dict[str, int] = defaultdict(int)
    seen: dict[str, list[int]] = defaultdict(list)
    total = len(keys) * per_key
    errors: list[BaseException] = []

    def consume() -> None:
        consumer = connect()
        try:
            give_up = time.monotonic() + 60
            while time.monotonic() < give_up:
                with lock:
                    if sum(len(v) for v in seen.values()) >= total:
                        return
                leases = consumer.lease(Q, 2, wait=0.05)
                for lease in leases:
                    key, index = lease.payload.decode().split(":")
                    with lock:
                        in_flight[key] += 1
                        most_in_flight[key] = max(most_in_flight[key], in_flight[key])
                        seen[key].append(int(index))
                with lock:
                    for lease in leases:
                        in_flight[lease.key] -= 1
                assert all(consumer.ack_many(leases))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors, errors
    assert {key: seen[key] for key in keys} == {key: list(range(per_key)) for key in keys}
    assert max(most_in_flight.values()) == 1
    assert stats_counts(producer) == {"ready": 0, "leased": 0, "delayed": 0, "dead": 0, "keys": 0}


def test_one_message_of_a_key_in_flight(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("a", b"a3"), ("b", b"b1")])
    first = broker.lease(Q, 10)
    assert payloads(first) == [b"a1", b"b1"]
    assert broker.lease(Q, 10) == []
    assert broker.ack(first[0])
    assert payloads(broker.lease(Q, 10)) == [b"a2"]


def test_key_concurrency_two(connect, clock: FakeClock) -> None:
    broker = connect(key_concurrency=2)
    enqueue_each(broker, clock, [("a", f"a{i}".encode()) for i in range(1, 5)])
    first = broker.lease(Q, 10)
    assert payloads(first) == [b"a1", b"a2"]
    assert broker.lease(Q, 10) == []
    assert broker.ack(first[1])
    assert payloads(broker.lease(Q, 10)) == [b"a3"]
    assert broker.lease(Q, 10) == []


def test_priorities_inside_a_key(broker: Broker, clock: FakeClock) -> None:
    for payload, priority in [(b"x", 5), (b"y", 0), (b"z", 5), (b"w", -1), (b"v", 0)]:
        broker.enqueue(Q, payload, key="a", priority=priority)
        clock.advance(0.001)
    assert drain(broker) == [b"w", b"y", b"v", b"x", b"z"]


@pytest.mark.one_partition
def test_priorities_in_the_unkeyed_lane(broker: Broker, clock: FakeClock) -> None:
    for payload, priority in [(b"x", 2), (b"y", 1), (b"z", 2)]:
        broker.enqueue(Q, payload, priority=priority)
        clock.advance(0.001)
    assert payloads(broker.lease(Q, 10)) == [b"y", b"x", b"z"]


def test_unkeyed_messages_run_in_parallel(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [(None, f"u{i}".encode()) for i in range(5)])
    leases = broker.lease(Q, 10)
    assert payloads(leases) == [f"u{i}".encode() for i in range(5)]
    assert all(lease.key is None for lease in leases)
    assert len({lease.batch_id for lease in leases}) == 5
    assert stats_counts(broker) == {"ready": 0, "leased": 5, "delayed": 0, "dead": 0, "keys": 0}


# -- 2. order survives failure ----------------------------------------------------------------


def test_expired_lease_returns_to_the_head_and_blocks_its_key(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("a", b"a3")])
    [first] = broker.lease(Q, visibility_timeout=10)
    clock.advance(5)
    assert broker.lease(Q, 10) == []  # still leased: the key is held
    clock.advance(6)
    [again] = broker.lease(Q, 10, visibility_timeout=10)
    assert (again.payload, again.id, again.attempts) == (b"a1", first.id, 2)
    assert broker.lease(Q, 10) == []
    assert broker.ack(again)
    assert drain(broker) == [b"a2", b"a3"]


def test_nack_returns_to_the_head(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2")])
    [first] = broker.lease(Q)
    assert broker.nack(first)
    [again] = broker.lease(Q, 10)
    assert (again.payload, again.attempts) == (b"a1", 2)
    assert broker.ack(again)
    assert drain(broker) == [b"a2"]


@pytest.mark.one_partition
def test_nack_with_delay_holds_its_key(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("b", b"b1")])
    [first] = broker.lease(Q)
    assert first.payload == b"a1"
    assert broker.nack(first, delay=10)
    [other] = broker.lease(Q, 10)
    assert other.payload == b"b1"
    # The retry waits in its key's order (ready), holding a2 back.
    assert stats_counts(broker) == {"ready": 2, "leased": 1, "delayed": 0, "dead": 0, "keys": 2}
    clock.advance(9)
    assert broker.lease(Q, 10) == []
    clock.advance(1.5)
    [again] = broker.lease(Q, 10)
    assert (again.payload, again.attempts) == (b"a1", 2)
    assert broker.ack(again)
    assert drain(broker) == [b"a2"]


def test_retry_position_tail(connect, clock: FakeClock) -> None:
    broker = connect(retry_position="tail", visibility_timeout=10)
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("a", b"a3")])
    [first] = broker.lease(Q)
    assert broker.nack(first)
    [second] = broker.lease(Q)
    assert second.payload == b"a2"
    clock.advance(11)  # a2's lease expires: it goes behind a1 too
    delivered = []
    while leases := broker.lease(Q):
        delivered.extend((lease.payload, lease.attempts) for lease in leases)
        broker.ack_many(leases)
    assert delivered == [(b"a3", 1), (b"a1", 2), (b"a2", 2)]


def test_retry_position_can_be_set_per_queue(connect, clock: FakeClock) -> None:
    broker = connect(queues={"tail-q": {"retry_position": "tail"}})
    for queue in (Q, "tail-q"):
        broker.enqueue(queue, b"1", key="a")
        broker.enqueue(queue, b"2", key="a")
        assert broker.nack(broker.lease(queue)[0])
    assert payloads(broker.lease(Q)) == [b"1"]
    assert payloads(broker.lease("tail-q")) == [b"2"]


# -- 4. fencing ----------------------------------------------------------------------------


def test_stale_lease_is_refused_and_changes_nothing(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2")])
    [stale] = broker.lease(Q, visibility_timeout=10)
    clock.advance(11)
    [current] = broker.lease(Q, visibility_timeout=10)
    assert (current.id, current.attempts) == (stale.id, 2)
    assert current.token != stale.token
    deadline = current.deadline
    assert broker.ack(stale) is False
    assert broker.extend(stale, 100) is False
    assert broker.nack(stale) is False
    assert broker.nack(stale, dead=True, reason="stale") is False
    assert broker.ack_many([stale]) == [False]
    assert stats_counts(broker) == {"ready": 1, "leased": 1, "delayed": 0, "dead": 0, "keys": 1}
    assert broker.dead_letters(Q) == []
    assert broker.lease(Q, 10) == []  # still held by the current lease
    assert current.deadline == deadline
    assert broker.ack(current) is True
    assert broker.ack(current) is False  # a repeated ack is refused, not doubled
    assert drain(broker) == [b"a2"]


def test_extend_pushes_the_deadline(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue(Q, b"a1", key="a")
    [lease] = broker.lease(Q, visibility_timeout=10)
    clock.advance(8)
    assert broker.extend(lease, 10) is True
    assert lease.deadline == pytest.approx(CLOCK_START + 18)
    clock.advance(8)
    assert broker.lease(Q) == []
    clock.advance(3)
    [again] = broker.lease(Q)
    assert (again.payload, again.attempts) == (b"a1", 2)
    assert broker.extend(lease, 10) is False


# -- 5. fairness ----------------------------------------------------------------------------


@pytest.mark.one_partition
def test_hot_key_cannot_starve_a_cold_key(broker: Broker, clock: FakeClock) -> None:
    # Key names sort the hot key first, so a backend breaking ties by name would fail too.
    broker.enqueue_many(Q, [Message(f"hot{i}".encode(), key="a-hot") for i in range(10_000)])
    clock.advance(0.001)
    broker.enqueue(Q, b"cold", key="b-cold")
    clock.advance(0.001)
    [first] = broker.lease(Q)
    assert first.payload == b"hot0"
    clock.advance(0.001)
    assert broker.ack(first)
    clock.advance(0.001)
    assert payloads(broker.lease(Q)) == [b"cold"]
    assert broker.stats(Q).ready == 9_999


@pytest.mark.one_partition
def test_ready_keys_are_served_round_robin(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [(key, f"{key}{i}".encode()) for key in ("a", "b", "c") for i in range(3)])
    delivered = []
    while leases := broker.lease(Q):
        delivered.extend(payloads(leases))
        clock.advance(0.001)
        broker.ack_many(leases)
        clock.advance(0.001)
    assert delivered == [b"a0", b"b0", b"c0", b"a1", b"b1", b"c1", b"a2", b"b2", b"c2"]


@pytest.mark.one_partition
def test_one_lease_call_serves_each_ready_key_once(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("c", b"c0"), ("a", b"a0"), ("a", b"a1"), ("b", b"b0"), (None, b"u0")])
    assert payloads(broker.lease(Q, 10)) == [b"c0", b"a0", b"b0", b"u0"]


# -- 5b. weighted fairness ---------------------------------------------------------------------


def served_keys(broker: Broker, clock: FakeClock, deliveries: int) -> str:
    """The keys (one letter each) of ``deliveries`` deliveries, one lease call of one
    message at a time, each acked before the next lease: what a single consumer sees."""
    keys = ""
    for _ in range(deliveries):
        [lease] = broker.lease(Q)
        keys += lease.key
        clock.advance(0.001)
        assert broker.ack(lease)
        clock.advance(0.001)
    return keys


def fill(broker: Broker, clock: FakeClock, keys: str, each: int) -> None:
    for key in keys:
        broker.enqueue_many(Q, [Message(f"{key}{i}".encode(), key=key) for i in range(each)])
        clock.advance(0.001)


@pytest.mark.one_partition
def test_weighted_keys_are_served_in_proportion(broker: Broker, clock: FakeClock) -> None:
    fill(broker, clock, "abc", 40)
    weights = {"a": 3, "b": 1, "c": 2}
    for key, weight in weights.items():
        broker.set_weight(Q, key, weight)
    keys = served_keys(broker, clock, 60)
    # Deficit round robin: each key keeps its place for its weight's deliveries per round.
    assert keys == "aaabcc" * 10
    # The bound docs/operations.md states, over every window of consecutive deliveries
    # (all three stay backlogged): per-weight shares differ by at most 2 (one round's share
    # at each end of the window; at most 1 counted from the start of a round), and a key
    # waits at most the other keys' weights (3) between two of its deliveries.
    for start in range(len(keys)):
        for end in range(start + 1, len(keys) + 1):
            shares = [keys.count(key, start, end) / weight for key, weight in weights.items()]
            assert max(shares) - min(shares) <= 2
            if start == 0:
                assert max(shares) - min(shares) <= 1
    for key, weight in weights.items():
        gaps = [len(run) for run in keys.split(key)[1:-1] if run]
        assert max(gaps) == sum(weights.values()) - weight
    # Per-key FIFO is untouched.
    assert broker.lease(Q, 10)[0].payload == b"a30"


@pytest.mark.one_partition
def test_weight_one_or_none_is_plain_round_robin(connect, clock: FakeClock) -> None:
    admin = connect()
    admin.set_weight(Q, "a", 4)
    broker = connect()  # a second connection sees the weight: it is persisted
    assert broker.key_info(Q, "a").weight == 4
    fill(broker, clock, "abc", 12)
    assert served_keys(broker, clock, 6) == "aaaabc"
    admin.set_weight(Q, "a", 1)
    assert broker.key_info(Q, "a").weight == 1
    assert served_keys(broker, clock, 6) == "abcabc"
    admin.set_weight(Q, "b", 2)
    assert served_keys(broker, clock, 4) == "abbc"
    admin.set_weight(Q, "b", None)
    assert served_keys(broker, clock, 6) == "abcabc"
    assert sorted((info.key, info.weight) for info in broker.keys(Q)) == [("a", 1), ("b", 1), ("c", 1)]


def test_weight_is_read_back_in_key_info_keys_and_why(broker: Broker, clock: FakeClock) -> None:
    broker.set_weight(Q, "idle", 7)  # a key without messages keeps its weight
    assert broker.key_info(Q, "idle").weight == 7
    fill(broker, clock, "ab", 2)
    broker.set_weight(Q, "a", 3)
    assert {info.key: info.weight for info in broker.keys(Q)} == {"a": 3, "b": 1}
    assert broker.why(Q, "a").weight == 3
    assert broker.why(Q, "b").weight == 1
    assert broker.why(Q, "idle").weight == 7


@pytest.mark.one_partition
def test_a_weight_never_breaks_key_concurrency(connect, clock: FakeClock) -> None:
    broker = connect(key_concurrency=3)
    fill(broker, clock, "ab", 10)
    broker.set_weight(Q, "a", 5)
    # a keeps its place for its 3 free slots, then waits for one; b goes on.
    assert payloads(broker.lease(Q, 10)) == [b"a0", b"a1", b"a2", b"b0", b"b1", b"b2"]
    assert broker.why(Q, "a").reason == "key_concurrency"
    single = connect()  # key_concurrency 1: one delivery per key however heavy
    single.set_weight("other", "a", 5)
    single.enqueue_many("other", [Message(f"a{i}".encode(), key="a") for i in range(5)] + [Message(b"b0", key="b")])
    assert payloads(single.lease("other", 10)) == [b"a0", b"b0"]


@pytest.mark.one_partition
def test_a_weight_never_breaks_an_interval(broker: Broker, clock: FakeClock) -> None:
    broker.set_weight(Q, "a", 3)
    broker.set_interval(Q, "a", 10)
    fill(broker, clock, "ab", 10)
    assert served_keys(broker, clock, 4) == "abbb"  # a waits its interval
    clock.advance(10)
    # a's place is the end of its interval, after b's (b was ready earlier): one each.
    assert served_keys(broker, clock, 4) == "babb"


@pytest.mark.one_partition
def test_a_weight_never_breaks_a_retry_holding_its_key(broker: Broker, clock: FakeClock) -> None:
    broker.set_weight(Q, "a", 3)
    fill(broker, clock, "ab", 10)
    [lease] = broker.lease(Q)
    assert lease.payload == b"a0"
    assert broker.nack(lease, delay=5)  # the retry holds the key: no turn while it waits
    assert served_keys(broker, clock, 3) == "bbb"
    clock.advance(5)
    assert served_keys(broker, clock, 1) == "b"  # ready before the hold ended
    [retried] = broker.lease(Q)
    assert (retried.payload, retried.attempts) == (b"a0", 2)
    assert broker.ack(retried)
    # The hold ended a's round; the retry started a new one.
    assert served_keys(broker, clock, 3) == "aab"


@pytest.mark.one_partition
def test_a_weight_never_breaks_a_pause(broker: Broker, clock: FakeClock) -> None:
    broker.set_weight(Q, "a", 3)
    fill(broker, clock, "ab", 10)
    assert served_keys(broker, clock, 1) == "a"
    broker.pause(Q, key="a")
    assert served_keys(broker, clock, 2) == "bb"
    broker.resume(Q, key="a")  # the pause ended a's round: back of the round, a full one
    assert served_keys(broker, clock, 5) == "baaab"


@pytest.mark.one_partition
def test_a_weighted_key_that_empties_starts_a_new_round(broker: Broker, clock: FakeClock) -> None:
    broker.set_weight(Q, "a", 3)
    fill(broker, clock, "a", 1)
    fill(broker, clock, "b", 6)
    assert served_keys(broker, clock, 2) == "ab"
    fill(broker, clock, "a", 6)  # back at the end of the round, with its full weight
    assert served_keys(broker, clock, 5) == "baaab"


# -- 6. rate interval --------------------------------------------------------------------------


def test_queue_default_interval(connect, clock: FakeClock) -> None:
    broker = connect(interval=5)
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("b", b"b1")])
    first = broker.lease(Q, 10)
    assert payloads(first) == [b"a1", b"b1"]
    assert broker.ack_many(first) == [True, True]
    assert broker.lease(Q, 10) == []
    clock.advance(4.5)
    assert broker.lease(Q, 10) == []
    clock.advance(1)
    assert payloads(broker.lease(Q, 10)) == [b"a2"]


def test_interval_set_per_key_is_persisted(connect, clock: FakeClock) -> None:
    admin = connect()
    admin.set_interval(Q, "a", 10)
    broker = connect()  # a second connection sees the interval
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("a", b"a3"), ("b", b"b1"), ("b", b"b2")])
    assert drain(broker) == [b"a1", b"b1", b"b2"]
    clock.advance(9.5)
    assert broker.lease(Q) == []
    clock.advance(1)
    assert drain(broker) == [b"a2"]
    admin.set_interval(Q, "a", None)  # back to the queue default (0)
    assert drain(broker) == [b"a3"]


def test_interval_spans_an_idle_key(broker: Broker, clock: FakeClock) -> None:
    broker.set_interval(Q, "a", 10)
    broker.enqueue(Q, b"a1", key="a")
    assert drain(broker) == [b"a1"]
    clock.advance(3)
    broker.enqueue(Q, b"a2", key="a")
    assert broker.lease(Q) == []
    clock.advance(7.5)
    assert drain(broker) == [b"a2"]


# -- 7. delay ---------------------------------------------------------------------------------


def test_delay_does_not_block_due_messages(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue(Q, b"later", key="a", delay=10)
    clock.advance(0.001)
    broker.enqueue(Q, b"now", key="a")
    assert stats_counts(broker) == {"ready": 1, "leased": 0, "delayed": 1, "dead": 0, "keys": 1}
    assert drain(broker) == [b"now"]
    clock.advance(9)
    assert broker.lease(Q) == []
    clock.advance(1.5)
    assert drain(broker) == [b"later"]


def test_delayed_message_enters_its_key_order_when_due(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue(Q, b"d", key="a", delay=5)
    clock.advance(6)
    broker.enqueue(Q, b"x", key="a")
    assert drain(broker) == [b"d", b"x"]


def test_delayed_unkeyed_message(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue(Q, b"u", delay=5)
    assert broker.lease(Q) == []
    clock.advance(5.5)
    assert payloads(broker.lease(Q)) == [b"u"]


def test_enqueue_at_head(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2")])
    broker.enqueue(Q, b"first", key="a", at_head=True)
    clock.advance(0.001)
    broker.enqueue(Q, b"very-first", key="a", at_head=True)
    assert drain(broker) == [b"very-first", b"first", b"a1", b"a2"]


def test_enqueue_at_head_with_delay_holds_its_key(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("b", b"b1")])
    broker.enqueue(Q, b"retry", key="a", at_head=True, delay=5)
    assert drain(broker, limit=10) == [b"b1"]
    clock.advance(5.5)
    assert drain(broker) == [b"retry", b"a1", b"a2"]


# -- 8. dedup ------------------------------------------------------------------------------


def test_dedup_window(connect, clock: FakeClock) -> None:
    broker = connect(dedup_window=60)
    first = broker.enqueue(Q, b"x", key="a", dedup_id="order-1")
    assert broker.enqueue(Q, b"y", key="a", dedup_id="order-1") == first
    assert broker.enqueue(Q, b"z", key="a", dedup_id="order-2") != first
    assert drain(broker) == [b"x", b"z"]
    clock.advance(30)
    assert broker.enqueue(Q, b"again", key="a", dedup_id="order-1") == first  # consumed, still in the window
    assert broker.stats(Q).ready == 0
    clock.advance(31)
    fresh = broker.enqueue(Q, b"later", key="a", dedup_id="order-1")
    assert fresh != first
    assert drain(broker) == [b"later"]


@pytest.mark.one_partition
def test_dedup_inside_one_batch(broker: Broker) -> None:
    ids = broker.enqueue_many(Q, [Message(b"1", dedup_id="d"), Message(b"2", dedup_id="d"), Message(b"3")])
    assert ids[0] == ids[1] != ids[2]
    assert payloads(broker.lease(Q, 10)) == [b"1", b"3"]


def test_unique_while_pending(connect, clock: FakeClock) -> None:
    broker = connect(unique_while_pending=True, dedup_window=10)
    first = broker.enqueue(Q, b"x", key="a", dedup_id="refresh")
    clock.advance(20)  # beyond the window: pending is what counts
    assert broker.enqueue(Q, b"y", key="a", dedup_id="refresh") == first
    delayed = broker.enqueue(Q, b"d", key="b", dedup_id="later", delay=50)
    assert broker.enqueue(Q, b"d2", key="b", dedup_id="later") == delayed
    [lease] = broker.lease(Q)
    assert lease.payload == b"x"
    second = broker.enqueue(Q, b"z", key="a", dedup_id="refresh")  # the first is no longer queued
    assert second != first
    assert broker.ack(lease)
    assert drain(broker) == [b"z"]


# -- 9. dead letters ------------------------------------------------------------------------


def test_max_deliveries_dead_letters_with_reason_attempts_and_times(connect, clock: FakeClock) -> None:
    broker = connect(max_deliveries=2)
    mid = broker.enqueue(Q, b"poison", key="a", headers={"h": 1}, priority=2)
    clock.advance(0.001)
    broker.enqueue(Q, b"next", key="a", priority=5)
    clock.advance(1)
    assert broker.nack(broker.lease(Q)[0])
    clock.advance(1)
    [second] = broker.lease(Q)
    assert (second.payload, second.attempts) == (b"poison", 2)
    clock.advance(1)
    assert broker.nack(second, reason="boom")
    [dead] = broker.dead_letters(Q)
    assert (dead.queue, dead.id, dead.key, dead.payload) == (Q, mid, "a", b"poison")
    assert (dead.priority, dead.attempts, dead.headers) == (2, 2, {"h": 1})
    assert dead.reason
    assert dead.enqueued_at == pytest.approx(CLOCK_START)
    assert dead.died_at == pytest.approx(CLOCK_START + 3.001)
    assert stats_counts(broker) == {"ready": 1, "leased": 0, "delayed": 0, "dead": 1, "keys": 1}
    assert drain(broker) == [b"next"]


def test_a_huge_dead_letter_reason_is_kept_bounded(broker) -> None:
    broker.enqueue(Q, b"poison", key="a")
    traceback = "Traceback (most recent call last):\n" + "  frame\n" * 100_000
    assert broker.nack(broker.lease(Q)[0], dead=True, reason=traceback)
    [dead] = broker.dead_letters(Q)
    assert dead.reason.startswith("Traceback (most recent call last):\n  frame\n")
    assert dead.reason.endswith(" ...(truncated)")
    assert len(dead.reason) == 8 * 1024


def test_expired_leases_count_towards_max_deliveries(connect, clock: FakeClock) -> None:
    broker = connect(max_deliveries=3, visibility_timeout=10)
    broker.enqueue(Q, b"slow", key="a")
    for attempt in (1, 2, 3):
        [lease] = broker.lease(Q)
        assert lease.attempts == attempt
        clock.advance(11)
    assert broker.lease(Q) == []
    [dead] = broker.dead_letters(Q)
    assert (dead.payload, dead.attempts) == (b"slow", 3)
    assert dead.reason


def test_unlimited_deliveries(connect, clock: FakeClock) -> None:
    broker = connect(max_deliveries=None)
    broker.enqueue(Q, b"m", key="a")
    for _ in range(8):
        assert broker.nack(broker.lease(Q)[0])
    [lease] = broker.lease(Q)
    assert lease.attempts == 9
    assert broker.dead_letters(Q) == []


def test_reject_dead_letters_at_once(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"bad"), ("a", b"good")])
    [lease] = broker.lease(Q)
    assert broker.nack(lease, dead=True, reason="invalid payload")
    [dead] = broker.dead_letters(Q)
    assert (dead.payload, dead.attempts, dead.reason) == (b"bad", 1, "invalid payload")
    assert drain(broker) == [b"good"]


@pytest.mark.one_partition
def test_dead_letters_listing_is_oldest_death_first_with_paging(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [(f"k{i}", f"m{i}".encode()) for i in range(5)])
    for lease in broker.lease(Q, 10):
        broker.nack(lease, dead=True, reason=f"r-{lease.payload.decode()}")
        clock.advance(1)
    assert [d.payload for d in broker.dead_letters(Q)] == [f"m{i}".encode() for i in range(5)]
    assert [d.reason for d in broker.dead_letters(Q, limit=2, offset=1)] == ["r-m1", "r-m2"]
    assert broker.dead_letters(Q, offset=5) == []
    assert broker.dead_letters("elsewhere") == []


def kill_two(broker: Broker, clock: FakeClock) -> None:
    """Dead-letter the first two messages of key a (a queue with a1, a2, then a3)."""
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("a", b"a3")])
    for _ in range(2):
        [lease] = broker.lease(Q)
        assert broker.nack(lease, dead=True)
        clock.advance(1)


def test_replay_to_the_head_keeps_order_and_resets_attempts(broker: Broker, clock: FakeClock) -> None:
    kill_two(broker, clock)
    assert broker.replay(Q, position="head") == 2
    assert broker.dead_letters(Q) == []
    delivered = []
    while leases := broker.lease(Q):
        delivered.extend((lease.payload, lease.attempts) for lease in leases)
        broker.ack_many(leases)
    assert delivered == [(b"a1", 1), (b"a2", 1), (b"a3", 1)]


def test_replay_to_the_tail(broker: Broker, clock: FakeClock) -> None:
    kill_two(broker, clock)
    assert broker.replay(Q) == 2
    assert drain(broker) == [b"a3", b"a1", b"a2"]


def test_replay_chosen_ids(broker: Broker, clock: FakeClock) -> None:
    kill_two(broker, clock)
    first, second = broker.dead_letters(Q)
    assert broker.replay(Q, [second.id, "no-such-id"], position="head") == 1
    assert [d.id for d in broker.dead_letters(Q)] == [first.id]
    assert drain(broker) == [b"a2", b"a3"]
    assert broker.replay("elsewhere") == 0


def test_replay_ids_from_a_generator(broker: Broker, clock: FakeClock) -> None:
    # Read once: checking the ids must not use up an iterator and replay nothing.
    kill_two(broker, clock)
    first, second = broker.dead_letters(Q)
    assert broker.replay(Q, (d.id for d in [second])) == 1
    assert [d.id for d in broker.dead_letters(Q)] == [first.id]


def test_purge_dead_letters(broker: Broker, clock: FakeClock) -> None:
    kill_two(broker, clock)
    assert broker.purge(Q, dead=True) == 2
    assert broker.dead_letters(Q) == []
    assert stats_counts(broker) == {"ready": 1, "leased": 0, "delayed": 0, "dead": 0, "keys": 1}
    assert drain(broker) == [b"a3"]


@pytest.mark.one_partition
def test_purge_waiting_messages_leaves_leases(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("b", b"b1"), (None, b"u1")])
    broker.enqueue(Q, b"d1", key="c", delay=10)
    [held] = broker.lease(Q)
    assert held.payload == b"a1"
    assert broker.purge(Q) == 4
    assert stats_counts(broker) == {"ready": 0, "leased": 1, "delayed": 0, "dead": 0, "keys": 1}
    clock.advance(11)
    assert broker.lease(Q, 10) == []
    assert broker.ack(held)
    broker.enqueue(Q, b"a3", key="a")
    assert drain(broker) == [b"a3"]
    assert broker.purge("elsewhere") == 0


# More messages than one chunk of a chunked purge or replay (1,000 on Redis and SQLite): the
# outcome is the same as done at once.
MANY = 2_500


def kill_unkeyed(broker: Broker, clock: FakeClock, count: int) -> None:
    """Dead-letter ``count`` unkeyed messages (max_deliveries=1, leases left to expire)."""
    broker.configure_queue(Q, max_deliveries=1)
    broker.enqueue_many(Q, [Message(f"u{i}".encode()) for i in range(count)])
    assert len(broker.lease(Q, count, visibility_timeout=1)) == count
    clock.advance(2)
    while broker.stats(Q).dead < count:  # each lease call dead-letters a bounded number
        assert broker.lease(Q) == []


@pytest.mark.parametrize("position", ["tail", "head"])
def test_replay_of_more_than_a_chunk_keeps_each_keys_order(broker: Broker, clock: FakeClock, position: str) -> None:
    broker.configure_queue(Q, max_deliveries=1)
    broker.enqueue(Q, b"x", key="a")
    [x] = broker.lease(Q)
    assert broker.nack(x, dead=True)
    kill_unkeyed(broker, clock, 1_500)
    # y dies last but takes a seq ahead of x: replayed, it goes first, whatever chunks the
    # dead letters are replayed in.
    broker.enqueue(Q, b"y", key="a", at_head=True)
    [y] = broker.lease(Q)
    assert y.payload == b"y" and broker.nack(y, dead=True)
    assert broker.replay(Q, position=position) == 1_502
    assert broker.dead_letters(Q) == []
    assert stats_counts(broker) == {"ready": 1_502, "leased": 0, "delayed": 0, "dead": 0, "keys": 1}
    leases = broker.lease(Q, 10_000)
    assert len(leases) == 1_501 and all(lease.attempts == 1 for lease in leases)
    assert [lease.payload for lease in leases if lease.key == "a"] == [b"y"]
    unkeyed = [lease.payload for lease in leases if lease.key is None]
    assert unkeyed == [f"u{i}".encode() for i in range(1_500)]  # their order kept too
    broker.ack_many(leases)
    assert drain(broker) == [b"x"]


def test_replay_of_more_than_a_chunk_of_chosen_ids(broker: Broker, clock: FakeClock) -> None:
    kill_unkeyed(broker, clock, MANY)
    letters = broker.dead_letters(Q, limit=MANY)
    chosen = [d.id for d in letters[::2]] + ["no-such-id"]  # every other one
    assert broker.replay(Q, chosen) == 1_250
    assert [d.payload for d in broker.dead_letters(Q, limit=MANY)] == [f"u{i}".encode() for i in range(1, MANY, 2)]
    assert [lease.payload for lease in broker.lease(Q, 10_000)] == [f"u{i}".encode() for i in range(0, MANY, 2)]


def test_purge_of_more_than_a_chunk(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue(Q, b"held", key="h")
    [held] = broker.lease(Q)
    broker.enqueue_many(
        Q,
        [Message(f"k{i}".encode(), key=f"k{i % 100}") for i in range(1_000)]
        + [Message(f"u{i}".encode()) for i in range(1_000)]
        + [Message(f"d{i}".encode(), key=f"k{i % 7}", delay=10) for i in range(400)]
        + [Message(f"h{i}".encode(), key="h") for i in range(100)],
    )
    assert broker.purge(Q) == MANY
    assert stats_counts(broker) == {"ready": 0, "leased": 1, "delayed": 0, "dead": 0, "keys": 1}
    assert [info.key for info in broker.keys(Q)] == ["h"]
    clock.advance(11)
    assert broker.lease(Q, 10) == []
    assert broker.ack(held)
    broker.enqueue(Q, b"after", key="k1")
    assert drain(broker) == [b"after"]


def test_purge_of_more_than_a_chunk_of_dead_letters(broker: Broker, clock: FakeClock) -> None:
    kill_unkeyed(broker, clock, MANY)
    broker.enqueue(Q, b"alive", key="a")
    assert broker.purge(Q, dead=True) == MANY
    assert stats_counts(broker) == {"ready": 1, "leased": 0, "delayed": 0, "dead": 0, "keys": 1}
    assert drain(broker) == [b"alive"]


# -- pause / resume --------------------------------------------------------------------------


@pytest.mark.one_partition
def test_pause_and_resume_a_key(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("b", b"b1")])
    [held] = broker.lease(Q)
    broker.pause(Q, key="a")
    assert broker.ack(held)  # leases held go on
    assert drain(broker, limit=10) == [b"b1"]
    broker.resume(Q, key="a")
    assert drain(broker) == [b"a2"]


@pytest.mark.one_partition
def test_pause_and_resume_a_queue(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), (None, b"u1")])
    [held] = broker.lease(Q)
    broker.pause(Q)
    assert broker.stats(Q).paused is True
    assert broker.lease(Q, 10) == []
    assert broker.ack(held)
    broker.enqueue(Q, b"b1", key="b")
    assert broker.lease(Q, 10) == []
    broker.resume(Q)
    assert broker.stats(Q).paused is False
    assert sorted(drain(broker, limit=10)) == [b"a2", b"b1", b"u1"]


def test_pause_is_shared_by_connections(connect, clock: FakeClock) -> None:
    admin, worker = connect(), connect()
    worker.enqueue(Q, b"a1", key="a")
    admin.pause(Q, key="a")
    assert worker.lease(Q) == []
    admin.resume(Q, key="a")
    assert payloads(worker.lease(Q)) == [b"a1"]


# -- 11. ordered batches per key ----------------------------------------------------------------


@pytest.mark.one_partition
def test_batch_holds_the_key_until_every_message_settles(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", f"a{i}".encode()) for i in range(1, 6)] + [("b", b"b1")])
    leases = broker.lease(Q, 10, per_key=3)
    assert payloads(leases) == [b"a1", b"a2", b"a3", b"b1"]
    assert len({lease.batch_id for lease in leases[:3]}) == 1
    assert leases[3].batch_id != leases[0].batch_id
    assert broker.ack_many(leases[:2]) == [True, True]
    assert broker.lease(Q, 10, per_key=3) == []
    assert broker.ack(leases[2])
    assert payloads(broker.lease(Q, 10, per_key=3)) == [b"a4", b"a5"]


def test_nack_in_a_batch_returns_it_and_the_later_ones_in_order(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", f"a{i}".encode()) for i in range(1, 6)])
    a1, a2, a3, a4 = broker.lease(Q, 10, per_key=4)
    assert broker.ack(a1)
    assert broker.nack(a2)
    assert broker.ack(a3) is False  # returned with a2: its lease is no longer current
    assert broker.ack(a4) is False
    assert stats_counts(broker) == {"ready": 4, "leased": 0, "delayed": 0, "dead": 0, "keys": 1}
    again = broker.lease(Q, 10, per_key=4)
    assert [(lease.payload, lease.attempts) for lease in again] == [(b"a2", 2), (b"a3", 1), (b"a4", 1), (b"a5", 1)]


def test_nack_late_in_a_batch_keeps_the_key_held(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", f"a{i}".encode()) for i in range(1, 4)])
    a1, a2, a3 = broker.lease(Q, 10, per_key=3)
    assert broker.nack(a2)
    assert broker.lease(Q, 10, per_key=3) == []  # a1 still holds the key
    assert broker.ack(a1)
    again = broker.lease(Q, 10, per_key=3)
    assert [(lease.payload, lease.attempts) for lease in again] == [(b"a2", 2), (b"a3", 1)]


def test_expired_batch_returns_in_order(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", f"a{i}".encode()) for i in range(1, 5)])
    a1, a2, a3 = broker.lease(Q, per_key=3, limit=3, visibility_timeout=10)
    assert broker.ack(a1)
    clock.advance(11)
    again = broker.lease(Q, 10, per_key=3, visibility_timeout=10)
    assert [(lease.payload, lease.attempts) for lease in again] == [(b"a2", 2), (b"a3", 1), (b"a4", 1)]


def test_batch_is_cut_by_limit_and_by_delay(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("a", b"a3")])
    assert payloads(broker.lease(Q, 2, per_key=5)) == [b"a1", b"a2"]
    assert broker.lease(Q, 2, per_key=5) == []


# -- release and extend_many ---------------------------------------------------------------------


@pytest.mark.one_partition
def test_release_keeps_position_and_attempts(connect, clock: FakeClock) -> None:
    # retry_position="tail" and max_deliveries=2: a release ignores both.
    broker = connect(max_deliveries=2, retry_position="tail")
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), (None, b"u1"), (None, b"u2")])
    for _ in range(4):  # more releases than max_deliveries allows deliveries
        leases = broker.lease(Q, 2)
        assert [(lease.payload, lease.attempts) for lease in leases] == [(b"a1", 1), (b"u1", 1)]
        assert broker.release_many(leases) == [True, True]
        assert stats_counts(broker) == {"ready": 4, "leased": 0, "delayed": 0, "dead": 0, "keys": 1}
        clock.advance(0.001)
    broker.enqueue(Q, b"a3", key="a")
    assert broker.dead_letters(Q) == []
    delivered = []
    while leases := broker.lease(Q, 10):
        delivered.extend((lease.payload, lease.attempts) for lease in leases)
        assert all(broker.ack_many(leases))
    assert sorted(delivered) == [(b"a1", 1), (b"a2", 1), (b"a3", 1), (b"u1", 1), (b"u2", 1)]
    assert [p for p, _ in delivered if p.startswith(b"a")] == [b"a1", b"a2", b"a3"]
    assert [p for p, _ in delivered if p.startswith(b"u")] == [b"u1", b"u2"]
    # Releases count nothing; every delivery, the released ones included, was counted.
    totals = broker.metrics(Q, 5)
    assert sum(m.delivered for m in totals) == 8 + 5
    assert (sum(m.retried for m in totals), sum(m.dead for m in totals)) == (0, 0)


def test_release_after_a_nack_gives_back_the_retry_uncounted(connect, clock: FakeClock) -> None:
    broker = connect(max_deliveries=2)
    broker.enqueue(Q, b"a1", key="a")
    [first] = broker.lease(Q)
    assert broker.nack(first)  # a real failure: counts
    for _ in range(3):
        [again] = broker.lease(Q)
        assert again.attempts == 2
        assert broker.release(again)
    [last] = broker.lease(Q)
    assert broker.nack(last)  # the second counted delivery failed: dead
    assert [(d.payload, d.attempts) for d in broker.dead_letters(Q)] == [(b"a1", 2)]


def test_release_in_a_batch_returns_it_and_the_later_ones_in_order(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", f"a{i}".encode()) for i in range(1, 6)])
    a1, a2, a3, a4 = broker.lease(Q, 10, per_key=4)
    assert broker.ack(a1)
    assert broker.release(a2)
    assert broker.ack(a3) is False  # returned with a2: its lease is no longer current
    assert broker.release(a4) is False
    assert stats_counts(broker) == {"ready": 4, "leased": 0, "delayed": 0, "dead": 0, "keys": 1}
    again = broker.lease(Q, 10, per_key=4)
    assert [(lease.payload, lease.attempts) for lease in again] == [(b"a2", 1), (b"a3", 1), (b"a4", 1), (b"a5", 1)]


def test_release_late_in_a_batch_keeps_the_key_held(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", f"a{i}".encode()) for i in range(1, 4)] + [("b", b"b1")])
    a1, a2, a3 = broker.lease(Q, 10, per_key=3)[:3]
    assert broker.release(a2)
    assert broker.lease(Q, 10, per_key=3) == []  # a1 still holds the key (b1 went with a)
    assert broker.ack(a1)
    again = broker.lease(Q, 10, per_key=3)
    assert [(lease.payload, lease.attempts) for lease in again] == [(b"a2", 1), (b"a3", 1)]


def test_release_many_of_a_whole_batch_answers_each_lease(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", f"a{i}".encode()) for i in range(1, 4)])
    batch = broker.lease(Q, 10, per_key=3)
    # The first returns the whole batch; the later ones were current when the call began.
    assert broker.release_many(batch) == [True, True, True]
    assert broker.release_many(batch) == [False, False, False]
    assert broker.release_many([]) == []
    assert [(x.payload, x.attempts) for x in broker.lease(Q, 10, per_key=3)] == [(b"a1", 1), (b"a2", 1), (b"a3", 1)]


def test_stale_release_is_refused_and_changes_nothing(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2")])
    [stale] = broker.lease(Q, visibility_timeout=10)
    clock.advance(11)
    [current] = broker.lease(Q, visibility_timeout=10)
    assert (current.payload, current.attempts) == (b"a1", 2)
    assert broker.release(stale) is False
    assert broker.release_many([stale, current]) == [False, True]
    assert stats_counts(broker) == {"ready": 2, "leased": 0, "delayed": 0, "dead": 0, "keys": 1}
    [after] = broker.lease(Q)
    assert (after.payload, after.attempts) == (b"a1", 2)  # the expiry counted, the release did not
    assert broker.ack(after)
    assert broker.release(after) is False  # settled: nothing to give back
    assert drain(broker) == [b"a2"]


@pytest.mark.one_partition
def test_extend_many_with_a_stale_lease_among_fresh_ones(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("b", b"b1"), ("c", b"c1")])
    broker.enqueue("other", b"o1", key="a")
    [stale] = broker.lease(Q, visibility_timeout=5)
    b1, c1 = broker.lease(Q, 2, visibility_timeout=10)
    [o1] = broker.lease("other", visibility_timeout=10)
    clock.advance(6)
    [a1] = broker.lease(Q, visibility_timeout=30)  # stale's message again
    assert a1.attempts == 2
    stale_deadline = stale.deadline
    assert broker.extend_many([b1, stale, c1, o1], 20) == [True, False, True, True]
    assert stale.deadline == stale_deadline
    now = clock()
    assert [lease.deadline for lease in (b1, c1, o1)] == [pytest.approx(now + 20)] * 3
    clock.advance(19)
    assert broker.lease(Q, 10) == []  # every key still held
    assert broker.lease("other") == []
    clock.advance(2)
    assert sorted((x.payload, x.attempts) for x in broker.lease(Q, 10)) == [(b"b1", 2), (b"c1", 2)]
    assert [(x.payload, x.attempts) for x in broker.lease("other")] == [(b"o1", 2)]
    assert broker.extend_many([]) == []


def test_extend_many_defaults_to_each_queues_visibility_timeout(connect, clock: FakeClock) -> None:
    broker = connect(visibility_timeout=30, queues={"short": {"visibility_timeout": 5}})
    broker.enqueue(Q, b"long")
    broker.enqueue("short", b"short")
    leases = broker.lease(Q) + broker.lease("short")
    clock.advance(1)
    assert broker.extend_many(leases) == [True, True]
    now = clock()
    assert [lease.deadline for lease in leases] == [pytest.approx(now + 30), pytest.approx(now + 5)]


# -- stats, queues, bindings -------------------------------------------------------------------


@pytest.mark.one_partition
def test_stats_fields(broker: Broker, clock: FakeClock) -> None:
    empty = broker.stats("nothing-here")
    assert (empty.queue, empty.ready, empty.leased, empty.delayed, empty.dead, empty.keys) == ("nothing-here", 0, 0, 0, 0, 0)
    assert empty.oldest_age == 0 and empty.paused is False
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("b", b"b1"), (None, b"u1"), ("c", b"c1")])
    broker.enqueue(Q, b"d1", key="d", delay=100)
    broker.enqueue(Q, b"u2", delay=100)
    clock.advance(10)
    leases = broker.lease(Q, 2)
    assert payloads(leases) == [b"a1", b"b1"]
    assert broker.nack(leases[1], dead=True)
    stats = broker.stats(Q)
    assert stats.queue == Q
    assert (stats.ready, stats.leased, stats.delayed, stats.dead, stats.keys) == (3, 1, 2, 1, 3)
    assert stats.oldest_age == pytest.approx(10.004)  # a2, enqueued at +0.001, now +10.005
    assert stats.as_dict()["ready"] == 3


def test_queues_lists_queues_that_held_messages(broker: Broker) -> None:
    assert broker.queues() == []
    broker.enqueue("b-queue", b"1")
    broker.enqueue("a-queue", b"2", key="k")
    broker.lease("c-queue")
    broker.stats("d-queue")
    assert broker.queues() == ["a-queue", "b-queue"]


def test_bindings(connect) -> None:
    broker, other = connect(), connect()
    assert broker.bound_queues("events") == []
    broker.bind("events", "q2")
    broker.bind("events", "q1")
    broker.bind("events", "q1")
    broker.bind("other", "q3")
    assert other.bound_queues("events") == ["q1", "q2"]
    other.unbind("events", "q2")
    other.unbind("events", "never-bound")
    other.unbind("nobody", "q1")
    assert broker.bound_queues("events") == ["q1"]
    assert broker.bound_queues("other") == ["q3"]


# -- waiting ----------------------------------------------------------------------------------


def test_lease_wait_returns_when_a_message_arrives(connect) -> None:
    consumer, producer = connect(), connect()
    assert consumer.lease(Q, wait=0.1) == []
    timer = threading.Timer(0.3, lambda: producer.enqueue(Q, b"late", key="a"))
    started = time.monotonic()
    timer.start()
    try:
        leases = consumer.lease(Q, wait=20)
    finally:
        timer.cancel()
        # The lease may see the message before the enqueue has read its reply: let it
        # finish before the fixture closes the producer under it.
        timer.join()
    # Woken by the enqueue, long before the wait would have run out.
    assert payloads(leases) == [b"late"]
    assert time.monotonic() - started < 10


def test_wait_does_not_miss_work_that_arrived_after_the_last_lease(connect) -> None:
    # The race inside lease(wait=...): a message enqueued after the consumer's empty lease
    # and before it starts waiting must still end the wait early.
    consumer, producer = connect(), connect()
    assert consumer.backend.lease(Q, 1, 1, 30.0, consumer.settings(Q)).leases == []
    producer.enqueue(Q, b"x", key="a")
    started = time.monotonic()
    consumer.backend.wait(Q, 5.0)
    assert time.monotonic() - started < 2.5
    assert payloads(consumer.lease(Q)) == [b"x"]


# -- more combinations -----------------------------------------------------------------------


@pytest.mark.one_partition
def test_messages_outlive_the_connection(connect, clock: FakeClock) -> None:
    first = connect(max_deliveries=2)
    enqueue_each(first, clock, [("a", b"a1"), ("a", b"a2"), (None, b"u1")])
    [held] = first.lease(Q)
    first.close()
    second = connect(max_deliveries=2)
    assert stats_counts(second) == {"ready": 2, "leased": 1, "delayed": 0, "dead": 0, "keys": 1}
    assert second.ack(held) is True  # a lease survives its connection
    assert drain(second, limit=10) == [b"u1", b"a2"]  # a is ready again only from the ack


@pytest.mark.one_partition
def test_unkeyed_retries(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [(None, b"u1"), (None, b"u2")])
    u1, u2 = broker.lease(Q, 10, visibility_timeout=10)
    assert broker.nack(u1, delay=5)
    assert stats_counts(broker) == {"ready": 0, "leased": 1, "delayed": 1, "dead": 0, "keys": 0}
    clock.advance(5.5)
    assert [(x.payload, x.attempts) for x in broker.lease(Q, 10)] == [(b"u1", 2)]
    clock.advance(5)
    assert [(x.payload, x.attempts) for x in broker.lease(Q, 10)] == [(b"u2", 2)]


def test_key_concurrency_two_with_batches(connect, clock: FakeClock) -> None:
    broker = connect(key_concurrency=2)
    enqueue_each(broker, clock, [("a", f"a{i}".encode()) for i in range(1, 7)])
    leases = broker.lease(Q, 10, per_key=2)
    assert payloads(leases) == [b"a1", b"a2", b"a3", b"a4"]
    assert len({lease.batch_id for lease in leases}) == 2
    assert broker.ack_many(leases[2:]) == [True, True]  # the second batch settles first
    assert payloads(broker.lease(Q, 10, per_key=2)) == [b"a5", b"a6"]


def test_tail_retry_with_delay(connect, clock: FakeClock) -> None:
    broker = connect(retry_position="tail")
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2")])
    [a1] = broker.lease(Q)
    assert broker.nack(a1, delay=5)
    assert stats_counts(broker) == {"ready": 1, "leased": 0, "delayed": 1, "dead": 0, "keys": 1}
    assert drain(broker) == [b"a2"]
    clock.advance(5.5)
    broker.enqueue(Q, b"a3", key="a")
    assert drain(broker) == [b"a1", b"a3"]


def test_dead_letter_from_an_expired_batch(connect, clock: FakeClock) -> None:
    broker = connect(max_deliveries=1, visibility_timeout=10)
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("a", b"a3")])
    assert payloads(broker.lease(Q, per_key=3, limit=3)) == [b"a1", b"a2", b"a3"]
    clock.advance(11)
    # a1 dies (one delivery allowed); a2 and a3 come back, their attempt not counted.
    assert [(x.payload, x.attempts) for x in broker.lease(Q, per_key=3, limit=3)] == [(b"a2", 1), (b"a3", 1)]
    assert [(d.payload, d.attempts) for d in broker.dead_letters(Q)] == [(b"a1", 1)]


# -- why is a key not moving (broker.why, stuck_keys) -----------------------------------------


def test_why_an_unknown_key_is_empty(broker: Broker) -> None:
    why = broker.why(Q, "nobody")
    assert (why.reason, why.until, why.backlog, why.head, why.holds) == ("empty", None, 0, None, ())


@pytest.mark.one_partition
def test_why_a_ready_key_waits_for_a_consumer(broker: Broker, clock: FakeClock) -> None:
    mid = broker.enqueue(Q, b"1", key="a")
    clock.advance(5)
    why = broker.why(Q, "a")
    assert (why.reason, why.until, why.backlog, why.head.id) == ("ready", None, 1, mid)
    assert why.ready_since == pytest.approx(CLOCK_START)
    assert why.waited == pytest.approx(5)
    assert why.last_delivered_minute is None and "is one running?" in why.summary
    broker.enqueue(Q, b"x", key="b")
    [lease] = broker.lease(Q)  # key a was ready first
    assert lease.id == mid
    broker.ack(lease)
    why = broker.why(Q, "b")
    assert why.reason == "ready"
    assert why.last_delivered_minute == 60 * ((CLOCK_START + 5) // 60)
    assert "last took a message" in why.summary


def test_why_a_paused_key_or_queue(broker: Broker) -> None:
    broker.enqueue(Q, b"1", key="a")
    broker.pause(Q, key="a")
    why = broker.why(Q, "a")
    assert (why.reason, why.paused_scope, why.until) == ("paused", "key", None)
    broker.pause(Q)  # the queue's pause is the one that counts first
    assert (broker.why(Q, "a").reason, broker.why(Q, "a").paused_scope) == ("paused", "queue")
    broker.resume(Q)
    broker.resume(Q, key="a")
    assert broker.why(Q, "a").reason == "ready"


def test_why_says_since_when_a_lease_holds_the_key_and_how_big_its_batch_is(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue_many(Q, [Message(f"{i}".encode(), key="k") for i in range(4)])
    leased_at = clock()
    leases = broker.lease(Q, 3, per_key=3)
    clock.advance(7)
    [hold] = broker.why(Q, "k").holds
    assert (hold.leased_at, hold.message_id, hold.size, hold.settled) == (pytest.approx(leased_at), leases[0].id, 3, 0)
    assert broker.extend(leases[0], 30)
    broker.ack(leases[2])  # out of batch order: the size stays what was delivered
    [hold] = broker.why(Q, "k").holds
    assert (hold.leased_at, hold.size, hold.settled) == (pytest.approx(leased_at), 3, 1)  # an extension is no new delivery


def test_why_a_leased_key_names_its_lease(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue_many(Q, [Message(b"1", key="a"), Message(b"2", key="a")])
    [lease] = broker.lease(Q, visibility_timeout=30)
    clock.advance(4)
    why = broker.why(Q, "a")
    assert (why.reason, why.backlog) == ("leased", 2)
    assert why.until == pytest.approx(lease.deadline)
    [hold] = why.holds
    assert (hold.message_id, hold.token, hold.attempts, hold.size, hold.settled) == (lease.id, lease.token, 1, 1, 0)
    assert hold.deadline == pytest.approx(CLOCK_START + 30)
    assert why.head is not None and why.head.id != lease.id  # the message that waits
    # An operator who knows the holder is dead gives the lease back by id and token.
    assert broker.release_lease(Q, hold.message_id, hold.token, key="a", batch_id=hold.batch_id)
    assert not broker.release_lease(Q, hold.message_id, hold.token, key="a", batch_id=hold.batch_id)  # stale now
    assert broker.why(Q, "a").reason == "ready"
    assert payloads(broker.lease(Q)) == [b"1"]


def test_why_a_batch_counts_its_settled_messages(broker: Broker) -> None:
    broker.enqueue_many(Q, [Message(str(i).encode(), key="a") for i in range(4)])
    batch = broker.lease(Q, 3, per_key=3)
    assert broker.ack(batch[0])
    [hold] = broker.why(Q, "a").holds
    assert (hold.size, hold.settled, hold.message_id, hold.token) == (3, 1, batch[1].id, batch[1].token)


def test_why_key_concurrency_reached(connect) -> None:
    broker = connect()
    broker.configure_queue(Q, key_concurrency=2)
    broker.enqueue_many(Q, [Message(str(i).encode(), key="a") for i in range(3)])
    first = broker.lease(Q)
    assert broker.why(Q, "a").reason == "ready"  # one slot of two in use
    second = broker.lease(Q)
    why = broker.why(Q, "a")
    assert why.reason == "key_concurrency"
    assert {hold.message_id for hold in why.holds} == {first[0].id, second[0].id}
    assert why.until == pytest.approx(min(first[0].deadline, second[0].deadline))


def test_why_a_rate_interval(broker: Broker, clock: FakeClock) -> None:
    broker.set_interval(Q, "a", 10)
    broker.enqueue_many(Q, [Message(b"1", key="a"), Message(b"2", key="a")])
    broker.ack(broker.lease(Q)[0])
    clock.advance(3)
    why = broker.why(Q, "a")
    assert (why.reason, why.interval) == ("interval", 10)
    assert why.until == pytest.approx(CLOCK_START + 10)
    clock.advance(8)
    assert broker.why(Q, "a").reason == "ready"


def test_why_a_retry_holds_the_key(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue_many(Q, [Message(b"1", key="a"), Message(b"2", key="a")])
    [lease] = broker.lease(Q)
    broker.nack(lease, delay=20)
    why = broker.why(Q, "a")
    assert (why.reason, why.head.id, why.head.attempts) == ("retry", lease.id, 1)
    assert why.until == pytest.approx(CLOCK_START + 20)


def test_why_the_later_of_interval_and_retry_is_the_reason(broker: Broker, clock: FakeClock) -> None:
    broker.set_interval(Q, "a", 5)
    broker.enqueue(Q, b"1", key="a")
    [lease] = broker.lease(Q)
    broker.nack(lease, delay=20)
    assert (broker.why(Q, "a").reason, broker.why(Q, "a").until) == ("retry", pytest.approx(CLOCK_START + 20))
    broker.set_interval(Q, "a", 60)
    assert (broker.why(Q, "a").reason, broker.why(Q, "a").until) == ("interval", pytest.approx(CLOCK_START + 60))


@pytest.mark.one_partition
def test_why_only_delayed_messages(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue(Q, b"other", key="b", delay=5)
    broker.enqueue(Q, b"later", key="a", delay=40)
    broker.enqueue(Q, b"sooner", key="a", delay=30)
    why = broker.why(Q, "a")
    assert (why.reason, why.head, why.backlog) == ("delayed", None, 2)
    assert why.until == pytest.approx(CLOCK_START + 30)
    clock.advance(31)  # due, and entering the key's order at the next lease call
    assert broker.why(Q, "a").reason == "ready"
    assert payloads(broker.lease(Q, 2)) == [b"other", b"sooner"]


def test_stuck_keys_lists_long_waits_with_their_reasons(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue_many(Q, [Message(b"1", key="held"), Message(b"2", key="held")])
    broker.lease(Q)
    broker.enqueue(Q, b"1", key="paused")
    broker.pause(Q, key="paused")
    clock.advance(100)
    broker.enqueue(Q, b"1", key="fresh")  # waited 10 s only
    broker.enqueue(Q, b"1", key="later", delay=500)  # nothing ready: not stuck
    clock.advance(10)
    stuck = broker.stuck_keys(Q, older_than=60)
    assert [(d.key, d.reason) for d in stuck] == [("held", "leased"), ("paused", "paused")]
    assert stuck[0].waited == pytest.approx(110)
    assert [d.key for d in broker.stuck_keys(Q, older_than=5)] == ["held", "paused", "fresh"]
    assert [d.key for d in broker.stuck_keys(Q, older_than=5, limit=1)] == ["held"]


def test_stuck_keys_reads_keys_in_pages(broker: Broker, clock: FakeClock) -> None:
    from sharded_broker.broker import STUCK_PAGE

    count = STUCK_PAGE + 7
    broker.enqueue_many(Q, [Message(b"x", key=f"k{i:04}") for i in range(count)])
    clock.advance(120)
    assert len(broker.stuck_keys(Q, older_than=60, limit=10_000)) == count
    assert len(broker.stuck_keys(Q, older_than=60, limit=10_000, scan_limit=STUCK_PAGE)) == STUCK_PAGE
    assert broker.backend.backlog_keys(Q, count - 2, 10) == [f"k{count - 2:04}", f"k{count - 1:04}"]


def test_key_facts_of_several_keys_in_one_call(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue_many(Q, [Message(b"a1", key="a"), Message(b"a2", key="a"), Message(b"b1", key="b")])
    broker.enqueue(Q, b"c-later", key="c", delay=50)
    broker.enqueue(Q, b"e-sooner", key="e", delay=20)
    leases = {lease.key: lease for lease in broker.lease(Q, 2)}
    facts = {f.key: f for f in broker.backend.key_facts(Q, ["a", "b", "c", "e", "nobody"])}
    assert [h.message_id for h in facts["a"].holds] == [leases["a"].id]
    assert [h.message_id for h in facts["b"].holds] == [leases["b"].id]
    assert (facts["a"].backlog, facts["a"].slots, facts["a"].head.id != leases["a"].id) == (2, 1, True)
    assert (facts["b"].head, facts["b"].next_delayed) == (None, None)  # leased, nothing else waiting
    assert facts["c"].next_delayed == pytest.approx(CLOCK_START + 50)
    assert facts["e"].next_delayed == pytest.approx(CLOCK_START + 20)
    assert (facts["nobody"].backlog, facts["nobody"].holds, facts["nobody"].head) == (0, (), None)
    # b has nothing waiting behind its lease: not stuck, whatever holds it.
    assert [broker.why(Q, key).reason for key in "abce"] == ["leased", "empty", "delayed", "delayed"]


def test_head_times_answer_each_keys_head_enqueue_time(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue(Q, b"a1", key="a")
    clock.advance(3)
    broker.enqueue_many(Q, [Message(b"a2", key="a"), Message(b"b1", key="b")])
    broker.enqueue(Q, b"c", key="c", delay=60)
    clock.advance(1)
    now, times = broker.backend.head_times(Q, ["a", "b", "c", "nobody"])
    assert now == pytest.approx(CLOCK_START + 4)
    assert times[0] == pytest.approx(CLOCK_START) and times[1] == pytest.approx(CLOCK_START + 3)
    assert times[2:] == [None, None]
    broker.ack(broker.lease(Q)[0])  # a's head goes: its next message is the head now
    assert broker.backend.head_times(Q, ["a"])[1][0] == pytest.approx(CLOCK_START + 3)


def test_lagging_keys_in_bounded_pages(broker: Broker, clock: FakeClock) -> None:
    from sharded_broker.broker import STUCK_PAGE

    broker.enqueue_many(Q, [Message(b"x", key=f"k{i:04}") for i in range(STUCK_PAGE + 5)])
    clock.advance(10)
    broker.enqueue_many(Q, [Message(b"y", key="big") for _ in range(3)])  # largest backlog, youngest head
    broker.enqueue(Q, b"z", key="later", delay=100)  # nothing ready: no lag
    clock.advance(1)
    lagging = broker.lagging_keys(Q, limit=3)
    assert [info.key for info in lagging] == ["k0000", "k0001", "k0002"]
    assert lagging[0].lag == pytest.approx(11)
    assert [info.key for info in broker.lagging_keys(Q, limit=2, scan_limit=1)] == ["big"]
    assert [info.key for info in broker.lagging_keys(Q, limit=400)][-1] == "big"
    assert len(broker.lagging_keys(Q, limit=400)) == STUCK_PAGE + 6


def test_why_a_lease_past_its_deadline_waits_for_a_consumer(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue_many(Q, [Message(b"1", key="a"), Message(b"2", key="a")])
    [lease] = broker.lease(Q, visibility_timeout=10)
    clock.advance(25)  # expired, but nothing returns it until a consumer calls lease
    why = broker.why(Q, "a")
    assert why.reason == "leased" and why.until == pytest.approx(lease.deadline)
    assert "expired 15 s ago" in why.summary and "is one running?" in why.summary
    assert payloads(broker.lease(Q)) == [b"1"]  # the next lease call returns and redelivers it


# -- cancel and get by id -----------------------------------------------------------------


def assert_consistent(broker: Broker, expected: dict[str, int], backlogs: dict[str, int]) -> None:
    """stats, keys, why and get agree with each other and with what the test expects:
    ``expected`` the stats counts, ``backlogs`` each key's backlog."""
    assert stats_counts(broker) == expected
    infos = broker.keys(Q, limit=1000)
    assert {info.key: info.backlog for info in infos} == backlogs
    assert broker.stats(Q).keys == len(infos)
    for info in infos:
        why = broker.why(Q, info.key)
        assert why.backlog == info.backlog
        if info.head is not None:
            assert why.head == info.head
            found = broker.get(Q, info.head.id)
            assert found is not None and found.state == "waiting" and found.key == info.key


@pytest.mark.one_partition
def test_cancel_the_head_moves_its_key_on_keeping_its_place(broker: Broker, clock: FakeClock) -> None:
    ids = enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("a", b"a3"), ("b", b"b1")])
    result = broker.cancel(Q, ids[0])
    assert result and result.cancelled
    assert (result.queue, result.id, result.state, result.key) == (Q, ids[0], "waiting", "a")
    assert broker.get(Q, ids[0]) is None
    assert_consistent(broker, {"ready": 3, "leased": 0, "delayed": 0, "dead": 0, "keys": 2}, {"a": 2, "b": 1})
    assert broker.key_info(Q, "a").head.id == ids[1]
    # Key a was ready before b and keeps that place: its next message goes first.
    assert drain(broker) == [b"a2", b"b1", b"a3"]


def test_cancel_a_message_in_the_middle_of_its_key(broker: Broker, clock: FakeClock) -> None:
    ids = enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("a", b"a3")])
    assert broker.cancel(Q, ids[1]).cancelled
    assert_consistent(broker, {"ready": 2, "leased": 0, "delayed": 0, "dead": 0, "keys": 1}, {"a": 2})
    again = broker.cancel(Q, ids[1])
    assert not again and (again.state, again.key) == (None, None)
    assert "no message" in again.summary
    assert drain(broker) == [b"a1", b"a3"]


def test_cancel_a_delayed_message(broker: Broker, clock: FakeClock) -> None:
    first = broker.enqueue(Q, b"a1", key="a")
    later = broker.enqueue(Q, b"a2", key="a", delay=10)
    unkeyed = broker.enqueue(Q, b"u", delay=10)
    assert broker.get(Q, later).state == "delayed"
    result = broker.cancel(Q, later)
    assert result.cancelled and (result.state, result.key) == ("delayed", "a")
    assert broker.cancel(Q, unkeyed).cancelled
    assert_consistent(broker, {"ready": 1, "leased": 0, "delayed": 0, "dead": 0, "keys": 1}, {"a": 1})
    clock.advance(20)
    assert drain(broker) == [b"a1"]
    assert broker.get(Q, first) is None  # acked: done messages are not kept
    assert_consistent(broker, {"ready": 0, "leased": 0, "delayed": 0, "dead": 0, "keys": 0}, {})


def test_cancel_the_only_message_of_a_key_forgets_the_key(broker: Broker, clock: FakeClock) -> None:
    ids = enqueue_each(broker, clock, [("a", b"a1"), ("b", b"b1")])
    assert broker.cancel(Q, ids[0]).cancelled
    assert_consistent(broker, {"ready": 1, "leased": 0, "delayed": 0, "dead": 0, "keys": 1}, {"b": 1})
    assert broker.why(Q, "a").reason == "empty"
    assert drain(broker) == [b"b1"]


@pytest.mark.one_partition
def test_cancel_an_unkeyed_message(broker: Broker, clock: FakeClock) -> None:
    ids = enqueue_each(broker, clock, [(None, b"u1"), (None, b"u2"), ("a", b"a1")])
    assert broker.cancel(Q, ids[0]).cancelled
    assert_consistent(broker, {"ready": 2, "leased": 0, "delayed": 0, "dead": 0, "keys": 1}, {"a": 1})
    assert drain(broker) == [b"u2", b"a1"]


def test_a_leased_message_is_refused_and_nothing_changes(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2")])
    [lease] = broker.lease(Q)
    before = (stats_counts(broker), broker.why(Q, "a").reason)
    result = broker.cancel(Q, lease.id)
    assert not result and (result.state, result.key) == ("leased", "a")
    assert "leased" in result.summary and "cannot be cancelled" in result.summary
    assert (stats_counts(broker), broker.why(Q, "a").reason) == before == (
        {"ready": 1, "leased": 1, "delayed": 0, "dead": 0, "keys": 1}, "leased",
    )
    assert broker.ack(lease)  # the lease is intact
    assert drain(broker) == [b"a2"]


def test_a_dead_letter_is_refused(broker: Broker, clock: FakeClock) -> None:
    mid = broker.enqueue(Q, b"a1", key="a")
    [lease] = broker.lease(Q)
    assert broker.nack(lease, dead=True, reason="boom")
    result = broker.cancel(Q, mid)
    assert not result and (result.state, result.key) == ("dead", "a")
    assert [d.id for d in broker.dead_letters(Q)] == [mid]
    assert_consistent(broker, {"ready": 0, "leased": 0, "delayed": 0, "dead": 1, "keys": 0}, {})


def test_cancel_in_an_unknown_queue_or_of_an_unknown_id(broker: Broker) -> None:
    unknown = broker.cancel("never-used", "some-id")
    assert (unknown.queue, unknown.id, unknown.cancelled, unknown.state, unknown.key) == ("never-used", "some-id", False, None, None)
    broker.enqueue(Q, b"a1", key="a")
    assert broker.cancel(Q, "no-such-id").state is None
    assert broker.get(Q, "no-such-id") is None and broker.get("never-used", "x") is None
    assert stats_counts(broker)["ready"] == 1


@pytest.mark.one_partition
def test_cancel_a_retry_that_holds_its_key_frees_the_key_now(broker: Broker, clock: FakeClock) -> None:
    enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("b", b"b1")])
    [first] = broker.lease(Q)
    assert broker.nack(first, delay=30)
    info = broker.get(Q, first.id)
    assert (info.state, info.attempts) == ("waiting", 1)
    assert info.available_at == pytest.approx(broker.backend.now() + 30)
    assert payloads(broker.lease(Q, 10)) == [b"b1"]  # a2 waits behind the held retry
    assert broker.why(Q, "a").reason == "retry"
    assert broker.cancel(Q, first.id).cancelled
    assert broker.why(Q, "a").reason == "ready"
    assert payloads(broker.lease(Q, 10)) == [b"a2"]


@pytest.mark.one_partition
def test_cancel_the_head_of_a_key_in_flight_or_paused_waits_for_it(connect, clock: FakeClock) -> None:
    broker = connect(visibility_timeout=10)
    ids = enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2"), ("a", b"a3"), ("b", b"b1"), ("b", b"b2")])
    [lease] = broker.lease(Q)
    assert lease.payload == b"a1"
    assert broker.cancel(Q, ids[1]).cancelled  # a's head while a1 runs
    assert broker.why(Q, "a").reason == "leased"
    broker.pause(Q, key="b")
    assert broker.cancel(Q, ids[3]).cancelled
    assert broker.why(Q, "b").reason == "paused"
    assert broker.lease(Q, 10) == []
    assert broker.ack(lease)
    assert payloads(broker.lease(Q, 10)) == [b"a3"]
    broker.resume(Q, key="b")
    assert payloads(broker.lease(Q, 10)) == [b"b2"]


def test_cancel_releases_dedup_as_an_ack_does(connect, clock: FakeClock) -> None:
    window = connect(dedup_window=60)
    first = window.enqueue(Q, b"x", key="a", dedup_id="order-1")
    assert window.cancel(Q, first).cancelled
    # As after an ack: within the window the dedup id still answers the first message.
    assert window.enqueue(Q, b"y", key="a", dedup_id="order-1") == first
    assert stats_counts(window)["ready"] == 0
    clock.advance(61)
    assert window.enqueue(Q, b"z", key="a", dedup_id="order-1") != first
    assert drain(window) == [b"z"]

    pending = connect(unique_while_pending=True, dedup_window=60)
    twin = pending.enqueue("p", b"x", key="a", dedup_id="refresh")
    assert pending.enqueue("p", b"x2", key="a", dedup_id="refresh") == twin
    assert pending.cancel("p", twin).cancelled
    fresh = pending.enqueue("p", b"y", key="a", dedup_id="refresh")  # no longer pending: enqueued
    assert fresh != twin
    assert drain(pending, "p") == [b"y"]


def test_cancel_is_not_counted_in_the_metrics(broker: Broker, clock: FakeClock) -> None:
    ids = enqueue_each(broker, clock, [("a", b"a1"), ("a", b"a2")])
    assert broker.cancel(Q, ids[0]).cancelled
    assert drain(broker) == [b"a2"]
    [minute] = broker.metrics(Q, 1)
    assert (minute.enqueued, minute.delivered, minute.acked, minute.retried, minute.dead) == (2, 1, 1, 0, 0)
    [key_minute] = broker.metrics(Q, 1, key="a")
    assert (key_minute.enqueued, key_minute.delivered, key_minute.acked) == (2, 1, 1)


def test_get_shows_each_state_with_attempts_and_times(connect, clock: FakeClock) -> None:
    broker = connect(visibility_timeout=10)
    start = broker.backend.now()
    waiting = broker.enqueue(Q, b"hello", key="a", priority=2, dedup_id="d-1")
    delayed = broker.enqueue(Q, b"later", key="b", delay=60)
    info = broker.get(Q, waiting)
    assert (info.queue, info.id, info.key, info.state, info.priority, info.attempts) == (Q, waiting, "a", "waiting", 2, 0)
    assert (info.size, info.dedup_id) == (5, "d-1")
    assert info.enqueued_at == pytest.approx(start) and info.available_at == pytest.approx(start)
    assert (info.lease_deadline, info.leased_at, info.dead_reason, info.died_at) == (None, None, None, None)
    later = broker.get(Q, delayed)
    assert (later.state, later.available_at) == ("delayed", pytest.approx(start + 60))

    clock.advance(2)
    [lease] = broker.lease(Q)
    leased = broker.get(Q, waiting)
    assert (leased.state, leased.attempts, leased.available_at) == ("leased", 1, None)
    assert leased.lease_deadline == pytest.approx(start + 12) and leased.leased_at == pytest.approx(start + 2)
    assert broker.extend(lease, 20)
    assert broker.get(Q, waiting).lease_deadline == pytest.approx(start + 22)
    assert broker.nack(lease, dead=True, reason="boom")
    dead = broker.get(Q, waiting)
    assert (dead.state, dead.attempts, dead.dead_reason) == ("dead", 1, "boom")
    assert dead.died_at == pytest.approx(start + 2) and dead.lease_deadline is None
    assert dead.as_dict()["state"] == "dead"
    broker.replay(Q)
    assert (broker.get(Q, waiting).state, broker.get(Q, waiting).attempts) == ("waiting", 0)
    assert drain(broker) == [b"hello"]
    assert broker.get(Q, waiting) is None


def test_get_a_leased_message_of_a_batch(broker: Broker) -> None:
    ids = broker.enqueue_many(Q, [Message(b"1", key="a"), Message(b"2", key="a"), Message(b"3", key="a")])
    leases = broker.lease(Q, 2, per_key=2)
    assert len(leases) == 2 and leases[0].batch_id == leases[1].batch_id
    assert [broker.get(Q, mid).state for mid in ids] == ["leased", "leased", "waiting"]
    assert broker.get(Q, ids[1]).lease_deadline == pytest.approx(leases[1].deadline)
    assert not broker.cancel(Q, ids[1])
    assert broker.cancel(Q, ids[2]).cancelled
    assert all(broker.ack_many(leases))
    assert_consistent(broker, {"ready": 0, "leased": 0, "delayed": 0, "dead": 0, "keys": 0}, {})


def test_cancel_and_get_refuse_a_bad_message_id(broker: Broker) -> None:
    from sharded_broker import InvalidArgument, InvalidArgumentType

    for bad in (42, b"id"):
        with pytest.raises(InvalidArgumentType, match="message id must be a str"):
            broker.cancel(Q, bad)
        with pytest.raises(InvalidArgumentType, match="message id must be a str"):
            broker.get(Q, bad)
    with pytest.raises(InvalidArgument, match="must not be empty"):
        broker.cancel(Q, "")
    with pytest.raises(InvalidArgument, match="lone surrogate"):
        broker.get(Q, "\udcff")
    with pytest.raises(InvalidArgument, match="queue"):
        broker.cancel("bad queue {}", "x")


# -- refs: cancel and get by the caller's own name for a message ----------------------------


def test_cancel_and_get_by_ref_from_another_broker(connect, clock: FakeClock) -> None:
    producer, other = connect(), connect()
    waiting = producer.enqueue(Q, b"w", key="a", ref="task-w")
    delayed = producer.enqueue(Q, b"d", key="a", delay=60, ref="task-d")
    unkeyed = producer.enqueue_many(Q, [Message(b"u", ref="task-u")])[0]
    plain = producer.enqueue(Q, b"p", key="b")
    info = other.get(Q, ref="task-w")
    assert (info.id, info.ref, info.state, info.key) == (waiting, "task-w", "waiting", "a")
    assert other.get(Q, waiting).ref == "task-w" and other.get(Q, plain).ref is None
    assert (other.get(Q, ref="task-d").id, other.get(Q, ref="task-d").state) == (delayed, "delayed")
    result = other.cancel(Q, ref="task-d")
    assert result.cancelled and (result.id, result.ref, result.state, result.key) == (delayed, "task-d", "delayed", "a")
    assert "task-d" in result.summary
    assert other.get(Q, ref="task-d") is None and other.get(Q, delayed) is None
    assert other.cancel(Q, ref="task-u").cancelled and other.get(Q, unkeyed) is None
    unknown = other.cancel(Q, ref="task-d")
    assert (unknown.id, unknown.ref, unknown.cancelled, unknown.state) == (None, "task-d", False, None)
    assert "no message with ref 'task-d'" in unknown.summary
    assert other.cancel("never-used", ref="x").state is None and other.get("never-used", ref="x") is None
    clock.advance(1)
    leases = producer.lease(Q, 2)
    assert {(lease.id, lease.ref) for lease in leases} == {(waiting, "task-w"), (plain, None)}
    refused = other.cancel(Q, ref="task-w")
    assert (refused.cancelled, refused.state, refused.id) == (False, "leased", waiting)
    assert other.get(Q, ref="task-w").state == "leased"
    assert all(producer.ack_many(leases))
    assert other.get(Q, ref="task-w") is None
    assert stats_counts(other) == {"ready": 0, "leased": 0, "delayed": 0, "dead": 0, "keys": 0}


@pytest.mark.one_partition
def test_a_ref_names_the_newest_message_enqueued_with_it(broker: Broker, clock: FakeClock) -> None:
    first = broker.enqueue(Q, b"1", key="a", ref="r")
    second = broker.enqueue(Q, b"2", key="b", ref="r")
    assert broker.get(Q, ref="r").id == second
    assert broker.get(Q, first).ref is None  # the older one lost it
    leases = broker.lease(Q, 2)
    assert {(lease.id, lease.ref) for lease in leases} == {(first, None), (second, "r")}
    first_lease = next(lease for lease in leases if lease.id == first)
    assert broker.ack(first_lease)  # acking the older one leaves the ref to the newer
    assert broker.get(Q, ref="r").id == second
    assert broker.ack(next(lease for lease in leases if lease.id == second))
    assert broker.get(Q, ref="r") is None
    # Two in one call: the later one takes it; a duplicate dropped by dedup takes nothing.
    ids = broker.enqueue_many(Q, [Message(b"3", ref="s"), Message(b"4", ref="s", dedup_id="d")])
    assert broker.get(Q, ref="s").id == ids[1] and broker.get(Q, ids[0]).ref is None
    assert broker.enqueue(Q, b"5", ref="t", dedup_id="d") == ids[1]
    assert broker.get(Q, ref="t") is None and broker.get(Q, ref="s").id == ids[1]
    assert broker.cancel(Q, ref="s").id == ids[1]
    assert broker.get(Q, ref="s") is None and broker.get(Q, ids[0]).state == "waiting"
    # A framework's retry: published again under the same ref while the first one runs.
    drain(broker)
    running = broker.enqueue(Q, b"6", key="c", ref="task")
    [lease] = broker.lease(Q)
    retry = broker.enqueue(Q, b"6 again", key="c", ref="task", at_head=True, delay=5)
    assert broker.get(Q, running).ref is None and broker.get(Q, ref="task").id == retry
    assert broker.ack(lease) and broker.get(Q, ref="task").id == retry
    clock.advance(5)
    [again] = broker.lease(Q)
    assert (again.id, again.ref) == (retry, "task")


def test_a_ref_lives_as_long_as_its_message(connect, clock: FakeClock) -> None:
    broker = connect(max_deliveries=2, max_pending_per_key=1, on_full="drop_oldest", visibility_timeout=5)
    # Retried, expired, dead-lettered, replayed: still the same message, still found.
    broker.enqueue(Q, b"x", key="a", ref="x")
    [lease] = broker.lease(Q)
    assert broker.nack(lease, delay=0)
    clock.advance(1)
    [lease] = broker.lease(Q)
    assert lease.ref == "x" and lease.attempts == 2
    clock.advance(10)  # the lease expires; max_deliveries=2: dead
    assert broker.lease(Q) == [] and broker.get(Q, ref="x").state == "dead"
    assert [letter.ref for letter in broker.dead_letters(Q)] == ["x"]  # a dead letter shows its ref
    assert broker.replay(Q) == 1 and broker.get(Q, ref="x").state == "waiting"
    # Dropped by backpressure: a dead letter, found until it is purged.
    broker.enqueue(Q, b"y", key="a", ref="y")
    assert broker.get(Q, ref="x").dead_reason == DROPPED_REASON
    assert [letter.ref for letter in broker.dead_letters(Q)] == ["x"]
    assert broker.purge(Q, dead=True) == 1 and broker.get(Q, ref="x") is None
    assert broker.purge(Q) == 1 and broker.get(Q, ref="y") is None
    # A new message may take a ref its settled message had.
    again = broker.enqueue(Q, b"x again", key="a", ref="x")
    assert broker.get(Q, ref="x").id == again


def test_cancel_and_get_name_a_message_by_exactly_one_of_id_and_ref(broker: Broker) -> None:
    from sharded_broker import InvalidArgument, InvalidArgumentType

    mid = broker.enqueue(Q, b"x", ref="r")
    for call in (broker.cancel, broker.get):
        with pytest.raises(InvalidArgument, match="exactly one of its id and its ref"):
            call(Q)
        with pytest.raises(InvalidArgument, match="exactly one of its id and its ref"):
            call(Q, mid, ref="r")
        with pytest.raises(InvalidArgumentType, match="ref must be a str"):
            call(Q, ref=42)
        with pytest.raises(InvalidArgument, match="ref must be 1 to 512 characters"):
            call(Q, ref="")
    for bad in ("", "r" * 513):
        with pytest.raises(InvalidArgument, match="ref must be 1 to 512 characters"):
            broker.enqueue(Q, b"x", ref=bad)
        with pytest.raises(InvalidArgument, match="ref must be 1 to 512 characters"):
            broker.enqueue_many(Q, [Message(b"x", ref=bad)])
    with pytest.raises(InvalidArgumentType, match="ref must be a str or None, not bytes"):
        broker.enqueue(Q, b"x", ref=b"r")
    with pytest.raises(InvalidArgument, match="lone surrogate"):
        broker.enqueue(Q, b"x", ref="\udcff")
    assert broker.get(Q, ref="r" * 512) is None
    assert broker.get(Q, ref="r").id == mid


def test_cancel_frees_room_under_max_pending_per_key(connect, clock: FakeClock) -> None:
    from sharded_broker.errors import QueueFull

    broker = connect(max_pending_per_key=2)
    broker.enqueue(Q, b"a1", key="a")
    later = broker.enqueue(Q, b"a2", key="a", delay=30)
    with pytest.raises(QueueFull):
        broker.enqueue(Q, b"a3", key="a")
    assert broker.cancel(Q, later).cancelled  # the key's delayed count goes down with it
    broker.enqueue(Q, b"a3", key="a")
    clock.advance(40)
    assert drain(broker) == [b"a1", b"a3"]
