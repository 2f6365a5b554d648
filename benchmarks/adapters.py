"""The adapters against the brokers users have today, with real in-process workers.

Four targets on the run's Redis server: Dramatiq ``RedisBroker`` and ``ShardedBroker``,
Celery's ``redis://`` transport and ``sharded+redis://``. Every target runs the same
no-op task with the same worker settings (``worker_threads`` threads: Dramatiq's
``Worker(worker_threads=...)``, Celery's ``threads`` pool with that concurrency), so the
only difference is the broker.

Enqueue rate: ``send`` / ``apply_async`` of N tasks one by one (neither framework has a
batch send). Drain rate: N / (last task's end - first task's start), so worker start-up
is not counted for anyone. Keyed runs spread the tasks over ``adapter_keys`` shard keys;
the plain brokers, which have no keys, run the very same tasks. Latency: tasks sent at a
steady rate while a worker runs; each records its start time minus its send time.

Redis server cost per task, for each phase (see :mod:`benchmarks.server_cost`): the
sending, and the worker's run from its start to its stop (fetch, ack, heartbeats and
idle polls included, so every command the drain caused is counted).
"""

from __future__ import annotations

import cProfile
import itertools
import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

from .common import PAYLOAD, Sizes, flush, percentile, rate, stopwatch, used_memory
from .profiling import profile_new_threads
from .server_cost import ServerMeter

TARGETS = ("dramatiq/RedisBroker", "dramatiq/ShardedBroker", "celery/redis", "celery/sharded+redis")
QUEUE = "bench"
_names = itertools.count()


