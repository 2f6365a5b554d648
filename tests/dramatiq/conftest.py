"""Fixtures for the Dramatiq adapter: a ShardedBroker per backend and a running Worker."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import dramatiq
import pytest

from sharded_broker.integrations.dramatiq import ShardedBroker

# Every test that takes `sharded_url` runs once per backend.
BACKENDS = ("memory", "sqlite", "redis")


def url_for(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "memory":
        return request.getfixturevalue("memory_url")
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/dramatiq.db"
    if backend == "redis":
        return request.getfixturevalue("redis_url")
    raise ValueError(backend)


@pytest.fixture(params=BACKENDS)
def sharded_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return url_for(request.param, request, tmp_path)


@pytest.fixture
def make_broker(sharded_url: str) -> Iterator[Callable[..., ShardedBroker]]:
    """``make_broker(**options)``: a ShardedBroker on this test's store, closed afterwards."""
    opened: list[ShardedBroker] = []

    def make(**options: Any) -> ShardedBroker:
        options.setdefault("visibility_timeout", 5.0)
        broker = ShardedBroker(url=sharded_url, **options)
        opened.append(broker)
        return broker

    yield make
    for broker in opened:
        broker.close()


@pytest.fixture
def broker(make_broker: Callable[..., ShardedBroker]) -> ShardedBroker:
    return make_broker()


@contextlib.contextmanager
def running_worker(broker: dramatiq.Broker, threads: int = 4) -> Iterator[dramatiq.Worker]:
    """An in-process dramatiq.Worker, stopped (gracefully) on exit."""
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(timeout=10_000)


class Recorder:
    """Thread-safe record of what actors did, and a check that no key ran twice at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: list[tuple[Any, ...]] = []
        self.running: set[Any] = set()
        self.overlaps: list[Any] = []

    @contextlib.contextmanager
    def running_key(self, key: Any) -> Iterator[None]:
        with self.lock:
            if key in self.running:
                self.overlaps.append(key)
            self.running.add(key)
        try:
            yield
        finally:
            with self.lock:
                self.running.discard(key)

    def add(self, *event: Any) -> None:
        with self.lock:
            self.done.append(event)

    def by_key(self) -> dict[Any, list[Any]]:
        """Second field of each event, grouped by the first, in completion order."""
        grouped: dict[Any, list[Any]] = {}
        with self.lock:
            for key, value, *_ in self.done:
                grouped.setdefault(key, []).append(value)
        return grouped


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def run_worker() -> Callable[..., contextlib.AbstractContextManager[dramatiq.Worker]]:
    """``with run_worker(broker, threads=4):`` an in-process Worker for the block."""
    return running_worker
