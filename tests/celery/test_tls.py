"""``sharded+rediss://`` end to end: Celery's ``broker_use_ssl`` reaches the Redis backend."""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker
from support.redis_server import RedisServer, free_port
from support.tls import make_ca, tls_server_args


def test_a_task_round_trip_over_rediss_with_broker_use_ssl(tmp_path: Path, wait_until) -> None:
    ca = make_ca(tmp_path)
    port = free_port()
    done: list[tuple[str, int]] = []
    with RedisServer([*tls_server_args(ca, port), "--bind", "127.0.0.1"]):
        app = Celery("tls", broker=f"sharded+rediss://localhost:{port}/0", set_as_current=False)
        app.conf.broker_use_ssl = {"ssl_ca_certs": str(ca.ca_cert)}
        app.conf.worker_hijack_root_logger = False

        @app.task(shared=False, shard_key="user")
        def step(user: str, seq: int) -> None:
            done.append((user, seq))

        for seq in range(3):
            step.delay("u", seq)
        with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=20):
            wait_until(lambda: len(done) == 3, 15, "three tasks over TLS")
        app.close()
    assert done == [("u", 0), ("u", 1), ("u", 2)]