class Recorder:
    """What the no-op task reports, from every worker thread."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.lock = threading.Lock()
        self.delays: list[float] = []  # start time - send time, per task
        self.first_start = 0.0
        self.last_end = 0.0
        self.all_done = threading.Event()

    def task_ran(self, sent_at: float) -> None:
        started = time.time()
        with self.lock:
            if not self.delays:
                self.first_start = started
            self.delays.append(started - sent_at)
            self.last_end = time.time()
            if len(self.delays) >= self.expected:
                self.all_done.set()

    def wait(self, timeout: float) -> None:
        if not self.all_done.wait(timeout):
            raise RuntimeError(f"only {len(self.delays)} of {self.expected} tasks ran within {timeout:.0f}s")


recorder = Recorder(0)  # replaced by each measurement; the task reports to the current one


def noop(index: int, key: str, sent_at: float, data: str = "") -> None:
    recorder.task_ran(sent_at)


class DramatiqTarget:
    def __init__(self, redis_url: str, sharded: bool, worker_threads: int) -> None:
        import dramatiq

        if sharded:
            from sharded_broker.integrations.dramatiq import ShardedBroker

            self.broker: Any = ShardedBroker(url=redis_url)
        else:
            from dramatiq.brokers.redis import RedisBroker

            self.broker = RedisBroker(url=redis_url)
        self.sharded = sharded
        self.worker_threads = worker_threads
        self.actor = dramatiq.actor(
            noop, broker=self.broker, actor_name=f"noop{next(_names)}", queue_name=QUEUE, max_retries=0
        )

    def send(self, index: int, key: str | None, data: str = "") -> None:
        args = (index, key or "", time.time(), data) if data else (index, key or "", time.time())
        if key is not None and self.sharded:
            self.actor.send_with_options(args=args, shard_key=key)
        else:
            self.actor.send(*args)

    @contextmanager
    def worker(self) -> Iterator[None]:
        import dramatiq

        worker = dramatiq.Worker(self.broker, worker_threads=self.worker_threads)
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    def close(self) -> None:
        self.broker.close()


class CeleryTarget:
    def __init__(self, redis_url: str, sharded: bool, worker_threads: int) -> None:
        from celery import Celery

        url = redis_url.replace("redis://", "sharded+redis://", 1) if sharded else redis_url
        self.app = Celery(f"bench{next(_names)}", broker=url, set_as_current=False)
        self.app.conf.update(
            task_ignore_result=True,
            task_default_queue=QUEUE,
            worker_hijack_root_logger=False,
            broker_connection_retry_on_startup=True,
        )
        self.task = self.app.task(name="bench.noop", ignore_result=True)(noop)
        self.sharded = sharded
        self.worker_threads = worker_threads

    def send(self, index: int, key: str | None, data: str = "") -> None:
        args = (index, key or "", time.time(), data) if data else (index, key or "", time.time())
        if key is not None and self.sharded:
            self.task.apply_async(args=args, shard_key=key)
        else:
            self.task.apply_async(args=args)

    @contextmanager
    def worker(self) -> Iterator[None]:
        from celery.contrib.testing.worker import start_worker

        with start_worker(
            self.app,
            pool="threads",
            concurrency=self.worker_threads,
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=30.0,
        ):
            yield

    def close(self) -> None:
        self.app.close()


def make_target(name: str, redis_url: str, worker_threads: int) -> DramatiqTarget | CeleryTarget:
    framework, _, broker = name.partition("/")
    sharded = "Sharded" in broker or "sharded" in broker
    cls = DramatiqTarget if framework == "dramatiq" else CeleryTarget
    return cls(redis_url, sharded, worker_threads)


def target_missing(name: str) -> str | None:
    """Why ``name`` cannot be measured in this checkout, or None when it can."""
    try:
        if name == "dramatiq/ShardedBroker":
            import sharded_broker.integrations.dramatiq  # noqa: F401
        elif name == "celery/sharded+redis":
            import sharded_broker.integrations.celery  # noqa: F401
        elif name.startswith("dramatiq"):
            import dramatiq  # noqa: F401
        else:
            import celery  # noqa: F401
    except ImportError as exc:
        return f"not importable: {exc}"
    return None


def key_for(index: int, keys: int | None) -> str | None:
    return None if keys is None else f"user-{index % keys}"


def enqueue_and_drain(
    name: str,
    redis_url: str,
    sizes: Sizes,
    keys: int | None,
    *,
    enqueue_profiler: cProfile.Profile | None = None,
    worker_profilers: list[cProfile.Profile] | None = None,
) -> dict[str, Any]:
    """Send ``adapter_tasks`` tasks, then drain them with a worker; the rates, and the
    Redis server's cost per task of each phase. With ``enqueue_profiler``, the sending
    runs under it; with ``worker_profilers``, every thread the worker starts gets a
    profiler, appended to that list."""
    global recorder
    flush(redis_url)
    count = sizes.adapter_tasks
    target = make_target(name, redis_url, sizes.worker_threads)
    try:
        recorder = Recorder(count)
        with ServerMeter(redis_url) as send_cost, stopwatch() as enqueue_seconds:
            if enqueue_profiler is not None:
                enqueue_profiler.enable()
            for index in range(count):
                target.send(index, key_for(index, keys))
            if enqueue_profiler is not None:
                enqueue_profiler.disable()
        profiling = profile_new_threads() if worker_profilers is not None else nullcontext([])
        with ServerMeter(redis_url) as drain_cost, profiling as profilers, target.worker():
            recorder.wait(timeout=60 + count / 50)
        if worker_profilers is not None:
            worker_profilers.extend(profilers)
    finally:
        target.close()
    send, drain = send_cost.figures(count), drain_cost.figures(count)
    return {
        "tasks": count,
        "keys": keys,
        "enqueue_per_s": rate(count, enqueue_seconds[0]),
        "drain_per_s": rate(count, recorder.last_end - recorder.first_start),
        "server": {
            "send": send,
            "fetch_ack": drain,
            "total": {what: round(send[what] + drain[what], 2)
                      for what in ("server_us", "cpu_us", "naive_sum_us", "commands_sent")},
        },
    }


def latency(name: str, redis_url: str, sizes: Sizes, keys: int | None) -> dict[str, Any]:
    """Enqueue-to-start delays of tasks sent at ``latency_rate`` per second."""
    global recorder
    flush(redis_url)
    count = max(1, int(sizes.latency_rate * sizes.latency_seconds))
    target = make_target(name, redis_url, sizes.worker_threads)
    try:
        recorder = Recorder(count)
        with target.worker():
            start = time.monotonic()
            for index in range(count):
                pause = start + index / sizes.latency_rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                target.send(index, key_for(index, keys))
            recorder.wait(timeout=60 + count / 50)
    finally:
        target.close()
    return {
        "tasks": count,
        "keys": keys,
        "rate_per_s": sizes.latency_rate,
        "p50_ms": round(percentile(recorder.delays, 0.50) * 1000, 2),
        "p99_ms": round(percentile(recorder.delays, 0.99) * 1000, 2),
    }


def memory_per_message(name: str, redis_url: str, sizes: Sizes, keys: int | None) -> float:
    """Redis bytes per queued task (no worker running), after the first one; each task
    carries a 100-byte argument, like the engine's 100-byte payloads."""
    flush(redis_url)
    target = make_target(name, redis_url, sizes.worker_threads)
    data = PAYLOAD.decode()
    try:
        target.send(0, key_for(0, keys), data)
        before = used_memory(redis_url)
        for index in range(1, sizes.memory_messages):
            target.send(index, key_for(index, keys), data)
        after = used_memory(redis_url)
    finally:
        target.close()
    return round((after - before) / (sizes.memory_messages - 1), 1)


@contextmanager
def quiet_frameworks() -> Iterator[None]:
    """Worker start/stop chatter would bury the report; the levels are put back after."""
    loggers = [logging.getLogger(name) for name in ("dramatiq", "celery", "kombu", "sharded_broker")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
