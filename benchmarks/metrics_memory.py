"""Redis memory of the per-minute metrics, per active key-minute:
``python -m benchmarks.metrics_memory [--keys N] [--minutes M]``.

Over ``minutes`` minutes of a test clock, every one of ``keys`` keys has one message
enqueued, delivered and acked per minute (three of the five counters used, as in a healthy
queue). The figure is the ``INFO memory`` ``used_memory`` freed by deleting the metrics
structures (the queue's hash and the keys' span hashes), divided by the key-minutes
counted; the queue's own minutes are included in that total, so the figure slightly
overstates a key-minute.
Only the public API is used, so the same script measures an older checkout
(``PYTHONPATH=<old tree> python -m benchmarks.metrics_memory``).
"""

from __future__ import annotations

import argparse

import sharded_broker
from sharded_broker import Message

from .common import RedisServer, redis_client

Q = "metrics-memory"


class _Clock:
    """A test clock that starts on a minute and moves only when told."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def measure(url: str, keys: int, minutes: int) -> dict[str, float]:
    clock = _Clock()
    admin = redis_client(url)
    admin.flushall()
    with sharded_broker.connect(url, clock=clock, events=False) as broker:
        for _ in range(minutes):
            messages = [Message(b"x", key=f"tenant-{i}") for i in range(keys)]
            for start in range(0, keys, 1000):
                broker.enqueue_many(Q, messages[start : start + 1000])
            while leases := broker.lease(Q, 10_000):
                broker.ack_many(leases)
            clock.now += 60
    metric_keys = [name for name in admin.keys(f"sb:{{{Q}}}:*metrics*")]
    fields = sum(admin.hlen(name) for name in metric_keys)
    before = int(admin.info("memory")["used_memory"])
    admin.delete(*metric_keys)
    freed = before - int(admin.info("memory")["used_memory"])
    admin.close()
    key_minutes = keys * minutes
    return {
        "keys": keys,
        "minutes": minutes,
        "hash_fields": fields,
        "bytes_freed": freed,
        "bytes_per_key_minute": freed / key_minutes,
        "mb_per_minute_for_10000_keys": freed / minutes * 10_000 / keys / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--minutes", type=int, default=3)
    options = parser.parse_args()
    with RedisServer() as server:
        figures = measure(server.url, options.keys, options.minutes)
    for name, value in figures.items():
        print(f"{name:>30}: {value:,.1f}" if isinstance(value, float) else f"{name:>30}: {value:,}")


if __name__ == "__main__":
    main()
