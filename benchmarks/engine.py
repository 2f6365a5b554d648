"""Engine throughput on every backend in one run: enqueue, and lease+ack, per second.

    python benchmarks/engine.py              # quick: a few seconds
    python benchmarks/engine.py --messages 50000 --batch 500

Each backend gets a fresh store: ``memory://``, a SQLite file in a temporary directory,
and a throwaway redis-server on a free loopback port (tests/support/redis_server.py).
Messages carry a 100-byte payload spread over ``--keys`` shard keys. Two shapes are
timed: batched calls (``enqueue_many``, ``lease(limit=batch)`` + ``ack_many``) and one
message per call (``enqueue``, ``lease`` + ``ack``), which is what a task-queue worker
does. Figures on a shared machine are noisy; compare backends within one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import sharded_broker  # noqa: E402
from sharded_broker import Message  # noqa: E402
from support.redis_server import RedisServer  # noqa: E402

PAYLOAD = b"x" * 100
QUEUE = "bench"


def timed(work: Callable[[], int]) -> float:
    """Operations per second of ``work`` (which returns how many it did)."""
    start = time.perf_counter()
    count = work()
    return count / (time.perf_counter() - start)


def batched(broker: sharded_broker.Broker, messages: int, batch: int, keys: int) -> tuple[float, float]:
    def enqueue() -> int:
        for start in range(0, messages, batch):
            broker.enqueue_many(
                QUEUE, [Message(PAYLOAD, key=f"k{n % keys}") for n in range(start, min(start + batch, messages))]
            )
        return messages

    def lease_ack() -> int:
        done = 0
        while done < messages:
            leases = broker.lease(QUEUE, batch)  # one message of each of up to `batch` keys
            if not leases:
                raise RuntimeError(f"queue ran dry after {done} of {messages} messages")
            broker.ack_many(leases)
            done += len(leases)
        return done

    return timed(enqueue), timed(lease_ack)


def one_by_one(broker: sharded_broker.Broker, messages: int, keys: int) -> tuple[float, float]:
    def enqueue() -> int:
        for n in range(messages):
            broker.enqueue(QUEUE, PAYLOAD, key=f"k{n % keys}")
        return messages

    def lease_ack() -> int:
        for done in range(messages):
            [lease] = broker.lease(QUEUE) or [None]
            if lease is None:
                raise RuntimeError(f"queue ran dry after {done} of {messages} messages")
            broker.ack(lease)
        return messages

    return timed(enqueue), timed(lease_ack)


def backends(names: list[str]) -> Iterator[tuple[str, str]]:
    """(name, URL) of a fresh store per backend; servers and files go away afterwards."""
    for name in names:
        if name == "memory":
            yield name, f"memory://bench-{time.monotonic_ns()}"
        elif name == "sqlite":
            with tempfile.TemporaryDirectory(prefix="sharded-broker-bench-") as directory:
                yield name, f"sqlite:///{directory}/bench.db"
        elif name == "redis":
            with RedisServer() as server:
                yield name, server.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5_000, help="messages per batched run (default 5000)")
    parser.add_argument("--single", type=int, default=1_000, help="messages per one-by-one run (default 1000)")
    parser.add_argument("--batch", type=int, default=100, help="messages per batched call (default 100)")
    parser.add_argument("--keys", type=int, default=100, help="shard keys (default 100)")
    parser.add_argument(
        "--backends", default="memory,sqlite,redis", help="comma-separated, from memory,sqlite,redis"
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = sorted(set(names) - {"memory", "sqlite", "redis"})
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(unknown)}")

    print(
        f"{args.messages} messages in batches of {args.batch}, and {args.single} one per call; "
        f"{args.keys} keys, {len(PAYLOAD)}-byte payloads\n"
    )
    header = f"{'backend':<8} {'enqueue_many/s':>15} {'lease+ack_many/s':>17} {'enqueue/s':>10} {'lease+ack/s':>12}"
    print(header)
    print("-" * len(header))
    for name, url in backends(names):
        with sharded_broker.connect(url) as broker:
            enqueue_rate, lease_rate = batched(broker, args.messages, args.batch, args.keys)
            single_enqueue, single_lease = one_by_one(broker, args.single, args.keys)
        print(f"{name:<8} {enqueue_rate:>15,.0f} {lease_rate:>17,.0f} {single_enqueue:>10,.0f} {single_lease:>12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
