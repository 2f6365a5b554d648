from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import sharded_broker
from support.backends import BACKENDS, FakeClock, partition_options
from support.redis_cluster import RedisCluster
from support.redis_server import RedisServer
from support.redis_sentinel import SentinelGroup

# celery.contrib.pytest's fixtures (celery_app, celery_worker, ...), registered after
# pytest-celery's entry point: pytest-celery 1.x replaces celery_worker with a Docker
# container worker, and registering the module here brings back the in-process one.
pytest_plugins = ("celery.contrib.pytest", "pytester")


@pytest.fixture(autouse=True)
def _no_sharded_broker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SHARDED_BROKER_* variable of the shell running the tests reaches connect():
    a test that wants one sets it (monkeypatch.setenv)."""
    for name in [name for name in os.environ if name.startswith("SHARDED_BROKER_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One throwaway redis-server for the session; tests that share it flush it first."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One throwaway Redis Cluster (3 masters, 3 replicas) for the session; tests that share
    it flush it first (redis_cluster_url)."""
    with RedisCluster(masters=3, replicas_per_master=1) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisCluster) -> str:
    """``redis+cluster://`` on the session's cluster, flushed (data and functions) and ok."""
    redis_cluster.wait_ok()
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture(scope="session")
def sentinel_group() -> Iterator[SentinelGroup]:
    """One primary, one replica and three Sentinels for the session (a test may fail the
    primary over: it waits until the group is settled again)."""
    with SentinelGroup() as group:
        yield group


@pytest.fixture
def sentinel_url(sentinel_group: SentinelGroup) -> str:
    """The group's redis+sentinel:// URL, its primary flushed."""
    import redis

    with redis.Redis(port=sentinel_group.primary_port()) as primary:
        primary.flushall()
    return sentinel_group.url()


_memory_names = itertools.count()


@pytest.fixture
def memory_url() -> str:
    """A memory:// store of this test's own."""
    return f"memory://test-{next(_memory_names)}"


# -- backends by URL, each with a fake clock (tests/support/backends.py) --------------------

@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Each backend in turn."""
    return request.param


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def backend_url(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, private store for backend ``name``."""
    if name == "memory":
        return request.getfixturevalue("memory_url")
    if name == "sqlite":
        return f"sqlite:///{tmp_path}/q.db"
    if name == "redis":
        return request.getfixturevalue("redis_url")
    if name == "redis-cluster":
        return request.getfixturevalue("redis_cluster_url")
    raise ValueError(f"no such backend {name!r}")


@pytest.fixture
def broker_url(backend_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(backend_name, request, tmp_path)


@pytest.fixture
def connect(
    broker_url: str, clock: FakeClock, request: pytest.FixtureRequest
) -> Iterator[Callable[..., sharded_broker.Broker]]:
    """``connect(**options)``: another broker on this test's store and fake clock."""
    opened: list[sharded_broker.Broker] = []
    defaults = partition_options(broker_url, request)

    def open_broker(**options) -> sharded_broker.Broker:
        broker = sharded_broker.connect(broker_url, clock=clock, **{**defaults, **options})
        opened.append(broker)
        return broker

    yield open_broker
    for broker in opened:
        broker.close()


@pytest.fixture
def broker(connect: Callable[..., sharded_broker.Broker]) -> sharded_broker.Broker:
    """A broker with default settings on each backend in turn."""
    return connect()


@pytest.fixture
def aconnect(
    broker_url: str, clock: FakeClock, request: pytest.FixtureRequest
) -> Callable[..., "sharded_broker.aio.AsyncBroker"]:
    """``aconnect(**options)``: an AsyncBroker on this test's store and fake clock (closed by
    the test)."""
    import sharded_broker.aio

    defaults = partition_options(broker_url, request)

    def open_broker(**options: Any) -> sharded_broker.aio.AsyncBroker:
        return sharded_broker.aio.connect(broker_url, clock=clock, **{**defaults, **options})

    return open_broker
