"""The engine per backend, against the physical limit of raw Redis, and how it scales.

The limit: pipelined ``LPUSH`` then pipelined ``RPOP`` of the same payloads on the run's
Redis server. No queue with atomic leases can beat it, so the engine's figures are quoted
as a fraction of it.

Engine rates: ``enqueue_many`` in batches of ``batch``, then ``lease(limit=lease_batch)`` +
``ack_many`` until the queue is empty (issue 11's full cycle: 500, 100). A *round trip* rate counts each message once for both halves
(messages / (enqueue time + drain time)), comparable with the raw LPUSH+RPOP pair rate.
"""

from __future__ import annotations

import cProfile
import itertools
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import sharded_broker
from sharded_broker import Message

from .common import PAYLOAD, Sizes, flush, rate, redis_client, stopwatch, used_memory
from .profiling import summary
from .server_cost import ServerMeter

QUEUE = "bench"
_store_names = itertools.count()


def raw_redis_limit(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    """Pipelined LPUSH of ``raw_pairs`` payloads, then pipelined RPOP of all of them
    (best of ``repeats``), and once more to read the server's time per command."""
    flush(redis_url)
    client = redis_client(redis_url)
    rounds, batch = sizes.raw_pairs // sizes.batch, sizes.batch
    popped = [0]

    def push() -> None:
        for _ in range(rounds):
            pipe = client.pipeline(transaction=False)
            for _ in range(batch):
                pipe.lpush("raw", PAYLOAD)
            pipe.execute()

    def pop() -> None:
        for _ in range(rounds):
            pipe = client.pipeline(transaction=False)
            for _ in range(batch):
                pipe.rpop("raw")
            popped[0] += sum(1 for item in pipe.execute() if item is not None)

    try:
        push_time, pop_time = best_of(sizes.repeats, push, pop)
        with server_time(redis_url) as push_server:
            push()
        with server_time(redis_url) as pop_server:
            pop()
    finally:
        client.close()
    moved = rounds * batch
    if popped[0] != moved * (sizes.repeats + 1):
        raise RuntimeError(f"raw Redis limit: pushed {moved * (sizes.repeats + 1)} payloads but popped {popped[0]}")
    return {
        "messages": moved,
        "enqueue_per_s": rate(moved, push_time),
        "drain_per_s": rate(moved, pop_time),
        "round_trip_per_s": rate(moved, push_time + pop_time),
        "server_us_per_enqueue": round(push_server[0] / moved, 2),
        "server_us_per_lease_ack": round(pop_server[0] / moved, 2),
        "one_per_call": raw_redis_one_per_call(redis_url, sizes.single_messages, sizes.repeats),
    }


def raw_redis_one_per_call(redis_url: str, count: int, repeats: int) -> dict[str, Any]:
    """LPUSH one payload per round trip, then RPOP one per round trip (best of ``repeats``)."""
    flush(redis_url)
    client = redis_client(redis_url)
    popped = [0]

    def push() -> None:
        for _ in range(count):
            client.lpush("raw", PAYLOAD)

    def pop() -> None:
        popped[0] += sum(1 for _ in range(count) if client.rpop("raw") is not None)

    try:
        push_time, pop_time = best_of(repeats, push, pop)
    finally:
        client.close()
    if popped[0] != count * repeats:
        raise RuntimeError(f"raw Redis one per call: pushed {count * repeats} payloads but popped {popped[0]}")
    return {
        "messages": count,
        "enqueue_per_s": rate(count, push_time),
        "drain_per_s": rate(count, pop_time),
        "round_trip_per_s": rate(count, push_time + pop_time),
    }


def backend_urls(redis_url: str | None, workdir: str) -> Iterator[tuple[str, Callable[[], str]]]:
    """(backend name, factory of a fresh empty URL) for every backend this run can reach."""
    yield "memory", lambda: f"memory://bench-{os.getpid()}-{next(_store_names)}"
    yield "sqlite", lambda: f"sqlite:///{os.path.join(workdir, f'bench-{next(_store_names)}.db')}"
    if redis_url is not None:

        def fresh_redis() -> str:
            flush(redis_url)
            return redis_url

        yield "redis", fresh_redis


def discard(backend: str, broker: sharded_broker.Broker) -> None:
    """Free what a measurement left behind before the next one starts.

    The memory backend's stores live as long as the process: purge it. The SQLite file
    goes with the run's temporary directory, and the Redis server is flushed by the next
    ``fresh_url()``: faster than ``purge``, which visits every message there (in chunks
    of 1,000, a thousand script calls at a million messages).
    """
    if backend == "memory":
        broker.purge(QUEUE)


def available_backends(redis_url: str | None, workdir: str, skipped: dict[str, str]) -> list[tuple[str, Callable[[], str]]]:
    """The backends whose module imports; the others are recorded in ``skipped``."""
    usable = []
    for name, fresh_url in backend_urls(redis_url, workdir):
        try:
            sharded_broker.broker.backend_class(f"{name}://")
        except ImportError as exc:
            skipped[f"engine/{name}"] = f"backend not importable: {exc}"
            continue
        usable.append((name, fresh_url))
    return usable


def keyed_messages(count: int, keys: int | None, start: int = 0) -> list[Message]:
    """``count`` messages spread round-robin over ``keys`` shard keys (None: unkeyed)."""
    if keys is None:
        return [Message(PAYLOAD) for _ in range(count)]
    return [Message(PAYLOAD, key=f"key-{(start + i) % keys}") for i in range(count)]


def enqueue_all(broker: sharded_broker.Broker, messages: list[Message], batch: int) -> None:
    """Enqueue in batches of ``batch``."""
    for offset in range(0, len(messages), batch):
        broker.enqueue_many(QUEUE, messages[offset : offset + batch])


def drain(broker: sharded_broker.Broker, count: int, batch: int, per_key: int) -> None:
    """Lease and ack ``count`` messages, ``batch`` per lease call."""
    done = 0
    while done < count:
        leases = broker.lease(QUEUE, limit=min(batch, count - done), per_key=per_key, wait=1.0)
        if not leases:
            raise RuntimeError(f"drain stalled after {done} of {count} messages")
        broker.ack_many(leases)
        done += len(leases)


def timed(work: Callable[[], None]) -> float:
    """Seconds ``work`` took."""
    with stopwatch() as elapsed:
        work()
    return elapsed[0]


def best_of(repeats: int, *phases: Callable[[], None]) -> list[float]:
    """Run the phases in order ``repeats`` times; each phase's shortest time.

    The shortest time is the one least disturbed by other processes on a shared
    machine (as ``timeit`` reports). Each round must leave the state it started from.
    """
    best = [float("inf")] * len(phases)
    for _ in range(repeats):
        for index, phase in enumerate(phases):
            best[index] = min(best[index], timed(phase))
    return best


def per_key_for(keys: int | None, batch: int) -> int:
    """Messages per key per lease call so that every call can fill ``batch``.

    With few keys and one message per key, a lease call could deliver at most ``keys``
    messages and the figure would measure round trips, not the engine's cost.
    """
    return 1 if keys is None else max(1, batch // keys)


def engine_rates(url: str, count: int, keys: int | None, batch: int, lease_batch: int, repeats: int) -> dict[str, Any]:
    """Enqueue ``count`` messages over ``keys`` keys, ``batch`` per call, then drain them,
    ``lease_batch`` per lease call, each call's leases acked in one ``ack_many`` (best of
    ``repeats``)."""
    messages = keyed_messages(count, keys)
    per_key = per_key_for(keys, lease_batch)
    with sharded_broker.connect(url) as broker:
        enqueue_seconds, drain_seconds = best_of(
            repeats,
            lambda: enqueue_all(broker, messages, batch),
            lambda: drain(broker, count, lease_batch, per_key),
        )
        left = broker.stats(QUEUE)
    if left.ready or left.leased:
        raise RuntimeError(f"{url}: {left.ready} ready and {left.leased} leased after the drain")
    return {
        "messages": count,
        "keys": keys,
        "batch": batch,
        "lease_batch": lease_batch,
        "per_key": per_key,
        "enqueue_per_s": rate(count, enqueue_seconds),
        "drain_per_s": rate(count, drain_seconds),
        "round_trip_per_s": rate(count, enqueue_seconds + drain_seconds),
    }


def engine_one_per_call(url: str, count: int, keys: int, repeats: int) -> dict[str, Any]:
    """``enqueue`` one message per call, then ``lease()`` + ``ack`` one per call (best of
    ``repeats``)."""
    with sharded_broker.connect(url) as broker:

        def enqueue() -> None:
            for i in range(count):
                broker.enqueue(QUEUE, PAYLOAD, key=f"key-{i % keys}")

        def lease_and_ack() -> None:
            for done in range(count):
                leases = broker.lease(QUEUE)
                if not leases:
                    raise RuntimeError(f"{url}: queue ran dry after {done} of {count} messages")
                broker.ack(leases[0])

        enqueue_seconds, drain_seconds = best_of(repeats, enqueue, lease_and_ack)
    return {
        "messages": count,
        "keys": keys,
        "enqueue_per_s": rate(count, enqueue_seconds),
        "drain_per_s": rate(count, drain_seconds),
        "round_trip_per_s": rate(count, enqueue_seconds + drain_seconds),
    }


def engine_vs_limit(
    backends: list[tuple[str, Callable[[], str]]], limit: dict[str, Any], sizes: Sizes, keys: int
) -> dict[str, Any]:
    """Each backend unkeyed and over ``keys`` keys, with the fraction of the raw Redis
    limit reached."""
    figures: dict[str, Any] = {}
    for name, fresh_url in backends:
        for label, key_count in (("unkeyed", None), ("keyed", keys)):
            result = engine_rates(
                fresh_url(), sizes.engine_messages, key_count, sizes.batch, sizes.lease_batch, sizes.repeats
            )
            for what in ("enqueue_per_s", "drain_per_s", "round_trip_per_s"):
                result[f"{what[:-6]}_fraction_of_limit"] = round(result[what] / limit[what], 4)
            figures[f"{name}/{label}"] = result
        result = engine_one_per_call(fresh_url(), sizes.single_messages, keys, sizes.repeats)
        result["round_trip_fraction_of_limit"] = round(
            result["round_trip_per_s"] / limit["one_per_call"]["round_trip_per_s"], 4
        )
        figures[f"{name}/keyed, one per call"] = result
    return figures


def scaling(
    backends: list[tuple[str, Callable[[], str]]],
    sizes: Sizes,
    redis_url: str | None = None,
    profiles: dict[str, Any] | None = None,
    figures: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Engine rates on top of a backlog, for each number of keys.

    For each (backlog, keys): enqueue the backlog (its rate is reported too), then time
    ``scaling_sample`` more enqueues and ``scaling_sample`` lease+acks on top of it (best
    of ``repeats``; each round leaves the backlog as it found it, FIFO aside). Flat
    rates across the number of keys and the backlog size are the goal (O(log n) cost).

    For Redis, the server's own time per message in each phase (``INFO commandstats``)
    is reported next to the rates. With ``profiles``, a further small sample of each
    phase runs under cProfile (after the timed ones, so they are not slowed) and its
    summary is stored there under the row's name. Rows go into ``figures`` (returned) as
    they are measured, so a failure keeps the rows measured before it.
    """
    figures = {} if figures is None else figures
    for name, fresh_url in backends:
        server = redis_url if name == "redis" else None
        for backlog in sizes.scaling_backlogs:
            for keys in sizes.scaling_keys:
                row_name = f"{name}/backlog={backlog}/keys={keys}"
                per_key = per_key_for(keys, sizes.batch)
                with sharded_broker.connect(fresh_url()) as broker:
                    backlog_messages = keyed_messages(backlog, keys)
                    preload_seconds = timed(lambda: enqueue_all(broker, backlog_messages, sizes.batch))
                    del backlog_messages
                    sample = keyed_messages(sizes.scaling_sample, keys, start=backlog)
                    enqueue_seconds = drain_seconds = enqueue_server = drain_server = float("inf")
                    for _ in range(sizes.repeats):  # best of: see best_of
                        with server_time(server) as spent:
                            enqueue_seconds = min(enqueue_seconds, timed(lambda: enqueue_all(broker, sample, sizes.batch)))
                        enqueue_server = min(enqueue_server, spent[0])
                        with server_time(server) as spent:
                            drain_seconds = min(drain_seconds, timed(lambda: drain(broker, sizes.scaling_sample, sizes.batch, per_key)))
                        drain_server = min(drain_server, spent[0])
                    stats = broker.stats(QUEUE)
                    if stats.ready != backlog:
                        raise RuntimeError(f"{name}: {stats.ready} ready after the sample, expected {backlog}")
                    if profiles is not None:
                        profiles[row_name] = profile_sample(broker, keys, backlog, sizes, per_key)
                    discard(name, broker)
                row = {
                    "backend": name,
                    "backlog": backlog,
                    "keys": keys,
                    "per_key": per_key,
                    "preload_per_s": rate(backlog, preload_seconds),
                    "enqueue_per_s": rate(sizes.scaling_sample, enqueue_seconds),
                    "drain_per_s": rate(sizes.scaling_sample, drain_seconds),
                }
                if server is not None:
                    row["server_us_per_enqueue"] = round(enqueue_server / sizes.scaling_sample, 2)
                    row["server_us_per_lease_ack"] = round(drain_server / sizes.scaling_sample, 2)
                figures[row_name] = row
    return figures


@contextmanager
def server_time(redis_url: str | None) -> Iterator[list[float]]:
    """Microseconds the Redis server spent executing the commands the block caused, each
    counted once (top-level commands, see :mod:`benchmarks.server_cost`); stays 0
    without a server."""
    spent = [0.0]
    if redis_url is None:
        yield spent
        return
    with ServerMeter(redis_url) as meter:
        yield spent
    spent[0] = meter.usec


def profile_sample(broker: sharded_broker.Broker, keys: int, backlog: int, sizes: Sizes, per_key: int) -> dict[str, str]:
    """cProfile summaries of a small enqueue sample and a small lease+ack sample."""
    count = max(1, sizes.scaling_sample // 5)
    messages = keyed_messages(count, keys, start=backlog + sizes.scaling_sample)
    summaries = {}
    for phase, work in (
        ("enqueue", lambda: enqueue_all(broker, messages, sizes.batch)),
        ("lease+ack", lambda: drain(broker, count, sizes.batch, per_key)),
    ):
        profiler = cProfile.Profile()
        profiler.enable()
        work()
        profiler.disable()
        summaries[phase] = summary([profiler], top=10)
    return summaries


def engine_memory_per_message(redis_url: str, sizes: Sizes, keys: int) -> dict[str, Any]:
    """Redis bytes per queued engine message (100-byte payload), unkeyed and keyed."""
    figures = {}
    for label, key_count in (("unkeyed", None), ("keyed", keys)):
        flush(redis_url)
        messages = keyed_messages(sizes.memory_messages, key_count)
        with sharded_broker.connect(redis_url) as broker:
            broker.enqueue_many(QUEUE, messages[:1])  # the queue's fixed structures are not per message
            before = used_memory(redis_url)
            for offset in range(1, len(messages), sizes.batch):
                broker.enqueue_many(QUEUE, messages[offset : offset + sizes.batch])
            after = used_memory(redis_url)
        figures[f"sharded-broker engine/{label}"] = round((after - before) / (len(messages) - 1), 1)
    return figures


def workdir() -> tempfile.TemporaryDirectory[str]:
    """Where the SQLite databases of one run live."""
    return tempfile.TemporaryDirectory(prefix="sharded-broker-bench-")
