"""Fixtures that run Dramatiq's own broker-generic tests against ShardedBroker.

Copied next to Dramatiq's ``tests/`` package by ``scripts/dramatiq-reference`` (never
committed with them). ``stub_broker`` is a :class:`ShardedBroker` on the backend named by
``SHARDED_REFERENCE_BACKEND`` (memory, sqlite or redis); Redis stores and Redis result
backends live on one throwaway redis-server started for the session. Memcached and
RabbitMQ fixtures skip: those tests are about other brokers.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys

import types

import pytest
import redis

import dramatiq
from dramatiq import Worker
from dramatiq.rate_limits import backends as rl_backends
from dramatiq.results import backends as res_backends

sys.path.insert(0, os.environ["SHARDED_REFERENCE_SUPPORT"])  # the project's tests/ folder
from support.redis_server import RedisServer  # noqa: E402

from sharded_broker.integrations.dramatiq import ShardedBroker  # noqa: E402

try:
    import pika  # noqa: F401
except ImportError:
    # Some modules import RabbitmqBroker at the top; only its own tests use it.
    _rabbitmq = types.ModuleType("dramatiq.brokers.rabbitmq")

    class RabbitmqBroker:  # noqa: D101
        def __init__(self, *args, **kwargs):
            pytest.skip("RabbitMQ (pika) is not installed here")

    _rabbitmq.RabbitmqBroker = RabbitmqBroker
    sys.modules["dramatiq.brokers.rabbitmq"] = _rabbitmq

logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(threadName)s] [%(name)s] [%(levelname)s] %(message)s")

BACKEND = os.environ.get("SHARDED_REFERENCE_BACKEND", "memory")
_names = itertools.count()


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def sharded_url(request, tmp_path):
    if BACKEND == "memory":
        return f"memory://reference-{next(_names)}"
    if BACKEND == "sqlite":
        return f"sqlite:///{tmp_path}/reference.db"
    if BACKEND == "redis":
        request.getfixturevalue("redis_client")
        return request.getfixturevalue("redis_server").url
    raise ValueError(f"SHARDED_REFERENCE_BACKEND must be memory, sqlite or redis, not {BACKEND!r}")


@pytest.fixture()
def stub_broker(sharded_url):
    broker = ShardedBroker(url=sharded_url)
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    yield broker
    broker.flush_all()
    broker.close()


@pytest.fixture()
def stub_worker(stub_broker):
    worker = Worker(stub_broker, worker_timeout=100, worker_threads=32)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture()
def redis_broker():
    pytest.skip("RedisBroker test: not broker-generic")


@pytest.fixture()
def rabbitmq_broker():
    pytest.skip("RabbitmqBroker test: not broker-generic")


@pytest.fixture
def info_logging():
    logger = logging.getLogger()
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(logging.DEBUG)


@pytest.fixture
def start_cli():
    pytest.skip("CLI test: not broker-generic")


@pytest.fixture
def redis_rate_limiter_backend(redis_server, redis_client):
    return rl_backends.RedisBackend(url=redis_server.url)


@pytest.fixture
def stub_rate_limiter_backend():
    return rl_backends.StubBackend()


@pytest.fixture
def memcached_rate_limiter_backend():
    pytest.skip("memcached is not installed here")


@pytest.fixture(params=["redis", "stub"])
def rate_limiter_backend(request):
    return request.getfixturevalue(f"{request.param}_rate_limiter_backend")


@pytest.fixture
def redis_result_backend(redis_server, redis_client):
    return res_backends.RedisBackend(url=redis_server.url)


@pytest.fixture
def stub_result_backend():
    return res_backends.StubBackend()


@pytest.fixture
def memcached_result_backend():
    pytest.skip("memcached is not installed here")


@pytest.fixture
def result_backends(redis_result_backend, stub_result_backend):
    return {"redis": redis_result_backend, "stub": stub_result_backend}


@pytest.fixture(params=["redis", "stub"])
def result_backend(request):
    return request.getfixturevalue(f"{request.param}_result_backend")
