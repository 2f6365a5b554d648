from __future__ import annotations

import itertools
from typing import Iterator

import pytest

from support.redis_server import RedisServer


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


_memory_names = itertools.count()


@pytest.fixture
def memory_url() -> str:
    """A memory:// store of this test's own."""
    return f"memory://test-{next(_memory_names)}"
