"""What every benchmark section shares: sizes, the throwaway Redis server, timing, results."""

from __future__ import annotations

import gc
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import redis

ROOT = Path(__file__).resolve().parent.parent
# The test suite's RedisServer is the one way this project starts a throwaway server.
sys.path.insert(0, str(ROOT / "tests"))
from support.redis_server import RedisServer  # noqa: E402

PAYLOAD = b"x" * 100  # what every engine-level message carries


@dataclass(frozen=True)
class Sizes:
    """How much work each section does; one instance per mode (tiny, quick, full)."""

    name: str
    raw_pairs: int  # raw Redis LPUSH/RPOP pairs
    engine_messages: int  # per backend, enqueue_many then lease+ack
    batch: int  # messages per enqueue_many call (and per lease call in the scaling rows)
    lease_batch: int  # messages per lease call of the engine's full cycle (issue 11, goal 3)
    repeats: int  # engine figures are the best of this many rounds
    single_messages: int  # per backend, one message per call (what a task-queue worker does)
    scaling_keys: tuple[int, ...]
    scaling_backlogs: tuple[int, ...]
    scaling_sample: int  # messages timed on top of each backlog
    memory_messages: int  # messages queued to measure Redis bytes per message
    adapter_tasks: int  # tasks enqueued then drained per adapter run
    adapter_keys: int
    worker_threads: int
    latency_rate: float  # tasks per second of the steady load
    latency_seconds: float
    seed_requests: int
    seed_threads: int
    sharq_jobs: int
    sharq_keys: int
    cluster_keys: int  # the scale-out section: one queue over 1 and 3 cluster masters
    cluster_messages: int  # engine full cycle, per topology
    cluster_tasks: int  # Dramatiq keyed drain, per topology


TINY = Sizes(
    name="tiny",
    raw_pairs=200,
    engine_messages=200,
    batch=50,
    lease_batch=20,
    repeats=1,
    single_messages=50,
    scaling_keys=(2, 60),
    scaling_backlogs=(100,),
    scaling_sample=50,
    memory_messages=100,
    adapter_tasks=40,
    adapter_keys=10,
    worker_threads=4,
    latency_rate=50.0,
    latency_seconds=0.5,
    seed_requests=200,
    seed_threads=4,
    sharq_jobs=100,
    sharq_keys=10,
    cluster_keys=60,
    cluster_messages=600,
    cluster_tasks=200,
)

QUICK = Sizes(
    name="quick",
    raw_pairs=50_000,
    engine_messages=10_000,
    batch=500,
    lease_batch=100,
    repeats=3,
    single_messages=3_000,
    scaling_keys=(10, 1_000, 10_000, 100_000),
    scaling_backlogs=(100_000,),
    scaling_sample=5_000,
    memory_messages=10_000,
    adapter_tasks=5_000,
    adapter_keys=1_000,
    worker_threads=8,
    latency_rate=100.0,
    latency_seconds=5.0,
    seed_requests=50_000,
    seed_threads=10,
    sharq_jobs=5_000,
    sharq_keys=100,
    cluster_keys=1_000,
    cluster_messages=30_000,
    cluster_tasks=3_000,
)

FULL = Sizes(
    name="full",
    raw_pairs=200_000,
    engine_messages=100_000,
    batch=500,
    lease_batch=100,
    repeats=3,
    single_messages=10_000,
    scaling_keys=(10, 1_000, 10_000, 100_000),
    scaling_backlogs=(100_000, 1_000_000),
    scaling_sample=20_000,
    memory_messages=100_000,
    adapter_tasks=20_000,
    adapter_keys=1_000,
    worker_threads=8,
    latency_rate=200.0,
    latency_seconds=20.0,
    seed_requests=200_000,
    seed_threads=50,
    sharq_jobs=20_000,
    sharq_keys=1_000,
    cluster_keys=1_000,
    cluster_messages=200_000,
    cluster_tasks=20_000,
)

MODES = {sizes.name: sizes for sizes in (TINY, QUICK, FULL)}


@dataclass
class Results:
    """Raw figures of one run, grouped by section; what the JSON file holds."""

    mode: str
    machine: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # what could not be measured, and why

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "machine": self.machine, "sections": self.sections, "skipped": self.skipped}


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """Yields a one-element list that holds the elapsed seconds once the block ends.

    The garbage collector is paused inside the block so one run's garbage does not land
    in the next measurement's time.
    """
    elapsed = [0.0]
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.perf_counter() - start
        gc.enable()


def rate(count: int, seconds: float) -> float:
    """Operations per second, rounded for the report."""
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (which must not be empty)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def flush(url: str) -> None:
    """Empty the run's Redis server between measurements so none sees another's data."""
    client = redis_client(url)
    client.flushall()
    client.close()


def used_memory(url: str) -> int:
    """Bytes Redis reports as used (``INFO memory`` ``used_memory``)."""
    client = redis_client(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()
