"""Load: producers and consumer processes at full speed over 10,000 keys, in rounds.
Once each round drains, Redis's memory and the workers' memory are back where they were
after the first round, no lease is left and no key is stuck."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

import sharded_broker
from support.workload import Workers, drained, numbered, wait_until

pytestmark = pytest.mark.reliability

Q = "load"
KEYS = [f"tenant-{i}" for i in range(10_000)]


def soak(redis_url: str, events: Path, *, per_key: int, rounds: int, workers: int) -> None:
    admin = redis.Redis.from_url(redis_url)
    redis_memory: list[int] = []
    leftovers: list[dict[bytes, int]] = []
    state_fields: list[int] = []
    worker_memory: list[dict[int, int]] = []
    with sharded_broker.connect(redis_url) as broker, Workers(
        events, url=redis_url, queue=Q, vt=30.0, limit=100, rss_every=500
    ) as pool:
        pool.start(workers)
        for _ in range(rounds):
            messages = numbered(KEYS, per_key)
            for start in range(0, len(messages), 1000):  # producing while the workers consume
                broker.enqueue_many(Q, messages[start:start + 1000])
            wait_until(lambda: drained(broker, Q), timeout=600, what="the round to drain", step=0.2)
            stats = broker.stats(Q)
            assert (stats.ready, stats.leased, stats.delayed, stats.dead, stats.keys) == (0, 0, 0, 0, 0)
            sizes = {key: admin.memory_usage(key, samples=0) for key in admin.keys("*")}
            # Per-minute metrics are kept for their window (an hour by default) on purpose:
            # bounded by time, not by the work done; everything else must be back to nothing.
            metrics = {key: sizes.pop(key) for key in list(sizes) if key.endswith((b":metrics", b":kmetrics0", b":kmetrics1", b":kmetrics2"))}
            redis_memory.append(admin.info("memory")["used_memory"] - sum(metrics.values()))
            # The metrics themselves: one field per counter used per active (key, minute)
            # (docs/operations.md).
            key_minutes = sum(admin.hlen(key) for key in metrics)
            assert sum(metrics.values()) <= 200 * key_minutes, (sum(metrics.values()), key_minutes)
            leftovers.append(sizes)
            state_fields.append(admin.hlen(f"sb:{{{Q}}}:state"))
            latest: dict[int, int] = {}
            for event in pool.read():
                if event["e"] == "rss":
                    latest[event["pid"]] = event["kib"]
            worker_memory.append(latest)
        acks = [e for e in pool.read() if e["e"] == "ack"]
    admin.close()
    assert len(acks) == len(KEYS) * per_key * rounds and all(e["ok"] for e in acks)
    # A drained queue keeps only its counters, its partition count and the queue
    # registry, whatever it served.
    kept = [b"sb:queues", f"sb:{{{Q}}}:partitions".encode(), f"sb:{{{Q}}}:state".encode()]
    assert all(sorted(left) == kept for left in leftovers), leftovers[-1].keys()
    # Counters only change value: the state hash keeps its fields round after round. Its
    # bytes may step by its hash table's bucket array, which Redis grows while a round's
    # transient fields are there and shrinks lazily; every other key within a few bytes.
    assert all(fields == state_fields[0] for fields in state_fields), state_fields
    state = f"sb:{{{Q}}}:state".encode()
    for left in leftovers[1:]:
        assert all(abs(size - leftovers[0][key]) <= 64 for key, size in left.items() if key != state), leftovers
        assert abs(left[state] - leftovers[0][state]) <= 256, leftovers
    # The first round warms caches up; every later round must end where it did (the
    # allowance covers the allocator and client buffers, not data: see the keys above).
    for used in redis_memory[2:]:
        assert used - redis_memory[1] < 1024 * 1024, f"Redis memory grows round after round: {redis_memory}"
    for latest in worker_memory[2:]:
        for pid, kib in latest.items():
            assert kib - worker_memory[1].get(pid, kib) < 8 * 1024, f"worker {pid} memory grows: {worker_memory}"


def test_short_soak_over_10000_keys_leaves_memory_flat_and_nothing_leased(redis_url: str, tmp_path: Path) -> None:
    soak(redis_url, tmp_path / "events.jsonl", per_key=1, rounds=3, workers=2)


@pytest.mark.soak
def test_long_soak_over_10000_keys_leaves_memory_flat_and_nothing_leased(redis_url: str, tmp_path: Path) -> None:
    soak(redis_url, tmp_path / "events.jsonl", per_key=5, rounds=6, workers=4)
