"""A Celery worker over sharded+redis+cluster:// with wait_replicas: every write of the
producer and of the worker waited for on its slot's master."""

from __future__ import annotations

import redis
from celery.contrib.testing.worker import start_worker

from support.redis_cluster import RedisCluster


def test_a_worker_runs_tasks_over_a_cluster_with_wait_replicas(make_app, redis_cluster_url: str,
                                                               redis_cluster: RedisCluster, wait_until) -> None:
    for node in redis_cluster.primaries():
        admin: redis.Redis = redis_cluster.client(node)
        try:
            admin.config_resetstat()
        finally:
            admin.close()
    app = make_app(f"sharded+{redis_cluster_url}", wait_replicas=1)
    done: list[int] = []

    @app.task(shared=False, shard_key="user")
    def step(user, seq):
        done.append(seq)

    for seq in range(4):
        step.delay("u1", seq)
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=10):
        wait_until(lambda: len(done) == 4, 30, "all tasks")
    assert done == [0, 1, 2, 3]
    waits = 0
    for node in redis_cluster.primaries():
        client: redis.Redis = redis_cluster.client(node)
        try:
            waits += int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
        finally:
            client.close()
    assert waits >= 12  # 4 enqueues, 4 leases at least, 4 acks
