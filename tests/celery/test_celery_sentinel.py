"""A Celery worker over sharded+redis+sentinel://, with the master name and the Sentinels'
password given as kombu's sentinel:// transport takes them."""

from __future__ import annotations

import pytest
from celery.contrib.testing.worker import start_worker
from kombu import Connection

from sharded_broker.errors import ConfigurationError
from sharded_broker.integrations.celery import engine_url
from support.redis_sentinel import MASTER_NAME, SentinelGroup


def test_a_worker_runs_tasks_through_the_sentinels(make_app, sentinel_url: str, sentinel_group: SentinelGroup,
                                                   wait_until) -> None:
    # The master name from the transport options, as kombu's sentinel:// reads it.
    app = make_app(f"sharded+redis+sentinel://{sentinel_group.addresses}/0", master_name=MASTER_NAME,
                   wait_replicas=1)
    done: list[int] = []

    @app.task(shared=False, shard_key="user")
    def step(user, seq):
        done.append(seq)

    for seq in range(4):
        step.delay("u1", seq)
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=10):
        wait_until(lambda: len(done) == 4, 30, "all tasks")
    assert done == [0, 1, 2, 3]


def test_the_url_master_name_wins_and_sentinel_kwargs_are_checked(make_app, sentinel_group: SentinelGroup) -> None:
    connection = Connection(sentinel_group.url(scheme="sharded+redis+sentinel"), transport_options={"master_name": "x"})
    assert engine_url(connection.transport.client) == sentinel_group.url()
    assert connection.transport.engine_url == sentinel_group.url()  # ?master= kept, master_name ignored
    connection.release()
    with pytest.raises(ConfigurationError, match="sentinel_kwargs takes only 'password' and 'username'"):
        Connection(f"sharded+redis+sentinel://{sentinel_group.addresses}/0",
                   transport_options={"master_name": MASTER_NAME, "sentinel_kwargs": {"ssl": True}}).connect()
