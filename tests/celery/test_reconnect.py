"""A worker survives a Redis restart: it reconnects and keeps per-key order."""

from __future__ import annotations

import logging
import time

import sharded_broker
from celery import Celery
from celery.contrib.testing.worker import start_worker
from support.redis_server import RedisServer


def test_worker_reconnects_after_a_redis_restart(caplog, wait_until) -> None:
    done: list[int] = []
    with RedisServer(["--appendonly", "yes", "--appendfsync", "always"]) as server:
        app = Celery("reconnect", broker=f"sharded+{server.url}", set_as_current=False)
        app.conf.worker_hijack_root_logger = False

        @app.task(shared=False, shard_key="user")
        def step(user: str, seq: int) -> None:
            done.append(seq)

        caplog.set_level(logging.WARNING)
        with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=30):
            step.delay("u", 0)
            wait_until(lambda: done == [0], 10, "the first task")
            # Kill the server once the first task's late ack has landed (an ack cut off by
            # the kill is logged as an error and the task would run again: not this test).
            with sharded_broker.connect(server.url) as engine:
                wait_until(lambda: engine.stats("celery").leased == 0, 10, "the first task's ack")
            server.kill()
            time.sleep(0.5)  # the worker notices while the server is down
            server.start()
            for seq in (1, 2, 3):
                step.delay("u", seq)
            wait_until(lambda: len(done) == 4, 30, "the tasks sent after the restart")
        app.close()
    assert done == [0, 1, 2, 3]
    # Reconnecting logs "Cannot connect ... Trying again"; nothing else may go wrong.
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [e for e in errors if "Cannot connect" not in e], errors
