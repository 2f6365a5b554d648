"""Celery batch tasks (``@app.task(base=BatchTask, batch=M)``) with real Celery workers:
ordered batches of one key, acked on success, the contract's ordered-batch failure
semantics, on every backend."""

from __future__ import annotations

import threading

import pytest
from celery.contrib.testing.worker import start_worker
from kombu import Queue

import sharded_broker
from sharded_broker.errors import ConfigurationError, InvalidArgument
from sharded_broker.integrations.celery import BatchFailed, BatchItem, BatchTask


def run_worker(app, pool="threads", concurrency=4):
    return start_worker(app, pool=pool, concurrency=concurrency, perform_ping_check=False, shutdown_timeout=20)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def engine_url(request, tmp_path) -> str:
    if request.param == "memory":
        return request.getfixturevalue("memory_broker_url").removeprefix("sharded+")
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/celery.db"
    return request.getfixturevalue("redis_url")


@pytest.fixture
def engine(engine_url: str):
    broker = sharded_broker.connect(engine_url)
    yield broker
    broker.close()


def assert_queue_empty(engine: sharded_broker.Broker, queue: str) -> None:
    stats = engine.stats(queue)
    assert (stats.ready, stats.delayed, stats.leased) == (0, 0, 0)


class Runs:
    """The batches a task was called with, from any thread, and key overlaps."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[list[tuple[str, int]]] = []
        self.done: list[tuple[str, int]] = []
        self.running: set[str] = set()
        self.overlaps: list[str] = []

    def start(self, items: list[BatchItem]) -> list[tuple[str, int]]:
        pairs = [(item.kwargs["user"], item.kwargs["n"]) for item in items]
        with self.lock:
            self.batches.append(pairs)
            if pairs[0][0] in self.running:
                self.overlaps.append(pairs[0][0])
            self.running.add(pairs[0][0])
        return pairs

    def end(self, key: str, done: list[tuple[str, int]]) -> None:
        with self.lock:
            self.running.discard(key)
            self.done.extend(done)

    def by_key(self) -> dict[str, list[int]]:
        grouped: dict[str, list[int]] = {}
        with self.lock:
            for key, n in self.done:
                grouped.setdefault(key, []).append(n)
        return grouped


def test_batches_are_consecutive_messages_of_one_key_in_order(make_app, engine_url, engine, wait_until):
    app = make_app(broker_url=f"sharded+{engine_url}", visibility_timeout=10)
    app.conf.task_routes = {"*.post": {"queue": "ledger"}}
    app.conf.task_queues = [Queue("ledger")]
    runs = Runs()

    @app.task(shared=False, base=BatchTask, batch=5, shard_key="user")
    def post(items):
        pairs = runs.start(items)
        assert all(isinstance(item, BatchItem) and item.id for item in items)
        runs.end(pairs[0][0], pairs)

    users = ["u1", "u2", "u3"]
    for n in range(12):
        for user in users:
            post.delay(user=user, n=n)
    with run_worker(app):
        wait_until(lambda: len(runs.done) == 36, 30, "every message")
        wait_until(lambda: engine.stats("ledger").leased == 0, 10, "every batch settled")

    assert runs.by_key() == {user: list(range(12)) for user in users}
    assert runs.overlaps == []
    for pairs in runs.batches:
        assert 1 <= len(pairs) <= 5 and len({user for user, _ in pairs}) == 1
        numbers = [n for _, n in pairs]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    assert max(len(pairs) for pairs in runs.batches) == 5  # queued before the worker: full batches
    assert_queue_empty(engine, "ledger")
    assert engine.stats("ledger").dead == 0


def test_a_failure_at_index_acks_the_earlier_retries_it_and_gives_back_the_later(make_app, engine_url, engine, wait_until):
    app = make_app(broker_url=f"sharded+{engine_url}", visibility_timeout=10)
    app.conf.task_default_queue = "steps"
    runs = Runs()
    failed_once: set[int] = set()

    @app.task(shared=False, base=BatchTask, batch=6, shard_key="user", default_retry_delay=0.05)
    def step(items):
        pairs = runs.start(items)
        done = []
        try:
            for index, (_, n) in enumerate(pairs):
                if n == 2 and n not in failed_once:
                    failed_once.add(n)
                    raise BatchFailed(index, ValueError("flaky"))
                done.append(pairs[index])
        finally:
            runs.end(pairs[0][0], done)

    for n in range(6):
        step.delay(user="k", n=n)
    with run_worker(app, concurrency=2):
        wait_until(lambda: len(runs.done) == 6, 20, "every message")
        wait_until(lambda: engine.stats("steps").leased == 0, 10, "every batch settled")

    first, *later = runs.batches
    assert first == [("k", n) for n in range(6)]
    assert [n for pairs in later for _, n in pairs] == [2, 3, 4, 5]  # 2 first, at the head of its key
    assert runs.by_key() == {"k": [0, 1, 2, 3, 4, 5]}
    assert_queue_empty(engine, "steps")
    minutes = engine.metrics("steps", 5)
    assert sum(m.retried for m in minutes) == 1  # only the failed message; the later ones were given back
    assert sum(m.acked for m in minutes) == 6
    assert engine.stats("steps").dead == 0


def test_a_message_failing_every_time_is_dead_lettered_and_its_key_moves_on(make_app, engine, engine_url, wait_until):
    app = make_app(broker_url=f"sharded+{engine_url}", visibility_timeout=10, max_deliveries=2)
    app.conf.task_default_queue = "charges"
    runs = Runs()

    @app.task(shared=False, base=BatchTask, batch=4, shard_key="user", default_retry_delay=0.05)
    def charge(items):
        pairs = runs.start(items)
        done = []
        try:
            for index, (_, n) in enumerate(pairs):
                if n == 1:
                    raise BatchFailed(index, RuntimeError("card declined"))
                done.append(pairs[index])
        finally:
            runs.end(pairs[0][0], done)

    for n in range(4):
        charge.delay(user="k", n=n)
    with run_worker(app, concurrency=2):
        wait_until(lambda: len(runs.done) == 3 and engine.stats("charges").dead == 1, 20, "the key to move on")
        wait_until(lambda: engine.stats("charges").leased == 0, 10, "every batch settled")

    assert runs.by_key() == {"k": [0, 2, 3]}
    [dead] = engine.dead_letters("charges")
    assert dead.attempts == 2
    assert dead.reason == "RuntimeError: card declined (message 1 of a batch of 3, after 2 deliveries)"
    assert_queue_empty(engine, "charges")


def test_another_exception_fails_the_batch_at_its_first_message(make_app, wait_until, engine_url, engine):
    app = make_app(broker_url=f"sharded+{engine_url}", visibility_timeout=10)
    app.conf.task_default_queue = "boom"
    runs: list[list[int]] = []

    @app.task(shared=False, base=BatchTask, batch=3, shard_key="user", default_retry_delay=0.05)
    def boom(items):
        runs.append([item.kwargs["n"] for item in items])
        if len(runs) == 1:
            raise KeyError("whole batch")

    for n in range(3):
        boom.delay(user="k", n=n)
    with run_worker(app, concurrency=1):
        wait_until(lambda: len(runs) == 2 and engine.stats("boom").leased == 0, 20, "the retry")
    assert runs == [[0, 1, 2], [0, 1, 2]]
    assert_queue_empty(engine, "boom")


def test_a_rejecting_app_dead_letters_the_failed_message_at_once(make_app, engine, engine_url, wait_until):
    app = make_app(broker_url=f"sharded+{engine_url}", visibility_timeout=10)
    app.conf.task_default_queue = "strict"
    app.conf.task_acks_on_failure_or_timeout = False  # Celery rejects a failed task's message
    seen: list[int] = []

    @app.task(shared=False, base=BatchTask, batch=3, shard_key="user")
    def strict(items):
        for index, item in enumerate(items):
            if item.kwargs["n"] == 0:
                raise BatchFailed(index, ValueError("malformed"))
            seen.append(item.kwargs["n"])

    for n in range(3):
        strict.delay(user="k", n=n)
    with run_worker(app, concurrency=1):
        wait_until(lambda: seen == [1, 2] and engine.stats("strict").leased == 0, 20, "the rest")
    [dead] = engine.dead_letters("strict")
    assert dead.attempts == 1
    assert dead.reason == "ValueError: malformed (message 1 of a batch of 3)"


def test_declaring_batch_tasks(make_app) -> None:
    app = make_app()

    with pytest.raises(ConfigurationError, match="the batch option needs base=BatchTask"):
        @app.task(shared=False, batch=5)
        def plain(items): ...

    for bad in (0, True, "5", 10_001):
        with pytest.raises(ConfigurationError, match="must be an int from 1 to 10000"):
            app.task(shared=False, base=BatchTask, batch=bad, name=f"bad{bad!r}")(lambda items: None)

    @app.task(shared=False, base=BatchTask, batch=5, shard_key="user_id")
    def sync(items):
        return [item.kwargs for item in items]

    assert sync([BatchItem("id-1", (), {"user_id": 1})]) == [{"user_id": 1}]  # called directly
    with pytest.raises(ConfigurationError, match="raise BatchFailed\\(index, error\\)"):
        sync.retry()

    sync.delay(user_id=42, text="hi")  # the key comes by keyword
    with pytest.raises(InvalidArgument, match="batch task .*sync' \\(its messages pass the key by keyword\\)"):
        sync.delay(42, "hi")
